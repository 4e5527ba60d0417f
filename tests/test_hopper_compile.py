"""Every kernel launch that cnndsl's networks make, compiled for a Hopper GPU (sm_90)
without one: what only a GPU compile shows (a plain-int global read inside @triton.jit
code, a bf16 `tl.dot`, a tile config the interpreter never runs) stays invisible to the
interpreter tests. Nothing here needs a GPU; the compile test skips where Triton's NVIDIA
backend or its ptxas is missing.

1. Record. Under Triton's interpreter, `InterpretedFunction.run` is wrapped so that every
   launch records its kernel (module and name), the value of every argument (tensors as
   dtype and pointer alignment; ints, floats, None, bools, strings and tl dtypes as they
   are; the autotuner's interpreter config among them) and the launch options (num_warps,
   ...). The launches come from `_drive`: a training step (forward, loss, backward) and an
   eval forward of RESIDUAL and EVERYTHING (from test_triton_backend; EVERYTHING with its
   dropout layer) in fp32 and bf16, unfused too where the unfused plan differs; one fp32
   training step of examples/cifar_small.cnn at batch 2 (its eval forward repeats the same
   launches; bf16 would add 40 s of interpreter time and no kernel or constexpr value that
   the rest does not record); and direct
   launcher calls for what the networks do not reach: the fused-activation epilogues (every
   activation through dense, gelu through conv), rows wider than softmax's widest block, a
   dropout seed past int32 and the cumulative (momentum=None) BatchNorm update.
2. What a GPU launches instead. The kernel package is imported a second time as a GPU
   process imports it (TRITON_INTERPRET=0). While recording, the launchers use its value of
   every module constant that differs (batchnorm's tile sizes), and every helper that reads
   `INTERPRET` returns its interpreter value tagged with its GPU values: dot_dtype's bf16
   `tl.dot` operands, dot_precision's "ieee" and "tf32" (either, as torch's TF32 switch says).
3. Compile. One subprocess (TRITON_INTERPRET=0, a fresh Triton cache) imports the kernel
   modules (real JITFunctions) and turns each recorded launch into what `JITFunction.run`
   would compile on the GPU (Triton's own binder and `_pack_args`: ints pick i32/i64, ints
   equal to 1 become constexprs, pointers and ints divisible by 16 get the attribute), with
   an autotuned kernel's GPU configs (`tuner.gpu_configs`) in place of the interpreter's
   config. Each runs through `triton.compile` for GPUTarget("cuda", 90, 32) down to a cubin
   (ptxas), two processes at a time; a kernel needing more shared memory than an sm_90 block
   has fails too.

   What is compiled, to fit CI (under two minutes in all on two cores): every code path (a
   kernel with one set of argument types, declared constexprs and options; launches that
   differ only in int values, divisibility or ints equal to 1 compile once) with the
   smallest GPU config, not the first (the largest tiles: up to 30 s each for an fp32 FMA
   `tl.dot`); and every GPU config of each autotuned kernel for one code path per input
   dtype (its first tensor's), with TF32 on where that is a choice (tensor-core tf32, which
   stages the most shared memory). CNNDSL_HOPPER_ALL_CONFIGS=1 compiles every code path
   with every GPU config instead (about a thousand compiles, 9 minutes on two cores;
   CNNDSL_HOPPER_PROCESSES sets the pool size).

A second test checks that the recording reaches every `_..._kernel` defined in kernels/*.py,
so that a new kernel cannot escape the compile."""

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import types
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

import cnndsl
import cnndsl.kernels  # before triton: decides TRITON_INTERPRET
import cnndsl.specs

from test_triton_backend import EVERYTHING, RESIDUAL

