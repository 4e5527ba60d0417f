"""Weights from outside cnndsl (cnndsl/weights.py): torchvision's resnet18 layout loaded by
declaration order, state dicts and checkpoints by name, safetensors read and written bit for bit,
and every bad file refused with the model left as it was."""

import io
import json
import os
import pickle
import re
import struct
import warnings
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


def test_a_state_dict_without_batch_norm_counts_loads_the_rest(tmp_path):
    """A file saved by a torch before 0.4.1 (older files of torchvision's weights) holds no
    num_batches_tracked: everything else loads, in declaration order or by name, the counts stay."""
    ref = tm.randomize(tm.resnet18(), seed=3).eval()
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    model = cnndsl.compile(EXAMPLES / "resnet18.cnn", backend="torch", device="cpu").eval()
    loaded = cnndsl.load_weights(model, tmp_path / "old.pth")
    assert list(loaded.values()) == list(old) and not any(k.endswith("num_batches_tracked") for k in loaded)
    assert all(int(v) == 0 for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model.logits(x), ref(x))
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(cnndsl.load_weights(model, mine)) == list(mine)


def test_torchvision_s_auxiliary_classifiers_are_named_when_the_counts_differ():
    """A GoogLeNet state dict with torchvision's aux1 and aux2 heads (aux_logits=True, as its weights
    file holds them) is refused, naming them; without their entries it loads."""
    ref = tm.googlenet()
    state = dict(ref.state_dict())
    aux = {f"aux{i}.{name}": torch.zeros(2) for i in (1, 2) for name in ("conv.conv.weight", "fc1.weight")}
    model = cnndsl.compile(EXAMPLES / "googlenet.cnn", backend="torch", device="cpu")
    with pytest.raises(CnnWeightsError, match=r"the counts must agree; its aux1\.\*, aux2\.\* entries are the "
                                              r"auxiliary classifiers of torchvision's GoogLeNet or Inception v3"):
        cnndsl.load_weights(model, {**state, **aux})
    with pytest.raises(CnnWeightsError, match=r"the counts must agree \(is it the same architecture\?\)"):
        cnndsl.load_weights(model, {**state, "extra.weight": torch.zeros(2)})
    cnndsl.load_weights(model, state)


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
            "a missing": ("missing.pt", "no weights file at"),
            "a directory as": ("folder.pt", r"no weights file at .*folder.pt \(a directory\)"),
            **_fifos(tmp_path)}


def _fifos(tmp_path) -> dict:
    """FIFOs named as weights files: refused from the open file's type (the open must not wait
    for a writer, and a check before the open could be raced)."""
    (tmp_path / "folder.pt").mkdir()
    if not hasattr(os, "mkfifo"):
        return {}
    for name in ("pipe.pt", "pipe.safetensors"):
        os.mkfifo(tmp_path / name)
    return {f"a FIFO as a {kind}": (f"pipe.{kind}", r"pipe\.\w+ \(not a regular file\)") for kind in ("pt", "safetensors")}


def test_bad_files_change_nothing(tmp_path):
    model = cnndsl.compile(EXAMPLES / "cifar_small.cnn", backend="torch", device="cpu")
    before = _snapshot(model)
    for what, (name, message) in _bad_files(tmp_path).items():
        with pytest.raises(CnnWeightsError, match=message):
            load_weights(model, tmp_path / name)
        assert _unchanged(model, before), what


def test_torch_s_refusal_is_quoted_without_its_terminal_escapes(tmp_path):
    """torch's weights_only refusal sets bold with escape sequences; the quote leaves them out."""
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # (a module: a class global)
    with pytest.raises(CnnWeightsError, match="holds objects other than tensors .*Weights only load failed") as caught:
        read(tmp_path / "module.pt")
    assert "\x1b" not in str(caught.value) and "?[" not in caught.value.render()


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
    tensors, ordered, ckpt, where = read(result["checkpoint"])
    assert where == str(result["checkpoint"])
    assert ckpt is not None and ckpt["epoch"] == 1
    model = cnndsl.compile(EXAMPLES / "digits.cnn", backend="torch", device="cpu")
    assert ordered and list(tensors) == list(model.state_dict())


