"""Learning-rate schedules (cnndsl/schedule.py, `cnndsl train --sched --warmup-epochs`): their
shapes, the rate each epoch records, and a resumed run that equals an uninterrupted one bit for bit."""

import math
from pathlib import Path

import pytest
import torch

import cnndsl.loop
from cnndsl import schedule
from cnndsl.errors import CnnInputError
from cnndsl.train import Options, train
from cnndsl.weights import read

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits.cnn"


@pytest.mark.parametrize(("kind", "points"), [
    ("none", {0: 1.0, 50: 1.0, 99: 1.0}),
    ("step", {0: 1.0, 33: 1.0, 34: 0.1, 67: 0.01, 99: 0.01}),
    ("cosine", {0: 1.0, 50: 0.5, 100: 0.0}),
    ("onecycle", {0: 1 / 25, 30: 1.0, 100: 1 / 25 / 1e4}),
])
def test_the_shapes(kind, points):
    for step, want in points.items():
        assert math.isclose(schedule.factor(kind, step, 100, 0), want, rel_tol=1e-9, abs_tol=1e-12), (kind, step)


def test_warm_up_rises_linearly_then_the_schedule_starts():
    assert [schedule.factor("cosine", s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.factor("cosine", 4, 100, 4) == 1.0 and schedule.factor("cosine", 100, 100, 4) == 0.0


def test_a_resumed_run_with_a_schedule_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    opts = {"backend": "torch", "sched": "cosine", "warmup_epochs": 1, "lr": 0.01, "optimizer": "sgd", "epochs": 3}
    whole = train(DIGITS, Options(out=str(tmp_path / "whole"), **opts), log=lambda s: None)
    real = cnndsl.loop.run_epoch

    def killed_in_epoch_3(*args):
        if args[7] == 3:  # the epoch
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(cnndsl.loop, "run_epoch", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(DIGITS, Options(out=str(tmp_path / "cut"), **opts), log=lambda s: None)
    monkeypatch.setattr(cnndsl.loop, "run_epoch", real)
    cut = train(DIGITS, Options(out=str(tmp_path / "cut"), resume="", **opts), log=lambda s: None)
    assert [h["lr"] for h in whole["history"]] == [h["lr"] for h in cut["history"]]
    assert whole["history"][0]["lr"] == 0.01 and whole["history"][-1]["lr"] == 0.0  # the base after warm-up; 0
    a, b = read(whole["checkpoint"]).tensors, read(cut["checkpoint"]).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_schedules_are_refused():
    for bad in (Options(sched="linear"), Options(warmup_epochs=-1)):
        with pytest.raises(CnnInputError, match="--sched must be one of none, step, cosine, onecycle"):
            bad.validate()
