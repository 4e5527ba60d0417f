"""The byte model of `cnndsl plan` and `cnndsl bench`: what each kernel a group launches reads and
writes, as data. KERNEL_BYTES maps a kernel's plan name (plan.py's lists: the rule's for a fused
group, the op's own for a lone op) to its bytes, from the sizes of the group's tensors, so the
model follows the plan's kernel lists: a fused group's bytes are its kernels', an unfused
group's the sum of its ops' kernels alone. Each kernel counts each tensor it reads or writes
once (tile re-reads hit the caches); per-channel vectors (statistics, scale and shift) are
left out. Also counted: the channels a conv pads to 16 with zeros (its GEMM reads them), the
conv weight gradient's fp32 per-split partials (written, then summed), one read of dz per stride
phase of a conv's input gradient, and where a value has k > 1 readers, the k - 1 additions of
their gradients in training; the network's input takes no gradient. tests/test_traffic.py
records every launch of a training step and checks the model against it."""

from collections.abc import Callable
from dataclasses import dataclass

from . import ir
from .ir import Op
from .shapes import numel, params
from .slabs import COPIED, SUMMED, WRITTEN
from .specs import (
    H100,
    MIN_GEMM_K,
    Machine,
    stride_phases,
    weight_grad_split,
    weight_grad_tiles,
)


@dataclass(frozen=True)
class Tensors:
    """A group's tensors in bytes: x the input of its conv or dense layer (of its op, alone) and
    x_read as the GEMM reads it (channels padded), w the parameters, z the GEMM's (op's) output and
    z_read as the input gradient's GEMM reads it as dz, y the group's output, res the shortcut
    (add's second input), argmax a max pool's, split the weight gradient's fp32 partials, phases
    the conv input gradient's launches that read dz (one per stride phase that a tap reaches: each
    reads dz whole and writes its share of dx); pre: a dense block keeps its GEMM output for its
    activation's gradient in training; z_bwd and res_bwd: a conv block's backward gather pass reads
    z (for batch norm or an activation) and the shortcut (for an activation after the add); copied:
    a concat's inputs that it copies into its output (those no group wrote there: zero-copy), and
    grad_copied those whose slices of its gradient are copied out in backward."""

    x: int
    w: int
    z: int
    y: int
    x_read: int = 0
    z_read: int = 0
    res: int = 0
    argmax: int = 0
    split: int = 0
    phases: int = 1
    pre: bool = False
    z_bwd: bool = True
    res_bwd: bool = True
    copied: int = 0
    grad_copied: int = 0


