"""A conv block, conv -> [batch norm] -> act1 -> [+ shortcut] -> act2 -> [pool], as custom ops; a
lone conv runs through it with every other stage off, so fusing adds epilogue stages, not a
second code path.

Without gradients (inference) the block is one kernel (`conv_block_inference`): batch norm is
folded into the conv's weight and bias (`bn_fold`; in eager recomputed only when one of them
changes: `state.cache` keys the fold on the tensors' version counters, which every in-place
update moves, a kernel's write of the running statistics included; a compiled graph folds on
every call) and the activations, the residual add and the pool run in the conv's epilogue.
With gradients it is the training path (`conv_block`): the conv writes z (and, in training, the
batch statistics from its epilogue), one epilogue pass (epilogue.py) normalises, activates,
adds and pools, returning z and a compact pool argmax for backward, which recomputes the rest;
batchnorm_layer.py's op then updates the running statistics.

Cross-layer fusion (specs.ConvBlock.defer and .prologue): a deferring block's training path skips
the epilogue pass and hands on `Deferred(z, scale, shift)`; the next block's conv applies them
as it loads its input (prologue.py), forward and weight gradient, and its input gradient is the
gradient of the deferring block's y. In backward, a block with `dz_on_load` (batch norm and act1,
nothing else; or batch norm, the shortcut and act2) writes no dz: its conv's gradient kernels
read dy (da, the shortcut's gradient, with a shortcut) and z and apply the batch norm's and
activation's backward as they load them (prologue.GradPrologue), after one pass over dy and z
for batch norm's per-channel sums (the gather pass, with a shortcut); one that pools in its GEMM
(`gemm_pool`, no z kept) and computes dz on load reads the pooled dy, y and the argmax; a deferring block takes
those sums from its reader instead, as the gradients of the Deferred's scale and shift, which
the reader's input gradient computes (conv.conv2d_backward_input). Where x forks to this conv
and a shortcut, the block returns a gradient token of x's shape (Step.token), whose gradient,
the shortcut's, the input gradient adds to dx (kernels/add.py's redirect)."""

from typing import NamedTuple

import torch

from ..specs import NO_ACT, Act, ConvBlock, decode
from ._common import absent, check, define, present
from .batchnorm_backward import batchnorm_backward_on_load
from .batchnorm_layer import update_running
from .concat import slab_of, take_slice
from .conv import conv2d_backward_input, conv2d_backward_weight, conv2d_forward
from .epilogue import epilogue_forward
from .epilogue_backward import (
    BatchNormBackward,
    epilogue_backward,
    epilogue_backward_on_load,
    pooled_backward,
)
from .fold import bn_scale_shift, fold_conv
from .gate import gate_backward
from .prologue import GradPrologue, Prologue
from .window import argmax_dtype


class Deferred(NamedTuple):
    """A deferring block's output in training: z (N, H, W, K), the per-channel fp32 scale and
    shift of its batch norm (None without one) and its act1; its reader (a conv, or a max pool)
    computes y = act1(z scale + shift) as it loads z, and its backward returns y's gradient."""

    z: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    act: Act = NO_ACT


def _prologue(s, pro, pro_scale, pro_shift):
    return Prologue(pro_scale, pro_shift, s.prologue) if pro else None


def _shape(x, s, pooled: bool):
    hw = s.pool.out_hw if pooled and s.pool is not None else s.geometry.out_hw
    return (x.shape[0], *hw)


# --- inference: one kernel, batch norm folded ---------------------------------------------------

_inference = define(
    "conv_block_inference", "(Tensor x, Tensor w, Tensor? b, Tensor? residual, bool pro, Tensor? pro_scale, "
    "Tensor? pro_shift, Tensor? gate, str spec) -> Tensor",
    lambda x, w, b, residual, pro, pro_scale, pro_shift, gate, spec: _inference_impl(
        x, w, b, residual, pro, pro_scale, pro_shift, gate, decode(spec)),
    lambda x, w, b, residual, pro, pro_scale, pro_shift, gate, spec: x.new_empty((*_shape(x, decode(spec), True),
                                                                                 w.shape[0])))


def _inference_impl(x, w, b, residual, pro, pro_scale, pro_shift, gate, s, out=None):
    return conv2d_forward(x, w, b, s.geometry, s.act1, residual=residual, act2=s.act2, pool=s.pool,
                          prologue=_prologue(s, pro, pro_scale, pro_shift), out=out, gate=gate)


