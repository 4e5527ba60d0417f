"""`cnndsl emit`: the standalone module imports with only torch and triton and matches
the compiled model for outputs, loss and every gradient."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl.emit import emit

from helpers import assert_close
from test_triton_backend import RESIDUAL

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_emitted_module_matches_compiled_model(tmp_path, fuse):
    net = cnndsl.parse(RESIDUAL)
    path = tmp_path / "emitted_net.py"
    path.write_text(emit(net, fuse=fuse))
    module = _load(path)
    classes = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
               and v.__module__ == module.__name__]
    emitted = classes[-1]().train()
    compiled = cnndsl.compile(net, backend="triton", fuse=fuse, device="cpu").train()
    emitted.load_state_dict(compiled.state_dict())
    x = torch.randn(2, *net.input_shape)
    target = torch.randint(0, net.output_shape[0], (2,))
    results = []
    for m in (compiled, emitted):
        xi = x.clone().requires_grad_()
        y = m(xi)
        loss = m.loss(xi, target)
        loss.backward()
        with torch.no_grad():  # eval without autograd: batch norm folded into the conv weights
            inference = m.eval()(x)
        results.append((y, loss, xi.grad, [p.grad for p in m.parameters()], inference, list(m.buffers())))
    (y1, l1, g1, p1, i1, b1), (y2, l2, g2, p2, i2, b2) = results
    assert_close(y2, y1, name="output")
    assert_close(l2.reshape(1), l1.reshape(1), name="loss")
    assert_close(g2, g1, name="input grad")
    for a, b in zip(p2, p1):
        assert_close(a, b, name="param grad")
    assert_close(i2, i1, name="inference output")
    for a, b in zip(b2, b1):
        assert torch.equal(a, b), "running statistics"


def test_emit_cli_writes_a_module_without_cnndsl(tmp_path):
    out = tmp_path / "lenet.py"
    run = subprocess.run([sys.executable, "-m", "cnndsl", "emit", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert "cnndsl" not in text.split('"""')[2], "the emitted module must not import cnndsl"
    check = (f"import sys, torch; sys.modules['cnndsl'] = None; sys.path.insert(0, {str(tmp_path)!r}); import lenet; "
             "m = lenet.Lenet5(); print(tuple(m(torch.randn(1, 1, 32, 32)).shape))")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("(1, 10)")
