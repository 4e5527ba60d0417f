"""The triton backend's model under torch's compiler: every runner calls torch custom ops (with
fake implementations and registered gradients), so `torch.compile(model, fullgraph=True)` and
`torch.export` capture a whole network, train and eval, with no graph break, and a compiled
model computes what the eager one does. On the CPU the custom ops run the kernels in Triton's
interpreter inside the compiled graph."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_architectures import densenet_text, fewer_layers
from test_zero_copy import INCEPTION

import cnndsl

from test_triton_backend import EVERYTHING, RESIDUAL

# every example whose ops and groups the others do not all have: not resnet50 (resnet18's), vgg16, alexnet,
# cifar_small and lenet5 (plain conv, relu, pool, dense and dropout groups: resnet18's, digits' and EVERYTHING's)
EXAMPLES = sorted(p for p in (Path(__file__).resolve().parent.parent / "examples").glob("*.cnn")
                  if p.stem not in ("resnet50", "vgg16", "alexnet", "cifar_small", "lenet5"))


class _Loss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, target):
        return self.model.loss(x, target)


def _inputs(model, batch=2):
    net = model.net
    return torch.randn(batch, *net.input_shape), torch.randint(0, net.output_shape[0], (batch,))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_captured_whole_in_training_and_eval(path):
    """Strict export traces with dynamo, as torch.compile does, and fails on any graph break; it
    runs the custom ops' fake implementations, so the 224x224 networks cost no kernel time.
    DenseNet-121, GoogLeNet and EfficientNet-B0 with fewer of their repeated layers (tracing all of
    them costs a minute: the same ops)."""
    if path.stem == "densenet121":
        path = densenet_text((2, 2, 2, 2), 224)
    elif path.stem in ("googlenet", "efficientnet_b0"):
        path = fewer_layers(path.stem, path.read_text())
    model = cnndsl.compile(path)
    x, target = _inputs(model)
    model.train()
    train = torch.export.export(_Loss(model), (x, target), strict=True)
    with torch.no_grad():
        model.eval()
        evaluate = torch.export.export(model, (x,), strict=True)
    for program in (train, evaluate):
        ops = {n.target.namespace for n in program.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "namespace")}
        assert "cnndsl" in ops


def _step(loss_fn, model, x, target):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    loss = loss_fn(xi, target)
    loss.backward()
    return [loss, xi.grad, *[p.grad for p in model.parameters()], *[b.clone() for b in model.buffers()]]


# (unfused: every op's own custom op; EVERYTHING fused runs most of them as groups of one op)
# (INCEPTION: zero-copy concatenation, whose writers return the slab they write into, marked dirty)
@pytest.mark.parametrize("src,fuse", [(EVERYTHING, True), (INCEPTION, True)], ids=["everything-fused", "inception-fused"])
def test_a_compiled_model_trains_and_evaluates_as_the_eager_one(src, fuse):
    """fullgraph=True: one graph or an error. Two training steps (dropout's seeds drawn in the
    graph from the same generator state), then eval with and without autograd, bit for bit
    (the aot_eager backend runs the traced graph as it is)."""
    torch._dynamo.reset()
    model = cnndsl.compile(src, fuse=fuse)
    x, target = _inputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled_loss = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for loss_fn, forward in ((compiled_loss, compiled), (model.loss, model)):
        model.load_state_dict(state)
        model.train()
        torch.manual_seed(3)
        out = _step(loss_fn, model, x, target) + _step(loss_fn, model, x, target)
        model.eval()
        out.append(forward(x))
        with torch.no_grad():
            out.append(forward(x))
        results.append(out)
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"value {i} differs"


def test_inductor_compiles_a_training_step():
    """The default backend, inductor, around the custom ops (its own RNG replaced by torch's, so
    dropout draws the eager model's seeds)."""
    torch._dynamo.reset()
    model = cnndsl.compile(EVERYTHING)
    x, target = _inputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # (no FX graph cache: its key leaves out the custom ops' schemas, so a cache from before a schema
    # changed replays a call of the old one)
    with torch._inductor.config.patch(fallback_random=True, fx_graph_cache=False):
        compiled_loss = torch.compile(model.loss, fullgraph=True)
        model.train()
        torch.manual_seed(4)
        got = _step(compiled_loss, model, x, target)
    model.load_state_dict(state)
    torch.manual_seed(4)
    want = _step(model.loss, model, x, target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_exported_model_evaluates_as_the_eager_one(tmp_path):
    model = cnndsl.compile(RESIDUAL).eval()
    x, _ = _inputs(model)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.export.save(program, tmp_path / "residual.pt2")
        loaded = torch.export.load(tmp_path / "residual.pt2")
        assert torch.equal(loaded.module()(x), model(x))


def test_an_exported_model_loads_in_a_fresh_process_after_load_ops(tmp_path):
    """The saved program names torch.ops.cnndsl.*: a process that compiled nothing registers
    them with cnndsl.load_ops() (import cnndsl alone does not import torch)."""
    model = cnndsl.compile(RESIDUAL).eval()
    x, _ = _inputs(model)
    with torch.no_grad():
        torch.export.save(torch.export.export(model, (x,)), tmp_path / "residual.pt2")
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = ("import sys, torch, cnndsl; cnndsl.load_ops(); io = torch.load(sys.argv[2]); "
              "p = torch.export.load(sys.argv[1]); assert torch.equal(p.module()(io['x']), io['y']); print('same')")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "residual.pt2"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "same", run.stderr[-2000:]
