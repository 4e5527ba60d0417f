"""One prepared check on a GPU: `python benchmarks/gpu_check.py OUT` runs, within --budget
seconds (default 420, autotuning and torch.compile warm-up included), the stages

    env      the GPU, driver, CUDA, torch, triton, and whether the installed cnndsl is this tree
    parity   fused and unfused against the reference backend: cifar_small, resnet18, vgg16,
             fp32 (TF32 off) and bf16: outputs, every gradient, BN running statistics
    bench    bf16, inference and a training step: a conv block 64->128 at 56x56 (+ BN, relu,
             maxpool) batch 64, a conv 128->128 at 28x28 (+ BN, relu) batch 128, cifar_small
             batch 256, resnet18 batch 64, vgg16_bn batch 32; fused, unfused, eager NCHW,
             eager channels_last, torch.compile; cifar_small's fused, unfused and eager steps
             also replayed as CUDA graphs (launch-bound)
    profile  the 15 most expensive kernels of resnet18's training step, fused and eager
    groups   resnet18's fused groups against the same layers unfused and eager
    pytest   `pytest -m gpu`, each test under --test-timeout seconds

and writes into OUT: check.json (everything), check.md (the tables), bench.png and
groups.png (where matplotlib is installed) and pytest.txt; the short table is printed last.

Each stage gets a share of the budget (STAGE_SHARES; what a stage leaves over goes to the
next) and runs in a worker process of its own, killed at its deadline: a case that raises is
recorded and the next one runs; one that kills its process (a CUDA error poisons it) is
recorded and a fresh worker takes the remaining cases; cases left when the budget is spent
are recorded as skipped. check.json is rewritten after every stage.

--dry-run runs all of it on the CPU (Triton's interpreter) with one tiny network and one
call per timing: the plumbing in seconds, no numbers. --inline runs the stages in this
process (no isolation, no kill: for debugging and the CPU tests). --render FILE.json
rewrites the tables and plots of a saved check.json."""

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import check_pytest
import check_report

from cnndsl.errors import CnnError

# pytest last: the stages before it compile and autotune the kernels its networks use (Triton's
# disk cache, TRITON_CACHE_AUTOTUNING), so its tests mostly run.
STAGES = ("env", "parity", "bench", "profile", "groups", "pytest")
STAGE_SHARES = {"env": 0.03, "parity": 0.17, "bench": 0.38, "profile": 0.07, "groups": 0.10, "pytest": 0.25}
MAX_BUDGET_S = 3600
GRACE_S = 10  # a worker past its stage's deadline is killed this much later (a case in flight)
HERE = Path(__file__).resolve().parent


def _now() -> float:
    return time.time()


# --- a worker: runs one stage's cases, one JSON line per event -----------------------------------

