"""`cnndsl bench`: time one network, side by side in one run on one GPU, as the triton
backend fused (cross-layer), fused at block level only and unfused, the reference backend (eager PyTorch: cuDNN convs) in NCHW and
in channels_last, and `torch.compile` of the reference; inference (a forward pass without
gradients, eval mode) and one training step (forward, loss, backward; a network without
class scores backpropagates a fixed random gradient of its output). Medians with p20/p80
from `triton.testing.do_bench`, which flushes the L2 cache between runs; with `graph=True`
the step is captured once as a CUDA graph and its replays are timed (launch-bound networks).

Each row also gives its fraction of the roofline: the fused plan's modelled bytes
(plan.traffic) at the copy bandwidth, or its FLOPs at the matmul rate in the same dtype,
whichever is slower, both measured in the same run (`ceilings`).

Precision is matched: with fp32 inputs, TF32 is on for every provider or for none
(`--tf32`), since Triton's `tl.dot` and cuDNN would otherwise differ.

`--groups` times each fused group instead (bench_groups.py); tables, CSV and plots are
bench_report.py's."""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import api, bench_report
from .errors import CnnInputError
from .limits import MAX_SIZE
from .plan import plan, traffic
from .shapes import buffers, macs, numel, params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("fused", "fused_block", "unfused", "eager", "eager_cl", "compile")
FUSE = {"fused": True, "fused_block": "block", "unfused": False}  # the triton providers' fusion levels
MODES = ("inference", "training")
COPY_BYTES = 1 << 30  # the copy that measures the memory bandwidth: 1 GiB read, 1 GiB written
MATMUL_N = 8192  # the square matmul that measures the arithmetic rate: 2 * 8192^3 FLOPs
GRAPH_WARMUP = 3  # steps run on a side stream before a CUDA graph captures one (autograd, cuDNN)


def gpu_timer(fn) -> tuple[float, float, float]:
    """(median, p20, p80) ms from do_bench, over at least ~10 runs whatever a run costs
    (do_bench repeats for `rep` ms: 100 ms would time a 50 ms step twice)."""
    import triton.testing
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    rep = min(max(100.0, 10 * once_ms), 2000.0)
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8]))