ROOT = Path(__file__).resolve().parent.parent
KERNELS = Path(cnndsl.kernels.__file__).resolve().parent
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if not p.stem.startswith("__"))
TARGET = ("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one block of an sm_90 GPU may use (227 KiB)


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
    parent = "_cnndsl_gpu_view"  # as cnndsl: its `specs` (which `from ..specs` reaches) is cnndsl's own
    pkg = f"{parent}.kernels"
    spec = importlib.util.spec_from_file_location(pkg, KERNELS / "__init__.py",
                                                  submodule_search_locations=[str(KERNELS)])
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        sys.modules[parent] = types.ModuleType(parent)
        sys.modules[parent].__path__ = []
        sys.modules[f"{parent}.specs"] = sys.modules["cnndsl.specs"]
        package = importlib.util.module_from_spec(spec)
        sys.modules[pkg] = package
        spec.loader.exec_module(package)
        return {name: importlib.import_module(f"{pkg}.{name}") for name in MODULES}
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
        for name in [m for m in sys.modules if m == parent or m.startswith(parent + ".")]:
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


def _train_and_eval(src, dtype, fuse=True, batch=2, evaluate=True):
    """A training step (forward, loss, backward) and an eval forward of `src`, fused or not."""
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


def _both_plans(src, dtype):
    """`_train_and_eval` fused, and unfused where that plans other kernels."""
    from cnndsl.plan import plan
    _train_and_eval(src, dtype)
    net = cnndsl.parse(src)
    if plan(net, True).groups != plan(net, False).groups:
        _train_and_eval(src, dtype, fuse=False)


def _launcher_extras(dtype):
    """Launches that the networks do not make: the activation epilogues of dense (every one) and
    conv (gelu), the conv's residual and pool epilogue, the training epilogue with each pool and
    both batch-norm backwards, rows wider than softmax's widest block, a dropout seed past int32,
    momentum=None."""
    from cnndsl.kernels import batchnorm, conv, dense, dropout, epilogue, softmax
    from cnndsl.kernels.activation import ACTIVATIONS
    from cnndsl.specs import Act, ConvGeometry, Window
    x2, w2, b2 = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype), torch.randn(5, dtype=dtype)
    x4, w4, b4 = torch.randn(1, 4, 4, 3, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype)
    for act in ACTIVATIONS:  # every epilogue in dense (quick to compile), one in conv (slow)
        dense.dense_forward(x2, w2, b2, Act(act))
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (4, 4))
    conv.conv2d_forward(x4, w4, b4, geometry, Act("gelu"))
    res4 = torch.randn(1, 4, 4, 4, dtype=dtype)
    for mode in ("max", "avg"):  # the inference conv block: residual, act2 and a pool in the epilogue
        pool = Window(mode, (2, 2), (2, 2), (0, 0), (2, 2))
        conv.conv2d_forward(x4, w4, b4, geometry, Act("relu"), residual=res4, act2=Act("silu"), pool=pool)
        z = torch.randn(2, 4, 4, 3, dtype=dtype)
        mean, var = torch.zeros(3), torch.ones(3)
        y, arg = epilogue.epilogue_forward(z, mean, var, Act("relu"), z, Act("tanh"), pool)
        for train in (True, False):  # batch norm's backward through batch or running statistics
            bn = epilogue.BatchNormBackward(mean, var, 1e-5, torch.ones(3, dtype=dtype), True, True, train)
            epilogue.epilogue_backward(y, z, mean, var, Act("relu"), z, Act("tanh"), pool, arg, bn)
    wide = torch.randn(2, softmax._MAX_BLOCK + 3, dtype=dtype)
    y = softmax.softmax_forward(wide)
    softmax.softmax_backward(torch.randn_like(y), y)
    target = torch.tensor([0, 1])
    _, lse = softmax.cross_entropy_forward(wide, target)
    softmax.cross_entropy_backward(torch.ones(()), wide, target, lse)
    dropout.dropout_forward(x2, 0.5, 2**40)
    mean, var = batchnorm.batchnorm_stats(x2)
    batchnorm.batchnorm_update_running(mean, var, torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype),
                                       torch.zeros((), dtype=torch.int64), None, 3)


def _drive():
    for dtype in (torch.float32, torch.bfloat16):
        _both_plans(RESIDUAL, dtype)
        _both_plans(EVERYTHING, dtype)
        _launcher_extras(dtype)
    _train_and_eval(ROOT / "examples" / "cifar_small.cnn", torch.float32, evaluate=False)


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
import importlib, itertools, json, multiprocessing, os, re, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

launches_path, out_path, mode, processes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
TARGET = GPUTarget(*json.loads(sys.argv[5]))
MAX_SHARED = int(sys.argv[6])
backend = make_backend(TARGET)
# A float max or min that returns the other operand of a NaN (tl.maximum, tl.max); the NaN-propagating
# forms are `max.NaN.f32` or a compare and select (kernels/_common.py nan_max).
NAN_DROPPING = re.compile(r"\b(?:max|min)(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")