_NONE = lambda t, training: 0
_CONV_DX = lambda t: t.phases * t.z_read + t.w + t.x  # dz (per phase) and w in, dx out
_CONV_DW = lambda t: t.x_read + t.z + t.w + t.split  # x and dz in, the partials, dw out
_POOLED_DZ = lambda t: (1 + t.z_bwd) * t.y + t.argmax  # dy, y (for an activation's gradient), the argmax
KERNEL_BYTES: dict[str, Callable[[Tensors, bool], int]] = {
    "conv_fwd": lambda t, training: t.x_read + t.w + t.z,
    "conv_fwd+stats": lambda t, training: t.x_read + t.w + t.z,
    "conv_fwd+epilogue": lambda t, training: t.x_read + t.w + t.res + t.y,
    "conv_fwd+pool": lambda t, training: t.x_read + t.w + t.y + t.argmax,  # pooled in the GEMM, no z
    "conv_bwd_input": lambda t, training: _CONV_DX(t),
    "conv_bwd_weight": lambda t, training: _CONV_DW(t),
    # dz on load: the gradient kernels read dy and z where they read dz
    "dz_on_load+conv_bwd_input": lambda t, training: _CONV_DX(t) + t.phases * t.y,
    "dz_on_load+conv_bwd_weight": lambda t, training: _CONV_DW(t) + t.y,
    # ... from a pooled dy: dy, the argmax and (for act1's gradient) y, all pooled, where they read dz
    "pooled_dz_on_load+conv_bwd_input": lambda t, training: t.phases * _POOLED_DZ(t) + t.w + t.x,
    "pooled_dz_on_load+conv_bwd_weight": lambda t, training: t.x_read + _POOLED_DZ(t) + t.w + t.split,
    "epilogue_fwd": lambda t, training: t.z + t.res + t.y + t.argmax,
    # dy, argmax, z and the shortcut (where read) in; dz (da with batch norm) and its gradient out
    "epilogue_bwd": lambda t, training: t.y + t.argmax + (1 + t.z_bwd) * t.z + (1 + t.res_bwd) * t.res,
    # dy and the argmax in, y where the activation's gradient needs it (at each window's maximum), dz out
    "pool_bwd_from_y": lambda t, training: (1 + t.z_bwd) * t.y + t.argmax + t.z,
    "epilogue_bwd+bn_reduce": lambda t, training: t.y + t.argmax + 2 * t.z + (1 + t.res_bwd) * t.res,
    # ... where da is the shortcut's gradient (no act1): written once, as that (dz on load)
    "epilogue_bwd+bn_sums": lambda t, training: t.y + t.argmax + t.z + (1 + t.res_bwd) * t.res,
    "bn_stats": lambda t, training: t.x,
    "bn_apply": lambda t, training: t.x + t.y,
    "bn_bwd_reduce": lambda t, training: 2 * t.z,  # dy and x
    # a deferred block's sums, in its reader's input gradient (a conv's or max pool's epilogue): z read again
    "bn_sums_in_reader": lambda t, training: t.z,
    # a value's gradients from a conv and a shortcut: the shortcut's read in the conv's input gradient
    "fork_sum_in_reader": lambda t, training: t.y,
    "bn_bwd_apply": lambda t, training: 3 * t.z,  # dy and x in, dx out
    "bn_act_bwd": lambda t, training: 3 * t.z,  # dy and x in, dx out (the activation's gradient recomputed)
    "bn_fold": _NONE, "bn_scale_shift": _NONE, "bn_merge_stats": _NONE, "bn_update_running": _NONE,
    "bn_bwd_merge": _NONE,
    "dense_fwd": lambda t, training: t.x + t.w + t.y + (t.z if t.pre and training else 0),
    "dense_epilogue_bwd": lambda t, training: 3 * t.z,  # dy and pre in, dz out
    "softmax_bwd": lambda t, training: 3 * t.y,  # y and dy in, dz out
    "dense_bwd_input": lambda t, training: t.z + t.w + t.x,
    "dense_bwd_weight": lambda t, training: t.x + 2 * t.z + t.w,  # x and dz in (dz again for the bias), dw out
    "activation_fwd": lambda t, training: t.x + t.y,
    "activation_bwd": lambda t, training: 3 * t.x,
    "pool_fwd": lambda t, training: t.x + t.y + t.argmax,
    "pool_bwd": lambda t, training: t.y + t.argmax + t.x,
    "global_avgpool_fwd": lambda t, training: t.x + t.y,
    "global_avgpool_bwd": lambda t, training: t.y + t.x,
    "add_fwd": lambda t, training: t.x + t.res + t.y,
    "concat_fwd": lambda t, training: 2 * t.copied,  # the inputs not written in place in, copied out
    # the slices of dy copied out (all but those whose writers' backward reads them in place)
    "concat_bwd": lambda t, training: 2 * t.grad_copied,
    # (of a gate alone, or the first stage of a conv block: x is the gated value's size either way)
    "gate_fwd": lambda t, training: 2 * t.x,  # x in, x * g out (the per-channel gate is small)
    "gate_bwd": lambda t, training: 3 * t.x,  # dy and x in, dx out
    "dropout_fwd": lambda t, training: t.x + t.y,
    "dropout_bwd": lambda t, training: 2 * t.y,
    "stochastic_depth_fwd": lambda t, training: t.x + t.y,
    "stochastic_depth_bwd": lambda t, training: 2 * t.y,
    "softmax_fwd": lambda t, training: t.x + t.y,
}


def kernel_bytes(name: str, t: Tensors, training: bool) -> int:
    """The bytes of one kernel of the plan's lists; cross-layer fusion's prologue moves what the
    kernel does without it (it reads z where it read y: the same size), and so does a conv that
    applies a gate as it loads x (the gate, one value per sample and channel, is small)."""
    name = name.removeprefix("prologue+").removeprefix("gate+")
    base = name.removesuffix("+bn_sums")
    if base != name and base.endswith(("conv_bwd_input", "pool_bwd")):  # it reads z (x: the forward normalised
        return KERNEL_BYTES[base](t, training) + t.x  # it on load) for the sums
    key = "dense_fwd" if name.startswith("dense_fwd") else name
    return KERNEL_BYTES[key](t, training)


