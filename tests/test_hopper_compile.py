"""Every kernel launch that cnndsl's networks make, compiled for a Hopper GPU (sm_90)
without one: bugs that only a GPU compile shows (a plain-int global read inside
@triton.jit code, a bf16 `tl.dot`, a tile that does not fit) stay invisible to the
interpreter tests.

1. Record: under Triton's interpreter, `InterpretedFunction.run` is wrapped so that every
   launch records its kernel (module and name) and the value of every argument: tensors
   as their dtype and pointer alignment, ints, floats, None, bools, strings and tl dtypes
   as they are, plus the launch options (num_warps, ...). The launches come from a training
   step (forward, loss, backward) and an eval forward of RESIDUAL and EVERYTHING (from
   test_triton_backend, EVERYTHING with its dropout layer) in fp32 and bf16, fused and
   unfused; one fp32 training step of examples/cifar_small.cnn (its forward in eval is the
   same launches; bf16 cifar_small would add a minute of interpreter time and no kernel
   that the small networks do not record in bf16); and direct launcher calls for what the
   networks do not reach: the dense and conv epilogues of every activation, rows wider
   than softmax's widest block, a seed past int32 for dropout, the cumulative (momentum=None)
   BatchNorm update.
2. What a GPU would launch instead: a second copy of the kernel package, imported as a GPU
   process imports it (TRITON_INTERPRET=0), gives the GPU's value of every module constant
   that depends on the interpreter (e.g. batchnorm's merge tiles), which the launchers use
   while recording, and of every helper function that reads `INTERPRET` (dot_dtype gives
   bf16 `tl.dot` operands on a GPU, fp32 under the interpreter; dot_precision "tf32" or
   "ieee" as torch's TF32 switch says, both compiled), whose results are tagged with their
   GPU values so that the compile uses those.
3. Compile: one subprocess (TRITON_INTERPRET=0, a fresh Triton cache) imports the kernel
   modules (real JITFunctions), turns each recorded launch into the signature, constexprs
   and divisibility attributes that `JITFunction.run` would compute (Triton's own binder
   and `_pack_args`, so ints equal to 1 become constexprs and ints pick i32/i64 as on a
   GPU) and compiles it with `triton.compile` for GPUTarget("cuda", 90, 32), through
   ptxas to a cubin, in a pool of two processes. An autotuned kernel is compiled with each
   of its GPU configs (`tuner.gpu_configs`) in place of the interpreter's config.
   Budget: every specialisation is compiled with the first GPU config and, for one
   specialisation per kernel and pointer dtype, with every GPU config; the full product
   (every specialisation x every config) is about six times as many compiles. Set
   CNNDSL_HOPPER_ALL_CONFIGS=1 to compile the full product.

A second test checks that the recording covers every `_..._kernel` defined in kernels/*.py,
so that a new kernel cannot escape the compile."""

import importlib
import importlib.util
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

import cnndsl
import cnndsl.kernels  # before triton: decides TRITON_INTERPRET
from test_triton_backend import EVERYTHING, RESIDUAL

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path(cnndsl.kernels.__file__).resolve().parent
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if not p.stem.startswith("__"))
TARGET = ("cuda", 90, 32)


def _kernel_objects(module):
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


# --- the GPU view -------------------------------------------------------------------------


class _GpuStr(str):
    """A string launch argument whose GPU value differs: `gpu_values` lists them."""


_GPU_DTYPES = {}  # tl.dtype class -> its tagged subclass


def _gpu_tagged(value, gpu_values):
    """`value` (the interpreter's) tagged with the GPU's values, or as it is where they agree
    or the type cannot carry a tag."""
    import triton.language as tl
    if gpu_values == [value]:
        return value
    if isinstance(value, str):
        tagged = _GpuStr(value)
    elif isinstance(value, tl.dtype):
        cls = _GPU_DTYPES.setdefault(type(value), type("_GpuDtype", (type(value),), {}))
        tagged = cls(value.name)
    else:
        return value
    tagged.gpu_values = gpu_values
    return tagged


def _gpu_view():
    """The kernel modules imported again under another package name as a GPU process imports
    them (TRITON_INTERPRET=0, so `_common.INTERPRET` is False); never launched."""
    pkg = "_cnndsl_kernels_gpu_view"
    spec = importlib.util.spec_from_file_location(pkg, KERNELS / "__init__.py",
                                                  submodule_search_locations=[str(KERNELS)])
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        package = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = package
        spec.loader.exec_module(package)
        return {name: importlib.import_module(f"{pkg}.{name}") for name in MODULES}
    finally:
        os.environ["TRITON_INTERPRET"] = saved
        for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
            del sys.modules[name]


