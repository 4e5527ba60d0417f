"""Recording what cnndsl's networks launch, as a GPU process would launch it, without a GPU,
and running the compile workers on the recording (shared by tests/test_hopper_compile.py,
tests/test_hopper_speed.py and benchmarks/hopper_report.py).

1. Record. Under Triton's interpreter, `InterpretedFunction.run` is wrapped so that every
   launch records its kernel (module and name), the value of every argument (tensors as
   dtype and pointer alignment; ints, floats, None, bools, strings and tl dtypes as they
   are; the autotuner's interpreter config among them) and the launch options (num_warps,
   ...). With execute=False the launch returns without running the kernel: the outputs
   are garbage, but every shape flows through allocation and no launch argument depends
   on tensor values, so a network too large for the interpreter (resnet18 at 224x224)
   records in seconds.
2. What a GPU launches instead: while recording, the launchers see the GPU's values of
   the kernel modules' constants and INTERPRET-dependent helpers (tests/hopper_gpu.py).
3. Compile: `run_worker` runs a compile worker (a script using tests/hopper_jit.py) in a
   subprocess as a GPU process; `measure` runs tests/hopper_measure.py on a recording."""

import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hopper_gpu import MODULES, gpu_patches, gpu_view

import cnndsl

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def kernel_objects(module):
    """name -> kernel object (JITFunction, InterpretedFunction or an Autotuner around one) for
    the `_..._kernel` names that `module` defines."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_") and name.endswith("_kernel") and isinstance(
                obj, (JITFunction, InterpretedFunction, Autotuner)):
            fn = obj
            while hasattr(fn, "fn"):
                fn = fn.fn
            if getattr(fn, "__module__", None) == module.__name__:
                found[name] = obj
    return found


def encode(value):
    """A launch argument as JSON for the compile subprocess."""
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        value = value.value
    gpu_values = getattr(value, "gpu_values", None)
    if gpu_values is not None:
        return {"gpu_values": [encode(v) for v in gpu_values]}
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "offset": value.data_ptr() % 16}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, float):
        return {"float": repr(value)}  # inf and nan survive
    if isinstance(value, (bool, int, str, type(None))):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}: {value!r}")


class Recorder:
    """The distinct launches; with callers=True each also names the kernel package's functions on
    the stack when it was made (innermost first: `_launch_conv`, `conv2d_backward_input`, ...),
    which tell a forward launch from a gradient's where the kernel is the same."""

    def __init__(self, callers=False):
        self.launches = {}  # JSON key -> launch
        self.callers = callers

    def record(self, kernel, args, kwargs):
        fn = kernel.fn
        names = kernel.arg_names
        values = dict(zip(names, args))
        values.update((k, v) for k, v in kwargs.items() if k in names)
        for k, p in inspect.signature(fn).parameters.items():
            if k not in values and p.default is not inspect.Parameter.empty:
                values[k] = p.default
        launch = {"module": fn.__module__, "kernel": fn.__name__,
                  "args": {k: encode(values[k]) for k in names},
                  "options": {k: encode(v) for k, v in kwargs.items() if k not in names}}
        if self.callers:
            launch["callers"] = _kernel_callers()
        key = json.dumps(launch, sort_keys=True)
        self.launches.setdefault(key, launch)


def _kernel_callers():
    """The kernel package's functions on the stack above Recorder.record's caller, innermost first."""
    names, frame = [], sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("cnndsl.kernels."):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def train_and_eval(src, dtype, fuse=True, batch=2, evaluate=True, input_grad=True):
    """A training step (forward, loss, backward) and an eval forward of `src`, fused or not;
    input_grad=False leaves the input without a gradient, as in a real training step."""
    torch.manual_seed(0)
    model = cnndsl.compile(src, backend="triton", fuse=fuse, device="cpu").to(dtype)
    net = model.net
    x = torch.randn(batch, *net.input_shape).to(dtype).requires_grad_(input_grad)
    target = torch.randint(0, net.output_shape[0], (batch,))
    model.train()
    model.loss(x, target).backward()
    if evaluate:
        model.eval()
        with torch.no_grad():
            model(x.detach())


def record_networks(names, dtypes, batch):
    """`record` (kernels skipped, callers named) of a training step (no gradient for the input
    images) and an eval forward of each examples/NAME.cnn in each dtype at `batch`."""
    def drive():
        for dtype in dtypes:
            for name in names:
                train_and_eval(ROOT / "examples" / f"{name}.cnn", dtype, batch=batch, input_grad=False)
    return record(drive, execute=False, callers=True)


def record(drive, execute=True, callers=False):
    """(launches, GPU constants substituted, kernels defined: {(module, name)}, seconds) of
    `drive()`; execute=False skips every kernel (see the module's docstring), callers=True
    names the launchers (see Recorder)."""
    from triton.runtime.interpreter import InterpretedFunction
    modules = {name: importlib.import_module(f"cnndsl.kernels.{name}") for name in MODULES}
    defined = {(m.__name__, name) for m in modules.values() for name in kernel_objects(m)}
    recorder = Recorder(callers)
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            recorder.record(self, args, kwargs)
        if execute:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    start = time.perf_counter()
    with ExitStack() as stack:
        changed = gpu_patches(stack, modules, gpu_view())
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(InterpretedFunction, "run", recording_run)
        drive()
    return list(recorder.launches.values()), changed, defined, time.perf_counter() - start


def run_worker(script, args, tmp_path, timeout=3600):
    """(the finished process, seconds) of the compile worker `script` run with `args` as a GPU
    process runs it: TRITON_INTERPRET=0, a fresh Triton cache under tmp_path, reads of
    non-constexpr globals refused (the GPU default), tests/ on the path for hopper_jit."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    return proc, time.perf_counter() - start


def measure(launches, select, yardstick, tmp_path, processes=None, same_tile=False):
    """(results, seconds) of tests/hopper_measure.py for `launches` (recorded with callers), its
    `select` rule, the tutorial's `yardstick` config and `same_tile` switch, in `processes`
    compile processes (default: CNNDSL_HOPPER_PROCESSES, else 2)."""
    if processes is None:
        processes = int(os.environ.get("CNNDSL_HOPPER_PROCESSES", min(2, os.cpu_count() or 1)))
    request, out = tmp_path / "request.json", tmp_path / "measured.json"
    request.write_text(json.dumps({"launches": launches, "select": select, "yardstick": yardstick,
                                   "processes": processes, "same_tile": same_tile}))
    proc, seconds = run_worker(TESTS / "hopper_measure.py", [request, out], tmp_path)
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring subprocess failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}")
    return json.loads(out.read_text()), seconds


def nvidia_backend_or_skip():
    """Skip unless Triton's NVIDIA backend, the JIT internals that tests/hopper_jit.py reuses and
    ptxas are there."""
    try:
        import triton.backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        pytest.skip(f"Triton's NVIDIA backend is not available: {err}")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton's JIT has no binder to reuse: {err}")
    if not hasattr(JITFunction, "_pack_args"):
        pytest.skip("this Triton's JITFunction has no _pack_args to reuse")
    from hopper_jit import TARGET
    try:
        path = get_ptxas(TARGET[1]).path
    except Exception as err:  # noqa: BLE001 - any way of not finding it
        pytest.skip(f"ptxas is not available: {err}")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"ptxas is not available ({path!r})")
