"""Fine-tuning: a network with a new head for another number of classes, a compiled model
started from weights it did not train (weights.py), layers frozen (no gradients; their batch
norms in eval mode, optionally), and a data set cut to some of its classes."""

from dataclasses import replace

import numpy as np
import torch

from . import ir
from .dataset import Dataset
from .errors import CnnInputError, did_you_mean
from .ir import Op
from .weights import load_weights


def head(net: ir.Network) -> ir.Node:
    """The network's last dense layer: the classifier head."""
    dense = [n for n in net.nodes if n.op is Op.DENSE]
    if not dense:
        raise CnnInputError(f"{net.name} has no dense layer to replace for --classes")
    return dense[-1]


def with_classes(net: ir.Network, classes: int) -> ir.Network:
    """The network with its last dense layer giving `classes` outputs (what follows it, an
    activation, dropout or softmax, keeps its kind and takes the new width)."""
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise CnnInputError(f"--classes must be a positive integer, got {classes!r}")
    last = head(net)
    nodes = list(net.nodes)
    nodes[last.id] = replace(last, attrs=replace(last.attrs, units=classes), shape=(classes,))
    for n in nodes[last.id + 1:]:
        if n.shape != last.shape:
            raise CnnInputError(f"{net.name}: {n.name} ({n.keyword}) after the head {last.name} changes its "
                                f"shape, so --classes cannot replace the head")
        nodes[n.id] = replace(n, shape=(classes,))
    return replace(net, nodes=tuple(nodes))


def head_entries(model) -> tuple[str, ...]:
    """The state-dict names of the head's parameters."""
    last = head(model.net)
    return tuple(f"{last.name}.{p}" for p in ("weight", "bias") if p == "weight" or last.attrs.bias)


def init(model, source, new_head: bool, log=print) -> None:
    """Load `source` into the model (weights.load_weights), all but the head if it is new."""
    skip = head_entries(model) if new_head else ()
    loaded = load_weights(model, source, skip)
    how = "by name" if all(ours == theirs for ours, theirs in loaded.items()) else "in declaration order"
    log(f"initialised {len(loaded)} tensors from {source} ({how})")
    if skip:
        last = head(model.net)
        log(f"new head: {last.name} ({last.shape[0]} classes) freshly initialised")


def _nodes(net: ir.Network, label: str) -> list[ir.Node]:
    """The layers a label names: the layer itself, or every layer under it (a block call)."""
    found = [n for n in net.nodes[1:] if n.name == label or n.name.startswith(label + ".")]
    if not found:
        names = sorted({n.name.split(".")[0] for n in net.nodes[1:]})
        raise CnnInputError(f"--freeze: {net.name} has no layer {label!r}", hint=did_you_mean(label, names))
    return found


def freeze(model, labels, bn: bool = False) -> list[str]:
    """Freeze layers: one label, every layer up to and including it (or the block it names); several,
    exactly those. Their parameters take no gradient and, with bn, their batch norms stay in eval
    mode (running statistics, not updated) whatever model.train() says. -> the frozen layers' names."""
    net = model.net
    if len(labels) == 1:
        last = max(n.id for n in _nodes(net, labels[0]))
        chosen = [n for n in net.nodes[1:] if n.id <= last]
    else:
        chosen = sorted({n.id: n for label in labels for n in _nodes(net, label)}.values(), key=lambda n: n.id)
    if any(n.id == head(net).id for n in chosen):
        raise CnnInputError(f"--freeze {','.join(labels)} would freeze the head {head(net).name}: nothing would train")
    frozen = []
    for n in chosen:
        layer = model.layers.get(n.id)
        if layer is None:
            continue
        layer.requires_grad_(False)
        if bn and n.op is Op.BATCHNORM:
            model.frozen_bn.add(n.id)
        frozen.append(n.name)
    if not frozen:
        raise CnnInputError(f"--freeze {','.join(labels)}: no layer with parameters among the layers it names")
    model.train(model.training)  # puts the frozen batch norms in eval mode
    return frozen


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def only_classes(ds: Dataset, spec: str) -> Dataset:
    """The examples of some classes, relabelled 0, 1, ... in the order given: `spec` is a list of
    labels and ranges, "0-4" or "5,7,9"."""
    if not isinstance(spec, str):  # a checkpoint's config or an API caller may hold anything
        raise CnnInputError(f"--only-classes: expected labels and ranges such as 0-4 or 5,7,9, got {spec!r:.60} "
                            f"({type(spec).__name__})")
    n = len(ds.classes)
    wanted: list[int] = []
    seen: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:  # not a number, or one of more than 4,300 digits
            raise CnnInputError(f"--only-classes: expected labels and ranges such as 0-4 or 5,7,9, got {spec!r:.60}") \
                from None
        # Each range is bounded by the classes before it is built, and a repeat stops the
        # loop, so "0-10000000000" costs nothing and the list never outgrows the classes.
        if not 0 <= first <= last < n or not seen.isdisjoint(range(first, last + 1)):
            raise CnnInputError(f"--only-classes {spec:.60}: expected distinct labels in 0..{n - 1}")
        wanted += range(first, last + 1)
        seen.update(range(first, last + 1))
    keep = np.isin(ds.y, wanted)
    relabel = np.zeros(n, dtype=np.int64)
    relabel[wanted] = np.arange(len(wanted))
    return Dataset(f"{ds.name}, classes {spec}", ds.x[keep], relabel[ds.y[keep]],
                   tuple(ds.classes[c] for c in wanted))