def host_timer(fn) -> tuple[float, float, float]:
    """One call timed by the host clock: for checking the plumbing on a CPU, not for numbers."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return ms, ms, ms


@dataclass(frozen=True)
class Setup:
    """Where and how a benchmark runs: the device, the timer (fn -> (median, p20, p80) ms), the
    compiler of the `compile` provider, whether steps replay as a CUDA graph, whether one
    untimed call comes first (compilation, autotuning, the eval fold), and the sizes of the
    ceiling measurements."""

    device: str = "cuda"
    timer: Callable = gpu_timer
    compiler: Callable = torch.compile
    graph: bool = False
    warmup: bool = True
    copy_bytes: int = COPY_BYTES
    matmul_n: int = MATMUL_N

    def free_memory(self) -> int | None:
        return torch.cuda.mem_get_info()[0] if self.device.startswith("cuda") else None

    def release(self) -> None:
        """Between providers: drop compiled graphs and cached blocks, so each starts alike."""
        torch._dynamo.reset()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu"


def cpu_setup() -> Setup:
    """Every stage on the CPU (the kernels in Triton's interpreter): one call per timing and
    none before it, the compile provider traced by dynamo only, small ceiling measurements.
    For plumbing checks: its times say nothing."""
    import functools
    return Setup(device="cpu", timer=host_timer, compiler=functools.partial(torch.compile, backend="eager"),
                 warmup=False, copy_bytes=1 << 20, matmul_n=64)


def _captured(fn, device: str):
    """`fn` captured as a CUDA graph after GRAPH_WARMUP runs on a side stream: its replay.
    Host-side work inside `fn` runs once, at capture: a dropout seed is drawn then, so the
    masks repeat on every replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(fn, setup: Setup, warm: bool = False) -> tuple[float, float, float]:
    """Time `fn` after one call outside the timing where the setup asks for it and the caller
    has not just made one (`warm`)."""
    if setup.warmup and not warm:
        fn()
    if setup.graph:
        fn = _captured(fn, setup.device)
    return setup.timer(fn)


def check_memory(net, batch: int, dtype_name: str, setup: Setup, training: bool = True) -> None:
    """Refuse, before allocating, a batch whose activations cannot fit the free device memory:
    every layer's output (and in training its gradient; again for a captured graph's pool)
    plus the weights three times (the model, their gradients, a folded or compiled copy)."""
    free = setup.free_memory()
    if free is None:
        return
    item = DTYPES[dtype_name].itemsize
    acts = batch * sum(numel(n.shape) for n in net.nodes) * item
    weights = sum(params(net, n) + buffers(net, n) for n in net.nodes[1:]) * item
    need = acts * (2 if training else 1) * (2 if setup.graph else 1) + 3 * weights
    if need > free:
        raise CnnInputError(f"bench: {net.name} at batch {batch} in {dtype_name} needs about {need / 2**30:,.1f} "
                            f"GiB on the GPU (every layer's output{' and its gradient' if training else ''}, "
                            f"the weights three times), more than the {free / 2**30:,.1f} GiB free on "
                            f"{setup.device_name()}; use a smaller --batch")


def ceilings(setup: Setup, dtype) -> dict:
    """The measured copy bandwidth (GB/s, bytes read plus written) and matmul rate (TFLOP/s)
    in `dtype`: the roofline's two ceilings, on random data, never replayed as a graph."""
    plain = replace(setup, graph=False)
    src = torch.randint(0, 256, (setup.copy_bytes,), dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), plain)[0]
    n = setup.matmul_n
    a, b = (torch.randn(n, n, device=setup.device).to(dtype) for _ in range(2))
    c = torch.empty_like(a)
    mm_ms = measure(lambda: torch.mm(a, b, out=c), plain)[0]
    return {"copy_gb_s": float(f"{2 * setup.copy_bytes / copy_ms / 1e6:.4g}"),
            "matmul_tflop_s": float(f"{2 * n**3 / mm_ms / 1e9:.4g}"), "copy_bytes": setup.copy_bytes, "matmul_n": n}


def modelled_work(net, batch: int, itemsize: int) -> dict[str, tuple[int, int]]:
    """{mode: (bytes, FLOPs)}: the fused plan's modelled traffic; 2 FLOPs per multiply-add, and
    a training step three times the forward's (backward: two GEMMs per forward GEMM)."""
    groups = plan(net, True).groups
    flops = 2 * batch * sum(macs(net, n) for n in net.nodes[1:])
    return {mode: (sum(traffic(net, g, batch, itemsize)[mode][0] for g in groups),
                   flops * (3 if mode == "training" else 1)) for mode in MODES}


def provider_model(net, provider: str, setup: Setup, dtype):
    """The module a provider times, with seeded random weights."""
    torch.manual_seed(0)
    if provider in FUSE:
        return api.compile(net, backend="triton", fuse=FUSE[provider], device=setup.device, dtype=dtype)
    model = api.compile(net, backend="torch", device=setup.device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if provider == "eager_cl" else model


def provider_step(model, provider: str, mode: str, x, target, dy, setup: Setup):
    """The timed callable: an inference forward, or zero_grad + forward + backward. A network
    whose output is not class scores backpropagates the fixed gradient `dy` instead of a loss."""
    if provider == "eager_cl":
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last) if dy.dim() == 4 else dy
    model.train(mode == "training")
    wrap = setup.compiler if provider == "compile" else (lambda f: f)
    if mode == "inference":
        forward = wrap(model)

        def infer():
            with torch.no_grad():
                forward(x)
        return infer
    if len(model.net.output_shape) == 1:
        loss = wrap(model.loss)
        backward = lambda: loss(x, target).backward()
    else:
        forward = wrap(model)
        backward = lambda: forward(x).backward(dy)

    def step():
        model.zero_grad(set_to_none=True)
        backward()
    return step


