"""What gpu_check.py writes and prints, from its results alone (no torch, no GPU: a saved
check.json renders anywhere): check.json, check.md (every table), bench.png and groups.png
(cnndsl.bench_report's plots, skipped with a note without matplotlib), and the short table
printed last."""

import json
import os
from pathlib import Path

from cnndsl import bench_report

MAX_JSON_BYTES = 64 << 20  # a saved check.json read by --render (a real one is well under 1 MiB)
PROVIDERS = ("fused", "fused_block", "unfused", "eager", "eager_cl", "compile")  # cnndsl.bench's (which imports torch)
QUANTITIES = ("logits", "loss", "input_grad", "param_grad", "bn_stats", "eval_output")


class CheckFileError(Exception):
    """A file given to --render that is not a check.json (or too large to be one)."""


def write_json(path: Path, results: dict) -> None:
    """Atomically: a run killed while writing leaves the previous stage's file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckFileError(f"{path}: {size:,} bytes, more than the {MAX_JSON_BYTES:,} a check.json may have")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckFileError(f"{path}: not JSON ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("stages"), dict):
        raise CheckFileError(f"{path}: not a check.json of gpu_check.py (no \"stages\" object)")
    return results


def _cases(results: dict, stage: str) -> list[dict]:
    return results["stages"].get(stage, {}).get("cases", [])


def _ok(results: dict, stage: str) -> list[dict]:
    return [c["result"] for c in _cases(results, stage) if c["status"] == "ok"]


def rows(results: dict, stage: str) -> list[dict]:
    """The cnndsl.bench rows of the bench or groups stage's finished cases."""
    return [r for result in _ok(results, stage) for r in result["rows"]]


def progress(stage: str, result: dict) -> str:
    """One line about a finished case, for the log."""
    if stage == "bench":
        return ", ".join(f"{r['mode']} {r['median_ms']:.3f} ms" for r in result["rows"])
    if stage == "parity":
        return result["verdict"]
    if stage == "profile":
        return f"{result['total_ms']:.3f} ms of {result['unit']} per step"
    if stage == "groups":
        return f"{len(result['rows'])} groups, {sum(r['fused_ms'] for r in result['rows']):.3f} ms fused"
    return "ok"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2g}"


# --- the short table ----------------------------------------------------------------------------

def _stage_lines(results: dict) -> list[str]:
    lines = [f"{'stage':<8} {'ok':>4} {'error':>6} {'skipped':>8} {'elapsed s':>10} {'budget s':>9}"]
    for stage, s in results["stages"].items():
        n = {k: sum(c["status"] == k for c in s["cases"]) for k in ("ok", "error", "skipped")}
        lines.append(f"{stage:<8} {n['ok']:>4} {n['error']:>6} {n['skipped']:>8} {s['elapsed_s']:>10.1f} "
                     f"{s['budget_s']:>9.1f}")
    return lines


def _pytest_line(results: dict) -> list[str]:
    done = _ok(results, "pytest")
    if not done:
        return []
    r = done[0]
    timeout = f"per-test timeout {r['per_test_timeout_s']} s" if r["per_test_timeout_s"] else "no per-test timeout"
    line = [(f"pytest -m gpu: {r['passed']} passed, {r['failed']} failed, {r['error']} errors, {r['skipped']} skipped "
            f"({timeout}){'; ' + '; '.join(r['notes']) if r['notes'] else ''}")]
    return line + [f"  {f['outcome']} {f['test']} {f['reason'][:150]}" for f in r["failures"][:10]]


def _parity_lines(results: dict) -> list[str]:
    done = _ok(results, "parity")
    if not done:
        return []
    bad = [f"  {r['network']} {r['dtype']} {'fused' if r['fuse'] else 'unfused'}: {r['verdict']}" for r in done
           if r["verdict"] != "ok"]
    return [f"parity: {len(done) - len(bad)} ok, {len(bad)} to check (of {len(_cases(results, 'parity'))} cases)", *bad]


def _bench_lines(results: dict) -> list[str]:
    table = rows(results, "bench")
    if not table:
        return []
    ms = {(bench_report.case(r), r["mode"], r["provider"]): r for r in table}
    r0 = table[0]
    lines = [(f"bench ({r0['dtype']}, median ms and speed vs eager NCHW; roofline: fused's fraction of the floor at "
             f"{r0['copy_gb_s']:,.4g} GB/s copy and {r0['matmul_tflop_s']:,.4g} TFLOP/s matmul)"),
             f"{'case':<26} {'mode':<10}" + "".join(f" {p:>16}" for p in PROVIDERS) + f" {'roofline':>9}"]
    for net, mode in dict.fromkeys((bench_report.case(r), r["mode"]) for r in table):
        eager = ms.get((net, mode, "eager"))
        cells = "".join(f" {_cell(ms.get((net, mode, p)), eager):>16}" for p in PROVIDERS)
        fused = ms.get((net, mode, "fused"))
        batch = next(r["shape"] for r in table if bench_report.case(r) == net).split("x")[0]
        roof = f"{fused['roofline_pct']:.1f}%" if fused else "-"
        lines.append(f"{net + ' b' + batch:<26} {mode:<10}{cells} {roof:>9}")
    return lines


def _groups_lines(results: dict) -> list[str]:
    """Per mode: the groups' total times, and the groups where fusing saves the most."""
    table = rows(results, "groups")
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in table):
        mine = [r for r in table if r["mode"] == mode]
        best = sorted(mine, key=lambda r: r["fused_ms"] - r["unfused_ms"])[:3]
        lines.append(f"groups ({mine[0]['network']} b{mine[0]['batch']} {mode}): {sum(r['fused_ms'] for r in mine):.3f} "
                     f"ms fused, {sum(r['unfused_ms'] for r in mine):.3f} unfused, {sum(r['eager_ms'] for r in mine):.3f}"
                     f" eager; most saved by fusing: " + ", ".join(f"{r['name']} {r['vs_unfused']:.2f}x" for r in best))
    return lines