def work(stage: str, cases: list[dict], deadline: float, dry_run: bool, emit) -> bool:
    """Run the cases until `deadline`, reporting through `emit(dict)`; False when the device
    is no longer usable after an error (the caller then ends the process)."""
    import check_stages
    ctx = None
    for case in cases:
        name = case["name"]
        if _now() > deadline:
            emit({"case": name, "event": "skipped", "note": "the stage's budget was spent"})
            continue
        emit({"case": name, "event": "start"})
        start = _now()
        try:
            ctx = ctx or check_stages.Context(dry_run)
            result = check_stages.run_case(stage, case, ctx)
            emit({"case": name, "event": "done", "elapsed_s": round(_now() - start, 2), "result": result})
            print(f"[{stage}] {name}: {check_report.progress(stage, result)} ({_now() - start:.1f} s)", flush=True)
        except Exception as err:  # noqa: BLE001 - any failure of a case is recorded, the next one runs
            emit({"case": name, "event": "error", "elapsed_s": round(_now() - start, 2),
                  "error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]})
            print(f"[{stage}] {name}: error: {type(err).__name__}: {str(err)[:300]}", flush=True)
            if not check_stages.recover():
                return False
    return True


def _child(args) -> int:
    cases = json.loads(Path(args.cases).read_text())
    with open(args.events, "a", encoding="utf-8") as events:
        def emit(event):
            events.write(json.dumps(event) + "\n")
            events.flush()
        return 0 if work(args.child, cases, args.deadline, args.dry_run, emit) else 3


# --- the parent: stages, deadlines, workers ------------------------------------------------------

def records_from(cases: list[dict], events: list[dict], ended: str, stderr: str) -> tuple[dict, list[dict]]:
    """The records of the cases a worker finished, started or skipped, and the cases it never
    reached. A case started without an end died with its process (`ended` says how)."""
    by_case = {}
    for e in events:
        by_case.setdefault(e["case"], []).append(e)
    records, remaining = {}, []
    for case in cases:
        seen = by_case.get(case["name"], [])
        end = next((e for e in seen if e["event"] != "start"), None)
        if end is not None:
            records[case["name"]] = _record(end)
        elif seen:
            records[case["name"]] = {"case": case["name"], "status": "error", "error": f"the worker process ended "
                                     f"while running it ({ended})", "stderr": stderr[-4000:]}
        else:
            remaining.append(case)
    return records, remaining


def _record(event: dict) -> dict:
    status = {"done": "ok", "error": "error", "skipped": "skipped"}[event["event"]]
    return {"status": status, **{k: v for k, v in event.items() if k != "event"}}


def _read_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed worker
            pass
    return events


def _in_worker(stage: str, cases: list[dict], deadline: float, dry_run: bool, tmp: Path) -> dict:
    records, remaining, attempt = {}, cases, 0
    while remaining and _now() < deadline:
        attempt += 1
        events, todo, err = (tmp / f"{stage}-{attempt}.{k}" for k in ("events", "cases", "stderr"))
        todo.write_text(json.dumps(remaining))
        cmd = [sys.executable, str(HERE / "gpu_check.py"), "--child", stage, "--cases", str(todo), "--events",
               str(events), "--deadline", str(deadline), *(["--dry-run"] if dry_run else [])]
        with open(err, "w", encoding="utf-8") as stderr:
            proc = subprocess.Popen(cmd, stderr=stderr, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                ended = f"exit code {proc.wait(timeout=max(1.0, deadline - _now() + GRACE_S))}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                ended = f"killed {GRACE_S} s after the stage's deadline"
        tail = err.read_text(errors="replace")[-4000:]
        done, remaining = records_from(remaining, _read_events(events), ended, tail)
        records.update(done)
        if proc.returncode == 0:
            break
        print(f"[{stage}] the worker ended ({ended}); the end of its stderr:\n{tail[-1500:]}", flush=True)
        if not done:  # it died before its first case (an import, CUDA's start): another would too
            records.update({c["name"]: {"case": c["name"], "status": "error", "error": f"the worker process ended "
                                        f"before its first case ({ended})", "stderr": tail} for c in remaining})
            break
    return records


def _inline(stage: str, cases: list[dict], deadline: float, dry_run: bool) -> dict:
    events = []
    work(stage, cases, deadline, dry_run, events.append)
    return records_from(cases, events, "inline", "")[0]


def run_stage(stage: str, deadline: float, args, tmp: Path) -> list[dict]:
    """Every case of `stage` as a record, in order: ok, error or skipped."""
    import check_stages
    if stage == "pytest":
        if _now() > deadline:
            return [{"case": "pytest -m gpu", "status": "skipped", "note": "the budget was spent"}]
        paths = ["tests/test_gpu_networks.py"] if args.dry_run else ["tests"]
        start = _now()
        result = check_pytest.run(Path(args.out) / "pytest.txt", deadline, paths, args.test_timeout)
        record = {"case": "pytest -m gpu", "status": "ok", "elapsed_s": round(_now() - start, 2), "result": result}
        failed = result["exit_code"] == 1 and result["failures"]  # tests failed: the result says which
        if result["exit_code"] not in (0, 5) and not failed:  # 5: no test collected
            record.update(status="error", error=f"pytest exit code {result['exit_code']} (see pytest.txt); "
                                                f"{'; '.join(result['notes'])}")
        return [record]
    cases = check_stages.cases(stage, args.dry_run)
    run = _inline if args.inline else lambda *a: _in_worker(*a, tmp)
    records = run(stage, cases, deadline, args.dry_run)
    return [records.get(c["name"]) or {"case": c["name"], "status": "skipped", "note": "the stage's budget was spent"}
            for c in cases]


def _preflight(dry_run: bool) -> str | None:
    """Why nothing can run (cnndsl without its kernels), or None; every network the stages read
    is parsed too, so that a broken file costs no device time."""
    import check_stages

    import cnndsl
    if importlib.util.find_spec("cnndsl.kernels") is None:
        return (f"cnndsl (imported from {Path(cnndsl.__file__).parent}) has no kernels subpackage: install it "
                "(pip install -e . here, or the wheel on the GPU machine: see benchmarks/README.md)")
    for path in check_stages.networks(dry_run):
        cnndsl.parse(check_stages.ROOT / path)
    return None


def check(args) -> dict:
    out = Path(args.out)
    stages = args.stages
    start = _now()
    results = {"version": 1, "dry_run": args.dry_run, "budget_s": args.budget, "stages": {}, "started":
               time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], "shares": STAGE_SHARES,
               "test_timeout_s": args.test_timeout}
    shares = sum(STAGE_SHARES[s] for s in stages)
    cumulative = 0.0
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for stage in stages:
            cumulative += STAGE_SHARES[stage]
            deadline = start + args.budget * cumulative / shares
            t0 = _now()
            print(f"[{stage}] until +{deadline - start:.0f} s of the {args.budget} s budget", flush=True)
            records = run_stage(stage, deadline, args, Path(tmp))
            results["stages"][stage] = {"budget_s": round(deadline - t0, 1), "elapsed_s": round(_now() - t0, 1),
                                        "cases": records}
            results["elapsed_s"] = round(_now() - start, 1)
            check_report.write_json(out / "check.json", results)
    return results


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="the folder to write into (made if missing)")
    p.add_argument("--budget", type=int, default=420, help="seconds for all stages (default: 420)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order (default: all: "
                                                               f"{','.join(STAGES)})")
    p.add_argument("--test-timeout", type=int, default=check_pytest.TEST_TIMEOUT_S,
                   help=f"seconds per GPU test (default: {check_pytest.TEST_TIMEOUT_S})")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, one tiny network: the plumbing only")
    p.add_argument("--inline", action="store_true", help="run the stages in this process (no isolation)")
    p.add_argument("--render", metavar="JSON", help="rewrite the tables and plots of a saved check.json into OUT")
    for hidden in ("--child", "--cases", "--events"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if not args.out:
        p.error("OUT (the folder to write into) is required")
    args.stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in args.stages if s not in STAGES]
    if bad or not args.stages or len(set(args.stages)) != len(args.stages):
        p.error(f"--stages: expected distinct names among {', '.join(STAGES)}, got {', '.join(args.stages) or 'none'}")
    if not 1 <= args.budget <= MAX_BUDGET_S:
        p.error(f"--budget must be between 1 and {MAX_BUDGET_S} seconds, got {args.budget}")
    if not 1 <= args.test_timeout <= MAX_BUDGET_S:
        p.error(f"--test-timeout must be between 1 and {MAX_BUDGET_S} seconds, got {args.test_timeout}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"OUT {args.out} exists and is not a folder")
    return args


def main(argv=None) -> int:
    args = _args(argv)
    if args.child:
        return _child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        try:
            results = check_report.read_json(Path(args.render))
        except (OSError, check_report.CheckFileError) as err:
            print(f"gpu_check: --render: {err}", file=sys.stderr)
            return 2
    else:
        # Autotuning results go to Triton's disk cache, so a stage's worker reuses an earlier one's.
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        try:
            why = _preflight(args.dry_run)
        except CnnError as err:  # a network of the suite does not parse
            why = err.render()
        if why:
            print(f"gpu_check: nothing ran: {why}", file=sys.stderr)
            return 1
        results = check(args)
    for note in check_report.write_all(out, results):
        print(note)
    print(check_report.short_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
