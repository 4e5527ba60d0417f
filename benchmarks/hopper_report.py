"""Writes docs/performance.md: issue 11's measure of the GEMM kernels on Hopper, taken without a
GPU. `python benchmarks/hopper_report.py` records every launch of a training step and an eval
forward of resnet18 (224x224) and cifar_small at batch 64 in bf16 and fp16 (kernels skipped),
compiles every code path with every GPU config its autotuner tries for sm_90a, reads ptxas's
report and the SASS, and writes the tables: what tests/test_hopper_speed.py checks on a sample,
here for every config (about 760 compiles, 4 to 10 minutes on two cores). The tutorial matmul
is also compiled at every config the GEMMs use, for a comparison at equal tiles.

Options: --out FILE (default docs/performance.md), --json FILE (also save the measurements),
--render FILE (write the page from saved measurements, no compile), --processes N, --label TEXT
(what the page calls the kernels measured: by default this checkout's commit)."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# tests/ and this script's directory (benchmarks/); hopper imports cnndsl before triton: it decides TRITON_INTERPRET
import hopper_report_tables as tables
from hopper import measure, record_networks
from test_hopper_speed import BATCH, DTYPES, NETWORKS, YARDSTICK

MAX_JSON_BYTES = 64 << 20  # saved measurements read by --render (a full sweep's are a few MiB)


def _versions(label):
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    if label is None:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "kernels"], capture_output=True,
                               text=True, check=False).stdout.strip()
        label = f"commit {commit}" + (" with uncommitted changes to kernels/" if dirty else "")
    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas": "ptxas " + get_ptxas_version().split("release ")[-1].split("\n")[0], "kernels": label}


def run(processes, label):
    launches, _, _, record_s = record_networks(NETWORKS, DTYPES, BATCH)
    print(f"recorded {len(launches)} launches in {record_s:.0f} s; compiling every config (minutes)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results, seconds = measure(launches, "all", YARDSTICK, Path(tmp), processes, same_tile=True)
    print(f"measured {len(results)} compiles in {seconds:.0f} s", flush=True)
    return {"versions": _versions(label), "launches": len(launches), "results": results}


def _saved(parser, path):
    """The measurements that --json saved, refused with a clear message when they are not."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            parser.error(f"{path}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} of saved measurements")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        parser.error(f"{path}: not saved measurements ({err})")
    if not (isinstance(data, dict) and {"versions", "launches", "results"} <= set(data)):
        parser.error(f"{path}: not saved measurements (expected the keys versions, launches, results)")
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--json", type=Path, help="also save the measurements here")
    parser.add_argument("--render", type=Path, help="write the page from these saved measurements")
    parser.add_argument("--processes", type=int, default=None, help="compile processes (default 2)")
    parser.add_argument("--label", help="what the page calls the kernels measured (default: this checkout's "
                                        "commit, noting uncommitted changes to kernels/)")
    args = parser.parse_args(argv)
    data = _saved(parser, args.render) if args.render else run(args.processes, args.label)
    if args.json:
        args.json.write_text(json.dumps(data))
    args.out.write_text(tables.page(data))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