_fold = define(
    "bn_fold", "(Tensor w, Tensor? b, Tensor? bn_w, Tensor? bn_b, Tensor mean, Tensor var, float eps) -> "
    "(Tensor, Tensor)",
    lambda w, b, bn_w, bn_b, mean, var, eps: fold_conv(w, b, *bn_scale_shift(mean, var, eps, bn_w, bn_b)),
    lambda w, b, bn_w, bn_b, mean, var, eps: (torch.empty_like(w), w.new_empty(w.shape[0])))


def _folded(cache, w, b, bn_w, bn_b, mean, var, eps):
    """The conv weight and bias with eval-mode batch norm folded in; in eager, recomputed only when
    a tensor's version counter (bumped by every in-place update, e.g. an optimizer step) moves."""
    tensors = [t for t in (w, b, bn_w, bn_b, mean, var) if t is not None]
    # no version counters in a graph (inductor's freezing folds once), nor on the tensors that
    # torch.inference_mode makes (a cast or contiguous copy of a parameter): fold each call
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return _fold(w, b, bn_w, bn_b, mean, var, eps)
    key = tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in (w, b, bn_w, bn_b, mean, var))
    if cache.get("key") != key:
        cache["key"], cache["value"] = key, _fold(w, b, bn_w, bn_b, mean, var, eps)
    return cache["value"]


# --- training: the conv with batch statistics, one epilogue pass; its backward ----------------------

def _train_impl(x, residual, gate, w, b, bn_w, bn_b, mean, var, pro, pro_scale, pro_shift, spec, train, out=None):
    s = decode(spec)
    batch_stats = s.bn is not None and train
    prologue = _prologue(s, pro, pro_scale, pro_shift)
    if s.gemm_pool:  # the GEMM pools: y and the argmax from its accumulator, no z (pooled_backward)
        is_max = s.pool.mode == "max"
        out = conv2d_forward(x, w, b, s.geometry, s.act1, pool=s.pool, prologue=prologue, argmax=is_max, gate=gate)
        y, argmax = out if is_max else (out, None)
        return (y, absent(x), absent(x, torch.int8) if argmax is None else argmax,
                *(absent(x, torch.float32) for _ in range(4)))
    epilogue = s.epilogue and not s.defer  # a deferring block's y is computed by its reader
    z_out = None if epilogue else out  # without an epilogue pass, the conv writes y
    if batch_stats:
        z, mean, var = conv2d_forward(x, w, b, s.geometry, stats=True, prologue=prologue, out=z_out, gate=gate)
    else:
        z = conv2d_forward(x, w, b, s.geometry, prologue=prologue, out=z_out, gate=gate)
    scale = shift = None
    if s.bn is not None:
        scale, shift = bn_scale_shift(mean, var, s.bn.eps, bn_w, bn_b)
    y, argmax = epilogue_forward(z, scale, shift, s.act1, residual, s.act2, s.pool, out=out) if epilogue \
        else (z, None)
    keep = lambda t, on: t if on and t is not None else absent(x, torch.float32)
    return (y, z if epilogue else absent(x), absent(x, torch.int8) if argmax is None else argmax,
            keep(mean, batch_stats), keep(var, batch_stats), keep(scale, True), keep(shift, True))


def _train_fake(x, residual, gate, w, b, bn_w, bn_b, mean, var, pro, pro_scale, pro_shift, spec, train):
    s = decode(spec)
    k, stat = w.shape[0], s.bn is not None
    y = x.new_empty((*_shape(x, s, True), k))
    channels = lambda on: x.new_empty(k, dtype=torch.float32) if on else absent(x, torch.float32)
    argmax = y.new_empty(y.shape, dtype=argmax_dtype(s.pool.taps)) if s.pool and s.pool.mode == "max" \
        else absent(x, torch.int8)
    return (y, x.new_empty((*_shape(x, s, False), k)) if s.writes_z else absent(x), argmax,
            channels(stat and train), channels(stat and train), channels(stat), channels(stat))


def _grad_prologue(dy, z, residual, scale, shift, argmax, s, stats):
    """(what the gradient kernels read as dy, dresidual, GradPrologue, dweight, dbias) of a
    dz-on-load block: batch norm's per-channel sums and the coefficients with which its conv's
    gradient kernels compute dz as they load. With a shortcut, the gather pass takes the sums and
    writes da once, as the shortcut's gradient, which the kernels read; else a pass over dy and z."""
    if s.residual:
        dres, center, dbn_w, dbn_b = epilogue_backward_on_load(dy, z, scale, shift, residual, s.act2, s.pool, argmax,
                                                               stats)
        return dres, dres, GradPrologue(z, scale, shift, NO_ACT, center), dbn_w, dbn_b
    center = dbn_w = dbn_b = None
    if stats is not None:
        k = z.shape[-1]
        center, dbn_w, dbn_b = batchnorm_backward_on_load(
            dy.view(-1, k), z.view(-1, k), stats.mean, stats.var, stats.eps, stats.weight, stats.param_grads,
            stats.train, scale, shift, s.act1, stats.grads)
    return dy, None, GradPrologue(z, scale, shift, s.act1, center), dbn_w, dbn_b


