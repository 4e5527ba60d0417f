"""Activations: the scalar maths as `@triton.jit` helpers that other kernels' epilogues
call (selected by an `ACT: tl.constexpr` code), the standalone elementwise forward/backward
kernels with their launchers, and the custom op that runs an activation layer alone."""

import torch
import triton
import triton.language as tl

from ..specs import Act, decode
from ._common import (
    ELEMENTWISE_CONFIGS,
    autotune,
    check,
    check_tensor,
    define,
    elementwise_tiles,
)

# Codes for the ACT constexpr; NONE lets an epilogue skip the stage entirely.
NONE, RELU, LEAKY_RELU, SIGMOID, TANH, GELU, SILU, RELU6, HARDSWISH, HARDSIGMOID = range(10)
ACTIVATIONS = {"relu": RELU, "leaky_relu": LEAKY_RELU, "sigmoid": SIGMOID, "tanh": TANH, "gelu": GELU,
               "silu": SILU, "relu6": RELU6, "hardswish": HARDSWISH, "hardsigmoid": HARDSIGMOID}

# Globals read inside @triton.jit code must be tl.constexpr (plain ints compile only in the interpreter).
(_NONE, _RELU, _LEAKY_RELU, _SIGMOID, _TANH, _GELU, _SILU, _RELU6, _HARDSWISH,
 _HARDSIGMOID) = (tl.constexpr(c) for c in range(10))
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def apply_act(x, ACT: tl.constexpr, slope):
    """y = act(x) for fp32 x."""
    if ACT == _RELU:  # not tl.maximum: it may return 0 for NaN, where torch's relu keeps NaN
        x = tl.where(x < 0.0, 0.0, x)
    elif ACT == _LEAKY_RELU:
        x = tl.where(x > 0, x, x * slope)
    elif ACT == _SIGMOID:
        x = tl.sigmoid(x)
    elif ACT == _TANH:
        # tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow, no cancellation.
        e = tl.exp(-2.0 * tl.abs(x))
        x = tl.where(x < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    elif ACT == _GELU:
        x = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == _SILU:
        x = x * tl.sigmoid(x)
    elif ACT == _RELU6:  # comparisons, not min/max: NaN stays NaN
        x = tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACT == _HARDSWISH:  # x relu6(x + 3) / 6
        x = x * tl.where(x < -3.0, 0.0, tl.where(x > 3.0, 6.0, x + 3.0)) / 6.0
    elif ACT == _HARDSIGMOID:  # relu6(x + 3) / 6
        x = tl.where(x < -3.0, 0.0, tl.where(x > 3.0, 6.0, x + 3.0)) / 6.0
    return x


@triton.jit
def apply_act_grad(x, dy, ACT: tl.constexpr, slope):
    """dx = dy * act'(x) for fp32 x (the activation's input) and dy."""
    if ACT == _RELU:
        dy = tl.where(x > 0, dy, 0.0)
    elif ACT == _LEAKY_RELU:
        dy = tl.where(x > 0, dy, dy * slope)
    elif ACT == _SIGMOID:
        # s (1 - s) with 1 - s = sigmoid(-x): no cancellation where s is near 1.
        dy = dy * tl.sigmoid(x) * tl.sigmoid(-x)
    elif ACT == _TANH:
        # 1 - tanh(x)^2 = 4e / (1 + e)^2 with e = exp(-2|x|): accurate where tanh saturates.
        e = tl.exp(-2.0 * tl.abs(x))
        dy = dy * 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif ACT == _GELU:
        # d/dx [x Phi(x)] = Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        dy = dy * (cdf + x * pdf)
    elif ACT == _SILU:
        dy = dy * tl.sigmoid(x) * (1.0 + x * tl.sigmoid(-x))
    elif ACT == _RELU6:  # torch's: dy inside the open interval (0, 6)
        dy = tl.where((x > 0.0) & (x < 6.0), dy, 0.0)
    elif ACT == _HARDSWISH:  # torch's: 0 up to -3, dy (x / 3 + 1/2) inside (-3, 3), dy from 3 on
        dy = tl.where(x <= -3.0, 0.0, tl.where(x < 3.0, dy * (x / 3.0 + 0.5), dy))
    elif ACT == _HARDSIGMOID:  # torch's: dy / 6 inside the open interval (-3, 3)
        dy = tl.where((x > -3.0) & (x < 3.0), dy / 6.0, 0.0)
    return dy


@triton.jit
def apply_act_grad_from_output(y, dy, ACT: tl.constexpr, slope):
    """dx = dy * act'(x) from fp32 y = act(x), for the activations whose gradient y's sign gives
    (specs.Act.grad_from_output): x > 0 exactly where y > 0, as apply_act_grad tests x."""
    if ACT == _RELU:
        dy = tl.where(y > 0, dy, 0.0)
    elif ACT == _LEAKY_RELU:  # a positive slope keeps the sign
        dy = tl.where(y > 0, dy, dy * slope)
    else:
        tl.static_assert(ACT == _NONE, "the gradient of this activation does not follow from its output")
    return dy


@autotune(ELEMENTWISE_CONFIGS, key=["n", "ACT"], interpret=elementwise_tiles())
@triton.jit
def _activation_fwd_kernel(x_ptr, y_ptr, n, slope, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, apply_act(x, ACT, slope).to(y_ptr.dtype.element_ty), mask=mask)


@autotune(ELEMENTWISE_CONFIGS, key=["n", "ACT"], interpret=elementwise_tiles())
@triton.jit
def _activation_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, slope, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + offs, apply_act_grad(x, dy, ACT, slope).to(dx_ptr.dtype.element_ty), mask=mask)


