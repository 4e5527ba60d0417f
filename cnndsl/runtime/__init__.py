"""The runtime: torch.nn.Modules that run a Network, one per backend."""

import os
import re

import torch

from .. import ir
from ..errors import CnnInputError
from ..shapes import buffers, numel, params

BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_module(net: ir.Network, backend: str = "triton", fuse: bool | str = True, device=None, dtype=None):
    """Instantiate the module of `backend` for `net` on `device` in `dtype`."""
    if backend not in BACKENDS:
        raise CnnInputError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not (fuse is True or fuse is False or fuse == "block"):
        raise CnnInputError(f"fuse: expected True (cross-layer fusion), \"block\" (block-level) or False, got {fuse!r}")
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in DTYPES:
        raise CnnInputError(f"dtype {dtype} is not supported; expected torch.float32, torch.float16 or torch.bfloat16")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise CnnInputError(f"bad device {str(device)[:100]!r}; expected 'cpu' or 'cuda' (or 'cuda:N')") from None
    # (the triton kernels run on CUDA GPUs, or interpreted on a CPU; the reference also on 'meta', shapes only)
    if device.type not in ("cpu", "cuda") and not (backend == "torch" and device.type == "meta"):
        raise CnnInputError(f"device {str(device)!r} is not supported; expected 'cpu' or 'cuda' (or 'cuda:N')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnInputError("device 'cuda' was asked for, but no CUDA device is available; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CnnInputError(f"device {str(device)!r} was asked for, but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    _check_memory(net, device, dtype)
    if backend == "torch":
        from ..reference import ReferenceModule
        module = ReferenceModule(net, fuse=False)
    else:
        from .triton_module import TritonModule
        module = TritonModule(net, fuse=fuse)
    return module.to(device=device, dtype=dtype)


def _memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (None where the platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(net: ir.Network, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a network whose parameters alone cannot fit the device, before allocating them."""
    count = sum(params(net, n) + buffers(net, n) for n in net.nodes[1:])
    need, have = count * dtype.itemsize, _memory(device)
    if have is not None and need > have:
        raise CnnInputError(f"{net.name}: its {count:,} parameters and buffers need {need / 2**30:,.1f} GiB in "
                            f"{dtype}, more than the {have / 2**30:,.1f} GiB of memory on {device}")


def check_batch_memory(net: ir.Network, batch: int, device: torch.device, itemsize: int, training: bool,
                       what: str = "--batch-size") -> None:
    """Refuse, before the first batch allocates, a batch that surely cannot fit the device: in
    training every layer's output kept for backward plus the fp32 weights four times (themselves,
    their gradients, two optimizer moments); in inference the largest layer's input and output."""
    have = _memory(device)
    if have is None:
        return
    if training:
        weights = 4 * 4 * sum(params(net, n) + buffers(net, n) for n in net.nodes[1:])
        need = batch * sum(numel(n.shape) for n in net.nodes) * itemsize + weights
        kept = "every layer's output, kept for the backward pass, and the weights with their gradients and " \
               "optimizer state"
    else:
        need = batch * max(numel(n.shape) + sum(numel(net.nodes[i].shape) for i in n.inputs)
                           for n in net.nodes) * itemsize
        kept = "the largest layer's input and output"
    if need > have:
        raise CnnInputError(f"{net.name}: a batch of {batch:,} needs at least {need / 2**30:,.1f} GiB ({kept}), more "
                            f"than the {have / 2**30:,.1f} GiB of memory on {device}; use a smaller {what}")


def check_run_device(device: str | None) -> None:
    """Training and evaluation run on a CPU or a CUDA GPU (a 'meta' model holds no data)."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise CnnInputError(f"--device must be cpu, cuda or cuda:N, got {str(device)[:100]!r}")