def _backward_impl(dy, x, w, z, residual, gate, scale, shift, mean, var, bn_w, argmax, pro, pro_scale, pro_shift,
                   dscale, dshift, add, spec, train, bn_grads, input_grad, weight_grad, has_bias, pro_grads):
    s = decode(spec)
    dres = dbn_w = dbn_b = gp = dgate = dpro_scale = dpro_shift = None
    dz = dy
    stats = None
    if s.bn is not None and (train or bn_grads):  # in eval, only for batch norm's parameter gradients
        # dscale, dshift: batch norm's sums, from the conv that read this deferring block's z
        stats = BatchNormBackward(mean, var, s.bn.eps, bn_w, bn_w is not None, bn_grads, train,
                                  None if dscale is None or dshift is None else (dscale, dshift))
    if s.gemm_pool and s.dz_on_load:  # z is y here: the gradient kernels compute dz from dy, y and the argmax
        gp = GradPrologue(z, None, None, s.act1, pool=s.pool, argmax=present(argmax))
    elif s.dz_on_load:  # the gradient kernels compute dz as they load
        dz, dres, gp, dbn_w, dbn_b = _grad_prologue(dy, z, residual, present(scale), present(shift), present(argmax),
                                                    s, stats)
    elif s.gemm_pool:  # z is y here (saved in its place): the pooled output
        dz = pooled_backward(dy, z, present(argmax), s.act1, s.pool, (x.shape[0], *s.geometry.out_hw, w.shape[0]))
    elif s.epilogue:
        dz, dres, dbn_w, dbn_b = epilogue_backward(dy, z, present(scale), present(shift), s.act1, residual,
                                                   s.act2, s.pool, present(argmax), stats)
    check(add is None or (gate is None and not pro_grads), "add: x's other gradient is added only to an ungated input "
          "gradient without a prologue")
    dx = None
    if input_grad and pro_grads:  # with the gradients of the prologue's scale and shift (the sums above)
        dx, dpro_scale, dpro_shift = conv2d_backward_input(dz, w, s.geometry, tuple(x.shape[1:3]), gp,
                                                           _prologue(s, pro, pro_scale, pro_shift), x)
    elif input_grad:
        dx = conv2d_backward_input(dz, w, s.geometry, tuple(x.shape[1:3]), grad_prologue=gp, add=add)
    if gate is not None and dx is not None:  # dx is x * gate's gradient: the gate's backward pass (gate.py)
        dx, dgate = gate_backward(dx, x, gate)
    dw, db = conv2d_backward_weight(x, dz, tuple(w.shape), s.geometry, has_bias, _prologue(s, pro, pro_scale, pro_shift),
                                    grad_prologue=gp, gate=gate) if weight_grad else (None, None)
    return tuple(absent(x) if t is None else t for t in (dx, dres, dgate, dw, db, dbn_w, dbn_b, dpro_scale,
                                                         dpro_shift))


def _backward_fake(dy, x, w, z, residual, gate, scale, shift, mean, var, bn_w, argmax, pro, pro_scale, pro_shift,
                   dscale, dshift, add, spec, train, bn_grads, input_grad, weight_grad, has_bias, pro_grads):
    s = decode(spec)
    like = lambda t, on: torch.empty_like(t) if on else absent(x)
    return (like(x, input_grad), like(residual, residual is not None and s.epilogue),
            like(gate, gate is not None and input_grad), like(w, weight_grad),
            w.new_empty(w.shape[0]) if weight_grad and has_bias else absent(x), like(bn_w, bn_grads),
            like(bn_w, bn_grads), like(pro_scale, input_grad and pro_grads), like(pro_shift, input_grad and pro_grads))


_backward = define(
    "conv_block_backward", "(Tensor dy, Tensor x, Tensor w, Tensor z, Tensor? residual, Tensor? gate, Tensor scale, "
    "Tensor shift, Tensor? mean, Tensor? var, Tensor? bn_w, Tensor argmax, bool pro, Tensor? pro_scale, "
    "Tensor? pro_shift, Tensor? dscale, Tensor? dshift, Tensor? add, str spec, bool train, bool bn_grads, "
    "bool input_grad, bool weight_grad, bool has_bias, bool pro_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor, Tensor, Tensor)",
    _backward_impl, _backward_fake)


