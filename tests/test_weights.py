"""Weights from outside cnndsl (cnndsl/weights.py): torchvision's resnet18 layout loaded by
declaration order, state dicts and checkpoints by name, safetensors read and written bit for bit,
and every bad file refused with the model left as it was."""

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl.errors import CnnWeightsError
from cnndsl.weights import load_weights, read, read_safetensors, write_safetensors

import torch_models as tm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_torchvision_resnet18_loads_in_declaration_order(tmp_path):
    """A state dict with torchvision's names, order and shapes (the hand-built model's) loads into
    examples/resnet18.cnn, whose names differ; eval outputs equal the torch model's."""
    ref = tm.randomize(tm.resnet18(), seed=5).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model = cnndsl.compile(EXAMPLES / "resnet18.cnn", backend="torch", device="cpu").eval()
    loaded = cnndsl.load_weights(model, tmp_path / "resnet18.pth")
    assert loaded["conv1.weight"] == "conv1.weight" and loaded["batchnorm1.running_var"] == "bn1.running_var"
    assert list(loaded.values()) == list(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.logits(x), ref(x))


def test_a_checkpoint_and_a_state_dict_load_by_name(tmp_path):
    a = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    b = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    torch.save({"state_dict": a.state_dict()}, tmp_path / "wrapped.pt")  # Lightning's layout
    loaded = load_weights(b, tmp_path / "wrapped.pt")
    assert all(k == v for k, v in loaded.items())
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in b.state_dict().items())


def test_safetensors_round_trips_bit_for_bit(tmp_path):
    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16(),
               "n": torch.tensor(7), "e": torch.zeros(0, 3)}
    write_safetensors(tensors, tmp_path / "t.safetensors")
    back, ordered = read_safetensors(tmp_path / "t.safetensors")
    assert ordered and list(back) == list(tensors)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_safetensors_agrees_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"b.weight": torch.randn(3, 4), "a.bias": torch.randn(4).bfloat16()}
    write_safetensors(tensors, tmp_path / "ours.safetensors")
    theirs = st.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    back, ordered = read_safetensors(tmp_path / "theirs.safetensors")
    assert not ordered and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_sorted_safetensors_with_other_names_are_refused(tmp_path):
    model = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    state = {f"x{i}.{k}": v for i, (k, v) in enumerate(model.state_dict().items())}
    write_safetensors(state, tmp_path / "w.safetensors")
    raw = bytearray((tmp_path / "w.safetensors").read_bytes())  # as the safetensors package writes: no order
    raw = raw.replace(b'"order":"declaration"', b'"order":"sorted_____"')
    (tmp_path / "w.safetensors").write_bytes(raw)
    before = _snapshot(model)
    with pytest.raises(CnnWeightsError, match="its order is not the declaration order"):
        load_weights(model, tmp_path / "w.safetensors")
    assert _unchanged(model, before)


def _bad_files(tmp_path: Path) -> dict:
    lenet = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    torch.save(lenet.state_dict(), tmp_path / "lenet.pt")
    good = (tmp_path / "lenet.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # torch.save's layout, a pickle with code
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}))
        z.writestr("archive/version", "3\n")
    (tmp_path / "code.pt").write_bytes(buf.getvalue())
    header = b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}'
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    other = r"c1.weight has shape \[6, 1, 5, 5\], but the model's conv1.weight is \[32, 3, 3, 3\]; nothing was loaded"
    return {"another network's": ("lenet.pt", other),
            "a truncated": ("truncated.pt", "not a readable torch file"),
            "a pickle with code in": ("code.pt", "holds objects other than tensors and plain data"),
            "a short safetensors": ("short.safetensors", "do not fit it or the file's 16 bytes"),
            "a bad header in a": ("huge.safetensors", "its header claims 1,099,511,627,776 bytes"),
            "a missing": ("missing.pt", "no weights file at")}


def test_bad_files_change_nothing(tmp_path):
    model = cnndsl.compile(EXAMPLES / "cifar_small.cnn", backend="torch", device="cpu")
    before = _snapshot(model)
    for what, (name, message) in _bad_files(tmp_path).items():
        with pytest.raises(CnnWeightsError, match=message):
            load_weights(model, tmp_path / name)
        assert _unchanged(model, before), what


def test_a_shape_mismatch_names_both_sides():
    model = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    state = dict(model.state_dict())
    state["c3.weight"] = torch.zeros(16, 6, 3, 3)
    before = _snapshot(model)
    with pytest.raises(CnnWeightsError, match=r"c3.weight has shape \[16, 6, 3, 3\], but the model's c3.weight is "
                                              r"\[16, 6, 5, 5\]; nothing was loaded"):
        load_weights(model, state)
    assert _unchanged(model, before)


def test_read_returns_a_checkpoint_s_model(tmp_path):
    from cnndsl.train import Options, train
    result = train(EXAMPLES / "digits.cnn", Options(epochs=1, backend="torch", out=str(tmp_path)), log=lambda s: None)
    tensors, ordered, ckpt = read(result["checkpoint"])
    assert ckpt is not None and ckpt["epoch"] == 1
    model = cnndsl.compile(EXAMPLES / "digits.cnn", backend="torch", device="cpu")
    assert ordered and list(tensors) == list(model.state_dict())
