"""Learning-rate schedules for `cnndsl train --sched`: the factor of the base rate at each optimizer
step, a pure function of the step count, run by torch.optim.lr_scheduler.LambdaLR stepped once a
batch. The schedule's whole state is the step count, which a resumed run sets from the epochs done,
so a resumed run keeps the rate of an uninterrupted one (bit for bit on the CPU).

- none: the base rate throughout;
- step: a tenth of it from a third of the run, a hundredth from two thirds;
- cosine: half a cosine from the base rate to 0 over the run;
- onecycle: torch's OneCycleLR shape: up from base/25 to base over the first 30% (cosine), then
  down to base/25/10^4;
and with `warmup_epochs` > 0 a linear rise from base/steps to base over those epochs first."""

import math
import warnings

import torch

SCHEDULES = ("none", "step", "cosine", "onecycle")


def factor(kind: str, step: int, total: int, warmup: int) -> float:
    """The factor of the base rate at optimizer step `step` of `total`, after `warmup` steps of
    linear warm-up."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))  # progress after the warm-up, 0 .. 1
    if kind == "step":
        return 0.1 ** min(2, int(3 * t))
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if kind == "onecycle":
        lo, end = 1 / 25, 1 / 25 / 1e4
        cos = lambda a, b, u: b + (a - b) * 0.5 * (1 + math.cos(math.pi * u))
        return cos(lo, 1.0, t / 0.3) if t < 0.3 else cos(1.0, end, (t - 0.3) / 0.7)
    return 1.0


def make(optimizer, kind: str, epochs: int, steps_per_epoch: int, warmup_epochs: int, done_epochs: int):
    """A LambdaLR on `optimizer` (its base rates set), positioned after `done_epochs` epochs."""
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(kind, step, total, warmup))
    if done_epochs:
        scheduler.last_epoch = done_epochs * steps_per_epoch - 1
        with warnings.catch_warnings():  # positioning a resumed run's schedule, before any optimizer step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
    return scheduler
