"""What a GPU launches where the interpreter launches something else (shared by tests/hopper.py's
recording): the kernel package is imported a second time as a GPU process imports it
(TRITON_INTERPRET=0). While recording, the launchers use its value of every module constant that
differs (batchnorm's tile sizes), and every helper that reads `INTERPRET` returns its
interpreter value tagged with its GPU values: dot_dtype's bf16 `tl.dot` operands,
dot_precision's "ieee" and "tf32" (either, as torch's TF32 switch says)."""

import importlib
import importlib.util
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import cnndsl
import cnndsl.errors
import cnndsl.kernels  # before triton: decides TRITON_INTERPRET
import cnndsl.specs

KERNELS = Path(cnndsl.kernels.__file__).resolve().parent
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if not p.stem.startswith("__"))


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


def gpu_view():
    """The kernel modules imported again under another package name as a GPU process imports
    them (TRITON_INTERPRET=0, so `_common.INTERPRET` is False); never launched."""
    parent = "_cnndsl_gpu_view"  # as cnndsl: its `specs` and `errors` (`from ..specs`) are cnndsl's own
    pkg = f"{parent}.kernels"
    spec = importlib.util.spec_from_file_location(pkg, KERNELS / "__init__.py",
                                                  submodule_search_locations=[str(KERNELS)])
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        sys.modules[parent] = types.ModuleType(parent)
        sys.modules[parent].__path__ = []
        for name in ("specs", "errors"):
            sys.modules[f"{parent}.{name}"] = sys.modules[f"cnndsl.{name}"]
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


def gpu_patches(stack, modules, views):
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
