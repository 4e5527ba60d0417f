"""The optimizer of `cnndsl train` and its hyper-parameters: those given on the command line,
else a resumed checkpoint's (its state belongs to its optimizer), else the defaults."""

import math
from dataclasses import replace

import torch

from .errors import CnnTrainError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
STATE_KEYS = {"sgd": frozenset({"momentum_buffer"}), "adam": frozenset({"step", "exp_avg", "exp_avg_sq"}),
              "adamw": frozenset({"step", "exp_avg", "exp_avg_sq"})}  # torch's per-parameter state
DEFAULT_OPTIMIZER = "adam"
DEFAULT_LR = {"sgd": 0.05, "adam": 0.003, "adamw": 0.003}
DEFAULT_MOMENTUM, DEFAULT_WEIGHT_DECAY = 0.9, 0.0


def settle(opts, ckpt: dict | None, path):
    """The options with the optimizer and its hyper-parameters filled in: those given, else the
    checkpoint's when resuming (its state belongs to its optimizer), else the defaults."""
    if ckpt is None:
        name = opts.optimizer or DEFAULT_OPTIMIZER
        base = {"lr": DEFAULT_LR[name], "momentum": DEFAULT_MOMENTUM, "weight_decay": DEFAULT_WEIGHT_DECAY}
    else:
        name, base = saved_recipe(ckpt["config"], path)
        if opts.optimizer not in (None, name):
            raise CnnTrainError(f"{path} was trained with --optimizer {name}, not {opts.optimizer}: its optimizer "
                                f"state does not carry over; leave out --optimizer to continue with {name}, or "
                                f"train with {opts.optimizer} from the start in another --out")
    given = {k: getattr(opts, k) for k in base if getattr(opts, k) is not None}
    return replace(opts, optimizer=name, **{**base, **given})


def saved_recipe(config: dict, path) -> tuple[str, dict]:
    """The optimizer and hyper-parameters a checkpoint's config records, checked."""
    name = config.get("optimizer")
    if name not in OPTIMIZERS:
        raise CnnTrainError(f"{path}: its config names the optimizer {name!r:.40}; expected one of "
                            f"{', '.join(OPTIMIZERS)}")
    base = {}
    for key, positive in (("lr", True), ("momentum", False), ("weight_decay", False)):
        value = config.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (value > 0 if positive else value >= 0)):
            raise CnnTrainError(f"{path}: its config's {key} is {value!r:.40}; expected a number "
                                f"{'> 0' if positive else '>= 0'}")
        base[key] = value
    return name, base


def make(opts, params):
    """opts settled (settle)."""
    extra = {"momentum": opts.momentum} if opts.optimizer == "sgd" else {}
    return OPTIMIZERS[opts.optimizer](params, lr=opts.lr, weight_decay=opts.weight_decay, **extra)
