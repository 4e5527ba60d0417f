"""`cnndsl export`: a model with its weights handed to the tools users deploy with, by the
output's suffix: `.onnx` (the reference backend, plain torch ops, traced by torch's ONNX
exporter at opset 17 or newer, the batch dimension dynamic), `.safetensors` (weights.py's
writer, in declaration order) or `.pt`/`.pth` (a plain state dict, torch.save). Names are the
model's; the order is the declaration order, so either loads into the hand-written torch model
of the same network entry by entry."""

import warnings
from pathlib import Path

import torch

from . import api, finetune
from .errors import CnnInputError
from .weights import load_weights, read, write_safetensors

FORMATS = (".onnx", ".safetensors", ".pt", ".pth")
MIN_OPSET = 17


def export(file, weights, output, classes: int | None = None, opset: int = MIN_OPSET) -> Path:
    """Write the network in `file` with the weights in `weights` (any file load_weights reads)
    to `output`; `classes`: the head's width if fine-tuning replaced it (by default a fine-tuning
    checkpoint's). -> the path written."""
    output = Path(output)
    if output.suffix not in FORMATS:
        raise CnnInputError(f"export: cannot tell the format of {output}; name it *.onnx, *.safetensors or *.pt")
    if output.suffix == ".onnx" and opset < MIN_OPSET:
        raise CnnInputError(f"export: --opset must be {MIN_OPSET} or newer, got {opset}")
    net = api.parse(Path(file))
    w = read(weights)
    if classes is None and w.checkpoint is not None:  # a fine-tuning run's own head
        classes = w.checkpoint["config"].get("classes")
    if classes is not None:
        net = finetune.with_classes(net, classes)
    model = api.compile(net, backend="torch", device="cpu").eval()
    load_weights(model, w)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        write_safetensors(model.state_dict(), output)
    elif output.suffix in (".pt", ".pth"):
        torch.save(model.state_dict(), output)
    else:
        import importlib.util
        if importlib.util.find_spec("onnx") is None:
            raise CnnInputError("export to ONNX needs the onnx package: pip install onnx (or cnndsl[export])")
        x = torch.zeros(1, *net.input_shape)
        with warnings.catch_warnings():  # the legacy exporter's deprecation note and tracer warnings
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), output, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return output
