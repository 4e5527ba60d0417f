"""The stages of gpu_check.py that run in a worker process: each is a list of cases (plain
JSON-able dicts) and a function that runs one case and returns its result. On the GPU they
measure; with `dry_run` the same code runs on the CPU (Triton's interpreter) on a tiny
network, one call per timing, to check the plumbing in seconds.

Cases: `env` (the machine and the versions), `parity` (check_parity.py), `bench` (one
network and provider, inference and a training step, through cnndsl.bench), `profile` (the
most expensive kernels of a training step) and `groups` (cnndsl.bench_groups, one mode)."""

import datetime
import hashlib
import platform
import subprocess
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETS = Path("benchmarks/nets")
EXAMPLES = Path("examples")
DTYPE = "bf16"  # the benchmarks'; parity runs fp32 (TF32 off) and bf16

# (name, .cnn file relative to the repository, batch)
BENCH = (("conv_block_56", NETS / "conv_block_56.cnn", 64), ("conv_bn_relu_28", NETS / "conv_bn_relu_28.cnn", 128),
         ("cifar_small", EXAMPLES / "cifar_small.cnn", 256), ("resnet18", EXAMPLES / "resnet18.cnn", 64),
         ("vgg16_bn", NETS / "vgg16_bn.cnn", 32))
PARITY = (("cifar_small", EXAMPLES / "cifar_small.cnn", 64), ("resnet18", EXAMPLES / "resnet18.cnn", 8),
          ("vgg16", EXAMPLES / "vgg16.cnn", 2))
GRAPHED = ("fused", "unfused", "eager")  # cifar_small's providers also timed as CUDA graph replays
PROFILED = ("resnet18", EXAMPLES / "resnet18.cnn", 64)
DRY = ("tiny", NETS / "tiny.cnn", 2)  # stands in for every network in a dry run
PROVIDERS = ("fused", "eager", "fused_block", "unfused", "eager_cl", "compile")  # the order the bench stage runs them
TOP_KERNELS = 15
PROFILE_STEPS = 3  # profiled training steps, after as many unprofiled ones


def _case(net: tuple, label: str, **kw) -> dict:
    name, file, batch = net
    return {"name": f"{name} {label}", "file": str(file), "batch": batch, **kw}


def cases(stage: str, dry_run: bool) -> list[dict]:
    """The stage's cases in the order they run (the most telling first, for a spent budget)."""
    nets = [DRY] if dry_run else None
    if stage == "env":
        return [{"name": "env"}]
    if stage == "parity":  # every network fused before any unfused; a dry run: each dtype and plan once
        return [_case(net, f"{d} {'fused' if fuse else 'unfused'}", dtype=d, fuse=fuse) for fuse in (True, False)
                for d in ("bf16", "fp32") for net in nets or PARITY if not dry_run or fuse == (d == "bf16")]
    if stage == "bench":  # then the launch-bound network's steps as CUDA graphs; torch.compile last
        plain = [_case(net, p, provider=p, graph=False) for p in PROVIDERS if p != "compile" for net in nets or BENCH]
        graphs = [_case(net, f"{p} graph", provider=p, graph=True) for p in GRAPHED for net in BENCH
                  if net[0] == "cifar_small" and not dry_run]
        return plain + graphs + [_case(net, "compile", provider="compile", graph=False) for net in nets or BENCH]
    if stage == "profile":
        return [_case(nets[0] if dry_run else PROFILED, p, provider=p) for p in ("fused", "eager")]
    if stage == "groups":
        return [_case(nets[0] if dry_run else PROFILED, m, mode=m) for m in ("inference", "training")]
    raise ValueError(f"unknown stage {stage!r}")


def networks(dry_run: bool) -> list[Path]:
    """Every .cnn file the stages read, to parse before any device time is spent."""
    return sorted({DRY[1]} if dry_run else {f for _, f, _ in (*BENCH, *PARITY, PROFILED)})


class Context:
    """What the cases of one worker share: the bench Setup and the measured ceilings."""

    def __init__(self, dry_run: bool):
        from cnndsl import bench
        self.dry_run = dry_run
        self.setup = bench.cpu_setup() if dry_run else bench.Setup()
        self.roofs = {}

    def roof(self, dtype_name: str) -> dict:
        from cnndsl import bench
        if dtype_name not in self.roofs:
            self.roofs[dtype_name] = bench.ceilings(self.setup, bench.DTYPES[dtype_name])
        return self.roofs[dtype_name]


