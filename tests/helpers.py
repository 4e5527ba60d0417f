"""Comparison helpers shared by every test: norm-wise relative error with tolerances that
scale with the dtype and the reduction length, and `run_both`, which compares the triton
backend with the reference backend on a whole network, dropout included in training."""

import itertools
import math
from contextlib import contextmanager
from unittest import mock

import torch

# Unit roundoff of each storage dtype.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Networks in these dtypes are compared launch step by launch step (layerwise.py), each step
# within the bound of a single kernel, tolerance(dtype, reduction): 8 units in the last place
# (bf16 0.031, fp16 0.0039). The worst step errors measured over the networks of
# test_triton_backend (12 seeds of the residual network in bf16; 3 of the others; train and
# eval, fused and unfused, under the interpreter, which truncates to bf16) were 0.016 in bf16
# and 0.0005 in fp16 (0.0026 where a gradient falls among fp16's subnormals).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype, reduction: int = 1, depth: int = 1) -> float:
    """Allowed ||a - b|| / ||b|| for a kernel or an fp32 network: storage rounding grows with
    the depth of the chain of rounded results, fp32 accumulation error with sqrt(reduction
    length). Low-precision networks are compared step by step instead (LOW_PRECISION)."""
    return 8 * EPS[dtype] * depth + 16 * EPS[torch.float32] * math.sqrt(max(reduction, 1))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype=torch.float32, reduction=1, depth=1, name="tensor", tol=None):
    """||actual - expected|| / ||expected|| <= tol (default: tolerance(dtype, reduction, depth))."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    why = f"{dtype}, reduction {reduction}, depth {depth}" if tol is None else "the bound given"
    tol = tolerance(dtype, reduction, depth) if tol is None else tol
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({why})"


def max_reduction(net, batch: int) -> int:
    """The longest sum behind any value of a network's forward or backward pass."""
    from cnndsl.ir import Op
    longest = 1
    for node in net.nodes[1:]:
        shape = net.in_shape(node)
        if node.op is Op.CONV:
            a = node.attrs
            longest = max(longest, shape[0] // a.groups * a.kernel[0] * a.kernel[1],
                          batch * node.shape[1] * node.shape[2])
        elif node.op in (Op.DENSE, Op.BATCHNORM, Op.SOFTMAX):
            longest = max(longest, shape[0], batch * (shape[1] * shape[2] if len(shape) == 3 else 1))
    return longest


def torch_act(kind: str, slope: float = 0.01):
    """torch's activation `kind` as a function of a tensor: the op registry's reference (so a new
    activation is tested wherever the kernel tests loop over kernels/activation.py's), "none" the
    identity."""
    if kind == "none":
        return lambda t: t
    from cnndsl.ops import REGISTRY
    from cnndsl.ops.activation import Activation
    return lambda t: REGISTRY["activation"].reference(None, Activation(kind, slope), [t], False)


