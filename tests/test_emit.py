"""`cnndsl emit`: the standalone module imports with only torch and triton, runs the compiled
model's own launch steps for every example, and computes what the compiled model computes,
bit for bit, for outputs, losses, every gradient and the running statistics."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_examples import SHRUNK
from test_zero_copy import DENSE

import cnndsl
from cnndsl.emit import emit

from test_triton_backend import BRANCHES, EVERYTHING, RESIDUAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(name: str) -> str:
    """An example's text (the 224x224 networks at 32x32, AlexNet at 63x63: every layer and path, fewer pixels) or
    one of the test networks."""
    if name in NETWORKS:
        return NETWORKS[name]
    side = SHRUNK.get(name, 32)
    return (EXAMPLES / f"{name}.cnn").read_text().replace("input 3x224x224", f"input 3x{side}x{side}")


def _emitted(tmp_path, net, fuse):
    path = tmp_path / f"emitted_{net.name}_{fuse}.py"
    path.write_text(emit(net, fuse=fuse))
    module = _load(path)
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
               and v.__module__ == module.__name__]
    return module, classes[-1]()


NETWORKS = {"residual": RESIDUAL, "everything": EVERYTHING, "branches": BRANCHES, "dense": DENSE}
FUSE = pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])


@FUSE
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.cnn")))
def test_emitted_module_runs_the_compiled_models_steps(tmp_path, name, fuse):
    """Every example: the emitted module's launch steps (forward and logits) are the compiled
    model's, its layers have the same names and shapes, and weights load both ways."""
    net = cnndsl.parse(_source(name))
    module, emitted = _emitted(tmp_path, net, fuse)
    compiled = cnndsl.compile(net, backend="triton", fuse=fuse, device="cpu")
    # the emitted specs are the emitted module's own classes: equal as the literals they were written as
    assert repr(module.FORWARD) == repr(compiled.program.forward)
    assert repr(module.LOGITS) == repr(compiled.program.logits)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(emitted) == shapes(compiled)
    emitted.load_state_dict(compiled.state_dict())
    compiled.load_state_dict(emitted.state_dict())


@pytest.mark.parametrize(("name", "fuse"), [("digits", True), ("digits", False), ("residual", True),
                                            ("everything", False), ("dense", True)],
                         ids=["digits-fused", "digits-unfused", "residual-fused", "everything-unfused", "dense-fused"])
def test_emitted_module_computes_what_the_compiled_model_does(tmp_path, name, fuse):
    """A training step (dropout's masks from the same seeds; the optimizer updates the weights),
    then eval with and without autograd: outputs, losses, every gradient and the running
    statistics, bit for bit. The networks cover pools, batch norm, residuals with and without
    projections, dropout, cross-layer fusion, a gradient token (a dense layer's batch norm), and flatten
    after a spatial map and after a 1x1 one."""
    net = cnndsl.parse(_source(name))
    _, emitted = _emitted(tmp_path, net, fuse)
    compiled = cnndsl.compile(net, backend="triton", fuse=fuse, device="cpu")
    emitted.load_state_dict(compiled.state_dict())
    x = torch.randn(2, *net.input_shape)
    target = torch.randint(0, net.output_shape[0], (2,))
    results = []
    for m in (compiled, emitted):
        torch.manual_seed(7)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        xi = x.clone().requires_grad_()
        y = m(xi)
        loss = m.loss(xi, target)
        loss.backward()
        out = [y, loss, xi.grad, *[p.grad for p in m.parameters()]]
        opt.step()
        m.eval()
        out.append(m(x))
        with torch.no_grad():  # without autograd: batch norm folded into the conv weights
            out.append(m(x))
        results.append(out + list(m.buffers()))
    assert len(results[0]) == len(results[1])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"value {i} differs"


def test_emit_cli_writes_a_module_without_cnndsl(tmp_path):
    out = tmp_path / "lenet.py"
    run = subprocess.run([sys.executable, "-m", "cnndsl", "emit", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stderr == f"wrote {out}\n"  # no interpreter warning: emit runs no kernel
    text = out.read_text()
    assert "cnndsl" not in text.split('"""')[2], "the emitted module must not import cnndsl"
    check = (f"import sys, torch; sys.modules['cnndsl'] = None; sys.path.insert(0, {str(tmp_path)!r}); import lenet; "
             "m = lenet.Lenet5(); print(tuple(m(torch.randn(1, 1, 32, 32)).shape))")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("(1, 10)")


def test_emit_replaces_a_link_at_its_output_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "out.py").symlink_to(victim)
    run = subprocess.run([sys.executable, "-m", "cnndsl", "emit", str(EXAMPLES / "lenet5.cnn"), "-o",
                          str(tmp_path / "out.py")], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "out.py").is_symlink() and "class Lenet5" in (tmp_path / "out.py").read_text()


def test_an_emitted_module_checks_its_input_and_refolds_on_a_mode_switch(tmp_path):
    """The steps were planned for one input shape: another is refused, as the compiled model
    refuses it, not computed with the planned geometry. And a weight written through `.data`
    (which moves no version counter) is folded afresh after model.eval()."""
    net = cnndsl.parse("network g\ninput 1x6x6\nconv 2 3 pad=1\nbatchnorm\nglobal_avgpool\nflatten\ndense 3\n")
    _, model = _emitted(tmp_path, net, True)
    model.eval()
    for bad, message in ((torch.randn(2, 1, 8, 8), (r"expected a dense input of shape \[N, 1, 6, 6\] with N >= 1, got "
                                                    r"\[2, 1, 8, 8\]")),
                         (torch.randn(0, 1, 6, 6), r"got \[0, 1, 6, 6\]"),
                         (torch.randn(2, 1, 6, 6).double(), "got torch.float64 on cpu")):
        with pytest.raises(ValueError, match=message):
            model(bad)
    x = torch.ones(1, 1, 6, 6)
    with torch.no_grad():
        before = model(x)
        model.conv1.weight.data.mul_(3)
        model.eval()
        assert not torch.equal(model(x), before)
