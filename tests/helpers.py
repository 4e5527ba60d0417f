"""Comparison helpers shared by every test: tolerances that scale with the dtype,
the reduction length and the depth of the computation, on norm-wise relative error."""

import math

import torch

# Unit roundoff of each storage dtype.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(dtype: torch.dtype, reduction: int = 1, depth: int = 1) -> float:
    """Allowed ||a - b|| / ||b||: storage rounding grows with the depth of the chain of
    rounded results, fp32 accumulation error with sqrt(reduction length)."""
    return 8 * EPS[dtype] * depth + 16 * EPS[torch.float32] * math.sqrt(max(reduction, 1))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype=torch.float32, reduction=1, depth=1, name="tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    tol = tolerance(dtype, reduction, depth)
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({dtype}, reduction {reduction}, depth {depth})"


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


def run_both(src, batch=2, dtype=torch.float32, train=True, fuse=False, steps=1, seed=0, device="cpu"):
    """Run the same weights and inputs through the triton backend and the reference backend;
    compare the loss, the output, the input gradient, every parameter gradient and every buffer
    (BN running statistics) after `steps` training steps (or one eval pass, then the output of
    a forward without autograd)."""
    import cnndsl
    net = cnndsl.parse(src)
    torch.manual_seed(seed)
    ref = cnndsl.compile(net, backend="torch", device=device)
    tri = cnndsl.compile(net, backend="triton", fuse=fuse, device=device)
    tri.load_state_dict(ref.state_dict())
    ref, tri = ref.to(dtype), tri.to(dtype)
    for m in (ref, tri):
        m.train(train)
    tol = {"dtype": dtype, "reduction": max_reduction(net, batch), "depth": len(net.nodes)}
    classes = net.output_shape[0]
    for step in range(steps):
        x = torch.randn(batch, *net.input_shape, device=device).to(dtype)
        target = torch.randint(0, classes, (batch,), device=device) if len(net.output_shape) == 1 else None
        grads = []
        for m in (ref, tri):
            xi = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            out = m(xi)
            loss = m.loss(xi, target) if target is not None else (out.float() * out.float()).mean()
            loss.backward()
            grads.append((out, loss, xi.grad, [p.grad for p in m.parameters()]))
        (o_r, l_r, gx_r, gp_r), (o_t, l_t, gx_t, gp_t) = grads
        assert_close(o_t.float(), o_r.float(), name=f"step {step} output", **tol)
        assert_close(l_t.float().reshape(1), l_r.float().reshape(1), name=f"step {step} loss", **tol)
        assert_close(gx_t.float(), gx_r.float(), name=f"step {step} input grad", **tol)
        names = [n for n, _ in ref.named_parameters()]
        for name, g_t, g_r in zip(names, gp_t, gp_r):
            assert_close(g_t.float(), g_r.float(), name=f"step {step} grad {name}", **tol)
    if not train:  # the inference path (no autograd: batch norm folded into the conv weights)
        with torch.no_grad():
            assert_close(tri(x).float(), ref(x).float(), name="no-grad output", **tol)
    for (name, b_r), (_, b_t) in zip(ref.named_buffers(), tri.named_buffers()):
        if b_r.is_floating_point():
            assert_close(b_t.float(), b_r.float(), name=f"buffer {name}", **tol)
        else:
            assert torch.equal(b_t, b_r), f"buffer {name}: {b_t} != {b_r}"
    return ref, tri