def _safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file of `header` (a dict, or raw bytes for a header that is not one) and `data`."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_safetensors_ranges_that_overlap_or_leave_gaps_are_refused(tmp_path):
    """Many entries naming the same bytes made a 1.27 MB file cost 3.3 GB (each range was copied,
    only the largest end checked): the ranges must tile the data section, so the tensors are views
    of the one buffer read."""
    model = cnndsl.compile(EXAMPLES / "digits.cnn", backend="torch", device="cpu")
    before = _snapshot(model)
    size = 4096
    overlap = {f"t{i}": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]} for i in range(50)}
    gap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    cases = {"overlap": (overlap, b"\0" * size, r"tensor 't1' \(data offsets 0..4096\) overlaps 't0'"),
             "gap": (gap, b"\0" * 24, r"tensor 'b' \(data offsets 16..24\) leaves bytes 8..16 unused")}
    for name, (header, data, message) in cases.items():
        path = _safetensors(tmp_path / f"{name}.safetensors", header, data)
        with pytest.raises(CnnWeightsError, match=rf"{name}.safetensors: {message}; the tensors' data must follow"):
            load_weights(model, path)
        assert _unchanged(model, before), name


def test_safetensors_in_any_order_and_unaligned_still_read(tmp_path):
    """The header's order need not be the data's (the safetensors package sorts names, not
    offsets), zero-size tensors sit between others, and an unaligned range is copied, not viewed."""
    x = torch.tensor([1.5, -2.25])
    header = {"f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
              "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [3, 3]},
              "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}
    path = _safetensors(tmp_path / "t.safetensors", header, b"\1\2\3" + x.numpy().tobytes())
    back, ordered = read_safetensors(path)
    assert not ordered and list(back) == ["f", "e", "u"]
    assert torch.equal(back["f"], x) and back["e"].shape == (0, 4) and back["u"].tolist() == [1, 2, 3]


def test_hostile_safetensors_headers_give_one_clear_error(tmp_path):
    """A deeply nested header raised RecursionError, a zero-size shape with a dimension of 10**30
    a TypeError with a C++ dump from reshape."""
    cases = {"deep": (b"[" * 200_000 + b"]" * 200_000, "its safetensors header nests too deeply"),
             "deepobj": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "its safetensors header nests too deeply"),
             "listdtype": ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                           "tensor 'a' has a malformed entry in the header"),  # (unhashable: a TypeError)
             "hugezero": ({"a": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}},
                          (r"tensor 'a' has shape \[0, 1000000000000000000000000000000\], whose dimensions "
                           r"multiply \(zeros left out\) to 2\*\*63 or more")),
             "hugezero2": ({"a": {"dtype": "F32", "shape": [0, 2**62, 8], "data_offsets": [0, 0]}},
                           r"tensor 'a' has shape \[0, 4611686018427387904, 8\], whose dimensions multiply"),
             "nested_entry": ({"a": {"dtype": "F32", "shape": [[[[[[1]]]]]], "data_offsets": [0, 4]}},
                              r"tensor 'a' has a malformed entry in the header: .*\[\[\[\.\.\.\]\]\]")}
    for name, (header, message) in cases.items():
        path = _safetensors(tmp_path / f"{name}.safetensors", header)
        with pytest.raises(CnnWeightsError, match=rf"{name}.safetensors: {message}"):
            read(path)
    assert read_safetensors(_safetensors(tmp_path / "zero.safetensors", {
        "a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}))[0]["a"].shape == (0, 2**62)


def _sevens(model) -> dict:
    """The model's state dict with every value 7: a partial load would show."""
    return {k: torch.full_like(v, 7) for k, v in model.state_dict().items()}


def _bad_tensors() -> dict:
    """{what: (name in digits.cnn, the tensor put there, the message)}, each the last of its kind,
    so that a load checking as it copies would have copied everything before it."""
    dense = r"; only dense \(strided\) tensors load; nothing was loaded"
    floating = r"which loads only from a floating tensor \(float16, bfloat16, float32 or float64\); nothing was loaded"
    count = r"which loads only from an integer tensor \(int8, int16, int32, int64 or uint8\); nothing was loaded"
    bias, nbt = "dense2.bias", "batchnorm2.num_batches_tracked"
    return {
        "sparse": (bias, torch.full((10,), 7.0).to_sparse(), f"{bias} is a torch.sparse_coo tensor" + dense),
        "meta": (bias, torch.empty(10, device="meta"), f"{bias} is a meta tensor, which holds no data"),
        "complex count": (nbt, torch.tensor(1 + 2j), f"{nbt} is torch.complex64, the model's {nbt} torch.int64, "
                          + count),
        "float count": (nbt, torch.tensor(3.0), f"{nbt} is torch.float32, .* " + count),
        "bool count": (nbt, torch.tensor(True), f"{nbt} is torch.bool, .* " + count),
        "bool weight": (bias, torch.ones(10, dtype=torch.bool), f"{bias} is torch.bool, .* " + floating),
        "complex weight": (bias, torch.ones(10, dtype=torch.complex64), f"{bias} is torch.complex64, .* " + floating),
        "float8 weight": (bias, torch.ones(10).to(torch.float8_e4m3fn), f"{bias} is torch.float8_e4m3fn, .* "
                          + floating),
        "quantized weight": (bias, _quantized(), f"{bias} is torch.qint8, .* " + floating),
    }


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # torch deprecates making quantized tensors; files may still hold them
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(10), 0.1, 0, torch.qint8)


@pytest.mark.parametrize("what", list(_bad_tensors()))
def test_a_tensor_that_cannot_be_copied_loads_nothing(tmp_path, what):
    """A state dict with the right names and shapes and its last tensor sparse overwrote 15 of
    16 tensors, then raised RuntimeError from copy_ (a meta tensor NotImplementedError); a complex
    tensor loaded silently into the integer num_batches_tracked. Every tensor is checked first."""
    model = cnndsl.compile(EXAMPLES / "digits.cnn", backend="torch", device="cpu")
    name, bad, message = _bad_tensors()[what]
    state = _sevens(model)
    state[name] = bad
    before = _snapshot(model)
    path = tmp_path / "w.pt"
    torch.save(state, path)  # read back by torch.load(weights_only=True) as it was
    # a state dict, a path, and what read() gives (as `eval --weights` passes it): the file is named
    for source, where in ((state, "the state dict"), (path, str(path)), (read(path), str(path))):
        with pytest.raises(CnnWeightsError, match=re.escape(where) + ": " + message):
            load_weights(model, source)
        assert _unchanged(model, before), where


def test_counts_load_from_any_integer_dtype():
    """num_batches_tracked is int64 in torchvision's, timm's and cnndsl's files; a narrower
    integer converts exactly, so it loads too."""
    model = cnndsl.compile(EXAMPLES / "digits.cnn", backend="torch", device="cpu")
    state = _sevens(model)
    state["batchnorm1.num_batches_tracked"] = torch.tensor(5, dtype=torch.int32)
    state["dense2.bias"] = state["dense2.bias"].double()
    load_weights(model, state)
    assert int(model.state_dict()["batchnorm1.num_batches_tracked"]) == 5
    assert torch.equal(model.state_dict()["dense2.bias"], torch.full((10,), 7.0))


@pytest.mark.parametrize("source", [[1], torch.zeros(1), None, 3, b"w.pt"], ids=["list", "tensor", "none", "int", "bytes"])
def test_load_weights_names_what_it_takes(source):
    model = cnndsl.compile(EXAMPLES / "lenet5.cnn", backend="torch", device="cpu")
    with pytest.raises(CnnWeightsError, match=f"expected a path .* or a state dict, got {type(source).__name__}"):
        load_weights(model, source)
