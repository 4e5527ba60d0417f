"""Low-precision networks checked group by group (helpers.run_both with fp16 or bf16).

A whole network compared at its ends accumulates rounding through every layer and, worse,
through reductions that cancel (a batch-norm bias gradient, a conv weight gradient of
positive inputs): its relative error in bf16 reaches 0.1-0.25 against any reference, so a
bound loose enough to pass is loose enough for an all-zero gradient. Here every launch
step of the triton module is instead recorded (its inputs, output, and the gradients that
leave and enter it) and its group is run again in float64 by the reference backend on the
same rounded inputs and weights. A group's error is then that of its own kernels: one
rounding of each value they store in the dtype, whatever the depth.

Inside a fused group the float64 reference reproduces the values its kernels store in the
dtype, so that both take the same relu, max-pool and dropout decisions on the same values:
a conv block writes z (and its backward dz and, after batch norm, da) in the dtype and
takes batch statistics from the fp32 z of the conv's epilogue; a dense block's backward
writes the gradient after softmax and after its epilogue. `stored` rounds as the device
does: to nearest even, except bf16 under Triton 3.6's interpreter, which truncates fp32
to bf16 (2x the error, and biased). Wiring is exact: each step must read bit for bit the
value that the step producing it wrote, and the network's output is the last step's."""

from contextlib import ExitStack
from dataclasses import dataclass, field
from unittest import mock

import torch


def stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `t` as a kernel stores it in `dtype` (through fp32, as its accumulators)."""
    from cnndsl.kernels._common import INTERPRET
    t32 = t.float()
    if dtype == torch.bfloat16 and INTERPRET:  # truncation: keep the high 16 bits of the fp32 word
        return (t32.view(torch.int32) & -65536).view(torch.float32).double()
    return t32.to(dtype).double()


class _Store(torch.autograd.Function):
    """A value a fused group writes in `dtype` between two of its kernels (value=True), or only
    its gradient (value=False); backward rounds the gradient the same way."""

    @staticmethod
    def forward(ctx, t, dtype, value):
        ctx.dtype = dtype
        return stored(t, dtype) if value else t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return stored(g, ctx.dtype), None, None


class _Tap(torch.autograd.Function):
    """The identity; backward records the gradient that flows through it."""

    @staticmethod
    def forward(ctx, x, slot):
        ctx.slot = slot
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.slot.append(g)
        return g, None


@dataclass
class Call:
    """One launch step as it ran: its inputs and output (the module's NHWC or (N, F) tensors) and
    the gradients its backward returned for each input (dx) and received at its output (dy)."""
    step: object
    inputs: list
    output: torch.Tensor
    grad: bool
    logits: bool
    dx: list = field(default_factory=list)
    dy: list = field(default_factory=list)
    dtoken: list = field(default_factory=list)  # (Step.token) the shortcut's gradient it adds to input 0's


def _tap(value, slot):
    """_Tap on a tensor, or on the z of a block's deferred output (whose gradient is y's)."""
    from cnndsl.kernels.conv_block import Deferred
    if isinstance(value, Deferred):
        return value._replace(z=_Tap.apply(value.z, slot))
    return _Tap.apply(value, slot)


def _value(value):
    """What a step wrote, as a tensor: a deferred output is the y = act(z scale + shift) that its
    reading conv computes as it loads z, bit for bit: block-level fusion's epilogue pass computes
    it with the same code (the float64 reference then takes the same relu and pool decisions)."""
    from cnndsl.kernels.conv_block import Deferred
    from cnndsl.kernels.epilogue import epilogue_forward
    from cnndsl.specs import NO_ACT
    if not isinstance(value, Deferred):
        return value.detach()
    with torch.no_grad():
        return epilogue_forward(value.z, value.scale, value.shift, value.act, None, NO_ACT, None)[0]


class _Recorded:
    """A runner as the executor calls it, recording each call of the step it runs."""

    def __init__(self, runner, calls: list, current: dict):
        self.runner, self.calls, self.current = runner, calls, current

    def __call__(self, *args):
        step = self.current["steps"][self.current["i"]]
        self.current["i"] += 1
        k = len(step.inputs)
        call = Call(step, [], None, args[-1].grad, self.current["logits"])
        call.dx = [[] for a in args[:k] if a is not None]
        inputs = iter(_tap(a, slot) for a, slot in zip((a for a in args[:k] if a is not None), call.dx))
        args = [next(inputs) if a is not None else None for a in args[:k]] + list(args[k:])
        call.inputs = [_value(a) for a in args[:k] if a is not None]
        out = self.runner(*args)
        token = None
        if args[-1].token:  # (y, the gradient token of its input)
            out, token = out
            token = _Tap.apply(token, call.dtoken)
        if step.into is not None and step.runner != "concat_layer":
            # it wrote into a concat's slab, which later writers change in place: a tap (a view) would
            # break that; check_pass takes its slice of the slab, and of the concat's gradient
            call.output = out.detach().clone()
        else:
            out = _tap(out, call.dy)
            call.output = _value(out)
        self.calls.append(call)
        return out if token is None else (out, token)


def record(calls: list) -> ExitStack:
    """While open, every step the triton backend runs is appended to `calls`."""
    from cnndsl.runtime import triton_module as tm
    current = {"steps": (), "i": 0, "logits": False}
    run = tm.TritonModule._run

    def traced(module, x, logits):
        current.update(steps=module.program.logits if logits else module.program.forward, i=0,
                       logits=logits and module.program.logits != module.program.forward)
        return run(module, x, logits)

    stack = ExitStack()
    stack.enter_context(mock.patch.object(tm.TritonModule, "_run", traced))
    stack.enter_context(mock.patch.dict(tm.RUNNERS, {k: _Recorded(v, calls, current) for k, v in tm.RUNNERS.items()
                                                      if k not in ("fork", "redirect", "cross_entropy")}))
    return stack


def nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def _bn_of_stored(bn, z, zs):
    """Batch norm as a fused conv block applies it to its stored zs: in training, statistics of
    the fp32 z (values) that differentiate as zs's, and running statistics updated from them."""
    dims, view = ([0, 2, 3], (1, -1, 1, 1)) if z.dim() == 4 else ([0], (1, -1))
    if bn.training:
        mean_s, var_s = zs.mean(dims), zs.var(dims, unbiased=False)
        with torch.no_grad():
            mean, var = z.mean(dims), z.var(dims, unbiased=False)
            n = z.numel() // z.shape[1]
            bn.running_mean.mul_(1 - bn.momentum).add_(bn.momentum * mean)
            bn.running_var.mul_(1 - bn.momentum).add_(bn.momentum * var * n / (n - 1))
            bn.num_batches_tracked += 1
        mean, var = mean_s + (mean - mean_s).detach(), var_s + (var - var_s).detach()
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (zs - mean.view(view)) / torch.sqrt(var.view(view) + bn.eps)
    return y * bn.weight.view(view) + bn.bias.view(view) if bn.affine else y


def _run_group(ref, op, group, call, ins, dtype):
    """The group's nodes in float64 on `ins`, storing what its kernels store (module docstring)."""
    from cnndsl.ir import Op
    fused_conv = call.step.runner == "conv_block" and len(group.nodes) > 1 and call.grad
    fused_dense = call.step.runner == "dense_block" and call.grad
    values, z = dict(zip([i for i in call.step.inputs if i is not None], ins)), None
    for node in group.nodes:
        if node.op is Op.SOFTMAX and call.logits:
            break  # model.loss leaves the final softmax to the cross-entropy
        xs = [values[i] for i in node.inputs]
        if node.op is Op.SOFTMAX and fused_dense:
            xs = [_Store.apply(xs[0], dtype, False)]  # softmax backward writes its gradient
        if node.op is Op.BATCHNORM and fused_conv:
            y = _Store.apply(_bn_of_stored(ref.layers[node.id], z, xs[0]), dtype, False)  # da
        else:
            y = op(node, xs)
        if node.op is Op.CONV and fused_conv:
            z, y = y, _Store.apply(y, dtype, True)
        elif node.op is Op.GATE and fused_conv:  # in training the gate's own pass writes x * g
            y = _Store.apply(y, dtype, True)
        elif node.op is Op.DENSE and fused_dense and len(group.nodes) > 1:
            y = _Store.apply(y, dtype, False)  # the epilogue backward writes da
        values[node.id] = y
    return y