def dropout_keep(shape, p: float, seed: int, device="cpu") -> torch.Tensor:
    """The keep mask (bool, NCHW or (N, F) `shape`) of the triton runtime's dropout from `seed`,
    recovered from the kernel itself: what dropout of ones keeps. The runtime holds feature
    maps as NHWC, so a 4-d mask is drawn over N, H, W, C offsets."""
    from cnndsl.kernels.dropout import dropout_forward
    inside = (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else tuple(shape)
    keep = dropout_forward(torch.ones(inside, device=device), p, seed) != 0
    return keep.permute(0, 3, 1, 2) if len(shape) == 4 else keep


def stochastic_depth_keep(n: int, p: float, seed: int, device="cpu") -> torch.Tensor:
    """The keep mask (bool, (n, 1, 1, 1)) of the triton runtime's stochastic depth from `seed`,
    recovered from the kernel: which samples of ones it keeps."""
    from cnndsl.kernels.stochastic_depth import stochastic_depth_forward
    return (stochastic_depth_forward(torch.ones(n, 1, device=device), p, seed) != 0).view(n, 1, 1, 1)


class FixedDropout:
    """Dropout by value: fixes the seeds that the triton module `tri` draws (one per dropout or
    stochastic-depth layer with p > 0, in the order its steps run, again for every forward pass)
    and gives the reference module `ref` an op applying the same keep masks."""

    def __init__(self, tri, ref, base: int):
        from cnndsl.ir import Op
        order = []
        for step in tri.steps:
            if step.runner == "dense_block" and step.spec.p > 0:
                order += [n.id for n in tri.plan.groups[step.group].nodes if n.op is Op.DROPOUT]
            elif step.runner in ("dropout_layer", "stochastic_depth_layer") and step.spec.p > 0:
                order.append(step.output)
        self.seeds = {node: base + 7919 * k for k, node in enumerate(order)}
        self.ref, self.ref_op, self.dropout, self.depth = ref, ref._op, Op.DROPOUT, Op.STOCHASTIC_DEPTH

    @contextmanager
    def fixed(self):
        from cnndsl.runtime.steps import StepState
        seeds = itertools.cycle(self.seeds.values())
        with mock.patch.object(StepState, "seed", staticmethod(lambda: torch.tensor(next(seeds)))):
            yield

    def op(self, node, xs):
        """The reference's op, with dropout and stochastic depth in training applying the triton
        run's masks."""
        if node.op not in (self.dropout, self.depth) or not self.ref.training or node.id not in self.seeds:
            return self.ref_op(node, xs)
        p, x = node.attrs.p, xs[0]
        keep = dropout_keep(x.shape, p, self.seeds[node.id], x.device) if node.op is self.dropout else \
            stochastic_depth_keep(x.shape[0], p, self.seeds[node.id], x.device)
        return x * keep * (0.0 if p == 1 else 1.0 / (1.0 - p))


def run_both(src, batch=2, dtype=torch.float32, train=True, fuse=False, steps=1, seed=0, device="cpu"):
    """Run the same weights and inputs through the triton backend and the reference backend, with
    the same dropout masks; compare the loss, the output, the input gradient, every parameter
    gradient and every buffer (BN running statistics) after `steps` training steps (or one eval
    pass, then the output of a forward without autograd). fp32 compares the whole network;
    fp16 and bf16 compare every launch step with float64 (layerwise.py)."""
    import cnndsl
    net = cnndsl.parse(src)
    torch.manual_seed(seed)
    ref = cnndsl.compile(net, backend="torch", device=device)
    tri = cnndsl.compile(net, backend="triton", fuse=fuse, device=device)
    tri.load_state_dict(ref.state_dict())
    tri = tri.to(dtype)
    by_step = dtype in LOW_PRECISION
    if by_step:  # float64 on the same rounded weights
        ref = ref.to(torch.float64)
        ref.load_state_dict(tri.state_dict())
    else:
        ref = ref.to(dtype)
    for m in (ref, tri):
        m.train(train)
    tol = {"tol": tolerance(dtype, max_reduction(net, batch))} if by_step else \
        {"dtype": dtype, "reduction": max_reduction(net, batch), "depth": len(net.nodes)}
    classes = net.output_shape[0]
    for step in range(steps):
        x = torch.randn(batch, *net.input_shape, device=device).to(dtype)
        target = torch.randint(0, classes, (batch,), device=device) if len(net.output_shape) == 1 else None
        masks = FixedDropout(tri, ref, base=1 + 1000 * step)
        (_by_step if by_step else _whole)(ref, tri, x, target, masks, tol, f"step {step}")
    if not train:  # the inference path (no autograd: batch norm folded into the conv weights)
        with torch.no_grad():
            if by_step:
                _by_step_no_grad(ref, tri, x, tol)
            else:
                assert_close(tri(x).float(), ref(x).float(), name="no-grad output", **tol)
    for (name, b_r), (_, b_t) in zip(ref.named_buffers(), tri.named_buffers()):
        if b_r.is_floating_point():
            assert_close(b_t.float(), b_r.float(), name=f"buffer {name}", **tol)
        else:
            assert torch.equal(b_t, b_r), f"buffer {name}: {b_t} != {b_r}"
    return ref, tri


def _whole(ref, tri, x, target, masks, tol, label):
    """The network end to end: output, loss, input and parameter gradients."""
    grads = []
    ref._op = masks.op
    try:
        for m in (ref, tri):
            xi = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            with masks.fixed():
                out = m(xi)
                loss = m.loss(xi, target) if target is not None else (out.float() * out.float()).mean()
            loss.backward()
            grads.append((out, loss, xi.grad, [p.grad for p in m.parameters()]))
    finally:
        del ref._op
    (o_r, l_r, gx_r, gp_r), (o_t, l_t, gx_t, gp_t) = grads
    assert_close(o_t.float(), o_r.float(), name=f"{label} output", **tol)
    assert_close(l_t.float().reshape(1), l_r.float().reshape(1), name=f"{label} loss", **tol)
    assert_close(gx_t.float(), gx_r.float(), name=f"{label} input grad", **tol)
    for (name, _), g_t, g_r in zip(ref.named_parameters(), gp_t, gp_r):
        assert_close(g_t.float(), g_r.float(), name=f"{label} grad {name}", **tol)


def _by_step(ref, tri, x, target, masks, tol, label):
    """model(x), then model.loss(x) and its backward, checked launch step by launch step."""
    import layerwise as lw
    xi = x.clone().requires_grad_()
    tri.zero_grad(set_to_none=True)
    close = lambda *a, name, **k: assert_close(*a, name=f"{label}: {name}", **k)
    check = lambda calls, *loss: lw.check_pass(calls, x, ref, tri, masks.op, tri.dtype, tol["tol"], close, *loss)
    calls = []
    with lw.record(calls), masks.fixed():
        out = tri(xi)
    assert torch.equal(out, lw.nchw(calls[-1].output)), f"{label}: the output is not the last step's"
    if target is None:
        loss = (out.float() * out.float()).mean()
        loss.backward()
        check(calls, loss, lambda y: (y * y).mean())
    else:
        check(calls)
        calls = []
        with lw.record(calls), masks.fixed():
            loss = tri.loss(xi, target)
        loss.backward()
        check(calls, loss, lambda y: torch.nn.functional.cross_entropy(y, target))
    readers = [g for c in calls for v, slot in zip(c.step.inputs, c.dx) if v == 0 for g in slot]
    close(xi.grad.float(), lw.nchw(sum(g.double() for g in readers)), tol=tol["tol"], name="input grad")


def _by_step_no_grad(ref, tri, x, tol):
    import layerwise as lw
    calls = []
    with lw.record(calls):
        out = tri(x)
    lw.check_pass(calls, x, ref, tri, ref._op, tri.dtype, tol["tol"],
                  lambda *a, name, **k: assert_close(*a, name=f"no-grad: {name}", **k))
    assert torch.equal(out, lw.nchw(calls[-1].output)), "no-grad output is not the last step's"


def run_files(folder) -> list[str]:
    """The files a training run leaves in its folder, sorted; curves.png left out (drawn only where
    matplotlib is installed)."""
    return sorted(p.name for p in folder.iterdir() if p.name != "curves.png")


def launches(run, see=lambda kernel, values: kernel.fn.__name__, execute=True) -> list:
    """`see(kernel, {argument: value})` of every Triton kernel launch `run()` makes (under the
    interpreter), in order, leaving out what `see` returns as None; by default each kernel's name.
    execute=False skips the kernels: no launch depends on what one computed (test_hopper_speed.py
    checks it), so a test of what is launched need not wait for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    seen, original = [], InterpretedFunction.run

    def record(self, *args, **kwargs):
        what = see(self, {**dict(zip(self.arg_names, args)), **kwargs})
        if what is not None:
            seen.append(what)
        return original(self, *args, **kwargs) if execute else None
    with mock.patch.object(InterpretedFunction, "run", record):
        run()
    return seen
