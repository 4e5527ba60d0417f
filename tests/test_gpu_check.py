"""benchmarks/gpu_check.py on the CPU: its dry run runs every stage's plumbing on a tiny network
(inline, and in worker processes of their own), writes check.json, check.md and the plots, and
prints the short table last; a case that fails, a worker that dies and a spent budget are each
recorded while the other cases go on; a saved check.json renders again; the suite's networks
parse with the shapes the issue names."""

import json
import sys
from pathlib import Path

import pytest

import cnndsl
from cnndsl import bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import check_pytest
import check_report
import check_stages
import gpu_check

ALL_BUT_PYTEST = "env,parity,bench,profile,groups"


def _png_or_note(path: Path, printed: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert f"no plot written to {path}: matplotlib is not installed" in printed
    else:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_dry_run_runs_every_stage_and_writes_the_results(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--dry-run", "--inline", "--stages", ALL_BUT_PYTEST]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "check.json").read_text())
    assert list(results["stages"]) == ALL_BUT_PYTEST.split(",") and results["dry_run"] is True
    for stage, s in results["stages"].items():
        assert [c["case"] for c in s["cases"]] == [c["name"] for c in check_stages.cases(stage, True)]
        assert all(c["status"] == "ok" for c in s["cases"]), s["cases"]
    env = results["stages"]["env"]["cases"][0]["result"]
    assert env["gpu"] == "none (CPU)" and env["stale_files"] == []  # the tree is what runs
    bench = check_report.rows(results, "bench")
    assert [(r["provider"], r["mode"]) for r in bench] == [(p, m) for p in check_stages.PROVIDERS
                                                           for m in ("inference", "training")]
    parity = [c["result"] for c in results["stages"]["parity"]["cases"]]
    assert [(p["dtype"], p["fuse"]) for p in parity] == [("bf16", True), ("fp32", False)]
    assert all(p["verdict"] == "ok" and p["triton"]["param_grad"] > 0 for p in parity), parity
    assert all(p["triton"]["logits"] < 1e-5 for p in parity if p["dtype"] == "fp32")  # dropout masks matched
    for p in (c["result"] for c in results["stages"]["profile"]["cases"]):
        ms = [k["ms"] for k in p["kernels"]]
        assert 0 < len(ms) <= check_stages.TOP_KERNELS and ms == sorted(ms, reverse=True)
    assert {r["mode"] for r in check_report.rows(results, "groups")} == {"inference", "training"}
    md = (tmp_path / "check.md").read_text()
    for section in ("## Stages", "## Parity against float64", "## Benchmarks", "## Profile: tiny training step",
                    "## Fused groups"):
        assert section in md
    lines = printed.rstrip().splitlines()
    assert lines[-4].startswith("bench (bf16, median ms and speed vs eager NCHW")
    assert lines[-2].split()[:3] == ["tiny", "b2", "inference"] and lines[-1].split()[2] == "training"
    _png_or_note(tmp_path / "bench.png", printed)
    _png_or_note(tmp_path / "groups.png", printed)


def test_workers_run_the_stages_in_processes_of_their_own(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--dry-run", "--stages", "env,pytest"]) == 0
    results = json.loads((tmp_path / "check.json").read_text())
    env, tests = (results["stages"][s]["cases"][0] for s in ("env", "pytest"))
    assert env["status"] == "ok" and env["result"]["gpu"] == "none (CPU)"
    assert tests["status"] == "ok" and tests["result"]["exit_code"] == 0
    skipped = tests["result"]["skipped"]  # the gpu tests, without a GPU
    assert skipped > 0 and tests["result"]["passed"] == tests["result"]["failed"] == 0
    assert "test_gpu_networks.py::test_network_on_gpu" in (tmp_path / "pytest.txt").read_text()
    assert f"pytest -m gpu: 0 passed, 0 failed, 0 errors, {skipped} skipped" in capsys.readouterr().out


def _events(*rows):
    return [dict(zip(("case", "event"), r[:2]), **(r[2] if len(r) > 2 else {})) for r in rows]


def test_a_worker_that_dies_leaves_its_case_an_error_and_the_rest_to_the_next():
    cases = [{"name": n} for n in "abcde"]
    events = _events(("a", "start"), ("a", "done", {"result": {"x": 1}, "elapsed_s": 1.0}),
                     ("b", "start"), ("b", "error", {"error": "ValueError: no"}), ("c", "skipped", {"note": "late"}),
                     ("d", "start"))
    records, remaining = gpu_check.records_from(cases, events, "exit code -11", "Segmentation fault")
    assert records["a"] == {"status": "ok", "case": "a", "result": {"x": 1}, "elapsed_s": 1.0}
    assert (records["b"]["status"], records["b"]["error"]) == ("error", "ValueError: no")
    assert (records["c"]["status"], records["c"]["note"]) == ("skipped", "late")
    assert records["d"] == {"case": "d", "status": "error", "error": "the worker process ended while running it "
                            "(exit code -11)", "stderr": "Segmentation fault"}
    assert remaining == [{"name": "e"}]


FAKE_WORKER = """
import json, os, sys, time
arg = lambda name: sys.argv[sys.argv.index(name) + 1]
with open(arg("--events"), "a") as events:
    for case in json.load(open(arg("--cases"))):
        if case["name"] == "quiet":
            os._exit(1)  # before its first event, as an import error would
        events.write(json.dumps({"case": case["name"], "event": "start"}) + "\\n")
        events.flush()
        if case["name"] == "crash":
            os._exit(139)  # as a CUDA error that kills the process
        if case["name"] == "hang":
            time.sleep(60)
        events.write(json.dumps({"case": case["name"], "event": "done", "result": {}}) + "\\n")
        events.flush()
"""


@pytest.mark.parametrize(("names", "want"), [
    ("a crash b", {"a": "ok", "crash": "error", "b": "ok"}),  # a fresh worker takes b
    ("a quiet b", {"a": "ok", "quiet": "error", "b": "error"}),  # no second worker for the same death
    ("a hang b", {"a": "ok", "hang": "error"}),  # killed at the deadline; b left to the caller (skipped)
])
def test_a_worker_that_dies_is_replaced_for_the_cases_left(tmp_path, monkeypatch, names, want):
    (tmp_path / "gpu_check.py").write_text(FAKE_WORKER)
    monkeypatch.setattr(gpu_check, "HERE", tmp_path)
    monkeypatch.setattr(gpu_check, "GRACE_S", 0)
    cases = [{"name": n} for n in names.split()]
    records = gpu_check._in_worker("bench", cases, gpu_check._now() + 1.5, True, tmp_path)
    assert {n: r["status"] for n, r in records.items()} == want
    if "crash" in records:
        assert records["crash"]["error"] == "the worker process ended while running it (exit code 139)"
    if "quiet" in records:
        assert records["b"]["error"] == "the worker process ended before its first case (exit code 1)"
    if "hang" in records:
        assert records["hang"]["error"] == "the worker process ended while running it (killed 0 s after the " \
                                           "stage's deadline)"


def test_the_last_line_of_a_killed_worker_is_ignored(tmp_path):
    (tmp_path / "e").write_text('{"case": "a", "event": "start"}\n{"case": "a", "ev')
    assert gpu_check._read_events(tmp_path / "e") == [{"case": "a", "event": "start"}]


def test_a_failing_case_is_recorded_and_the_next_one_runs(monkeypatch):
    def run_case(stage, case, ctx):
        if case["name"] == "b":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"rows": []}
    monkeypatch.setattr(check_stages, "run_case", run_case)
    monkeypatch.setattr(check_stages, "Context", lambda dry_run: object())
    events = []
    assert gpu_check.work("bench", [{"name": n} for n in "abc"], 1e12, True, events.append)
    assert [(e["case"], e["event"]) for e in events] == [("a", "start"), ("a", "done"), ("b", "start"),
                                                         ("b", "error"), ("c", "start"), ("c", "done")]
    assert "illegal memory access" in events[3]["error"] and "Traceback" in events[3]["traceback"]
    # ...unless the device is lost: the worker stops, and a fresh one takes the cases left
    monkeypatch.setattr(check_stages, "recover", lambda: False)
    events.clear()
    assert not gpu_check.work("bench", [{"name": n} for n in "abc"], 1e12, True, events.append)
    assert [e["case"] for e in events] == ["a", "a", "b", "b"]


def test_a_spent_budget_skips_the_cases_left(tmp_path):
    events = []
    assert gpu_check.work("bench", [{"name": "a"}, {"name": "b"}], 0.0, True, events.append)
    assert events == [{"case": n, "event": "skipped", "note": "the stage's budget was spent"} for n in "ab"]
    args = gpu_check._args([str(tmp_path), "--dry-run", "--inline"])
    assert gpu_check.run_stage("pytest", 0.0, args, tmp_path) == [
        {"case": "pytest -m gpu", "status": "skipped", "note": "the budget was spent"}]
    records = gpu_check.run_stage("groups", 0.0, args, tmp_path)
    assert [r["status"] for r in records] == ["skipped", "skipped"]


def _saved() -> dict:
    """A check.json as a GPU run writes it: two networks, groups, parity, a profile, pytest, an
    error and a skipped case."""
    row = lambda net, p, m, ms: {"network": net, "provider": p, "mode": m, "dtype": "bf16", "shape": "64x3x224x224",
                                 "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "tflops": 1.0, "model_bytes": 1,
                                 "flops": 1, "floor_ms": 1.0, "roofline_pct": round(100 / ms, 1), "copy_gb_s": 3e3,
                                 "matmul_tflop_s": 700.0, "copy_bytes": 1, "matmul_n": 1, "gpu": "NVIDIA H100",
                                 "torch": "2.11", "triton": "3.6", "graph": False}
    bench = [row(n, p, m, ms * k) for n, k in (("resnet18", 1), ("vgg16_bn", 3))
             for p, ms in {"fused": 4.0, "unfused": 8.0, "eager": 5.0, "eager_cl": 4.5, "compile": 3.0}.items()
             for m in ("inference", "training")]
    group = {"network": "resnet18", "group": 0, "name": "conv1..maxpool1", "ops": "conv+batchnorm+activation",
             "mode": "training", "dtype": "bf16", "batch": 64, "fused_ms": 1.0, "unfused_ms": 2.0, "eager_ms": 1.5,
             "vs_unfused": 2.0, "vs_eager": 1.5, "bytes_fused": 1, "bytes_unfused": 3, "bytes_saved": 2, "err": 0.01,
             "gpu": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "graph": False}
    errs = dict.fromkeys(check_report.QUANTITIES, 0.01) | {"param_grad_worst": "fc.weight", "bn_stats_worst": None,
                                                            "batches_tracked_equal": True}
    ok = lambda name, result: {"case": name, "status": "ok", "elapsed_s": 1.0, "result": result}
    stage = lambda *cases: {"budget_s": 10.0, "elapsed_s": 5.0, "cases": list(cases)}
    pytest_result = {"passed": 18, "failed": 1, "error": 0, "skipped": 1, "per_test_timeout_s": 90, "notes": [],
                     "failures": [{"test": "tests/t.py::test_x", "outcome": "FAILED", "reason": "AssertionError"}],
                     "exit_code": 1}
    return {"version": 1, "dry_run": False, "budget_s": 420, "started": "2026-11-27T12:00:00", "elapsed_s": 400,
            "stages": {"env": stage(ok("env", {"gpu": "NVIDIA H100", "torch": "2.11", "triton": "3.6",
                                               "stale_files": []})),
                       "parity": stage(ok("resnet18 bf16 True", {"network": "resnet18", "batch": 8, "dtype": "bf16",
                                                                 "fuse": True, "triton": errs, "eager": errs,
                                                                 "verdict": "ok"})),
                       "bench": stage(*[ok(f"{r['network']} {r['provider']}", {"rows": [r]}) for r in bench],
                                      {"case": "vgg16_bn compile", "status": "error", "error": "RuntimeError: boom",
                                       "traceback": "Traceback ..."}),
                       "profile": stage(ok("resnet18 fused", {"network": "resnet18", "provider": "fused", "batch": 64,
                                                              "dtype": "bf16", "steps": 3, "unit": "GPU kernels",
                                                              "total_ms": 9.0, "kernels": [{"name": "_conv_kernel",
                                                              "calls": 20, "ms": 5.0, "pct": 55.6}]})),
                       "groups": stage(ok("resnet18 training", {"rows": [group]}),
                                       {"case": "resnet18 inference", "status": "skipped", "note": "budget"}),
                       "pytest": stage(ok("pytest -m gpu", pytest_result))}}


def test_a_saved_check_renders_again(tmp_path, capsys):
    (tmp_path / "saved.json").write_text(json.dumps(_saved()))
    assert gpu_check.main([str(tmp_path / "out"), "--render", str(tmp_path / "saved.json")]) == 0
    printed = capsys.readouterr().out
    assert "gpu_check: NVIDIA H100, torch 2.11, triton 3.6; 400 s of 420 s" in printed
    assert "pytest -m gpu: 18 passed, 1 failed, 0 errors, 1 skipped (per-test timeout 90 s)" in printed
    assert "  bench: vgg16_bn compile: error: RuntimeError: boom" in printed
    assert "  groups: resnet18 inference: skipped: budget" in printed
    assert ("groups (resnet18 b64 training): 1.000 ms fused, 2.000 unfused, 1.500 eager; most saved by fusing: "
            "conv1..maxpool1 2.00x") in printed
    last = printed.rstrip().splitlines()[-4:]
    # a check saved without the fused_block provider shows "-" in its column
    assert last[0].startswith("resnet18 b64") and last[0].split()[2:7] == ["inference", "4.000", "1.25x", "-", "8.000"]
    assert last[-1].startswith("vgg16_bn b64") and last[-1].split()[2] == "training"
    assert last[-1].split()[-1] == "8.3%"  # fused: 1 ms of floor in 12 ms
    md = (tmp_path / "out" / "check.md").read_text()
    assert "| resnet18 b8 | bf16 | fused | 0.01 / 0.01 |" in md and "| 1 | `_conv_kernel` | 20 | 5.0 | 55.6 |" in md
    assert "### bench: vgg16_bn compile" in md
    _png_or_note(tmp_path / "out" / "bench.png", printed)


@pytest.mark.parametrize(("argv", "message"), [
    (["--stages", "env,benchmark"], "--stages: expected distinct names among env, parity"),
    (["--stages", "env,env"], "--stages: expected distinct names"),
    (["--budget", "0"], "--budget must be between 1 and 3600 seconds, got 0"),
    (["--test-timeout", "7200"], "--test-timeout must be between 1 and 3600 seconds, got 7200"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [("[1, 2]", 'not a check.json of gpu_check.py (no "stages" object)'),
                                                  ("{", "not JSON"), ("x" * 100, "more than the 64 a check.json")])
def test_a_file_that_is_not_a_check_is_refused(tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setattr(check_report, "MAX_JSON_BYTES", 64)
    (tmp_path / "bad.json").write_text(content)
    assert gpu_check.main([str(tmp_path / "out"), "--render", str(tmp_path / "bad.json")]) == 2
    assert message in capsys.readouterr().err


def test_a_cut_off_pytest_log_says_what_finished_and_what_ran():
    log = ("tests/a.py::test_one PASSED  [ 10%]\ntests/a.py::test_two FAILED  [ 20%]\n"
           "tests/b.py::test_three[x] SKIPPED (needs a CUDA device)  [ 30%]\ntests/b.py::test_four ")
    result = check_pytest.parse(log + "\nFAILED tests/a.py::test_two - AssertionError: 0.3 > 0.01\n")
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 1, 1)
    assert result["failures"] == [{"test": "tests/a.py::test_two", "outcome": "FAILED",
                                   "reason": "AssertionError: 0.3 > 0.01"}]
    assert check_pytest.parse(log)["running_when_stopped"] == "tests/b.py::test_four"


def test_the_suite_is_the_issue_s():
    """Every network parses, with the sizes and batches of the issue's list."""
    shapes = {name: (cnndsl.parse(ROOT / f), b) for name, f, b in check_stages.BENCH}
    assert {n: (net.input_shape, net.output_shape, b) for n, (net, b) in shapes.items()} == {
        "conv_block_56": ((64, 56, 56), (128, 28, 28), 64), "conv_bn_relu_28": ((128, 28, 28), (128, 28, 28), 128),
        "cifar_small": ((3, 32, 32), (10,), 256), "resnet18": ((3, 224, 224), (1000,), 64),
        "vgg16_bn": ((3, 224, 224), (1000,), 32)}
    vgg = shapes["vgg16_bn"][0]
    assert sum(n.op is cnndsl.Op.BATCHNORM for n in vgg.nodes) == 13
    assert "Total params: 138,365,992" in vgg.summary()  # torchvision's vgg16_bn
    assert [(c["name"], c["batch"]) for c in check_stages.cases("parity", False)][:3] == [
        ("cifar_small bf16 fused", 64), ("resnet18 bf16 fused", 8), ("vgg16 bf16 fused", 2)]
    assert {(c["dtype"], c["fuse"]) for c in check_stages.cases("parity", False)} == {
        (d, f) for d in ("fp32", "bf16") for f in (True, False)}
    bench_cases = [c["name"] for c in check_stages.cases("bench", False)]
    assert len(bench_cases) == 30 + 3 and bench_cases[-8:] == [  # torch.compile, the slowest to warm up, last
        "cifar_small fused graph", "cifar_small unfused graph", "cifar_small eager graph",
        *(f"{n} compile" for n in ("conv_block_56", "conv_bn_relu_28", "cifar_small", "resnet18", "vgg16_bn"))]
    assert check_report.PROVIDERS == bench.PROVIDERS and sorted(check_stages.PROVIDERS) == sorted(bench.PROVIDERS)