def run_case(stage: str, case: dict, ctx: Context) -> dict:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if stage == "env":
        return env()
    import cnndsl
    net = cnndsl.parse(ROOT / case["file"])
    if stage == "parity":
        from check_parity import parity
        return parity(net, case["batch"], case["dtype"], case["fuse"], ctx.setup.device)
    if stage == "bench":
        from cnndsl import bench
        setup = replace(ctx.setup, graph=case["graph"])
        return {"rows": bench.run(net, case["batch"], DTYPE, (case["provider"],), setup=setup, roof=ctx.roof(DTYPE))}
    if stage == "profile":
        return profile(net, case["batch"], case["provider"], ctx)
    if stage == "groups":
        from cnndsl import bench_groups
        return {"rows": bench_groups.run_groups(net, case["batch"], DTYPE, (case["mode"],), ctx.setup)}
    raise ValueError(f"unknown stage {stage!r}")


def recover() -> bool:
    """After a case's error: free what it left (the models its frames held, compiled graphs)
    and say whether the GPU still runs work (an illegal address poisons the process)."""
    import gc

    import torch
    gc.collect()
    torch._dynamo.reset()
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.empty_cache()
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        return False
    return True


# --- env ----------------------------------------------------------------------------------------

def _nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__}: {err})"
    return out.stdout.strip() or f"unknown (nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]})"


def _stale(installed: Path, tree: Path, pattern: str) -> list[str]:
    """Files of the tree whose installed copy differs or is missing (a stale wheel)."""
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return [str(p.relative_to(ROOT)) for p in sorted(tree.glob(pattern))
            if digest(p) != digest(installed / p.relative_to(tree))]


def env() -> dict:
    import numpy
    import torch
    import triton

    import cnndsl
    import cnndsl.grammar
    import cnndsl.kernels
    package, kernels = Path(cnndsl.__file__).parent, Path(cnndsl.kernels.__file__).parent
    grammar = Path(next(iter(cnndsl.grammar.__path__)))
    stale = (_stale(package, ROOT / "cnndsl", "**/*.py") + _stale(kernels, ROOT / "kernels", "*.py")
             + _stale(grammar, ROOT / "grammar", "*.lark"))
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "numpy": numpy.__version__,
            "cnndsl": cnndsl.__version__, "cnndsl_from": str(package), "stale_files": stale[:20],
            "nvidia_smi": _nvidia_smi(), "gpu": "none (CPU)"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return info


# --- profile ------------------------------------------------------------------------------------

def profile(net, batch: int, provider: str, ctx: Context) -> dict:
    """The TOP_KERNELS kernels of a training step by self time (CPU ops in a dry run)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from cnndsl import bench
    setup, gpu = ctx.setup, ctx.setup.device.startswith("cuda")
    dtype = bench.DTYPES[DTYPE]
    bench.check_memory(net, batch, DTYPE, setup)
    model = bench.provider_model(net, provider, setup, dtype)
    step = bench.provider_step(model, provider, "training", *bench.inputs(net, batch, dtype, setup.device), setup)
    steps = 1 if ctx.dry_run else PROFILE_STEPS
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(steps):
        step()
    sync()
    with profiler(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        for _ in range(steps):
            step()
        sync()
    kind, self_us = (DeviceType.CUDA, "self_device_time_total") if gpu else (DeviceType.CPU, "self_cpu_time_total")
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, self_us) > 0]
    total = sum(getattr(e, self_us) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, self_us), reverse=True)[:TOP_KERNELS]
    del model
    setup.release()
    return {"network": net.name, "provider": provider, "batch": batch, "dtype": DTYPE, "steps": steps,
            "unit": "GPU kernels" if gpu else "CPU ops (dry run: no GPU)", "total_ms": round(total / steps / 1e3, 4),
            "kernels": [{"name": e.key[:200], "calls": round(e.count / steps, 2),
                         "ms": round(getattr(e, self_us) / steps / 1e3, 4),
                         "pct": round(100 * getattr(e, self_us) / total, 1)} for e in top]}