def _plain(value):
    """Whether `value` is plain data (numbers, strings, containers of them)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(map(_plain, value)) and all(map(_plain, value.values()))
    return False


def _gpu_function(fn, gpu_fn):
    """`fn` whose results carry the values that `gpu_fn` (its GPU-view twin) returns for the
    same arguments, under either setting of torch's TF32 switch."""
    matmul = torch.backends.cuda.matmul

    def wrapped(*args, **kwargs):
        value = fn(*args, **kwargs)
        saved = matmul.allow_tf32
        gpu_values = []
        try:
            for tf32 in (False, True):
                matmul.allow_tf32 = tf32
                gpu = gpu_fn(*args, **kwargs)
                if gpu not in gpu_values:
                    gpu_values.append(gpu)
        except Exception:  # noqa: BLE001 - a GPU-only path (e.g. device properties): keep the value
            return value
        finally:
            matmul.allow_tf32 = saved
        return _gpu_tagged(value, gpu_values)
    return wrapped


def _gpu_patches(stack, modules, views):
    """Patch the interpreter's kernel modules to launch what a GPU launches; returns the
    substituted constants as 'module.NAME: interpreter -> GPU' lines."""
    mp = stack.enter_context(pytest.MonkeyPatch.context())
    changed = []
    for name, module in modules.items():
        view = views[name]
        for attr, value in list(vars(module).items()):
            if attr.startswith("__") or attr == "INTERPRET" or not hasattr(view, attr):
                continue
            gpu = getattr(view, attr)
            if inspect.isfunction(value) and "INTERPRET" in value.__code__.co_names:
                mp.setattr(module, attr, _gpu_function(value, gpu))
            elif _plain(value) and _plain(gpu) and value != gpu:
                mp.setattr(module, attr, gpu)
                changed.append(f"{name}.{attr}: {value!r} -> {gpu!r}")
    return changed


# --- recording ----------------------------------------------------------------------------


def _encode(value):
    """A launch argument as JSON for the compile subprocess."""
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        value = value.value
    gpu_values = getattr(value, "gpu_values", None)
    if gpu_values is not None:
        return {"gpu_values": [_encode(v) for v in gpu_values]}
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "offset": value.data_ptr() % 16}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, float):
        return {"float": repr(value)}  # inf and nan survive
    if isinstance(value, (bool, int, str, type(None))):
        return value
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}: {value!r}")


class _Recorder:
    def __init__(self):
        self.launches = {}  # JSON key -> launch

    def record(self, kernel, args, kwargs):
        fn = kernel.fn
        names = kernel.arg_names
        values = dict(zip(names, args))
        values.update((k, v) for k, v in kwargs.items() if k in names)
        for k, p in inspect.signature(fn).parameters.items():
            if k not in values and p.default is not inspect.Parameter.empty:
                values[k] = p.default
        launch = {"module": fn.__module__, "kernel": fn.__name__,
                  "args": {k: _encode(values[k]) for k in names},
                  "options": {k: _encode(v) for k, v in kwargs.items() if k not in names}}
        key = json.dumps(launch, sort_keys=True)
        self.launches.setdefault(key, launch)


def _train_and_eval(src, dtype, fuse, batch=2, evaluate=True):
    torch.manual_seed(0)
    model = cnndsl.compile(src, backend="triton", fuse=fuse, device="cpu").to(dtype)
    net = model.net
    x = torch.randn(batch, *net.input_shape).to(dtype).requires_grad_()
    target = torch.randint(0, net.output_shape[0], (batch,))
    model.train()
    model.loss(x, target).backward()
    if evaluate:
        model.eval()
        with torch.no_grad():
            model(x.detach())


def _launcher_extras(dtype):
    """Launches that the networks do not make: every activation epilogue of dense and conv,
    rows wider than softmax's widest block, a dropout seed past int32, momentum=None."""
    from cnndsl.kernels import batchnorm, conv, dense, dropout, softmax
    from cnndsl.kernels.activation import ACTIVATIONS
    x2, w2, b2 = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype), torch.randn(5, dtype=dtype)
    x4, w4, b4 = torch.randn(1, 4, 4, 3, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype)
    for act in ACTIVATIONS:
        dense.dense_forward(x2, w2, b2, act=act)
        conv.conv2d_forward(x4, w4, b4, 1, 1, 1, 1, (4, 4), act=act)
    wide = torch.randn(2, softmax._MAX_BLOCK + 3, dtype=dtype)
    y = softmax.softmax_forward(wide)
    softmax.softmax_backward(torch.randn_like(y), y)
    target = torch.tensor([0, 1])
    loss, lse = softmax.cross_entropy_forward(wide, target)
    softmax.cross_entropy_backward(torch.ones(()), wide, target, lse)
    dropout.dropout_forward(x2, 0.5, 2**40)
    mean, var = batchnorm.batchnorm_stats(x2)
    batchnorm.batchnorm_update_running(mean, var, torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype),
                                       torch.zeros((), dtype=torch.int64), None, 3)


