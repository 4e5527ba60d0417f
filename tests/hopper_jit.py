"""What `JITFunction.run` would compile on a Hopper GPU for a launch recorded by tests/hopper.py,
and the compile itself: the helpers of the compile workers (tests/test_hopper_compile.py's
and tests/hopper_measure.py), which run in a subprocess with TRITON_INTERPRET=0 and a fresh
Triton cache. Importing it under the interpreter is harmless (the backend is made on first
use), so the recording side can read TARGET and MAX_SHARED from here."""

import functools
import importlib
import itertools
import json
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import create_function_from_signature

TARGET = ("cuda", 90, 32)  # Triton's NVIDIA backend compiles capability 90 for sm_90a (wgmma, setmaxnreg)
MAX_SHARED = 232448  # bytes of shared memory one block of an sm_90 GPU may use (227 KiB)


@functools.cache
def backend():
    return make_backend(GPUTarget(*TARGET))


class Pointer:  # a tensor argument as Triton's binder sees one: a dtype and an address
    def __init__(self, dtype, offset):
        self.dtype, self.address = getattr(torch, dtype), 1 << 20 | offset

    def data_ptr(self):
        return self.address

    def element_size(self):
        return self.dtype.itemsize


def decode(v):
    """A recorded launch argument (tests/hopper.py `encode`) as the binder sees it."""
    if isinstance(v, dict):
        if "tensor" in v:
            return Pointer(v["tensor"], v["offset"])
        if "tl_dtype" in v:
            return tl.dtype(v["tl_dtype"])
        if "float" in v:
            return float(v["float"])
    return v


def variants(args):
    """Every combination of the GPU values of the tagged arguments."""
    names = list(args)
    choices = [[decode(x) for x in args[n]["gpu_values"]] if isinstance(args[n], dict) and "gpu_values" in args[n]
               else [decode(args[n])] for n in names]
    for combo in itertools.product(*choices):
        yield dict(zip(names, combo))


_binders = {}


def specialise(jit, params, opts):
    """What JITFunction.run computes for these arguments on the target: signature, constexprs,
    attrs, options (and the constexprs by name)."""
    kwargs = dict(params, **opts)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    if jit not in _binders:
        _binders[jit] = create_function_from_signature(jit.signature, jit.params, backend())
    bound, specialization, options = _binders[jit](**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend(), kwargs, bound, specialization, options)
    named = {jit.arg_names[p[0]] if len(p) == 1 else str(p): v for p, v in constexprs.items()}
    return {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": options.__dict__,
            "named": named}


def exact_key(launch, spec):
    """One compile: launches with equal keys compile to the same binary."""
    return json.dumps([launch["module"], launch["kernel"], spec["signature"],
                       sorted((k, repr(v)) for k, v in spec["named"].items()),
                       repr(sorted(spec["attrs"].items())), repr(sorted(spec["options"].items()))])


@dataclass(frozen=True)
class Kernel:
    """A kernel module's `_..._kernel` as a GPU process defines it: the JITFunction, the Autotuner
    around it (None if not tuned) and the `triton.heuristics` between them (their value
    functions, outermost first: a tune config's constexprs can change what they compute)."""

    jit: object
    tuner: object
    heuristics: tuple

    @property
    def configs(self):
        """The GPU configs an autotuned kernel tunes over (None when it is not autotuned)."""
        return None if self.tuner is None else list(getattr(self.tuner, "gpu_configs", self.tuner.configs))

    def pruned(self, args):
        """The configs the autotuner would try: its early prune sees the launch's arguments."""
        prune = self.tuner.early_config_prune
        return prune(self.configs, {k: decode(v) for k, v in args.items()}) if prune else self.configs

    def with_config(self, args, cfg):
        """`specialise` with a tune config's constexprs and options in place of the launch's, and
        the heuristics recomputed from them (as Heuristics.run does)."""
        every = cfg.all_kwargs()
        params = dict(args, **{k: v for k, v in every.items() if k in self.jit.arg_names})
        opts = {k: v for k, v in every.items() if k not in self.jit.arg_names}
        for values in self.heuristics:
            for name, heuristic in values.items():
                params[name] = heuristic({**params, **opts})
        return specialise(self.jit, params, opts)


def kernel(module, name):
    """The `Kernel` that module `module` (a dotted name) defines as `name`."""
    obj = getattr(importlib.import_module(module), name)
    tuner = obj if isinstance(obj, Autotuner) else None
    fn, heuristics = obj.fn if tuner else obj, []
    while isinstance(fn, Heuristics):
        heuristics.append(fn.values)
        fn = fn.fn
    return Kernel(fn, tuner, tuple(heuristics))


def show(v):
    return v.name if isinstance(v, tl.dtype) else repr(v)


def compile_spec(jit, spec):
    """triton.compile of one specialisation for TARGET, down to a cubin (ptxas)."""
    src = ASTSource(fn=jit, signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec["attrs"])
    return triton.compile(src, target=GPUTarget(*TARGET), options=spec["options"])