class Pointer:  # a tensor argument as Triton's binder sees one: a dtype and an address
    def __init__(self, dtype, offset):
        self.dtype, self.address = getattr(torch, dtype), 1 << 20 | offset

    def data_ptr(self):
        return self.address

    def element_size(self):
        return self.dtype.itemsize


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
    # every combination of the GPU values of the tagged arguments
    names = list(args)
    choices = [[decode(x) for x in args[n]["gpu_values"]] if isinstance(args[n], dict) and "gpu_values" in args[n]
               else [decode(args[n])] for n in names]
    for combo in itertools.product(*choices):
        yield dict(zip(names, combo))


binders = {}


def specialise(jit, params, opts):
    # what JITFunction.run computes for these arguments on the target: signature, constexprs, attrs, options
    kwargs = dict(params, **opts)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    if jit not in binders:
        binders[jit] = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binders[jit](**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    named = {jit.arg_names[p[0]] if len(p) == 1 else str(p): v for p, v in constexprs.items()}
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options.__dict__,
            "named": named}


def exact_key(launch, spec):
    return json.dumps([launch["module"], launch["kernel"], spec["signature"],
                       sorted((k, repr(v)) for k, v in spec["named"].items()),
                       repr(sorted(spec["attrs"].items())), repr(sorted(spec["options"].items()))])


def coarse_key(launch, jit, spec):
    # the kernel's code path: argument types (an int specialised to the constexpr 1 counts as an i32), the
    # declared constexprs and the options; not the divisibility attributes
    declared = {p.name for p in jit.params if p.is_constexpr}
    types = {k: "i32" if v == "constexpr" else v for k, v in spec["signature"].items() if k not in declared}
    consts = sorted((k, repr(v)) for k, v in spec["named"].items() if k in declared)
    return json.dumps([launch["module"], launch["kernel"], types, consts, repr(sorted(spec["options"].items()))])


def size(cfg):
    n = cfg.num_warps * cfg.num_stages
    for v in cfg.kwargs.values():
        n *= v if isinstance(v, int) else 1
    return n


jobs = {}  # exact key -> job
errors = []


def add(launch, spec, config, tier):
    key = exact_key(launch, spec)
    if key not in jobs:
        jobs[key] = dict(spec, module=launch["module"], kernel=launch["kernel"], config=config, tier=tier,
                         names=list(launch["args"]))


def with_config(jit, args, cfg):
    every = cfg.all_kwargs()
    params = dict(args, **{k: v for k, v in every.items() if k in jit.arg_names})
    return specialise(jit, params, {k: v for k, v in every.items() if k not in jit.arg_names})


def pruned(tuner, configs, args):
    """The configs the autotuner would try: its early prune sees the launch's arguments."""
    prune = tuner.early_config_prune
    return prune(configs, {k: decode(v) for k, v in args.items()}) if prune else configs


def expand(launches):
    coarse = set()
    sweep = {}  # (module, kernel, dtype) -> (launch, jit, configs): the first such launch
    for launch in launches:
        try:
            obj = getattr(importlib.import_module(launch["module"]), launch["kernel"])
            tuner = obj if isinstance(obj, Autotuner) else None
            jit = obj.fn if tuner else obj
            configs = list(getattr(tuner, "gpu_configs", tuner.configs)) if tuner else None
            for args in variants(launch["args"]):
                if tuner is None:
                    spec = specialise(jit, args, {k: decode(v) for k, v in launch["options"].items()})
                    label = "launch options"
                else:
                    i, cfg = min(enumerate(configs), key=lambda c: size(c[1]))
                    spec = with_config(jit, args, cfg)
                    label = f"GPU config {i} (the smallest): {cfg}"
                key = coarse_key(launch, jit, spec)
                if key in coarse:
                    continue
                coarse.add(key)
                if tuner is not None and mode == "all":
                    for i, cfg in enumerate(pruned(tuner, configs, args)):
                        add(launch, with_config(jit, args, cfg), f"GPU config {i}: {cfg}", "all")
                    continue
                add(launch, spec, label, "path")
                if tuner is not None:  # the launch's dtype: its first tensor's
                    dtype = next((v["tensor"] for v in launch["args"].values()
                                  if isinstance(v, dict) and "tensor" in v), None)
                    sweep.setdefault((launch["module"], launch["kernel"], dtype), (launch, jit, tuner, configs))
        except Exception:
            errors.append({"kernel": f"{launch['module']}.{launch['kernel']}", "stage": "specialise",
                           "launch": json.dumps(launch["args"]), "error": traceback.format_exc()})
    for launch, jit, tuner, configs in sweep.values():
        args = list(variants(launch["args"]))[-1]  # GPU values last: TF32 on, where it is a choice
        for i, cfg in enumerate(pruned(tuner, configs, args)):
            try:
                add(launch, with_config(jit, args, cfg), f"GPU config {i}: {cfg}", "configs")
            except Exception:
                errors.append({"kernel": f"{launch['module']}.{launch['kernel']}", "stage": "specialise",
                               "launch": json.dumps(launch["args"]), "error": traceback.format_exc()})


