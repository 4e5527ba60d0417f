"""Pooling over NHWC activations: windowed max / average pooling forward (max also writes
a compact argmax of window offsets r*kw + s), its backward as a deterministic gather
(each input pixel sums dy over the output windows that contain it, so overlapping windows
need no atomics), and global average pooling both ways. Tiles are pixels x channels,
channels contiguous; PyTorch semantics (floor mode, avg count_include_pad=True)."""

import torch
import triton
import triton.language as tl

from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    elementwise_tiles,
)


def _cfg(bp, bc, warps):
    return triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps)


_CONFIGS = [_cfg(*c) for c in ((256, 4, 4), (128, 16, 4), (64, 32, 4), (128, 32, 4), (32, 64, 4),
                               (64, 64, 4), (128, 64, 8), (16, 128, 4), (32, 128, 4), (64, 128, 8))]


def _prune(configs, named_args, **kwargs):
    """Keep channel blocks that neither waste most lanes nor split a small C finely."""
    c = triton.next_power_of_2(named_args["C"])
    lo, hi = min(c, 16), max(c, 4)
    return [cf for cf in configs if lo <= cf.kwargs["BLOCK_C"] <= hi] or configs


_TUNE = {"interpret": {"BLOCK_P": ("P", 16, 1024), "BLOCK_C": ("C", 4, 64)},
         "prune_configs_by": {"early_config_prune": _prune}}