def _save(ctx, inputs, kept, argmax, mean, var, scale, shift):
    """What backward reads, saved by both training ops (`conv_block` and the slab writer's): the
    inputs, `kept` (z, or y where no z was kept), and the statistics that normalised z."""
    x, residual, gate, w, b, bn_w, _, mean_in, var_in, ctx.pro, pro_scale, pro_shift, ctx.spec, ctx.train = inputs
    batch_stats = present(mean) is not None
    ctx.has_bias = b is not None
    ctx.save_for_backward(x, w, kept, residual, gate, scale, shift, mean if batch_stats else mean_in,
                          var if batch_stats else var_in, bn_w, argmax, pro_scale, pro_shift)


def _grads(ctx, dy, need, dscale=None, dshift=None, add=None):
    """The gradients of (x, residual, gate, w, b, bn_w, bn_b, pro_scale, pro_shift) for dy (and the
    gradients of a deferring block's scale and shift; `add`, x's gradient token's, is added to x's);
    `need` the inputs' needs_input_grad."""
    x, w, z, residual, gate, scale, shift, mean, var, bn_w, argmax, pro_scale, pro_shift = ctx.saved_tensors
    bn_grads = bn_w is not None and (need[5] or need[6])
    pro_grads = pro_scale is not None and (need[10] or need[11])  # the deferring block's batch norm's sums
    return tuple(map(present, _backward(dy, x, w, z, residual, gate, scale, shift, mean, var, bn_w, argmax, ctx.pro,
                                        pro_scale, pro_shift, dscale, dshift, add, ctx.spec, ctx.train, bn_grads,
                                        need[0] or need[2], need[3] or need[4], ctx.has_bias, pro_grads)))


def _setup(ctx, inputs, output):
    y, z, argmax, mean, var, scale, shift, token = output
    s = decode(inputs[12])
    # a deferring block's scale and shift take gradients: the sums its batch norm's backward needs,
    # which its reader's input gradient computes (conv.conv2d_backward_input); unused, they stay None
    deferred = s.defer and s.bn is not None and inputs[13]
    ctx.mark_non_differentiable(z, argmax, mean, var, *(() if deferred else (scale, shift)),
                                *(() if inputs[14] else (token,)))
    ctx.set_materialize_grads(False)
    _save(ctx, inputs[:14], y if present(z) is None else z, argmax, mean, var, scale, shift)


def _block_backward(ctx, dy, _z, _argmax, _mean, _var, dscale, dshift, dtoken):
    if dy is None:  # (y unused: nothing reaches the block)
        return (None,) * 15
    dx, dres, dgate, dw, db, dbn_w, dbn_b, dpro_scale, dpro_shift = _grads(
        ctx, dy.contiguous(), ctx.needs_input_grad, dscale, dshift, None if dtoken is None else dtoken.contiguous())
    return dx, dres, dgate, dw, db, dbn_w, dbn_b, None, None, None, dpro_scale, dpro_shift, None, None, None


def grad_token(x, token: bool):
    """With `token`, x's gradient token: x's shape (an expanded element, never read), the output
    whose gradient is that of x's other reader (kernels/add.py's redirect), added to dx in the input
    gradient's epilogue (conv.conv2d_backward_input's `add`)."""
    return x.new_empty(1).expand(x.shape) if token else absent(x)


_block = define(
    "conv_block", "(Tensor x, Tensor? residual, Tensor? gate, Tensor w, Tensor? b, Tensor? bn_w, Tensor? bn_b, "
    "Tensor? mean, Tensor? var, bool pro, Tensor? pro_scale, Tensor? pro_shift, str spec, bool train, bool token) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    lambda *a: (*_train_impl(*a[:-1]), grad_token(a[0], a[-1])), lambda *a: (*_train_fake(*a[:-1]), grad_token(a[0], a[-1])),
    _block_backward, _setup)


# --- zero-copy concatenation: y written into its channel slice of a concat's output (concat.py) ----

def _inference_into_impl(x, w, b, residual, pro, pro_scale, pro_shift, gate, spec, slab, offset):
    _inference_impl(x, w, b, residual, pro, pro_scale, pro_shift, gate, decode(spec),
                    slab.narrow(-1, offset, w.shape[0]))


_inference_into = define(
    "conv_block_inference_into", "(Tensor x, Tensor w, Tensor? b, Tensor? residual, bool pro, Tensor? pro_scale, "
    "Tensor? pro_shift, Tensor? gate, str spec, Tensor(a!) slab, int offset) -> ()", _inference_into_impl,
    lambda x, w, b, residual, pro, pro_scale, pro_shift, gate, spec, slab, offset: None, mutates=("slab",))