def act_code(act: Act, name: str = "act", allow_none: bool = True) -> int:
    """The ACT constexpr code of an activation ("none" -> NONE, where an epilogue may skip it)."""
    names = (["none"] if allow_none else []) + sorted(ACTIVATIONS)
    check(isinstance(act, Act), f"{name}: expected an Act, got {act!r}")
    check(act.kind in names, f"{name}: unknown activation {act.kind!r}; expected one of {names}")
    return NONE if act.kind == "none" else ACTIVATIONS[act.kind]


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def activation_forward(x: torch.Tensor, act: Act) -> torch.Tensor:
    """y = act(x), any shape; reads and writes n elements once."""
    check_tensor(x, "x")
    code = act_code(act, "act", allow_none=False)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _activation_fwd_kernel[_grid(n)](x, y, n, float(act.slope), ACT=code)
    return y


def activation_backward(x: torch.Tensor, dy: torch.Tensor, act: Act) -> torch.Tensor:
    """dx = dy * act'(x) where x is the activation's saved input."""
    check_tensor(x, "x")
    check_tensor(dy, "dy", dtype=x.dtype, device=x.device)
    check(dy.shape == x.shape, f"dy: expected shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    code = act_code(act, "act", allow_none=False)
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _activation_bwd_kernel[_grid(n)](x, dy, dx, n, float(act.slope), ACT=code)
    return dx


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.spec = inputs[1]


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _activation_bwd(x, dy.contiguous(), ctx.spec), None


_activation_bwd = define("activation_backward", "(Tensor x, Tensor dy, str spec) -> Tensor",
                         lambda x, dy, spec: activation_backward(x, dy, decode(spec)),
                         lambda x, dy, spec: torch.empty_like(x))
_activation = define("activation", "(Tensor x, str spec) -> Tensor",
                     lambda x, spec: activation_forward(x, decode(spec)), lambda x, spec: torch.empty_like(x),
                     _backward, _setup)


def activation_layer(x, spec: Act, state):
    """An activation layer alone: saves its input for the gradient."""
    return _activation(x, state.text)
