"""The runtime: torch.nn.Modules that run a Network, one per backend."""

import torch

from .. import ir
from ..errors import CnnInputError

BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_module(net: ir.Network, backend: str = "triton", fuse: bool = True, device=None, dtype=None):
    """Instantiate the module of `backend` for `net` on `device` in `dtype`."""
    if backend not in BACKENDS:
        raise CnnInputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        raise CnnInputError(f"dtype {dtype} is not supported; expected torch.float32, torch.float16 or torch.bfloat16")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as err:
        raise CnnInputError(f"bad device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnInputError("device 'cuda' was asked for, but no CUDA device is available; use device='cpu'")
    if backend == "torch":
        from ..reference import ReferenceModule
        module = ReferenceModule(net, fuse=False)
    else:
        from .triton_module import TritonModule
        module = TritonModule(net, fuse=fuse)
    return module.to(device=device, dtype=dtype)