_TRAIN_ARGS = ("Tensor x, Tensor? residual, Tensor? gate, Tensor w, Tensor? b, Tensor? bn_w, Tensor? bn_b, Tensor? mean, Tensor? var, "
               "bool pro, Tensor? pro_scale, Tensor? pro_shift, str spec, bool train")
# the training pass's outputs but y: (z, argmax, mean, var, scale, shift)
_block_into = define(
    "conv_block_into", f"({_TRAIN_ARGS}, Tensor(a!) slab, int offset) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)",
    lambda *a: _train_impl(*a[:-2], out=a[-2].narrow(-1, a[-1], a[3].shape[0]))[1:],
    lambda *a: _train_fake(*a[:-2])[1:], mutates=("slab",))


class _BlockInto(torch.autograd.Function):
    """The slab with the block's y written into its channels from `offset`; backward takes that
    slice of the slab's gradient as dy (where it lies with `in_place`: its kernels read rows the
    slab's channels apart, slabs.reads_slice; else a copy) and passes the slab's gradient on to
    the other writers."""

    @staticmethod
    def forward(ctx, slab, offset, in_place, *inputs):
        z, argmax, mean, var, scale, shift = _block_into(*inputs, slab, offset)
        ctx.mark_dirty(slab)
        ctx.mark_non_differentiable(mean, var)
        ctx.offset, ctx.in_place = offset, in_place
        _save(ctx, inputs, z, argmax, mean, var, scale, shift)
        return slab, mean, var

    @staticmethod
    def backward(ctx, dslab, *_):
        k = ctx.saved_tensors[1].shape[0]  # w's output channels
        dslab = dslab.contiguous()
        dy = dslab.narrow(-1, ctx.offset, k) if ctx.in_place else take_slice(dslab, ctx.offset, k)
        dx, dres, dgate, dw, db, dbn_w, dbn_b, dpro_scale, dpro_shift = _grads(ctx, dy, ctx.needs_input_grad[3:])
        return dslab, None, None, dx, dres, dgate, dw, db, dbn_w, dbn_b, None, None, None, dpro_scale, dpro_shift, \
            None, None


def conv_block(x, residual, gate, w, b, bn_w, bn_b, running_mean, running_var, num_batches_tracked,
               spec: ConvBlock, state):
    """x (N, H, W, C) or a Deferred (N, H, W, C) -> (N, OH, OW, K), or pooled, or a Deferred; with
    state.into, the slab holding y in its channel slice. gate: a channel gate's g (N, 1, 1, C) or
    (N, C) that x is scaled by as the conv loads it (forward and weight gradient); x * g's gradient
    (the input gradient's GEMM) goes through the gate's backward pass (gate.py)."""
    bn = spec.bn
    pro, pro_scale, pro_shift = isinstance(x, Deferred), None, None
    if pro:  # the previous block's z: normalised and activated as the conv loads it
        x, pro_scale, pro_shift = x.z, x.scale, x.shift
    slab = None if state.into is None else slab_of(state, x, _shape(x, spec, True)[1:])
    if gate is not None:
        gate = gate.reshape(x.shape[0], x.shape[3])
    if not state.grad and not (bn is not None and state.training):  # inference: one kernel
        if bn is not None:
            w, b = _folded(state.cache, w, b, bn_w, bn_b, running_mean, running_var, bn.eps)
        if slab is None:
            return _inference(x, w, b, residual, pro, pro_scale, pro_shift, gate, state.text)
        _inference_into(x, w, b, residual, pro, pro_scale, pro_shift, gate, state.text, slab, state.into[1])
        return slab
    args = (x, residual, gate, w, b, bn_w, bn_b, running_mean, running_var, pro, pro_scale, pro_shift, state.text,
            state.training)
    if slab is None:
        out = _block(*args, state.token)
    elif torch.is_grad_enabled():
        out = _BlockInto.apply(slab, state.into[1], state.into[3], *args)
        out = (out[0], None, None, out[1], out[2])
    else:
        out = (slab, *_block_into(*args, slab, state.into[1]))
    if bn is not None and state.training:
        update_running(out[3], out[4], running_mean, running_var, num_batches_tracked, bn.momentum,
                       x.shape[0] * spec.geometry.out_hw[0] * spec.geometry.out_hw[1])
    y = Deferred(out[0], present(out[5]), present(out[6]), spec.act1) if spec.defer else out[0]
    return (y, out[7]) if state.token else y
