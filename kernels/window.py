"""What pooling and the fused epilogues that pool share: the (pixels x channels) tile
configs and their pruning, the validation of a pool's geometry, and the argmax dtype and
checks (max pooling's argmax holds the window offset r*kw + s of each maximum)."""

import torch
import triton

from ._common import check


def _cfg(bp, bc, warps):
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps)


CONFIGS = [_cfg(*c) for c in ((256, 4, 4), (128, 16, 4), (64, 32, 4), (128, 32, 4), (32, 64, 4),
                               (64, 64, 4), (128, 64, 8), (16, 128, 4), (32, 128, 4), (64, 128, 8))]


def prune(configs, named_args, **kwargs):
    """Keep channel blocks that neither waste most lanes nor split a small C finely."""
    c = triton.next_power_of_2(named_args["C"])
    lo, hi = min(c, 16), max(c, 4)
    return [cf for cf in configs if lo <= cf.kwargs["BLOCK_C"] <= hi] or configs


def pair(v, name, minimum):
    v = (v, v) if isinstance(v, int) else tuple(v)
    check(len(v) == 2 and all(isinstance(i, int) and i >= minimum for i in v),
          f"{name}: expected two ints >= {minimum}, got {v}")
    return v


def geometry(mode, kernel, stride, padding, in_hw, out_hw):
    """Validate the pooling hyper-parameters; out_hw must be the floor-mode output of in_hw."""
    check(mode in ("max", "avg"), f"mode: expected 'max' or 'avg', got {mode!r}")
    kernel, stride = pair(kernel, "kernel", 1), pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    check(all(2 * p <= k for p, k in zip(padding, kernel)),
          f"padding {padding} must be at most half the kernel {kernel}")
    out_hw = pair(out_hw, "out_hw", 0)
    expected = tuple(max(0, (i + 2 * p - k) // s + 1) for i, p, k, s in zip(in_hw, padding, kernel, stride))
    check(out_hw == expected, f"out_hw: input {tuple(in_hw)} with kernel {kernel}, stride {stride}, "
          f"padding {padding} gives {expected}, got {out_hw}")
    return kernel, stride, padding


def argmax_dtype(taps: int) -> torch.dtype:
    return torch.int8 if taps <= 127 else torch.int16 if taps <= 32767 else torch.int32


def check_argmax(argmax, mode: str, taps: int, shape, device) -> None:
    """argmax must be pool_forward's for max pooling (dtype, shape, device, contiguous), None for avg."""
    if mode != "max":
        check(argmax is None, f"argmax: expected None without max pooling, got {type(argmax).__name__}")
        return
    check(isinstance(argmax, torch.Tensor), f"argmax: expected a tensor for max pooling, got {type(argmax).__name__}")
    want = argmax_dtype(taps)
    check(argmax.dtype == want, f"argmax: expected dtype {want}, got {argmax.dtype}")
    check(tuple(argmax.shape) == tuple(shape), f"argmax: expected shape {tuple(shape)}, got {tuple(argmax.shape)}")
    check(argmax.device == device, f"argmax: expected device {device}, got {argmax.device}")
    check(argmax.is_contiguous(), f"argmax: expected a contiguous tensor, got strides {argmax.stride()}")