def _conv_split(net: ir.Network, conv: ir.Node, batch: int, machine: Machine) -> int:
    """Bytes of the conv weight gradient's fp32 partials (and the bias gradient's), written and read."""
    a = conv.attrs
    width, tiles = weight_grad_tiles(a.filters, a.groups, net.in_shape(conv)[0] // a.groups, a.kernel[0] * a.kernel[1])
    split, _ = weight_grad_split(batch * conv.shape[1] * conv.shape[2], tiles, machine)
    return 2 * 4 * split * a.filters * (a.kernel[0] * a.kernel[1] * width + (1 if a.bias else 0))


def input_grad_phases(conv) -> int:
    """The launches of a conv's input gradient that read dy: one per stride phase that taps reach on
    both axes (specs.stride_phases, over `stride` pixels: every phase has one)."""
    phases = 1
    for k, st, pad, dil in zip(conv.kernel, conv.stride, conv.padding, conv.dilation):
        phases *= sum(1 for phase in stride_phases(st, k, st, pad, dil, True) if phase[7])  # its taps
    return phases


def _padded(size: int, channels: int) -> int:
    """A conv operand's bytes as its GEMM reads it: fewer than 16 channels a group are padded."""
    return size * MIN_GEMM_K // channels if channels < MIN_GEMM_K else size


def tensors(net: ir.Network, nodes: tuple[ir.Node, ...], batch: int, itemsize: int, machine: Machine,
            in_place: tuple[int, ...] = ()) -> Tensors:
    """The tensor sizes of a group of `nodes` (a fused chain, or one op alone); in_place: a concat's
    inputs' states (plan.Group.in_place, slabs.py's)."""
    size = lambda node: batch * numel(node.shape) * itemsize
    ids = {n.id for n in nodes}
    gemm = next((n for n in nodes if n.op in (Op.CONV, Op.DENSE)), nodes[0])
    x, z = batch * numel(net.in_shape(gemm)) * itemsize, size(gemm)
    res = sum(size(net.nodes[i]) for n in nodes if n.op is Op.ADD for i in n.inputs if i not in ids) \
        if len(nodes) > 1 else sum(size(net.nodes[i]) for i in gemm.inputs[1:])
    pool = next((n for n in nodes if n.op is Op.POOL and n.attrs.mode == "max"), None)
    argmax = batch * numel(pool.shape) * (1 if pool.attrs.kernel[0] * pool.attrs.kernel[1] <= 127 else 2) \
        if pool else 0
    x_read, z_read, split, phases = x, z, 0, 1
    if gemm.op is Op.CONV:
        a = gemm.attrs
        cin_g, cout_g = net.in_shape(gemm)[0] // a.groups, a.filters // a.groups
        if not cin_g == cout_g == 1:  # depthwise layers are not padded
            x_read, z_read = _padded(x, cin_g), _padded(z, cout_g)
        split = _conv_split(net, gemm, batch, machine)
        phases = input_grad_phases(a)
    ops = [n.op for n in nodes]
    last = nodes[-1]
    states = list(zip(last.inputs, in_place or (0,) * len(last.inputs))) if last.op is Op.CONCAT else []
    copied = sum(size(net.nodes[i]) for i, f in states if f in (COPIED, SUMMED))
    grad_copied = sum(size(net.nodes[i]) for i, f in states if f in (COPIED, WRITTEN))
    return Tensors(x, params(net, gemm) * itemsize, z, size(last), x_read, z_read, res, argmax, split, phases,
                   pre=gemm.op is Op.DENSE and Op.ACTIVATION in ops,
                   z_bwd=Op.BATCHNORM in ops or Op.ACTIVATION in ops,
                   res_bwd=Op.ADD in ops and Op.ACTIVATION in ops[ops.index(Op.ADD):], copied=copied,
                   grad_copied=grad_copied)


_READERS: dict[int, tuple[ir.Network, dict[int, int]]] = {}


def _readers(net: ir.Network) -> dict[int, int]:
    """How many nodes read each node's output (kept for the last few networks asked about)."""
    hit = _READERS.get(id(net))
    if hit is None or hit[0] is not net:
        count = {n.id: 0 for n in net.nodes}
        for n in net.nodes:
            for i in n.inputs:
                count[i] += 1
        if len(_READERS) > 8:
            _READERS.clear()
        hit = _READERS[id(net)] = (net, count)
    return hit[1]


def group_bytes(net: ir.Network, nodes, kernels, batch: int, itemsize: int, training: bool,
                machine: Machine = H100, in_place: tuple[int, ...] = ()) -> int:
    """The bytes `kernels` (a plan's list for the group of `nodes`) move; in training, with the
    additions of the gradients of its output where several layers read it. The network's input
    takes no gradient: a conv or dense layer reading it launches no input-gradient kernel.
    in_place: a concat's inputs' states (zero-copy, tensors())."""
    nodes = tuple(nodes)
    t = tensors(net, nodes, batch, itemsize, machine, in_place)
    if nodes[0].inputs[:1] == (0,):
        kernels = [k for k in kernels if not k.endswith(("conv_bwd_input", "dense_bwd_input"))]
    moved = sum(kernel_bytes(k, t, training) for k in kernels)
    readers = _readers(net)[nodes[-1].id]
    if training and readers > 1 and "fork_sum_in_reader" not in kernels:
        moved += 3 * (readers - 1) * batch * numel(nodes[-1].shape) * itemsize
    return moved
