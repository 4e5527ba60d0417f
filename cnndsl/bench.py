"""`cnndsl bench`: time one network, side by side in one run on one GPU, as the triton
backend fused and unfused, the reference backend (eager PyTorch: cuDNN convs) and
`torch.compile` of the reference; inference (a forward pass without gradients, eval
mode) and one training step (forward, loss, backward). Medians with p20/p80 from
`triton.testing.do_bench`, which flushes the L2 cache between runs.

Precision is matched: with fp32 inputs, TF32 is on for every provider or for none
(`--tf32`), since Triton's `tl.dot` and cuDNN would otherwise differ."""

import csv
import json
import sys
from pathlib import Path

import torch

from . import api
from .errors import CnnInputError
from .shapes import macs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("fused", "unfused", "eager", "compile")


def _model(net, provider: str, dtype):
    if provider in ("fused", "unfused"):
        return api.compile(net, backend="triton", fuse=provider == "fused", device="cuda", dtype=dtype)
    return api.compile(net, backend="torch", device="cuda", dtype=dtype)


def _step(model, provider: str, mode: str, x, target):
    compiled = provider == "compile"
    model.train(mode == "training")
    if mode == "training":
        loss = torch.compile(model.loss) if compiled else model.loss

        def step():
            model.zero_grad(set_to_none=True)
            loss(x, target).backward()
        return step
    forward = torch.compile(model) if compiled else model

    def infer():
        with torch.no_grad():
            forward(x)
    return infer


def run(net, batch: int, dtype_name: str, providers=PROVIDERS, modes=("inference", "training")) -> list[dict]:
    import triton
    dtype = DTYPES[dtype_name]
    x = torch.randn(batch, *net.input_shape, device="cuda", dtype=dtype)
    target = torch.randint(0, net.output_shape[0], (batch,), device="cuda")
    flops = 2 * batch * sum(macs(net, n) for n in net.nodes[1:])
    rows = []
    for provider in providers:
        model = _model(net, provider, dtype)
        for mode in modes:
            step = _step(model, provider, mode, x, target)
            step()  # compile, autotune and fold outside the timing
            median, p20, p80 = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
            work = flops * (3 if mode == "training" else 1)  # backward: two GEMMs per forward GEMM
            rows.append({"network": net.name, "provider": provider, "mode": mode, "dtype": dtype_name,
                         "shape": f"{batch}x{'x'.join(map(str, net.input_shape))}",
                         "median_ms": round(median, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
                         "tflops": round(work / median / 1e9, 2), "gpu": torch.cuda.get_device_name(),
                         "torch": torch.__version__, "triton": triton.__version__})
    return rows


def table(rows: list[dict]) -> str:
    """Medians per provider and mode, with each provider's speed relative to eager."""
    eager = {r["mode"]: r["median_ms"] for r in rows if r["provider"] == "eager"}
    lines = [f"{'provider':<9} {'mode':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'vs eager':>9}"]
    for r in rows:
        rel = f"{eager[r['mode']] / r['median_ms']:.2f}x" if r["mode"] in eager else "-"
        lines.append(f"{r['provider']:<9} {r['mode']:<10} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} "
                     f"{r['p80_ms']:>9.3f} {r['tflops']:>8.1f} {rel:>9}")
    first = rows[0]
    lines.append(f"{first['network']} {first['shape']} {first['dtype']} on {first['gpu']} "
                 f"(torch {first['torch']}, triton {first['triton']})")
    return "\n".join(lines)


def main(args) -> int:
    net = api.parse(Path(args.file))  # errors in the file come first, GPU or not
    if not torch.cuda.is_available():
        print("cnndsl bench needs a CUDA GPU: none is available here (torch.cuda.is_available() is False). "
              "Use `cnndsl plan` for the kernels and modelled memory traffic without one.", file=sys.stderr)
        return 1
    if args.batch < 1:
        raise CnnInputError(f"--batch must be at least 1, got {args.batch}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    rows = run(net, args.batch, args.dtype)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    if args.csv:
        with open(args.csv, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if f.tell() == 0:
                writer.writeheader()
            writer.writerows(rows)
    return 0
