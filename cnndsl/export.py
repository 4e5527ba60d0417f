"""`cnndsl export`: a model with its weights handed to the tools users deploy with, by the
output's suffix: `.onnx` (the reference backend, plain torch ops, traced by torch's ONNX
exporter at opset 17 or newer, the batch dimension dynamic), `.safetensors` (weights.py's
writer, in declaration order) or `.pt`/`.pth` (a plain state dict, torch.save). Names are the
model's; the order is the declaration order, so either loads into the hand-written torch model
of the same network entry by entry.

A checkpoint of a run that normalised its images (`train --normalize`) exports a model that
normalises them itself in ONNX (the graph takes images as the data set holds them, in [0, 1]);
a weights file cannot hold that step: .safetensors records the statistics in its metadata
(`normalize_mean`, `normalize_std`, JSON lists), and `cnndsl export` says what to apply."""

import json
import os
import warnings
from pathlib import Path

import torch

from . import api, finetune, resume
from .augment import Normalize
from .checkpoint import reason
from .errors import CnnInputError, CnnWeightsError
from .files import new_file_beside, usable
from .weights import load_weights, read, write_safetensors

FORMATS = (".onnx", ".safetensors", ".pt", ".pth")
MIN_OPSET = 17


class _Normalized(torch.nn.Module):
    """The model behind its run's normalisation, for ONNX: (x - mean) / std per channel, then the model."""

    def __init__(self, model, norm: Normalize):
        super().__init__()
        self.model, self.norm = model, norm

    def forward(self, x):
        return self.model(self.norm(x))


def export(file, weights, output, classes: int | None = None, opset: int = MIN_OPSET, log=print) -> Path:
    """Write the network in `file` with the weights in `weights` (any file load_weights reads)
    to `output`; `classes`: the head's width if fine-tuning replaced it (by default a fine-tuning
    checkpoint's). -> the path written."""
    output = Path(output)
    if output.suffix not in FORMATS:
        raise CnnInputError(f"export: cannot tell the format of {output}; name it *.onnx, *.safetensors or *.pt")
    top = _max_opset()
    if output.suffix == ".onnx" and not MIN_OPSET <= opset <= (top or opset):
        raise CnnInputError(f"export: --opset must be from {MIN_OPSET} to {top} (the newest this torch's ONNX "
                            f"exporter writes), got {opset}" if top else f"export: --opset must be {MIN_OPSET} or "
                            f"newer, got {opset}")
    output = usable(output, "export: cannot write", CnnInputError)
    if output.is_dir():
        raise CnnInputError(f"export: {output} is a directory; name the file to write, e.g. {output / 'model'}"
                            f"{output.suffix}")
    folder = output.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise CnnInputError(f"export: cannot write {output}: {folder} {what}")
    net = api.parse(Path(file))
    w = read(weights)
    if classes is None and w.checkpoint is not None:  # a fine-tuning run's own head
        classes = w.checkpoint["config"].get("classes")
    if classes is not None:
        net = finetune.with_classes(net, classes)
    if w.checkpoint is not None:  # a checkpoint knows its network (its head too): another one's weights are refused
        resume.check_network(w.checkpoint, net, weights, file, error=CnnWeightsError)
    model = api.compile(net, backend="torch", device="cpu").eval()
    load_weights(model, w)
    norm = Normalize.from_record(w.checkpoint.get("normalize")) if w.checkpoint is not None else None
    stats = {"normalize_mean": json.dumps(norm.mean.tolist()), "normalize_std": json.dumps(norm.std.tolist())} \
        if norm is not None else {}
    if norm is not None and output.suffix != ".onnx":
        log(f"note: the run normalised its images: feed the model (x - mean) / std per channel, mean "
            f"{stats['normalize_mean']}, std {stats['normalize_std']}"
            + (" (also in the file's metadata)" if output.suffix == ".safetensors" else ""))
    if output.suffix == ".onnx":
        import importlib.util
        if importlib.util.find_spec("onnx") is None:
            raise CnnInputError("export to ONNX needs the onnx package: pip install onnx (or cnndsl[export])")
    try:  # written whole beside the output, then renamed over it: a failed export leaves no torn file
        fd, tmp = new_file_beside(output)
        os.close(fd)
        try:
            _write(model, net, norm, stats, output.suffix, tmp, opset)
            os.replace(tmp, output)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except (OSError, RuntimeError) as err:  # torch.save and the exporter report a failed write as RuntimeError
        raise CnnInputError(f"export: cannot write {output}: {reason(err)}") from None
    return output


def _write(model, net, norm, stats: dict, suffix: str, path: str, opset: int) -> None:
    if suffix == ".safetensors":
        write_safetensors(model.state_dict(), path, stats)
    elif suffix in (".pt", ".pth"):
        torch.save(model.state_dict(), path)
    else:
        x = torch.zeros(1, *net.input_shape)
        with warnings.catch_warnings():  # the legacy exporter's deprecation note and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(_Normalized(model, norm) if norm is not None else model, (x,), path, dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def _max_opset() -> int | None:
    """The newest opset the TorchScript exporter (dynamo=False, which export uses) writes, where this
    torch says (a private constant: None where it is gone, and the exporter's own error stands)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