def check_pass(calls, x, ref, tri, op, dtype, tol, close, loss=None, criterion=None):
    """Check one forward pass (and its backward, where it ran) step by step: `calls` as recorded
    from input `x`, `ref` the float64 reference module, `op` its op with the triton run's dropout
    masks, `close` helpers.assert_close; `loss` the triton value of `criterion` of the output."""
    written = {0: x.permute(0, 2, 3, 1)}  # what each step wrote: the network input NHWC
    _slices(calls, tri.net)
    for call in calls:
        placed = call.step.spec.in_place if call.step.runner == "concat_layer" and call.step.into else ()
        for i, (value, inp) in enumerate(zip([i for i in call.step.inputs if i is not None], call.inputs)):
            if placed and placed[i]:
                continue  # the concat's slab, which the step producing it wrote into
            assert torch.equal(inp, written[value]), f"{call.step.name}: input {i} is not what node {value} wrote"
        written[call.step.output] = call.output
        _check_call(call, ref, tri, op, dtype, tol, close)
    if loss is not None:
        out = nchw(calls[-1].output).double().requires_grad_()
        expected = criterion(out)
        close(loss.float().reshape(1), expected.reshape(1), tol=tol, name="loss")
        dout, = torch.autograd.grad(expected, out)
        close(nchw(calls[-1].dy[0]).float(), dout, tol=tol, name="loss gradient at the output")


def _slices(calls, net):
    """A step that wrote into a concat's slab (zero-copy): its output is its channel slice of the slab,
    its gradient that slice of the concat's gradient."""
    joins = {c.step.output: c for c in calls if c.step.runner == "concat_layer"}
    for call in calls:
        if call.step.into is not None and call.step.runner != "concat_layer":
            off, c = call.step.into[1], net.nodes[call.step.output].shape[0]
            join = joins[call.step.into[0]]
            call.output = call.output[..., off:off + c]
            call.dy = [join.dy[0][..., off:off + c]] if join.dy else []
    for join in joins.values():  # its inputs written in place: as the slab holds them
        if join.step.into is not None:
            starts = [sum(join.step.spec.channels[:i]) for i in range(len(join.step.spec.channels))]
            join.inputs = [join.output[..., off:off + c] if placed else x for x, off, c, placed in
                           zip(join.inputs, starts, join.step.spec.channels, join.step.spec.in_place)]


def _check_call(call, ref, tri, op, dtype, tol, close):
    group = tri.plan.groups[call.step.group]
    name = f"{group.name} ({'+'.join(group.ops)})"
    ins = [nchw(x).double().requires_grad_(call.grad) for x in call.inputs]
    with torch.set_grad_enabled(call.grad):
        y = _run_group(ref, op, group, call, ins, dtype)
    close(nchw(call.output).float(), y, tol=tol, name=f"{name} output")
    if not call.dy:
        return
    layers = [(n.name, ref.layers[n.id], tri.layers[n.id]) for n in group.nodes if n.id in ref.layers]
    params = [(f"{n}.{p}", q, dict(t.named_parameters())[p]) for n, r, t in layers for p, q in r.named_parameters()]
    grads = torch.autograd.grad(y, ins + [q for _, q, _ in params], nchw(call.dy[0]).double(), allow_unused=True)
    for i, (slot, g) in enumerate(zip(call.dx, grads)):
        if slot:
            if i == 0 and call.dtoken:  # its input gradient adds the shortcut's, which its token received
                g = g + nchw(call.dtoken[0]).double()
            close(nchw(slot[0]).float(), g, tol=tol, name=f"{name} input {i} gradient")
    for (pname, _, p), g in zip(params, grads[len(ins):]):
        close(p.grad.float(), g, tol=tol, name=f"{name} gradient of {pname}")