def _drive():
    for dtype in (torch.float32, torch.bfloat16):
        for fuse in (True, False):
            _train_and_eval(RESIDUAL, dtype, fuse)
            _train_and_eval(EVERYTHING, dtype, fuse)
        _launcher_extras(dtype)
    _train_and_eval(ROOT / "examples" / "cifar_small.cnn", torch.float32, True, evaluate=False)


def _record(drive=_drive):
    """(launches, GPU constants substituted, kernels defined: {(module, name)}, seconds)."""
    from triton.runtime.interpreter import InterpretedFunction
    modules = {name: importlib.import_module(f"cnndsl.kernels.{name}") for name in MODULES}
    defined = {(m.__name__, name) for m in modules.values() for name in _kernel_objects(m)}
    recorder = _Recorder()
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            recorder.record(self, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    start = time.perf_counter()
    with ExitStack() as stack:
        changed = _gpu_patches(stack, modules, _gpu_view())
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(InterpretedFunction, "run", recording_run)
        drive()
    return list(recorder.launches.values()), changed, defined, time.perf_counter() - start


@pytest.fixture(scope="module")
def recorded():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under Triton's interpreter (TRITON_INTERPRET=1); this process runs a GPU")
    return _record()


def test_recording_covers_every_kernel(recorded):
    launches, _, defined, _ = recorded
    assert defined, f"no `_..._kernel` found in {KERNELS}"
    seen = {(launch["module"], launch["kernel"]) for launch in launches}
    missing = sorted(f"{m}.{k}" for m, k in defined - seen)
    assert not missing, ("kernels that no recorded launch reaches (add a network or launcher call to "
                         f"tests/test_hopper_compile.py::_drive): {missing}")


# --- compiling ----------------------------------------------------------------------------

COMPILE_SCRIPT = r'''
import importlib, itertools, json, multiprocessing, os, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature
import triton.language as tl

launches_path, out_path, all_configs, processes = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
TARGET = GPUTarget(*json.loads(sys.argv[5]))
backend = make_backend(TARGET)


class Pointer:  # a tensor argument as the binder sees one: a dtype and an address
    def __init__(self, dtype, offset):
        self.dtype, self.address = getattr(torch, dtype), 1 << 20 | offset

    def data_ptr(self):
        return self.address


def decode(v):
    if isinstance(v, dict):
        if "tensor" in v:
            return Pointer(v["tensor"], v["offset"])
        if "tl_dtype" in v:
            return tl.dtype(v["tl_dtype"])
        if "float" in v:
            return float(v["float"])
    return v


def variants(args):
    """Every combination of the GPU values of tagged arguments."""
    names = list(args)
    choices = [[decode(x) for x in args[n]["gpu_values"]] if isinstance(args[n], dict) and "gpu_values" in args[n]
               else [decode(args[n])] for n in names]
    for combo in itertools.product(*choices):
        yield dict(zip(names, combo))


def show(v):
    if isinstance(v, Pointer):
        return "tensor"
    return repr(v)


binders = {}
jobs = {}  # specialisation key -> job
errors = []


def specialise(launch, jit, params, opts, config):
    kwargs = dict(params, **opts)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    if jit not in binders:
        binders[jit] = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binders[jit](**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    named = {jit.arg_names[path[0]] if len(path) == 1 else str(path): value for path, value in constexprs.items()}
    sig = {k: v for k, v in signature.items() if v != "constexpr"}
    key = json.dumps([launch["module"], launch["kernel"], sig, {k: repr(v) for k, v in sorted(named.items())},
                      repr(sorted(attrs.items())), repr(sorted(options.__dict__.items()))])
    if key not in jobs:
        jobs[key] = {"module": launch["module"], "kernel": launch["kernel"], "signature": signature,
                     "constexprs": constexprs, "attrs": attrs, "options": options.__dict__,
                     "sig": sig, "named": named, "config": config}


def tensor_dtypes(args):
    return tuple(sorted((k, v["tensor"]) for k, v in args.items() if isinstance(v, dict) and "tensor" in v))


def expand(launches):
    seen_full = set()  # (kernel, pointer dtypes) already given every config
    for launch in launches:
        try:
            obj = getattr(importlib.import_module(launch["module"]), launch["kernel"])
            tuner = obj if isinstance(obj, Autotuner) else None
            jit = obj.fn if tuner else obj
            for args in variants(launch["args"]):
                if tuner is None:
                    opts = {k: decode(v) for k, v in launch["options"].items()}
                    specialise(launch, jit, args, opts, "launch options")
                    continue
                configs = list(getattr(tuner, "gpu_configs", tuner.configs))
                full = (launch["module"], launch["kernel"], tensor_dtypes(launch["args"]))
                if not all_configs and full in seen_full:
                    configs = configs[:1]
                seen_full.add(full)
                for i, cfg in enumerate(configs):
                    every = cfg.all_kwargs()
                    params = dict(args, **{k: v for k, v in every.items() if k in jit.arg_names})
                    opts = {k: v for k, v in every.items() if k not in jit.arg_names}
                    specialise(launch, jit, params, opts, f"GPU config {i}: {cfg}")
        except Exception:
            errors.append({"kernel": f"{launch['module']}.{launch['kernel']}", "stage": "specialise",
                           "launch": json.dumps(launch["args"]), "error": traceback.format_exc()})


def compile_one(i):
    job = items[i][1]
    start = time.perf_counter()
    try:
        jit = getattr(importlib.import_module(job["module"]), job["kernel"])
        jit = jit.fn if isinstance(jit, Autotuner) else jit
        src = ASTSource(fn=jit, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        kernel = triton.compile(src, target=TARGET, options=job["options"])
        error = None if kernel.asm.get("cubin") else "no cubin produced"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"kernel": f"{job['module']}.{job['kernel']}", "signature": job["sig"],
            "constexprs": {k: show(v) for k, v in job["named"].items()}, "attrs": repr(job["attrs"]),
            "config": job["config"], "num_warps": job["options"]["num_warps"],
            "num_stages": job["options"]["num_stages"], "error": error,
            "seconds": round(time.perf_counter() - start, 3)}


if __name__ == "__main__":
    with open(launches_path) as f:
        expand(json.load(f))
    items = list(jobs.items())
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = list(pool.imap_unordered(compile_one, range(len(items)), chunksize=1))
    else:
        results = [compile_one(i) for i in range(len(items))]
    with open(out_path, "w") as f:
        json.dump({"results": results, "errors": errors}, f)
'''


def _nvidia_backend_or_skip():
    try:
        import triton.backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        pytest.skip(f"Triton's NVIDIA backend is not available: {err}")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    try:
        path = get_ptxas(TARGET[1]).path
    except Exception as err:  # noqa: BLE001 - any way of not finding it
        pytest.skip(f"ptxas is not available: {err}")
    if not path or not os.access(path, os.X_OK):
        pytest.skip(f"ptxas is not available ({path!r})")
    try:
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this Triton's JIT has no binder to reuse: {err}")
    if not hasattr(JITFunction, "_pack_args"):
        pytest.skip("this Triton's JITFunction has no _pack_args to reuse")


def _describe(failures):
    """Failures grouped by kernel and error: each error once, with every launch it broke."""
    groups = {}
    for f in failures:
        groups.setdefault((f["kernel"], f["error"]), []).append(f)
    lines = []
    for (kernel, error), fs in sorted(groups.items()):
        lines.append(f"\n=== {kernel}: {len(fs)} compile(s) failed with:\n{error.strip()[:3000]}")
        for f in fs:
            lines.append(f"  - signature {f.get('signature')}, constexprs {f.get('constexprs')}, "
                         f"attrs {f.get('attrs')}, {f.get('config')} (num_warps={f.get('num_warps')}, "
                         f"num_stages={f.get('num_stages')})" if "signature" in f else f"  - launch {f['launch']}")
    return "\n".join(lines)


def test_recorded_launches_compile_for_hopper(recorded, tmp_path):
    _nvidia_backend_or_skip()
    launches, changed, _, record_s = recorded
    launches_path, out_path = tmp_path / "launches.json", tmp_path / "results.json"
    launches_path.write_text(json.dumps(launches))
    script = tmp_path / "hopper_compile.py"
    script.write_text(COMPILE_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    all_configs = os.environ.get("CNNDSL_HOPPER_ALL_CONFIGS") == "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(launches_path), str(out_path), "1" if all_configs else "0",
                           str(min(2, os.cpu_count() or 1)), json.dumps(TARGET)],
                          env=env, capture_output=True, text=True, timeout=1800)
    compile_s = time.perf_counter() - start
    assert proc.returncode == 0, f"the compile subprocess failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    out = json.loads(out_path.read_text())
    results, errors = out["results"], out["errors"]
    failures = errors + [r for r in results if r["error"]]
    kernels = {r["kernel"] for r in results}
    print(f"\nhopper compile: {len(launches)} recorded launches in {record_s:.0f} s; {len(results)} compiles of "
          f"{len(kernels)} kernels for sm_90 in {compile_s:.0f} s; {len(failures)} failed")
    if changed:
        print("GPU values of interpreter-dependent constants used while recording:\n  " + "\n  ".join(changed))
    assert results, "nothing was compiled"
    assert not failures, f"{len(failures)} of {len(results)} sm_90 compiles failed:" + _describe(failures)