@autotune(_CONFIGS, key=["P", "C", "KH", "KW", "IS_MAX"], **_TUNE)
@triton.jit
def _pool_fwd_kernel(x_ptr, y_ptr, arg_ptr, P, H, W, C, OH, OW,  # x (N, H, W, C) -> y, arg (N, OH, OW, C)
                     stride_h, stride_w, pad_h, pad_w, KH: tl.constexpr, KW: tl.constexpr,
                     IS_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels (n, oh, ow)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    n = offs_p // (OH * OW)
    h0 = (offs_p // OW) % OH * stride_h - pad_h
    w0 = offs_p % OW * stride_w - pad_w
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    arg = tl.full((BLOCK_P, BLOCK_C), -1, tl.int32)
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for r in range(KH):
        ih = h0 + r
        for s in range(KW):
            iw = w0 + s
            valid = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            mask = valid[:, None] & c_mask[None, :]
            v = tl.load(x_ptr + (((n * H + ih) * W + iw) * C)[:, None] + offs_c[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            if IS_MAX:  # torch: the first valid tap, then strictly greater values or any NaN
                is_nan = v != v  # noqa: PLR0124
                take = mask & ((v > best) | is_nan | (arg < 0))
                best = tl.where(take, v, best)
                arg = tl.where(take, r * KW + s, arg)
            else:
                acc += v
    y_off = (offs_p * C)[:, None] + offs_c[None, :]
    out_mask = p_mask[:, None] & c_mask[None, :]
    if IS_MAX:
        tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=out_mask)
        tl.store(arg_ptr + y_off, arg.to(arg_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(y_ptr + y_off, (acc / (KH * KW)).to(y_ptr.dtype.element_ty), mask=out_mask)


@autotune(_CONFIGS, key=["P", "C", "KH", "KW", "IS_MAX"], **_TUNE)
@triton.jit
def _pool_bwd_kernel(dy_ptr, arg_ptr, dx_ptr, P, H, W, C, OH, OW,  # dy, arg (N, OH, OW, C) -> dx (N, H, W, C)
                     stride_h, stride_w, pad_h, pad_w, KH: tl.constexpr, KW: tl.constexpr,
                     IS_MAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dx[n, ih, iw, c] = sum over windows (oh, ow) holding (ih, iw) at tap (r, s) of dy[n, oh, ow, c]
    #     (max: only where arg[n, oh, ow, c] == r*KW + s; avg: divided by KH*KW)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # input pixels (n, ih, iw)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    n = offs_p // (H * W)
    ih = (offs_p // W) % H
    iw = offs_p % W
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for r in range(KH):
        th = ih + pad_h - r  # = oh * stride_h for the window that sees ih at tap r
        oh = th // stride_h
        h_ok = p_mask & (th >= 0) & (th % stride_h == 0) & (oh < OH)
        for s in range(KW):
            tw = iw + pad_w - s
            ow = tw // stride_w
            ok = h_ok & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            mask = ok[:, None] & c_mask[None, :]
            off = (((n * OH + oh) * OW + ow) * C)[:, None] + offs_c[None, :]
            d = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if IS_MAX:
                a = tl.load(arg_ptr + off, mask=mask, other=-1).to(tl.int32)
                d = tl.where(a == r * KW + s, d, 0.0)
            acc += d
    if not IS_MAX:
        acc = acc / (KH * KW)
    tl.store(dx_ptr + (offs_p * C)[:, None] + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=p_mask[:, None] & c_mask[None, :])


@autotune(_CONFIGS, key=["HW", "C"], **{**_TUNE, "interpret": {"BLOCK_P": ("HW", 16, 1024), "BLOCK_C": ("C", 4, 64)}})
@triton.jit
def _global_avg_fwd_kernel(x_ptr, y_ptr, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y[n, c] = sum_p x[n, p, c] / HW for x (N, HW, C)
    n = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_p = tl.arange(0, BLOCK_P)
    x_ptr += n * HW * C
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + offs_p
        acc += tl.load(x_ptr + (p * C)[:, None] + offs_c[None, :], mask=(p < HW)[:, None] & c_mask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + n * C + offs_c, (tl.sum(acc, axis=0) / HW).to(y_ptr.dtype.element_ty), mask=c_mask)


@autotune(ELEMENTWISE_CONFIGS, key=["total", "C"], interpret=elementwise_tiles("total"))
@triton.jit
def _global_avg_bwd_kernel(dy_ptr, dx_ptr, total, HW, C, BLOCK: tl.constexpr):
    # dx[n, p, c] = dy[n, c] / HW for dx (N, HW, C) with `total` elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    src = offs // (HW * C) * C + offs % C
    d = tl.load(dy_ptr + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, (d / HW).to(dx_ptr.dtype.element_ty), mask=mask)


def _pair(v, name, minimum):
    v = (v, v) if isinstance(v, int) else tuple(v)
    check(len(v) == 2 and all(isinstance(i, int) and i >= minimum for i in v),
          f"{name}: expected two ints >= {minimum}, got {v}")
    return v


def _geometry(mode, kernel, stride, padding, in_hw, out_hw):
    """Validate the pooling hyper-parameters; out_hw must be the floor-mode output of in_hw."""
    check(mode in ("max", "avg"), f"mode: expected 'max' or 'avg', got {mode!r}")
    kernel, stride = _pair(kernel, "kernel", 1), _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    check(all(2 * p <= k for p, k in zip(padding, kernel)),
          f"padding {padding} must be at most half the kernel {kernel}")
    out_hw = _pair(out_hw, "out_hw", 0)
    expected = tuple(max(0, (i + 2 * p - k) // s + 1) for i, p, k, s in zip(in_hw, padding, kernel, stride))
    check(out_hw == expected, f"out_hw: input {tuple(in_hw)} with kernel {kernel}, stride {stride}, "
          f"padding {padding} gives {expected}, got {out_hw}")
    return kernel, stride, padding


def _argmax_dtype(taps: int) -> torch.dtype:
    return torch.int8 if taps <= 127 else torch.int16 if taps <= 32767 else torch.int32


def _grid(pixels, c):
    return lambda meta: (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))


def pool_forward(x, mode, kernel, stride, padding, out_hw):
    """(y (N, OH, OW, C), argmax) for x (N, H, W, C); argmax is None for "avg" and for "max" the
    window offset r*kw + s of each maximum (N, OH, OW, C), int8 when kh*kw <= 127 (else int16/32).
    Max: the first maximum wins, NaN propagates, padding never wins; avg divides by kh*kw."""
    check_tensor(x, "x", ndim=4)
    n, h, w, c = x.shape
    kernel, stride, padding = _geometry(mode, kernel, stride, padding, (h, w), out_hw)
    oh, ow = out_hw
    y = torch.empty((n, oh, ow, c), dtype=x.dtype, device=x.device)
    is_max = mode == "max"
    argmax = torch.empty(y.shape, dtype=_argmax_dtype(kernel[0] * kernel[1]), device=x.device) if is_max else None
    if y.numel():
        pixels = n * oh * ow
        _pool_fwd_kernel[_grid(pixels, c)](x, y, argmax if is_max else y, pixels, h, w, c, oh, ow,
                                           *stride, *padding, KH=kernel[0], KW=kernel[1], IS_MAX=is_max)
    return y, argmax


def pool_backward(dy, mode, argmax, kernel, stride, padding, in_hw):
    """dx (N, H, W, C), (H, W) = in_hw, for dy (N, OH, OW, C) and pool_forward's argmax (None for avg)."""
    check_tensor(dy, "dy", ndim=4)
    n, oh, ow, c = dy.shape
    in_hw = _pair(in_hw, "in_hw", 0)
    kernel, stride, padding = _geometry(mode, kernel, stride, padding, in_hw, (oh, ow))
    is_max = mode == "max"
    if is_max:
        check(isinstance(argmax, torch.Tensor), f"argmax: expected a tensor for max pooling, got {type(argmax).__name__}")
        want = _argmax_dtype(kernel[0] * kernel[1])
        check(argmax.dtype == want, f"argmax: expected dtype {want}, got {argmax.dtype}")
        check(argmax.shape == dy.shape, f"argmax: expected shape {tuple(dy.shape)}, got {tuple(argmax.shape)}")
        check(argmax.device == dy.device, f"argmax: expected device {dy.device}, got {argmax.device}")
        check(argmax.is_contiguous(), f"argmax: expected a contiguous tensor, got strides {argmax.stride()}")
    else:
        check(argmax is None, f"argmax: expected None for avg pooling, got {type(argmax).__name__}")
    h, w = in_hw
    dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dy.device)
    if dx.numel():
        pixels = n * h * w
        _pool_bwd_kernel[_grid(pixels, c)](dy, argmax if is_max else dy, dx, pixels, h, w, c, oh, ow,
                                           *stride, *padding, KH=kernel[0], KW=kernel[1], IS_MAX=is_max)
    return dx


def global_avgpool_forward(x):
    """y (N, 1, 1, C) = the mean of x (N, H, W, C) over H and W."""
    check_tensor(x, "x", ndim=4)
    n, h, w, c = x.shape
    check(h * w > 0, f"x: global average pooling needs H, W >= 1, got shape {tuple(x.shape)}")
    y = torch.empty((n, 1, 1, c), dtype=x.dtype, device=x.device)
    if y.numel():
        _global_avg_fwd_kernel[lambda meta: (n, triton.cdiv(c, meta["BLOCK_C"]))](x, y, h * w, c)
    return y


def global_avgpool_backward(dy, in_hw):
    """dx (N, H, W, C) = dy (N, 1, 1, C) / (H*W) broadcast over (H, W) = in_hw."""
    check_tensor(dy, "dy", ndim=4)
    n, one_h, one_w, c = dy.shape
    check(one_h == 1 and one_w == 1, f"dy: expected shape (N, 1, 1, C), got {tuple(dy.shape)}")
    h, w = _pair(in_hw, "in_hw", 1)
    dx = torch.empty((n, h, w, c), dtype=dy.dtype, device=dy.device)
    total = dx.numel()
    if total:
        _global_avg_bwd_kernel[lambda meta: (triton.cdiv(total, meta["BLOCK"]),)](dy, dx, total, h * w, c)
    return dx
