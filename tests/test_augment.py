"""Augmentation and normalisation in `cnndsl train` (cnndsl/augment.py): crops and flips equal
torchvision's definitions image by image and follow (seed, epoch) alone, so a resumed run repeats
an uninterrupted one; normalisation by the training split's statistics is kept in the checkpoint
and applied by `cnndsl eval` and, in ONNX, by `cnndsl export`."""

import json
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnndsl import augment
from cnndsl import checkpoint as ckpt
from cnndsl.cli import main
from cnndsl.errors import CnnInputError, CnnTrainError
from cnndsl.evaluate import evaluate
from cnndsl.train import Options, train

from test_data_cifar import write_cifar

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits.cnn"
QUIET = lambda *_: None


def test_the_kinds_and_the_padding():
    assert augment.parse(None) == () and augment.parse("crop,flip") == ("crop", "flip")
    assert augment.parse(augment.DEFAULT) == augment.KINDS
    for bad in ("rotate", "crop,crop", "crop;flip"):
        with pytest.raises(CnnInputError, match="--augment takes crop, flip"):
            augment.parse(bad)
    assert [augment.crop_padding(s, s) for s in (8, 28, 32, 224)] == [1, 3, 4, 28]


def test_crops_and_flips_are_torchvisions_image_by_image():
    x = torch.randn(6, 3, 8, 8)
    fill = torch.tensor([0.5, -1.0, 2.0])
    aug = augment.Augment(("crop", "flip"), (3, 8, 8), fill, seed=3, epoch=2, n=10, device="cpu")
    out = aug(x, 4)  # the epoch's images 4..9
    for b in range(6):
        dy, dx = aug.shift[4 + b].tolist()
        padded = torch.stack([F.pad(x[b, c], (1, 1, 1, 1), value=float(fill[c])) for c in range(3)])
        want = padded[:, dy:dy + 8, dx:dx + 8]
        if aug.flip[4 + b]:
            want = want.flip(2)
        assert torch.equal(out[b], want), b
    assert 0 < int(aug.flip.sum()) < 10 and set(aug.shift.flatten().tolist()) <= {0, 1, 2}
    again = augment.Augment(("crop", "flip"), (3, 8, 8), fill, seed=3, epoch=2, n=10, device="cpu")
    other = augment.Augment(("crop", "flip"), (3, 8, 8), fill, seed=3, epoch=3, n=10, device="cpu")
    assert torch.equal(again(x, 4), out) and not torch.equal(other(x, 4), out)
    centred = augment.Augment(("crop",), (3, 8, 8), fill, 0, 1, 6, "cpu")
    centred.shift.fill_(1)
    assert torch.equal(centred(x, 0), x)  # a shift of pad each way is the image itself


def test_normalisation_statistics():
    x = torch.rand(50, 3, 4, 4)
    x[:, 2] = 0.25  # a constant channel is centred, not scaled
    norm = augment.Normalize.of(x)
    y = norm(x)
    assert torch.allclose(y[:, :2].mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-6)
    assert torch.allclose(y[:, :2].std(dim=(0, 2, 3), correction=0), torch.ones(2), atol=1e-5)
    assert norm.std[2] == 1 and torch.all(y[:, 2] == 0)


def test_an_augmented_normalised_run_resumes_bit_for_bit_and_eval_and_export_normalise(tmp_path):
    opts = {"backend": "torch", "augment": "crop", "normalize": True, "epochs": 2, "optimizer": "sgd", "lr": 0.05}
    whole = train(DIGITS, Options(out=str(tmp_path / "whole"), **opts), log=QUIET)
    train(DIGITS, Options(out=str(tmp_path / "cut"), **{**opts, "epochs": 1}), log=QUIET)
    cut = train(DIGITS, Options(out=str(tmp_path / "cut"), resume="", **opts), log=QUIET)
    a, b = ckpt.load(whole["checkpoint"]), ckpt.load(cut["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["normalize"]["mean"], b["normalize"]["mean"]) and a["normalize"]["mean"].shape == (1,)
    plain = train(DIGITS, Options(out=str(tmp_path / "plain"), **{**opts, "augment": None}), log=QUIET)
    assert plain["history"][0]["loss"] != whole["history"][0]["loss"]  # the crops change what is learnt
    assert evaluate(DIGITS, whole["checkpoint"], backend="torch") == whole["test_accuracy"]
    with pytest.raises(CnnTrainError, match="trained with --normalize: resume it with it"):
        train(DIGITS, Options(out=str(tmp_path / "cut"), resume="", **{**opts, "normalize": False, "epochs": 3}),
              log=QUIET)
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main(["export", str(DIGITS), "--weights", str(whole["checkpoint"]), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(DIGITS), "--weights", str(whole["checkpoint"]), "-o",
                 str(tmp_path / "m.safetensors")]) == 0
    raw = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {"input": raw})[0]
    import cnndsl
    model = cnndsl.compile(DIGITS, backend="torch", device="cpu").eval()
    model.load_state_dict(a["model"])
    mean, std = a["normalize"]["mean"], a["normalize"]["std"]
    want = model((torch.from_numpy(raw) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    data = (tmp_path / "m.safetensors").read_bytes()
    meta = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"]
    assert json.loads(meta["normalize_mean"]) == mean.tolist()


def test_a_checkpoint_with_bad_statistics_is_refused(tmp_path):
    stats = {"mean": torch.zeros(1), "std": torch.tensor([-1.0])}
    path = tmp_path / "last.pt"
    ckpt.save(path, network={"name": "n", "identity": "0" * 64}, source="", epoch=0, model={"w": torch.zeros(1)},
              optimizer={"state": {}, "param_groups": [{"params": [0]}]}, rng=torch.get_rng_state(), config={},
              history=[], normalize=stats)
    with pytest.raises(CnnTrainError, match="normalize"):
        ckpt.load(path)


def test_the_command_line_names_a_bad_augmentation(tmp_path, capsys):
    assert main(["train", str(DIGITS), "--augment", "rotate", "--out", str(tmp_path)]) == 1
    assert "--augment takes crop, flip" in capsys.readouterr().err


def test_the_readmes_cifar_commands_run_as_written(tmp_path, monkeypatch):
    """The README's CIFAR-10 block on a small stand-in for cifar-10-batches-py (the real files are
    not downloaded in tests), one epoch instead of its twenty, with the options it gives for a CPU."""
    text = (DIGITS.parents[1] / "README.md").read_text().split("CIFAR-10, from its python files", 1)[1]
    block = text.split("```", 2)[1].replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("cnndsl ")]
    assert [c[0] for c in commands] == ["train", "eval"] and "--augment" in commands[0]
    train_args = commands[0]
    train_args[train_args.index("--epochs") + 1] = "1"
    cpu = text.split("On a CPU", 1)[1].split("`")
    assert cpu[1] == "--backend torch" and cpu[3] == "--dtype fp32"
    train_args += ["--backend", "torch", "--dtype", "fp32"]
    (tmp_path / "examples").symlink_to(DIGITS.parent)
    write_cifar(tmp_path / "cifar-10-batches-py", n=30)
    monkeypatch.chdir(tmp_path)
    assert main(train_args) == 0
    saved = ckpt.load(tmp_path / "runs/cifar/last.pt")
    assert saved["normalize"]["mean"].shape == (3,) and saved["config"]["augment"] == "crop,flip"
    assert main([*commands[1], "--backend", "torch"]) == 0
