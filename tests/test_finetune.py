"""Transfer learning (cnndsl/finetune.py, `cnndsl train --init --freeze --classes`, `cnndsl
export`): the README's digits recipe (classes 0-4, then a frozen copy fine-tuned on 5-9) on the
reference backend, frozen layers bit-identical after fine-tuning, frozen batch norms on the triton
backend, and the exported ONNX, safetensors and state-dict files."""

import importlib.util
import shlex
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl import checkpoint, data, finetune
from cnndsl.cli import main
from cnndsl.errors import CnnInputError, CnnWeightsError
from cnndsl.evaluate import evaluate
from cnndsl.weights import load_weights, read

import torch_models as tm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DIGITS = str(EXAMPLES / "digits.cnn")


def readme_commands() -> list[list[str]]:
    """The commands of the README's transfer-learning block, as argument lists."""
    text = (EXAMPLES.parent / "README.md").read_text().split("## Transfer learning", 1)[1]
    block = text.split("```", 2)[1].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("cnndsl ")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The README's recipe, as written, in a folder holding the examples: (the first run's
    checkpoint, the fine-tuned one)."""
    out = tmp_path_factory.mktemp("readme")
    (out / "examples").symlink_to(EXAMPLES)
    commands = readme_commands()
    assert [c[0] for c in commands] == ["train", "train", "eval", "export"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        for args in commands[:3]:
            assert main(args) == 0, args
        if importlib.util.find_spec("onnx"):
            assert main(commands[3]) == 0 and (out / "digits59.onnx").is_file()
    return out / "runs/digits04/last.pt", out / "runs/digits59/last.pt"


def test_frozen_layers_keep_their_weights_and_the_head_trains(runs, capsys):
    before, after = (read(p).tensors for p in runs)
    frozen = [k for k in before if k.split(".")[0] in ("conv1", "batchnorm1", "conv2", "batchnorm2")
              and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(frozen) == 6 and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["dense1.weight"], after["dense1.weight"])
    assert not torch.equal(before["dense2.weight"], after["dense2.weight"])
    assert main(["eval", DIGITS, "--backend", "torch", "--weights", str(runs[1])]) == 0  # its head and classes
    assert float(capsys.readouterr().out.split()[-1]) >= 0.95


def test_eval_on_other_classes_than_the_head_was_trained_on_is_refused(runs, capsys):
    """Renumbered from 0, the chosen classes are not the ones a head trained on others predicts:
    its accuracy would mean nothing."""
    assert main(["eval", DIGITS, "--backend", "torch", "--weights", str(runs[0]), "--only-classes", "5,7"]) == 1
    assert ("input error: --only-classes 5,7 picks 2 classes, numbered 0 to 1, but the weights' head has 5 outputs, "
            "trained on --only-classes 0-4") in capsys.readouterr().err
    assert main(["eval", DIGITS, "--backend", "torch", "--weights", str(runs[0]), "--only-classes", "0-4"]) == 0
    capsys.readouterr()


def test_exports_load_elsewhere_and_agree(runs, tmp_path):
    model = cnndsl.compile(finetune.with_classes(cnndsl.parse(DIGITS), 5), backend="torch", device="cpu").eval()
    load_weights(model, runs[1])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
    for name in ("d.safetensors", "d.pt"):
        assert main(["export", DIGITS, "--weights", str(runs[1]), "-o", str(tmp_path / name)]) == 0
        assert all(torch.equal(a, b) for a, b in zip(read(tmp_path / name).tensors.values(), model.state_dict().values()))
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", DIGITS, "--weights", str(runs[1]), "-o", str(tmp_path / "d.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "d.onnx"))
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (4, 5) and abs(torch.from_numpy(got) - want).max() < 1e-4


def test_export_refuses_outputs_it_cannot_write_and_leaves_the_old_file(tmp_path, capsys):
    model = cnndsl.compile(EXAMPLES / "cifar_small.cnn", backend="torch", device="cpu")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "old.pt").write_bytes(b"the previous export")
    cases = [("dir.pt", [], f"export: {tmp_path / 'dir.pt'} is a directory; name the file to write"),
             ("missing/x.pt", [], f"{tmp_path / 'missing'} is not a folder"),
             ("absent/x.pt", [], f"{tmp_path / 'absent'} does not exist"),  # (not created: a typo stays a typo)
             ("x.onnx", ["--opset", "99"], "export: --opset must be from 17 to ")]
    (tmp_path / "missing").write_text("a file where a folder should be")
    for name, flags, message in cases:
        assert main(["export", str(EXAMPLES / "cifar_small.cnn"), "--weights", str(tmp_path / "w.pt"),
                     "-o", str(tmp_path / name), *flags]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and (message or f"export: cannot write {tmp_path / name}") in err, err
    real = torch.save
    with pytest.MonkeyPatch.context() as mp:  # a write that fails part-way (a full disk)
        mp.setattr(torch, "save", lambda obj, f: (real(obj, f), (_ for _ in ()).throw(OSError(28, "No space"))))
        assert main(["export", str(EXAMPLES / "cifar_small.cnn"), "--weights", str(tmp_path / "w.pt"),
                     "-o", str(tmp_path / "old.pt")]) == 1
    assert "cannot write" in capsys.readouterr().err and (tmp_path / "old.pt").read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.pt", "missing", "old.pt", "w.pt"]


def test_an_exported_state_dict_loads_into_the_torch_model(tmp_path):
    model = cnndsl.compile(EXAMPLES / "cifar_small.cnn", backend="torch", device="cpu").eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert main(["export", str(EXAMPLES / "cifar_small.cnn"), "--weights", str(tmp_path / "w.pt"),
                 "-o", str(tmp_path / "out.pt")]) == 0
    ref = tm.cifar_small().eval()
    theirs = ref.state_dict()
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    ref.load_state_dict(dict(zip(theirs, state.values())))  # declaration order
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(x), model.logits(x))


def test_frozen_batch_norms_stay_on_running_statistics_on_the_triton_backend():
    torch.manual_seed(0)
    model = cnndsl.compile(finetune.with_classes(cnndsl.parse(DIGITS), 5), device="cpu")
    frozen = finetune.freeze(model, ["maxpool1"], bn=True)
    assert frozen == ["conv1", "batchnorm1", "conv2", "batchnorm2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(finetune.trainable(model), lr=0.1)
    assert len(optimizer.param_groups[0]["params"]) == 4  # the two dense layers' weights and biases
    model.train()
    assert not model.batchnorm1.training and model.dense1.training
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        model.loss(x, y).backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("conv", "batchnorm")))
    assert not torch.equal(after["dense2.weight"], before["dense2.weight"])
    ref = cnndsl.compile(finetune.with_classes(cnndsl.parse(DIGITS), 5), backend="torch", device="cpu")
    ref.load_state_dict(model.state_dict())
    finetune.freeze(ref, ["maxpool1"], bn=True)
    ref.train()
    with torch.no_grad():
        assert torch.allclose(model.logits(x), ref.logits(x), atol=1e-5)  # both on running statistics


def test_fine_tuning_errors_are_clear():
    net = cnndsl.parse(DIGITS)
    model = cnndsl.compile(net, backend="torch", device="cpu")
    with pytest.raises(CnnInputError, match="has no layer 'conv9'") as err:
        finetune.freeze(model, ["conv9"])
    assert "did you mean" in err.value.render()
    with pytest.raises(CnnInputError, match="would freeze the head dense2"):
        finetune.freeze(model, ["dense2"])
    with pytest.raises(CnnInputError, match="--classes must be a positive integer"):
        finetune.with_classes(net, 0)
    with pytest.raises(CnnInputError, match="expected labels and ranges"):
        finetune.only_classes(data.load(None)[0], "a-b")
    with pytest.raises(CnnInputError, match="distinct labels in 0..9"):
        finetune.only_classes(data.load(None)[0], "8-12")
    assert main(["train", DIGITS, "--freeze-bn"]) == 1


@pytest.mark.parametrize("spec, message", [
    ("0-10000000000", r"--only-classes 0-10000000000: expected distinct labels in 0..9"),  # was a MemoryError
    ("0-4,2", "distinct labels in 0..9"),
    ("5-3", "distinct labels in 0..9"),
    ("1" * 5000, "expected labels and ranges"),  # more digits than int() reads
    (5, r"expected labels and ranges such as 0-4 or 5,7,9, got 5 \(int\)"),  # was an AttributeError
    (["0-4"], r"got \['0-4'\] \(list\)"),
])
def test_only_classes_are_bounded_before_they_are_built(spec, message):
    with pytest.raises(CnnInputError, match=message):
        finetune.only_classes(data.load(None)[0], spec)


def test_only_classes_keep_the_order_given():
    ds = finetune.only_classes(data.load(None)[1], "7,0-1")
    assert ds.classes == ("7", "0", "1") and set(ds.y.tolist()) == {0, 1, 2}


def forged(source, path, **config):
    """source with its config changed and a checksum that matches: a checksum is no signature."""
    payload = torch.load(source, weights_only=True)
    payload["config"].update(config)
    payload["checksum"] = checkpoint.digest(payload, checkpoint._hashed(payload))
    torch.save(payload, path)
    return path


def test_only_classes_from_a_checkpoint_are_checked(runs, tmp_path, capsys):
    wrong_type = forged(runs[0], tmp_path / "int.pt", only_classes=5)
    with pytest.raises(CnnWeightsError, match=r"int.pt is not a valid cnndsl checkpoint: only_classes in its config "
                                              r"is 5 \(int\); expected labels and ranges"):
        evaluate(DIGITS, wrong_type, backend="torch")
    assert main(["eval", DIGITS, "--backend", "torch", "--weights", str(wrong_type)]) == 1
    assert "weights error" in capsys.readouterr().err
    huge = forged(runs[0], tmp_path / "huge.pt", only_classes="0-10000000000")
    with pytest.raises(CnnInputError, match="expected distinct labels in 0..9"):
        evaluate(DIGITS, huge, backend="torch")


def test_resuming_with_another_freeze_says_so(runs, tmp_path, capsys):
    assert main(["train", DIGITS, "--backend", "torch", "--resume", str(runs[1]), "--out", str(tmp_path / "o"),
                 "--freeze", "conv1"]) == 1
    err = capsys.readouterr().err
    assert "parameters, this model's has" in err and "another --freeze trains other parameters" in err, err
