"""The `pytest -m gpu` stage of gpu_check.py: the GPU tests in a process of their own, each
test under a time budget (pytest-timeout, where installed) and the whole run under the
stage's; the outcome of every test from pytest's verbose lines, so a run killed at its
deadline still reports what finished and which test was running."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 90  # default per-test budget: a network's first test also compiles its kernels
_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(\S+::\S+) ")
_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")


def command(paths: list[str], test_timeout: int) -> tuple[list[str], str | None]:
    """The pytest command, and a note when the per-test budget cannot be enforced."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
           "--durations=10", "--durations-min=1", *paths]
    if importlib.util.find_spec("pytest_timeout") is None:
        return cmd, "pytest-timeout is not installed: no per-test budget, only the stage's"
    return [*cmd, f"--timeout={test_timeout}"], None


def parse(log: str) -> dict:
    """Counts and the failing tests from a verbose pytest log, complete or cut off."""
    outcomes, running = {}, None
    for line in log.splitlines():
        if m := _LINE.match(line):
            outcomes[m.group(1)], running = m.group(2), None
        elif m := _STARTED.match(line):
            running = m.group(1)
    reasons = {m.group(2): (m.group(3) or "")[:300] for m in map(_SUMMARY.match, log.splitlines()) if m}
    counts = {k.lower(): sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    failures = [{"test": t, "outcome": o, "reason": reasons.get(t, "")} for t, o in outcomes.items()
                if o in ("FAILED", "ERROR", "XPASS")]
    return {**counts, "failures": failures, "running_when_stopped": running}


def run(log_path: Path, deadline: float, paths: list[str], test_timeout: int) -> dict:
    """Run the GPU tests until `deadline` (time.time()); their log goes to `log_path`."""
    cmd, note = command(paths, test_timeout)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        # PYTHONSAFEPATH: `python -m` would put the working directory first on sys.path, and with
        # cnndsl installed from a wheel (the GPU machine) import ./cnndsl, which lacks its kernels.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"})
        try:
            code = proc.wait(timeout=max(1.0, deadline - start))
            stopped = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            stopped = f"killed at the stage's deadline after {time.time() - start:.0f} s"
    result = {"command": " ".join(["python", *cmd[1:]]), "exit_code": code, "per_test_timeout_s":
              None if note else test_timeout, "notes": [n for n in (note, stopped) if n],
              **parse(log_path.read_text(encoding="utf-8", errors="replace"))}
    if not stopped:
        result["running_when_stopped"] = None
    return result