def inputs(net, batch: int, dtype, device) -> tuple:
    """(x, target, dy): a random input batch, class indices, and the output gradient that a
    network without class scores backpropagates in training."""
    torch.manual_seed(0)
    x = torch.randn(batch, *net.input_shape, device=device).to(dtype)
    target = torch.randint(0, net.output_shape[0], (batch,), device=device)
    return x, target, torch.randn(batch, *net.output_shape, device=device).to(dtype)


def versions(setup: Setup) -> dict:
    import triton
    return {"gpu": setup.device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "graph": setup.graph}


def run(net, batch: int, dtype_name: str, providers=PROVIDERS, modes=MODES, setup: Setup | None = None,
        roof: dict | None = None) -> list[dict]:
    """One row per provider and mode; `roof` (ceilings) is measured here unless given."""
    setup = setup or Setup()
    dtype = DTYPES[dtype_name]
    check_memory(net, batch, dtype_name, setup, "training" in modes)
    roof = roof or ceilings(setup, dtype)
    work = modelled_work(net, batch, dtype.itemsize)
    x, target, dy = inputs(net, batch, dtype, setup.device)
    shape = f"{batch}x{'x'.join(map(str, net.input_shape))}"
    rows = []
    for provider in providers:
        model = provider_model(net, provider, setup, dtype)
        for mode in modes:
            median, p20, p80 = measure(provider_step(model, provider, mode, x, target, dy, setup), setup)
            nbytes, flops = work[mode]
            floor = max(nbytes / roof["copy_gb_s"] / 1e6, flops / roof["matmul_tflop_s"] / 1e9)
            rows.append({"network": net.name, "provider": provider, "mode": mode, "dtype": dtype_name,
                         "shape": shape, "median_ms": round(median, 4), "p20_ms": round(p20, 4),
                         "p80_ms": round(p80, 4), "tflops": round(flops / median / 1e9, 2),
                         "model_bytes": nbytes, "flops": flops, "floor_ms": round(floor, 4),
                         "roofline_pct": round(100 * floor / median, 1), **roof, **versions(setup)})
        del model
        setup.release()
    return rows


def main(args, setup: Setup | None = None) -> int:
    """`cnndsl bench`: on the GPU unless `setup` says otherwise (the tests' CPU setup)."""
    from . import bench_groups
    net = api.parse(Path(args.file))  # errors in the file and the options come first, GPU or not
    if not 1 <= args.batch <= MAX_SIZE:
        raise CnnInputError(f"--batch must be from 1 to {MAX_SIZE:,}, got {args.batch}")
    if args.groups and args.providers:
        raise CnnInputError("--providers does not apply to --groups, which times fused, unfused and eager")
    if setup is None:
        if not torch.cuda.is_available():
            print("cnndsl bench needs a CUDA GPU: none is available here (torch.cuda.is_available() is False). "
                  "Use `cnndsl plan` for the kernels and modelled memory traffic without one.", file=sys.stderr)
            return 1
        setup = Setup()
    if args.cuda_graph and not setup.device.startswith("cuda"):
        raise CnnInputError(f"--cuda-graph needs a CUDA device, not {setup.device}")
    setup = replace(setup, graph=args.cuda_graph)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.groups:
        rows = bench_groups.run_groups(net, args.batch, args.dtype, setup=setup)
    else:
        rows = run(net, args.batch, args.dtype, tuple(args.providers or PROVIDERS), setup=setup)
    print(bench_report.to_json(rows) if args.json else
          (bench_report.groups_table if args.groups else bench_report.table)(rows))
    if args.csv:
        bench_report.write_csv(args.csv, rows)
    if args.plot:
        note = bench_report.plot(args.plot, rows)
        print(note or f"wrote {args.plot}", file=sys.stderr)
    return 0
