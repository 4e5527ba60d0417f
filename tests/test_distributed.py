"""Training in several processes (cnndsl/distributed.py): `cnndsl train --nproc 2` runs torchrun
with two gloo processes on the CPU, each taking half of every global batch; DDP averages their
gradients, so (no batch norm here) the weights after an epoch equal one process training on the
whole batches, within fp32 rounding. Rank 0 alone writes the run's files. A global batch that the
processes cannot share evenly is refused before anything starts."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cnndsl import checkpoint as ckpt
from cnndsl.errors import CnnInputError
from cnndsl.train import Options, train

NET = """network tiny
input 1x6x6
conv 4 3 pad=1
relu
flatten
dense 3
"""


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    x = rng.normal(0, 0.5, (80, 1, 6, 6)).astype(np.float32)
    x[np.arange(80), 0, y] += 2.0
    np.savez(tmp_path / "set.npz", x=x, y=y)
    (tmp_path / "tiny.cnn").write_text(NET)
    return tmp_path / "tiny.cnn", tmp_path / "set.npz"


def test_two_processes_train_as_one_on_the_whole_batch(files, tmp_path):
    net, data = files
    args = ["train", str(net), "--data", str(data), "--epochs", "2", "--batch-size", "16", "--val-split", "0",
            "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "cnndsl", *args, "--nproc", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test accuracy:") == 1  # rank 0 alone prints
    assert "processes: 2 (torch.distributed), 8 images each of every batch of 16" in run.stdout
    one = train(net, Options(data=str(data), epochs=2, batch_size=16, val_split=0.0, device="cpu",
                             out=str(tmp_path / "one")), log=lambda *_: None)
    a, b = ckpt.load(tmp_path / "two" / "last.pt"), ckpt.load(one["checkpoint"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "two").iterdir())


def test_a_batch_the_processes_cannot_share_is_refused(files, monkeypatch):
    net, data = files
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CnnInputError, match="--batch-size 15 is the global batch of 2 processes"):
        train(net, Options(data=str(data), batch_size=15))
