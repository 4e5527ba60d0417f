"""What `cnndsl bench` prints and writes, from its rows alone (no torch: benchmarks/ renders
saved results with it): the tables of whole networks and of fused groups, JSON, CSV and a
PNG plot (matplotlib, optional: without it the plot is skipped with a note)."""

import csv
import json

from .errors import CnnInputError
from .summary import group_labels

BASELINE = "eager"  # the provider every speed is relative to


def case(row: dict) -> str:
    """What a whole-network row measures: its network, and whether as CUDA graph replays."""
    return row["network"] + (" (CUDA graph)" if row["graph"] else "")


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)


def table(rows: list[dict]) -> str:
    """Medians per provider and mode, the fraction of the roofline each reaches, and each
    provider's speed relative to eager NCHW."""
    base = {(case(r), r["mode"]): r["median_ms"] for r in rows if r["provider"] == BASELINE}
    lines = [(f"{'provider':<9} {'mode':<10} {'median ms':>10} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} "
             f"{'roofline':>9} {'vs eager':>9}")]
    for r in rows:
        eager = base.get((case(r), r["mode"]))
        rel = f"{eager / r['median_ms']:.2f}x" if eager else "-"
        lines.append(f"{r['provider']:<9} {r['mode']:<10} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} "
                     f"{r['p80_ms']:>9.3f} {r['tflops']:>8.1f} {r['roofline_pct']:>8.1f}% {rel:>9}")
    first = rows[0]
    floors = ", ".join(f"{r['mode']} {r['floor_ms']:.3f} ms" for r in rows if r["provider"] == first["provider"])
    lines.append(f"{first['network']} {first['shape']} {first['dtype']} on {first['gpu']} (torch {first['torch']}, "
                 f"triton {first['triton']}{', CUDA graph replays' if first['graph'] else ''})")
    lines.append(f"roofline floor ({floors}): the fused plan's modelled bytes at {first['copy_gb_s']:,.4g} GB/s or "
                 f"its FLOPs at {first['matmul_tflop_s']:,.4g} TFLOP/s, both measured in this run")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def groups_table(rows: list[dict]) -> str:
    """One row per fused group and mode: its layers, the three medians, the speed-ups of the
    fused group and the modelled MB it saves."""
    labels, width = group_labels(r["name"] for r in rows)
    lines = [(f"{'#':>3}  {'group':<{width}} {'layers':<30} {'mode':<9} {'fused ms':>9} {'unfused':>9} {'eager':>9} "
             f"{'vs unf.':>7} {'vs eager':>8} {'MB saved':>9} {'err':>8}")]
    for r, label in zip(rows, labels):
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        lines.append(f"{r['group']:>3}  {label:<{width}} {r['ops'][:30]:<30} {r['mode']:<9} {r['fused_ms']:>9.3f} "
                     f"{r['unfused_ms']:>9.3f} {r['eager_ms']:>9.3f} {r['vs_unfused']:>6.2f}x {r['vs_eager']:>7.2f}x "
                     f"{_mb(r['bytes_saved']):>9} {err:>8}")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sums = {k: sum(r[k] for r in rows if r["mode"] == mode) for k in ("fused_ms", "unfused_ms", "eager_ms")}
        lines.append(f"{mode}: all groups {sums['fused_ms']:.3f} ms fused, {sums['unfused_ms']:.3f} unfused, "
                     f"{sums['eager_ms']:.3f} eager")
    first = rows[0]
    lines.append(f"{first['network']} batch {first['batch']} {first['dtype']} on {first['gpu']} (torch {first['torch']}, "
                 f"triton {first['triton']}); err: the larger relative difference of the fused and unfused "
                 "outputs from eager's")
    return "\n".join(lines)


def write_csv(path, rows: list[dict]) -> None:
    """Append the rows to a CSV file, with a header if it is new; refuse a file whose header
    names other columns (rows of whole networks and of groups differ)."""
    fields = list(rows[0])
    try:
        with open(path, "a+", newline="", encoding="utf-8") as f:
            f.seek(0)
            header = next(csv.reader(f), None)
            if header is not None and header != fields:
                raise CnnInputError(f"--csv {path}: the file has {len(header)} columns ({', '.join(header[:4])}, ...), "
                                    f"these rows {len(fields)} ({', '.join(fields[:4])}, ...); write to another file")
            writer = csv.DictWriter(f, fieldnames=fields)
            if header is None:
                writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise CnnInputError(f"cannot write {path}: {err.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as err:  # not a CSV of rows: bytes, or a field past csv's limit
        raise CnnInputError(f"--csv {path}: not a CSV file of benchmark rows ({str(err)[:120]}); write to another "
                            "file") from None


def _pyplot():
    """matplotlib's pyplot without a display, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _bars(ax, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    """Grouped bars: one group per label, one bar per series; 1.0 (eager) marked."""
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    tilt = len(labels) > 4
    ax.set_xticks(range(len(labels)), labels, rotation=40 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=7)
    ax.set_ylabel("speed vs eager NCHW (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot(path, rows: list[dict], title: str = "") -> str | None:
    """A PNG of each provider's speed relative to eager, one panel per mode: per network for
    whole-network rows, per group for group rows. Returns a note when it cannot."""
    plt = _pyplot()
    if plt is None:
        return f"no plot written to {path}: matplotlib is not installed (pip install matplotlib)"
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6.0, 0.5 * len(rows) / len(modes) + 3), 3.6 * len(modes)),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        _bars(ax, *(_group_series if "group" in rows[0] else _network_series)([r for r in rows if r["mode"] == mode]),
              f"{title or rows[0]['network']}: {mode} ({rows[0]['dtype']}, {rows[0]['gpu']})")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise CnnInputError(f"cannot write {path}: {err.strerror}") from None
    finally:
        plt.close(fig)
    return None


def _network_series(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Labels: each case with eager's median; series: each provider's eager / median."""
    nets = list(dict.fromkeys(map(case, rows)))
    ms = {(case(r), r["provider"]): r["median_ms"] for r in rows}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    eager = {n: ms.get((n, BASELINE)) for n in nets}
    labels = [f"{n}\n(eager {eager[n]:.3g} ms)" if eager[n] else n for n in nets]
    series = {p: [eager[n] / ms[n, p] if eager[n] and (n, p) in ms else 0.0 for n in nets] for p in providers}
    return labels, series


_SHORT = {"batchnorm": "bn", "activation": "act", "dropout": "drop", "flatten": "flat", "global_avgpool": "gap"}


def _group_series(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Labels: each group's index and ops (abbreviated) with eager's median."""
    ops = lambda r: "+".join(_SHORT.get(op, op) for op in r["ops"].split("+"))
    labels = [f"{r['group']} {ops(r)}\n(eager {r['eager_ms']:.3g} ms)" for r in rows]
    return labels, {"fused": [r["vs_eager"] for r in rows],
                    "unfused": [r["eager_ms"] / r["unfused_ms"] if r["unfused_ms"] else 0.0 for r in rows]}

