"""`cnndsl eval`: the accuracy of a model's weights (a cnndsl checkpoint, a torch state dict or
safetensors) on the held-out split of a data set, its images normalised as the checkpoint's run
normalised them (`train --normalize`)."""

from pathlib import Path

from . import api, data, finetune, metrics, resume
from .augment import Normalize
from .errors import CnnInputError, CnnWeightsError
from .runtime import check_batch_memory, check_run_device
from .train import DTYPES, classes_of, tensors_of
from .weights import load_weights
from .weights import read as read_weights


def evaluate(file: str | Path, weights: str | Path, data_spec: str | None = None, batch_size: int = 256,
             device: str | None = None, backend: str = "triton", fuse: bool | str = True, dtype: str = "fp32",
             classes: int | None = None, only_classes: str | None = None) -> float:
    """The accuracy of `weights` (a checkpoint, a state dict or safetensors) on the held-out split
    of `data_spec` (its classes `only_classes`), for the network with a head of `classes` if given
    (else a fine-tuning checkpoint's)."""
    if batch_size < 1:
        raise CnnInputError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise CnnInputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    check_run_device(device)
    net = api.parse(Path(file))
    w = read_weights(weights)
    config = w.checkpoint["config"] if w.checkpoint else {}
    classes = classes if classes is not None else config.get("classes")
    trained_on = config.get("only_classes")
    if only_classes is None:
        only_classes = trained_on
        if not isinstance(only_classes, (str, type(None))):  # a checksum is no signature: anyone can forge one
            raise CnnWeightsError(f"{weights} is not a valid cnndsl checkpoint: only_classes in its config is "
                                  f"{only_classes!r:.60} ({type(only_classes).__name__}); expected labels and "
                                  "ranges such as '0-4' or '5,7,9'")
    if classes is not None:
        net = finetune.with_classes(net, classes)
    _, test_set = data.load(data_spec)
    if only_classes:
        test_set = finetune.only_classes(test_set, only_classes)
        picked, head = len(test_set.classes), classes_of(net)
        if only_classes != trained_on and picked != head:  # (renumbered 0.., they are not the classes it predicts)
            raise CnnInputError(f"--only-classes {only_classes} picks {picked} classes, numbered 0 to {picked - 1}, "
                                f"but the weights' head has {head} outputs, trained on "
                                + ("all the classes" if trained_on is None else f"--only-classes {trained_on}"),
                                hint=f"evaluate weights trained with --only-classes {only_classes} (or a head of "
                                     f"{picked} classes, --classes {picked})")
    data.check(test_set, net.input_shape, classes_of(net), "test set")
    model = api.compile(net, backend=backend, fuse=fuse, device=device, dtype=DTYPES[dtype])
    check_batch_memory(net, max(min(batch_size, len(test_set)), 1), model.device, DTYPES[dtype].itemsize,
                       training=False)
    if w.checkpoint is not None:  # (the same network, its labels free to differ: loaded by name or by order)
        resume.check_network(w.checkpoint, net, weights, file, error=CnnWeightsError)
    load_weights(model, w)
    norm = Normalize.from_record(w.checkpoint.get("normalize")) if w.checkpoint is not None else None
    return metrics.validate(model, *tensors_of(test_set, model, norm), batch_size)["val_accuracy"]
