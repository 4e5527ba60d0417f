"""What pooling and the fused epilogues that pool share: the (pixels x channels) tile
configs and their pruning, the validation of a pooling window, the argmax dtype and checks
(max pooling's argmax holds the window offset r*kw + s of each maximum), an average's
divisor (`avg_divisor`, `window_count`: the window's taps, or PyTorch's count for ceil_mode
and count_include_pad=False) and the backward's window loop (`gather_dy`)."""

import torch
import triton
import triton.language as tl

from ..specs import Window, window_out
from ._common import check
from .activation import apply_act_grad_from_output

POOL_MODES = {"max": 1, "avg": 2}  # codes for the POOL constexprs of pooling kernels (0: no pooling)


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


def _strict_pair(v, name, minimum):
    check(isinstance(v, tuple) and len(v) == 2 and all(isinstance(i, int) and i >= minimum for i in v),
          f"{name}: expected two ints >= {minimum}, got {v!r}")
    return v


def check_window(window: Window, in_hw, name: str = "window", uneven: bool = False) -> None:
    """Validate a pooling window over an (H, W) = in_hw input: its mode, sizes, padding at most
    half the kernel, out_hw the output of its floor or ceil mode (specs.window_out), and
    count_include_pad=False for "avg" only. `uneven`: the caller's kernel divides each window
    by avg_divisor's count (pool.py's); the others (the fused epilogues) divide by the taps, so
    an average that needs fewer for some window (Window.uneven) is refused there."""
    check(isinstance(window, Window), f"{name}: expected a Window, got {window!r}")
    check(window.mode in POOL_MODES, f"{name}: mode: expected 'max' or 'avg', got {window.mode!r}")
    kernel, stride = _strict_pair(window.kernel, f"{name}: kernel", 1), _strict_pair(window.stride, f"{name}: stride", 1)
    padding = _strict_pair(window.padding, f"{name}: padding", 0)
    out_hw = _strict_pair(window.out_hw, f"{name}: out_hw", 0)
    for flag in ("ceil_mode", "count_include_pad"):
        check(isinstance(getattr(window, flag), bool), f"{name}: {flag}: expected a bool, got {getattr(window, flag)!r}")
    check(window.mode == "avg" or window.count_include_pad,
          f"{name}: count_include_pad=False is for 'avg' pooling only, got mode {window.mode!r}")
    check(all(2 * p <= k for p, k in zip(padding, kernel)),
          f"{name}: padding {padding} must be at most half the kernel {kernel}")
    ceil = window.ceil_mode
    expected = tuple(window_out(i, k, s, 2 * p, 1, ceil) for i, k, s, p in zip(in_hw, kernel, stride, padding))
    check(out_hw == expected, f"{name}: out_hw: input {tuple(in_hw)} with kernel {kernel}, stride {stride}, "
          f"padding {padding}{', ceil_mode' if ceil else ''} gives {expected}, got {out_hw}")
    check(uneven or not window.uneven(in_hw),
          f"{name}: this kernel divides every window by its {window.taps} taps; an average with ceil_mode "
          f"windows past the padding or count_include_pad=False with padding runs as a pooling layer alone "
          f"(pool.py), got {window!r} over {tuple(in_hw)}")


def avg_divisor(window: Window, in_hw) -> int:
    """The AVG_DIV code of an average over `window` (checked) on an (H, W) = in_hw input: 0, every
    window's taps (Window.uneven false); else window_count's 1 (count_include_pad) or 2."""
    if not window.uneven(in_hw):
        return 0
    return 1 if window.count_include_pad else 2


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


@triton.jit
def window_count(o, size, stride, pad, K: tl.constexpr, AVG_DIV: tl.constexpr):
    """The taps on one axis that window o (from o*stride - pad, K taps) of an average divides by:
    AVG_DIV 1, those inside the padded input (PyTorch's count_include_pad: a ceil-mode window is
    clipped at the padding's end); 2, those inside the input (count_include_pad=False)."""
    start = o * stride - pad
    end = tl.minimum(start + K, size + pad)
    if AVG_DIV == 2:
        start = tl.maximum(start, 0)
        end = tl.minimum(end, size)
    return end - start


@triton.jit
def gather_dy(dy_ptr, arg_ptr, offs_p, offs_c, mask, H, W, C, OH, OW, stride_h, stride_w, pad_h, pad_w,
               KH: tl.constexpr, KW: tl.constexpr, POOL: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr, AVG_DIV: tl.constexpr = 0, y_ptr=None, slope=0.0, ACT_Y: tl.constexpr = 0):
    """du at the pre-pool pixels offs_p (n, ih, iw), valid where `mask`: dy summed over the windows
    (oh, ow) that hold the pixel at tap (r, s), max (POOL 1) only where the window's argmax is
    r*KW + s, avg (POOL 2) divided by KH*KW (AVG_DIV 0) or by each window's window_count
    (AVG_DIV 1, 2: avg_divisor); dy itself without a pool (POOL 0). With ACT_Y (max pooling of an
    activation's output y, the pooled values at y_ptr) each window's dy is taken through that
    activation's gradient at its maximum, from y (activation.apply_act_grad_from_output). A
    deterministic gather, no atomics: the one window loop of the pooling backward and the conv block's."""
    if POOL == 0:
        du = tl.load(dy_ptr + (offs_p * C)[:, None] + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        n = offs_p // (H * W)
        ih = (offs_p // W) % H
        iw = offs_p % W
        du = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for r in range(KH):
            th = ih + pad_h - r  # = oh * stride_h for the window that sees ih at tap r
            oh = th // stride_h
            h_ok = (th >= 0) & (th % stride_h == 0) & (oh < OH)
            if POOL == 2 and AVG_DIV != 0:
                count_h = window_count(oh, H, stride_h, pad_h, KH, AVG_DIV)
            for s in range(KW):
                tw = iw + pad_w - s
                ow = tw // stride_w
                ok = h_ok & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
                m = ok[:, None] & mask
                off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]
                d = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
                if POOL == 1:
                    a = tl.load(arg_ptr + off, mask=m, other=-1).to(tl.int32)
                    d = tl.where(a == r * KW + s, d, 0.0)
                    if ACT_Y != 0:  # y read only where this tap is the window's maximum
                        y = tl.load(y_ptr + off, mask=m & (a == r * KW + s), other=0.0).to(tl.float32)
                        d = apply_act_grad_from_output(y, d, ACT_Y, slope)
                if POOL == 2 and AVG_DIV != 0:  # at least 1 where ok; masked-out lanes are 0 / 1
                    count = count_h * window_count(ow, W, stride_w, pad_w, KW, AVG_DIV)
                    d = d / tl.maximum(count, 1).to(tl.float32)[:, None]
                du += d
        if POOL == 2 and AVG_DIV == 0:
            du = du / (KH * KW)
    return du