def show(v):
    return v.name if isinstance(v, tl.dtype) else repr(v)


def compile_one(i):
    job = items[i]
    start = time.perf_counter()
    shared = nan_dropping = None
    try:
        jit = getattr(importlib.import_module(job["module"]), job["kernel"])
        jit = jit.fn if isinstance(jit, Autotuner) else jit
        src = ASTSource(fn=jit, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        kernel = triton.compile(src, target=TARGET, options=job["options"])
        shared = kernel.metadata.shared
        nan_dropping = sorted(set(NAN_DROPPING.findall(kernel.asm.get("ptx", ""))))
        error = None if kernel.asm.get("cubin") else "no cubin produced"
        if error is None and shared > MAX_SHARED:
            error = (f"OutOfResources: needs {shared} bytes of shared memory, an sm_90 block may use at most "
                     f"{MAX_SHARED} (an autotuner compiles such a config and then skips it; other launches raise)")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"kernel": f"{job['module']}.{job['kernel']}", "tier": job["tier"],
            "signature": {k: v for k, v in job["signature"].items() if v != "constexpr"},
            "constexprs": {k: show(v) for k, v in job["named"].items()},
            "divisible_by_16": [job["names"][p[0]] if len(p) == 1 else str(p) for p, a in job["attrs"].items() if a],
            "config": job["config"], "num_warps": job["options"]["num_warps"],
            "num_stages": job["options"]["num_stages"], "shared": shared, "nan_dropping": nan_dropping,
            "error": error,
            "seconds": round(time.perf_counter() - start, 3)}


if __name__ == "__main__":
    with open(launches_path) as f:
        expand(json.load(f))
    items = list(jobs.values())
    if processes > 1:  # forked before any compile: no MLIR state to inherit
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
            if "signature" not in f:  # the launch could not be specialised
                lines.append(f"  - launch {f['launch']}")
                continue
            lines.append(f"  - signature {f['signature']}, constexprs {f['constexprs']}, divisible by 16: "
                         f"{f['divisible_by_16']}, {f['config']} (num_warps={f['num_warps']}, "
                         f"num_stages={f['num_stages']})")
    return "\n".join(lines)


def test_recorded_launches_compile_for_hopper(recorded, tmp_path):
    _nvidia_backend_or_skip()
    launches, changed, _, record_s = recorded
    launches_path, out_path = tmp_path / "launches.json", tmp_path / "results.json"
    launches_path.write_text(json.dumps(launches))
    script = tmp_path / "hopper_compile.py"
    script.write_text(COMPILE_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)  # the GPU default: such reads are errors
    mode = "all" if os.environ.get("CNNDSL_HOPPER_ALL_CONFIGS") == "1" else "ci"
    processes = int(os.environ.get("CNNDSL_HOPPER_PROCESSES", min(2, os.cpu_count() or 1)))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), str(launches_path), str(out_path), mode, str(processes),
                           json.dumps(TARGET), str(MAX_SHARED)],
                          env=env, capture_output=True, text=True, timeout=3600, check=False)
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
    # NaN must propagate as in torch on the GPU too, where the interpreter's numpy max hides the difference.
    dropping = sorted({(r["kernel"], tuple(r["nan_dropping"])) for r in results if r["nan_dropping"]})
    assert not dropping, "float max/min that drops NaN (use _common.nan_max):\n" + "\n".join(
        f"  {kernel}: {', '.join(found)}" for kernel, found in dropping)