def _cell(row: dict | None, eager: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['median_ms']:.3f}" + (f" {eager['median_ms'] / row['median_ms']:.2f}x" if eager else "")


def _failures(results: dict) -> list[str]:
    return [f"{stage}: {c['case']}: {c['status']}: {c.get('error') or c.get('note', '')}"[:300]
            for stage, s in results["stages"].items() for c in s["cases"] if c["status"] != "ok"]


def short_table(results: dict) -> str:
    env = _ok(results, "env")
    head = [(f"gpu_check{' (dry run: CPU plumbing, no numbers)' if results['dry_run'] else ''}: "
            f"{env[0]['gpu'] if env else 'environment unknown'}, torch {env[0]['torch'] if env else '?'}, "
            f"triton {env[0]['triton'] if env else '?'}; {results.get('elapsed_s', 0):.0f} s of "
            f"{results['budget_s']} s")]
    if env and env[0]["stale_files"]:
        head.append(f"WARNING: the installed cnndsl differs from this tree in {', '.join(env[0]['stale_files'][:5])}")
    failures = _failures(results)
    tail = [f"not ok ({len(failures)}):", *[f"  {f}" for f in failures[:12]]] if failures else []
    parts = [head, _stage_lines(results), _pytest_line(results), _parity_lines(results), tail, _groups_lines(results),
             _bench_lines(results)]
    return "\n".join("\n".join(p) for p in parts if p)


# --- check.md -----------------------------------------------------------------------------------

def _md_table(header: list[str], body: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(map(cell, row)) + " |" for row in body], ""]


def _md_parity(results: dict) -> list[str]:
    body = [[f"{r['network']} b{r['batch']}", r["dtype"], "fused" if r["fuse"] else "unfused",
             *[f"{_num(r['triton'][q])} / {_num(r['eager'][q])}" for q in QUANTITIES], r["triton"]["param_grad_worst"],
             r["verdict"]]
            for r in _ok(results, "parity")]
    return ["## Parity against float64 (triton / eager)", "",
            *_md_table(["network", "dtype", "plan", *QUANTITIES, "worst grad", "verdict"], body)] if body else []


def _md_bench(results: dict) -> list[str]:
    table = rows(results, "bench")
    if not table:
        return []
    r0 = table[0]
    body = [[f"{bench_report.case(r)} {r['shape']}", r["mode"], r["provider"], r["median_ms"], r["p20_ms"], r["p80_ms"],
             r["tflops"], f"{r['roofline_pct']}%"] for r in table]
    return ["## Benchmarks", "", (f"Ceilings measured in this run: copy {r0['copy_gb_s']:,} GB/s, {r0['dtype']} matmul "
            f"{r0['matmul_tflop_s']:,} TFLOP/s; roofline: the fused plan's modelled bytes or FLOPs at those."), "",
            *_md_table(["case", "mode", "provider", "median ms", "p20", "p80", "TFLOP/s", "roofline"], body),
            *[line for net in dict.fromkeys(map(bench_report.case, table))
              for line in ("```", bench_report.table([r for r in table if bench_report.case(r) == net]), "```", "")]]


def _md_profile(results: dict) -> list[str]:
    out = []
    for p in _ok(results, "profile"):
        out += [f"## Profile: {p['network']} training step, {p['provider']} (batch {p['batch']}, {p['dtype']})", "",
                f"{p['total_ms']} ms of {p['unit']} per step (mean of {p['steps']}).", "",
                *_md_table(["#", "kernel", "calls/step", "ms/step", "%"],
                           [[i, f"`{k['name'][:120]}`", k["calls"], k["ms"], k["pct"]]
                            for i, k in enumerate(p["kernels"], 1)])]
    return out


def _md_groups(results: dict) -> list[str]:
    table = rows(results, "groups")
    return ["## Fused groups", "", "```", bench_report.groups_table(table), "```", ""] if table else []


def _md_problems(results: dict) -> list[str]:
    out = []
    for stage, s in results["stages"].items():
        for c in s["cases"]:
            if c["status"] == "error":
                out += [f"### {stage}: {c['case']}", "", "```", c.get("error", ""), c.get("traceback", "")
                        or c.get("stderr", ""), "```", ""]
    return ["## Errors", "", *out] if out else []


def markdown(results: dict) -> str:
    env = _ok(results, "env")
    lines = [f"# gpu_check{' (dry run)' if results['dry_run'] else ''}, {results['started']}", ""]
    if env:
        lines += _md_table(["", ""], [[k, v] for k, v in env[0].items()])
    lines += ["## Stages", "", *_md_table(["stage", "ok", "error", "skipped", "elapsed s", "budget s"],
                                          [line.split() for line in _stage_lines(results)[1:]])]
    lines += ["## pytest -m gpu", "", *_pytest_line(results), ""] if _pytest_line(results) else []
    for part in (_md_parity, _md_bench, _md_profile, _md_groups, _md_problems):
        lines += part(results)
    return "\n".join(lines)


def write_all(out: Path, results: dict) -> list[str]:
    """check.md and the plots; the notes to print (a plot skipped)."""
    (out / "check.md").write_text(markdown(results), encoding="utf-8")
    notes = []
    for stage in ("bench", "groups"):
        table = rows(results, stage)
        if table:
            title = "gpu_check bench" if stage == "bench" else f"{table[0]['network']} fused groups"
            notes.append(bench_report.plot(out / f"{stage}.png", table, title) or f"wrote {out / stage}.png")
    return notes
