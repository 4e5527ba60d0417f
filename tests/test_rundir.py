"""Hostile files in a run's output folder (cnndsl/rundir.py): a link or a second name planted at
OUT/.lock is refused, not written through, and a link planted at a file the run writes
(config.json, metrics.csv) is replaced by the run's file; the file it pointed to is untouched."""

import os

import numpy as np
import pytest

from cnndsl.cli import main

NET = "network tiny\ninput 1x4x4\nconv 4 3 pad=1\nrelu\nflatten\ndense 3\nsoftmax\n"
SECRET = "ssh-ed25519 AAAA... the user's key\n"


@pytest.fixture
def run(tmp_path):
    """The command line of a one-epoch run on 30 4x4 images into tmp_path/out, and a victim file."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 1, 4, 4)).astype(np.float32), y=rng.integers(0, 3, 30))
    (tmp_path / "tiny.cnn").write_text(NET)
    (tmp_path / "out").mkdir()
    victim = tmp_path / "authorized_keys"
    victim.write_text(SECRET)
    argv = ["train", str(tmp_path / "tiny.cnn"), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out"),
            "--backend", "torch", "--epochs", "1", "--batch-size", "10"]
    return argv, tmp_path / "out", victim


@pytest.mark.parametrize("plant, message", [
    (os.symlink, "is a symbolic link; a run's lock file must be a file of its own"),
    (os.link, "is not a plain file of its own (a device, a pipe or a second name of another file)")])
def test_a_lock_file_planted_as_a_link_is_refused(run, plant, message, capsys):
    argv, out, victim = run
    plant(victim, out / ".lock")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"training error: {out / '.lock'} {message}" in err and "Traceback" not in err
    assert victim.read_text() == SECRET


def test_links_planted_at_the_runs_files_are_replaced_not_written_through(run, capsys):
    argv, out, victim = run
    for name in ("config.json", "metrics.csv"):
        (out / name).symlink_to(victim)
    assert main(argv) == 0
    capsys.readouterr()
    assert victim.read_text() == SECRET
    assert not (out / "config.json").is_symlink() and '"epochs": 1' in (out / "config.json").read_text()
    assert not (out / "metrics.csv").is_symlink() and (out / "metrics.csv").read_text().startswith("epoch,")



def test_a_folder_name_sends_no_terminal_escapes(run, capsys):
    """The run's report names its folder and files: a name chosen to hold an escape sequence
    (here one that sets the terminal's title and clears it) is printed with `?` in its place."""
    argv, out, _ = run
    hostile = out.parent / "run\x1b]0;PWNED\x07\x1b[2J"
    argv[argv.index(str(out))] = str(hostile)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed and "run?]0;PWNED??[2J" in printed


def test_a_lock_file_removed_as_it_is_opened_is_locked_afresh(tmp_path, monkeypatch):
    """The lock-file protocol's retry: a file the previous run removed just after our open has no
    name left (st_nlink 0), which is not a planted second name."""
    from cnndsl import rundir
    real, calls = os.open, []

    def opener(path, flags, mode=0o777, **kw):
        fd = real(path, flags, mode, **kw)
        if str(path).endswith(".lock") and not calls:
            calls.append(path)
            os.unlink(path)
        return fd
    monkeypatch.setattr(rundir.os, "open", opener)
    with rundir.claim(tmp_path / "out", ("last.pt.*.tmp",)):
        assert len(calls) == 1 and (tmp_path / "out" / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_replaced_file_keeps_its_mode_and_a_new_one_gets_the_usual(tmp_path):
    from cnndsl.files import write_file
    mask = os.umask(0o022)
    try:
        write_file(tmp_path / "new.json", "{}")
        (tmp_path / "private.json").write_text("old")
        os.chmod(tmp_path / "private.json", 0o600)
        write_file(tmp_path / "private.json", "new")
    finally:
        os.umask(mask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "private.json").read_text() == "new"


def test_an_output_folder_that_cannot_be_one_is_named(run, capsys):
    argv, out, victim = run
    at = argv.index(str(out))
    for target, message in ((victim, f"cannot use {victim} as the output folder: it is a file; give --out a folder"),
                            (victim / "sub", f"cannot create the output folder {victim / 'sub'}: Not a directory")):
        argv[at] = str(target)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"training error: {message}" in err and "Traceback" not in err, err
    assert victim.read_text() == SECRET
