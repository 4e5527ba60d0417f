"""Training curves (cnndsl/plot.py): OUT/curves.png after every epoch and `cnndsl plot` over one
or several runs when matplotlib is installed; a one-line note, and a clear error from `cnndsl
plot`, when it is not; a folder that is not a run refused."""

import os
from pathlib import Path

import pytest

from cnndsl import plot
from cnndsl.cli import main
from cnndsl.train import Options, train

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits.cnn"
PNG = b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_a_note_and_no_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plot, "available", lambda: False)
    lines = []
    train(DIGITS, Options(backend="torch", epochs=1, out=str(tmp_path / "a")), log=lines.append)
    assert f"note: {plot.MISSING}" in lines and not (tmp_path / "a" / "curves.png").exists()
    assert main(["plot", str(tmp_path / "a")]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_curves_of_a_run_and_of_two(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name in ("a", "b"):
        train(DIGITS, Options(backend="torch", epochs=2, out=str(tmp_path / name), val_split=0.1 if name == "a"
                              else 0), log=lambda s: None)
    assert (tmp_path / "a" / "curves.png").read_bytes().startswith(PNG)
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes().startswith(PNG)
    (tmp_path / "a").rename(tmp_path / "run_$\\frac$")  # matplotlib's mathematics, were it read as such
    assert main(["plot", str(tmp_path / "run_$\\frac$"), "-o", str(tmp_path / "frac.png")]) == 0
    assert (tmp_path / "frac.png").read_bytes().startswith(PNG)
    capsys.readouterr()


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.csv: cannot read it" in capsys.readouterr().err
    head = b"epoch,loss,accuracy\n"
    for text in (head + b"1,abc,1\n", head + b"1,\xff\xfe,1\n", head + b"1," + b"9" * 200_000 + b",1\n", b"a,b\n1,2\n",
                 b"epoch,loss\n1,2\n", head):
        # not a number, not UTF-8, a field past csv's limit, no epoch column, no accuracy column, no epoch
        (tmp_path / "metrics.csv").write_bytes(text)
        assert main(["plot", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "not the metrics.csv of a training run" in err and "Traceback" not in err
    (tmp_path / "metrics.csv").unlink()
    os.mkfifo(tmp_path / "metrics.csv")  # would block a reader for ever
    assert main(["plot", str(tmp_path)]) == 1
    assert "metrics.csv: cannot read it (not a regular file)" in capsys.readouterr().err
