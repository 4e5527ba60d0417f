"""Whether a verified checkpoint (checkpoint.load) fits what it is about to be loaded into:
the network (its identity), the compiled model (names, shapes and dtypes of the weights)
and the optimizer (parameter groups and per-parameter state). `cnndsl train --resume`, `eval`
and `export` call these before any load_state_dict, so a mismatch is a CnnTrainError (a
CnnWeightsError from eval and export) naming the file and both sides, never a torch error or a
silent change.

No torch import: the tensors are read through their .shape and .dtype."""

import dataclasses
import enum
import hashlib
import json

from . import ir
from .errors import CnnTrainError

IDENTITY_VERSION = "cnndsl-network-1"  # part of the hashed text: a new description gets new identities


def network_identity(net: ir.Network) -> str:
    """sha256 (hex) of a canonical description of the IR: the input shape, then per node its
    op, attributes, inputs and output shape. Not the source text, so comments, formatting,
    block definitions and layer names do not change it (names reach the weights' keys, which
    check_model compares). Attributes at their default are left out, so that an option added
    later with a default keeps the identity of every network that does not use it."""
    nodes = [{"op": n.op.value, "attrs": _describe(n.attrs), "inputs": list(n.inputs), "shape": list(n.shape)}
             for n in net.nodes]
    text = json.dumps({"version": IDENTITY_VERSION, "input": list(net.input_shape), "nodes": nodes},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return value  # int, float, bool, str or None: json writes floats exactly (shortest round-trip repr)


def network_record(net: ir.Network) -> dict:
    """The checkpoint's `network` field."""
    return {"name": net.name, "identity": network_identity(net)}


def check_network(ckpt: dict, net: ir.Network, path, file, error=CnnTrainError) -> None:
    """Refuse weights trained for another network, even one whose every weight has the same
    shape (tanh for relu, another dropout p): the two identities must agree. `error`: the kind
    the reader reports (a training error on --resume, a weights error from eval and export)."""
    mine, theirs = network_identity(net), ckpt["network"]["identity"]
    if mine != theirs:
        raise error(f"{path} holds weights for another network: {ckpt['network']['name'][:80]!r} (identity "
                            f"{theirs[:12]}) there, {net.name!r} (identity {mine[:12]}) in {file}; the layers or "
                            "their options differ (an activation, a dropout p, a pooling, ...) even where every "
                            "weight's shape matches. Use the .cnn file it was trained from (the checkpoint's "
                            "`source` holds its text)")


def in_our_names(theirs: dict, expected: dict) -> dict:
    """A checkpoint's weights under the model's names: as they are where every name matches, else
    in declaration order; after check_network, which has shown the same network (whose labels,
    and so names, may differ)."""
    if set(theirs) == set(expected) or len(theirs) != len(expected):
        return theirs
    return dict(zip(expected, theirs.values()))


def check_model(ckpt: dict, expected: dict, path, *, cast: bool, error=CnnTrainError) -> None:
    """The checkpoint's weights fit `expected` (the model's state dict): the same names, shapes
    and dtypes. cast=True (eval) lets floating-point weights load into another floating-point
    dtype, as load_state_dict would convert them; a resumed run needs them exact. `error` as
    check_network's."""
    theirs = ckpt["model"]
    for key in list(expected) + [k for k in theirs if k not in expected]:
        a, b = theirs.get(key), expected.get(key)
        if a is None or b is None or tuple(a.shape) != tuple(b.shape):
            raise error(f"{path} holds weights for a different network: {key[:80]} is "
                                f"{_shape(a)} there and {_shape(b)} here")
        if a.dtype != b.dtype and not (cast and a.dtype.is_floating_point and b.dtype.is_floating_point):
            trained = ckpt["config"].get("dtype")
            hint = f"; pass --dtype {trained[:20]}, the dtype it was trained with" if isinstance(trained, str) else ""
            if not cast and str(b.dtype) == "torch.float32" and str(a.dtype) in ("torch.bfloat16", "torch.float16"):
                hint = ("; an older cnndsl trained 16-bit weights, where training now keeps fp32 weights (mixed "
                        "precision): start a new run from them with --init")
            raise error(f"{path} holds {key[:80]} as {a.dtype} but this model keeps it as {b.dtype}{hint}")


def _shape(t) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def check_optimizer(ckpt: dict, optimizer, state_keys: frozenset, path) -> None:
    """The checkpoint's optimizer state fits `optimizer` (freshly built, no state yet): as many
    parameter groups with as many parameters each, every parameter id once, and each
    parameter's state holding exactly `state_keys`, each a floating-point tensor of the
    parameter's shape ("step" a scalar). torch's load_state_dict checks only the group sizes;
    a wrong key or shape would fail later, inside optimizer.step."""
    saved, kind = ckpt["optimizer"], type(optimizer).__name__
    groups, mine = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(mine):
        raise CnnTrainError(f"{path} holds {kind} state for {len(groups)} parameter groups, but this model's "
                            f"optimizer has {len(mine)}")
    params = {}
    for i, (group, own) in enumerate(zip(groups, mine)):
        if len(group["params"]) != len(own["params"]):  # (the parameters that train: --freeze decides them)
            raise CnnTrainError(f"{path}: parameter group {i} of its {kind} state lists {len(group['params'])} "
                                f"parameters, this model's has {len(own['params'])}",
                                hint="another --freeze trains other parameters: leave --freeze out to take the "
                                     "checkpoint's")
        for pid, param in zip(group["params"], own["params"]):
            if pid in params:
                raise CnnTrainError(f"{path}: its {kind} state lists parameter {pid} twice")
            params[pid] = param
    for pid, entry in saved["state"].items():
        if pid not in params:
            raise CnnTrainError(f"{path}: its {kind} state has an entry for parameter {pid}, which no parameter "
                                "group lists")
        if set(entry) != state_keys:
            raise CnnTrainError(f"{path}: the {kind} state of parameter {pid} holds {', '.join(sorted(entry))[:200]}; "
                                f"expected {', '.join(sorted(state_keys))}")
        for key, value in entry.items():
            shape = () if key == "step" else tuple(params[pid].shape)
            if tuple(value.shape) != shape or not value.dtype.is_floating_point:
                raise CnnTrainError(f"{path}: the {kind} state {key[:40]!r} of parameter {pid} is a {value.dtype} "
                                    f"tensor of shape {tuple(value.shape)}; expected a floating-point one of "
                                    f"shape {shape}")
