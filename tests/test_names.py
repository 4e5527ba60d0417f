"""Names from a .cnn file that could collide with Python or torch: labels that are attributes
of the compiled torch.nn.Module are refused by the front end (and the list is checked
against the installed torch); network names that are keywords, builtins or names of the
emitted module's helpers still emit a module that runs; a hostile file path cannot inject
code into an emitted module."""

import importlib.util
import subprocess
import sys

import pytest
import torch

import cnndsl
from cnndsl.emit import emit
from cnndsl.names import MODULE_ATTRIBUTES

H = "network a\ninput 1x4x4\n"
NET = "{label}: conv 2 3x3\nbatchnorm\nrelu\nflatten\ndense 3\nsoftmax\n"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _network_class(module):
    return [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)
            and v.__module__ == module.__name__][-1]


@pytest.mark.parametrize("label", ["training", "forward", "eval", "loss", "to", "net", "caches", "plan",
                                   "state_dict", "_modules", "_p", "__init__"])
def test_labels_that_are_module_attributes_are_refused_by_check(label):
    with pytest.raises(cnndsl.CnnNameError, match=f"layer name '{label}'") as err:
        cnndsl.parse(H + NET.format(label=label))
    assert (err.value.line, err.value.column) == (3, 1)
    with pytest.raises(cnndsl.CnnNameError):  # inside a block's scope too: the layer sits under a module
        cnndsl.parse(H + f"block b {{\n  {label}: relu\n}}\nb\n")


def test_the_reserved_labels_are_every_attribute_of_the_compiled_models(tmp_path):
    """Every public attribute a label could shadow, on the installed torch: of torch.nn.Module
    (the scopes), of both backends' compiled models and of the emitted module's class."""
    src = H + NET.format(label="c")
    attributes = set(dir(torch.nn.Module()))
    for backend in ("torch", "triton"):
        attributes |= set(dir(cnndsl.compile(src, backend=backend)))
    (tmp_path / "m.py").write_text(emit(cnndsl.parse(src)))
    attributes |= set(dir(_network_class(_load(tmp_path / "m.py", "emitted_attributes"))()))
    layers = {"c", "batchnorm1", "dense1"}
    public = {a for a in attributes - layers if not a.startswith("_")}
    assert public <= MODULE_ATTRIBUTES, f"labels that would shadow an attribute: {sorted(public - MODULE_ATTRIBUTES)}"


@pytest.mark.parametrize("label", ["p", "x1", "self_", "layer", "source", "nn", "torch"])
def test_labels_that_are_not_attributes_compile_and_emit(tmp_path, label):
    src = H + NET.format(label=label)
    model = cnndsl.compile(src)
    assert f"{label}.weight" in model.state_dict()
    path = tmp_path / "m.py"
    path.write_text(emit(cnndsl.parse(src)))
    emitted = _network_class(_load(path, f"emitted_{label}"))()
    emitted.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(emitted.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", ["none", "true", "false", "conv_block", "dense_block", "step_state", "act", "window",
                                  "batch_norm_backward", "p", "int", "source", "print", "nn", "torch"])
def test_network_names_never_shadow_the_emitted_modules_names(tmp_path, name):
    src = f"network {name}\ninput 1x4x4\n" + NET.format(label="c")
    path = tmp_path / f"{name}_net.py"
    path.write_text(emit(cnndsl.parse(src)))
    module = _load(path, f"emitted_{name}")
    model = _network_class(module)()
    assert module.cross_entropy.__name__ == "cross_entropy" and module.torch is torch
    x, target = torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    model.loss(x, target).backward()
    assert model(x).shape == (2, 3)


def test_a_hostile_file_path_cannot_inject_code_into_the_emitted_module(tmp_path):
    """The issue's folder name closes the module docstring when written inside it."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / 'x""";__import__("os").system("touch PWNED");"""'
    folder.mkdir()
    path = folder / "net.cnn"
    path.write_text("network net\ninput 1x4x4\n" + NET.format(label="c"))
    out = tmp_path / "emitted.py"
    out.write_text(emit(cnndsl.parse(path)))
    run = subprocess.run([sys.executable, "-c", f"import runpy; m = runpy.run_path({str(out)!r}); print(m['SOURCE'])"],
                         capture_output=True, text=True, check=False, cwd=tmp_path,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert not marker.exists(), "importing the emitted module ran a command from the file's path"
    assert run.stdout.strip() == str(path)
