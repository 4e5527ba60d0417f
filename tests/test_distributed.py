"""Training in several processes (cnndsl/distributed.py): `cnndsl train --nproc 2` runs torchrun
with two gloo processes on the CPU, each taking half of every global batch; DDP averages their
gradients, so without batch norm, and with batch norm under --sync-bn (kernels/sync.py), the
weights and running statistics after an epoch equal one process training on the whole
batches, within fp32 rounding; without --sync-bn each half is normalised by its own statistics,
as DDP means. Rank 0 alone writes the run's files. A global batch that the processes cannot
share evenly is refused before anything starts."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cnndsl import checkpoint as ckpt
from cnndsl.errors import CnnInputError
from cnndsl.train import Options, train

# (16 channels: the first block defers to the second conv, whose input gradient computes its batch
# norm's sums, synchronised as a pair of vectors)
BN = """network tiny_bn
input 1x6x6
conv 16 3 pad=1 bias=false
batchnorm
relu
conv 16 3 pad=1 bias=false
batchnorm
relu
flatten
dense 3
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """(the network file, the .npz set)."""
    tmp_path = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)  # 32 training images (the 80/20 split): two whole batches of 16
    x = rng.normal(0, 0.5, (40, 1, 6, 6)).astype(np.float32)
    x[np.arange(40), 0, y] += 2.0
    np.savez(tmp_path / "set.npz", x=x, y=y)
    (tmp_path / "tiny_bn.cnn").write_text(BN)
    return tmp_path / "tiny_bn.cnn", tmp_path / "set.npz"


@pytest.fixture(scope="module")
def files(paths, tmp_path_factory):
    """(the network file, the .npz set, the weights of one process trained on the whole batches)."""
    one = train(paths[0], Options(data=str(paths[1]), **RUN, out=str(tmp_path_factory.mktemp("one"))),
                log=lambda *_: None)
    return *paths, ckpt.load(one["checkpoint"])["model"]


RUN = {"epochs": 1, "batch_size": 16, "val_split": 0.0, "device": "cpu"}


def _two(net, data, out, *extra):
    args = ["train", str(net), "--data", str(data), "--epochs", "1", "--batch-size", "16", "--val-split", "0",
            "--device", "cpu", "--out", str(out), *extra]
    run = subprocess.run([sys.executable, "-m", "cnndsl", *args, "--nproc", "2"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test accuracy:") == 1  # rank 0 alone prints
    assert "processes: 2 (torch.distributed), 8 images each of every batch of 16" in run.stdout
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    return ckpt.load(out / "last.pt")["model"], run.stdout


def test_synchronised_batch_norm_trains_as_one_process_on_the_whole_batch(files, tmp_path):
    net, data, one = files
    two, out = _two(net, data, tmp_path / "sync", "--sync-bn")
    assert "batch norm synchronised" in out
    for k in two:  # weights and running statistics alike: the gradients averaged, the statistics global
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _two_halves(net, data):
    """What DDP means without --sync-bn, in one process: every step, the model's gradients on each
    half of the batch (each half normalised by its own statistics) averaged, then one Adam step;
    the running statistics are rank 0's (DDP broadcasts them before every forward)."""
    import cnndsl
    from cnndsl.data import load
    train_set, _ = load(data)
    x, y = torch.from_numpy(train_set.x), torch.from_numpy(train_set.y)
    torch.manual_seed(0)
    model = cnndsl.compile(net.read_text(), backend="triton", device="cpu").train()
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))  # epoch 1
    for i in range(0, len(y), 16):
        idx = order[i:i + 16]
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        opt.zero_grad(set_to_none=True)
        model.loss(x[idx[8:]], y[idx[8:]]).backward()  # rank 1: its running statistics are dropped
        second = [p.grad.clone() for p in model.parameters()]
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
        opt.zero_grad(set_to_none=True)
        model.loss(x[idx[:8]], y[idx[:8]]).backward()  # rank 0
        for p, g in zip(model.parameters(), second):
            p.grad = (p.grad + g) / 2
        opt.step()
    return model.state_dict()


def test_without_sync_each_process_normalises_its_own_part(files, tmp_path):
    net, data, one = files
    two, _ = _two(net, data, tmp_path / "local")
    halves = _two_halves(net, data)
    for k in two:
        torch.testing.assert_close(two[k], halves[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.allclose(two["batchnorm1.running_var"], one["batchnorm1.running_var"], rtol=1e-4)


def test_a_batch_the_processes_cannot_share_is_refused(paths, monkeypatch):
    net, data = paths
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CnnInputError, match="--batch-size 15 is the global batch of 2 processes"):
        train(net, Options(data=str(data), batch_size=15))


def test_nproc_checks_the_command_before_starting_torchrun(paths, monkeypatch, capsys):
    """A batch the processes cannot share, --sync-bn on the torch backend or a bad file: one clear
    message from the command, not one from every process and torchrun's traceback."""
    from cnndsl import distributed
    from cnndsl.cli import main
    net, data = paths
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    bad = net.parent / "bad.cnn"
    bad.write_text("network bad\ninput 1x4x4\nconvv 2 3\n")
    for args, message in ((["--batch-size", "15"], "input error: --batch-size 15 is the global batch of 2 processes"),
                          (["--sync-bn", "--backend", "torch"], "input error: --sync-bn synchronises the triton"),
                          ([], "")):
        file = str(bad) if not args else str(net)
        assert main(["train", file, "--data", str(data), "--nproc", "2", *args]) == 1
        err = capsys.readouterr().err
        assert (message or "name error: unknown layer 'convv'") in err and "Traceback" not in err, err


def test_a_run_whose_process_ended_says_so(monkeypatch, capsys):
    from cnndsl import distributed
    calls = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: calls.append(cmd) or 1)
    assert distributed.launch(["train", "net.cnn", "--nproc", "2", "--epochs", "3"], 2) == 1
    assert calls[0][-4:] == ["train", "net.cnn", "--epochs", "3"] and "--nproc_per_node=2" in calls[0]
    assert "the last checkpoint in the output folder is intact: continue with --resume" in capsys.readouterr().err


def test_a_process_of_torchrun_does_not_launch_torchrun_again(monkeypatch):
    from cnndsl import distributed
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CnnInputError, match="this process is one of torchrun's already"):
        distributed.launch(["train", "net.cnn", "--npro", "2"], 2)


def test_nproc_is_bounded_by_the_machine(monkeypatch):
    from cnndsl import distributed
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    with pytest.raises(CnnInputError, match=r"--nproc 2147483647: more processes than this machine's 2 CPU cores"):
        distributed.launch(["train", "net.cnn", "--nproc", "2147483647"], 2147483647, "cpu")


def test_a_file_cannot_set_nproc(paths, tmp_path, capsys, monkeypatch):
    """How many processes to start is the command line's to say, never a config.json's or a
    checkpoint's (a file that says 50,000 would start 50,000)."""
    from cnndsl import distributed
    from cnndsl.cli import main
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    net, _ = paths
    config = tmp_path / "config.json"
    config.write_text(f'{{"file": "{net}", "nproc": 50000, "batch_size": 100000}}')
    assert main(["train", "--config", str(config)]) == 1
    assert (f"input error: --config {config}: nproc is not an option a file sets: give --nproc on the command line"
            in capsys.readouterr().err)
