"""Training curves: OUT/curves.png after every epoch of `cnndsl train`, and `cnndsl plot RUN_DIR
[RUN_DIR ...]` to draw or compare runs, from each run's OUT/metrics.csv: loss and accuracy
against epochs, training solid and validation dashed, one colour per run. matplotlib is an
optional extra (`pip install -e ".[plot]"`); without it nothing is drawn and a one-line note says so."""

import csv
import importlib.util
import io
from pathlib import Path

from .errors import CnnInputError
from .files import FileTooLarge, read_regular, write_file

MAX_METRICS_BYTES = 64 * 2**20  # a row an epoch, ~150 bytes: far more epochs than any run trains
COLUMNS = ("epoch", "loss", "accuracy")  # what every run's metrics.csv holds, and the curves need
MISSING = "matplotlib is not installed, so no curves are drawn: pip install matplotlib (or cnndsl[plot])"


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_metrics(run: Path) -> list[dict]:
    """The rows of RUN/metrics.csv, numbers as floats (None where empty)."""
    path = Path(run) / "metrics.csv"
    try:
        reader = csv.DictReader(io.StringIO(read_regular(path, MAX_METRICS_BYTES).decode("utf-8"), newline=""))
        rows = list(reader)
    except FileTooLarge as err:
        raise CnnInputError(f"{path}: {err.size:,} bytes, more than the {MAX_METRICS_BYTES:,} a metrics.csv of a "
                            "training run holds") from None
    except OSError as err:
        raise CnnInputError(f"{path}: cannot read it ({err.strerror or err}); is {run} a training run's folder?") \
            from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise CnnInputError(f"{path}: not the metrics.csv of a training run ({str(err)[:120]})") from None
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing or not rows:
        why = f"no {', '.join(missing)} column" if missing else "no epoch recorded"
        raise CnnInputError(f"{path}: not the metrics.csv of a training run ({why})")
    try:
        return [{k: float(v) if v else None for k, v in row.items()} for row in rows]
    except (TypeError, ValueError):
        raise CnnInputError(f"{path}: not the metrics.csv of a training run (a cell is not a number)") from None


def draw(runs, output) -> Path:
    """A PNG of the runs' loss and accuracy against epochs at `output`."""
    # (a `$` in a folder's name would start matplotlib's mathematics in the legend)
    records = [((Path(run).name or str(run)).replace("$", r"\$"), read_metrics(run)) for run in runs]
    if not available():
        raise CnnInputError(MISSING)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, rows) in enumerate(records):
        colour = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot(epochs, [r[key] for r in rows], color=colour, label=f"{name} training")
            if any(r.get(f"val_{key}") is not None for r in rows):
                ax.plot(epochs, [r[f"val_{key}"] for r in rows], color=colour, linestyle="--",
                        label=f"{name} validation")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize="small")
    fig.tight_layout()
    output, image = Path(output), io.BytesIO()
    try:
        fig.savefig(image, dpi=100, format=output.suffix.lstrip(".").lower() or "png")
    except ValueError as err:  # an extension matplotlib draws no format for
        raise CnnInputError(f"cannot draw {output}: {str(err)[:200]}") from None
    finally:
        plt.close(fig)
    try:
        write_file(output, image.getvalue())
    except OSError as err:
        raise CnnInputError(f"cannot write {output}: {err.strerror or err}") from None
    return output
