"""The markdown of docs/performance.md from benchmarks/hopper_report.py's measurements: the
yardstick, a summary of the criteria (tests/test_hopper_speed.py's, with its limits), a table per
kind of GEMM, where each kind's K-loop instructions come from (per source line), and the other
kernels."""

import linecache
import re
from collections import Counter

from test_hopper_speed import (
    ASYNC_WIDTH,
    CRITERIA,
    KINDS,
    MAX_LOOP_CALLS,
    MAX_RATIO,
    MAX_SPILL_BYTES,
    YARDSTICK,
    config,
    issued,
    verdict,
)

SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
HIDDEN = ("DOT_DTYPE", "PRECISION")  # shown by the dtype column


def _config_text(r):
    return "x".join(map(str, r["tile"].values())) + f" w{r['num_warps']} s{r['num_stages']}"


def _path_text(r):
    return " ".join(f"{k}={v}" for k, v in r["path"].items() if k not in HIDDEN) or "-"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def _merged(rows):
    """Rows equal but for the dtype (the first cell) once, with both dtypes."""
    merged = {}
    for row in rows:
        merged.setdefault(tuple(row[1:]), {})[row[0]] = None
    return [["+".join(d), *rest] for rest, d in merged.items()]


class Page:
    def __init__(self, data):
        self.data, self.results = data, data["results"]
        tutorials = [r for r in self.results if r["kind"] == "tutorial" and not r["error"]]
        self.yardstick = {r["dtype"]: r for r in tutorials if config(r) == YARDSTICK}
        self.same_tile = {(r["dtype"], config(r)): r for r in tutorials}

    def failed(self, r):
        return [c for c in CRITERIA if not verdict(r, self.yardstick, c)[0]]

    def gemm_row(self, r, common):
        loop = r["loop"]
        ones = " ".join(n for n in r["ones"] if n not in common) or "-"
        if r["error"]:
            return [SHORT[r["dtype"]], _config_text(r), _path_text(r), ones, r["launches"], "compile failed",
                    *[""] * 10]
        spills = r["spill_stores"] + r["spill_loads"]
        row = [SHORT[r["dtype"]], _config_text(r), _path_text(r), ones, r["launches"], r["registers"], spills,
               f"{r['shared'] / 1024:.0f}"]
        if loop is None:
            return [*row, "no MMA loop", *[""] * 6, " ".join(self.failed(r))]
        widths = "/".join(map(str, loop["sync_load_widths"]))
        sync = f", {loop['sync_loads']} sync {widths} B" if loop["sync_loads"] else ""
        same = self.same_tile.get((r["dtype"], config(r)))
        versus = f"{same['loop']['instructions']} ({loop['instructions'] / same['loop']['instructions']:.1f}x)" \
            if same and same["loop"] else "-"
        ratio = issued(r) / issued(self.yardstick[r["dtype"]])
        return [*row, f"{loop['mma']} x{loop['mma_count']}",
                "/".join(map(str, loop["async_widths"])) + " B" + sync, loop["calls"], loop["divisions"],
                loop["instructions"], f"{ratio:.2f}", versus, " ".join(self.failed(r)) or "none"]

    def kind_section(self, kind):
        mine = sorted((r for r in self.results if r["kind"] == kind and r["gemm"]),
                      key=lambda r: (_path_text(r), r["launchers"], config(r), r["dtype"]))
        header = ["dtype", "config", "path", "ints = 1", "layers", "regs", "spills", "smem KiB", "MMA",
                  "async loads", "calls", "div", "instr/iter", "ratio", "tutorial@config", "fails"]
        launchers = sorted({name for r in mine for name in r["launchers"]})
        common = set.intersection(*(set(r["ones"]) for r in mine)) if mine else set()
        return (f"## {kind}\n\n{len(mine)} compiles ({', '.join(launchers)}); ints equal to 1 in every one of "
                f"them: {' '.join(sorted(common)) or 'none'}.\n\n"
                + _table(header, _merged(self.gemm_row(r, common) for r in mine)))

    def summary(self):
        rows = []
        for kind in KINDS:
            mine = [r for r in self.results if r["kind"] == kind and r["gemm"]]
            fails = Counter(c for r in mine for c in self.failed(r))
            ratios = [issued(r) / issued(self.yardstick[r["dtype"]]) for r in mine if r["loop"] and not r["error"]]
            at = sorted({r["loop"]["instructions"] for r in mine if config(r) == YARDSTICK and r["loop"]})
            rows.append([kind, len(mine), *(fails[c] for c in CRITERIA),
                         f"{min(ratios):.2f} - {max(ratios):.2f}" if ratios else "-",
                         ", ".join(map(str, at)) or "-"])
        header = ["kind", "compiles", *(f"fail {c}" for c in CRITERIA), "ratio (best - worst)",
                  "instr/iter at 128x128x64 w8 s3"]
        return "## Summary\n\n" + _table(header, rows)

    def yardstick_section(self):
        rows = []
        for dtype, r in sorted(self.yardstick.items()):
            loop = r["loop"]
            rows.append([SHORT[dtype], r["registers"], r["spill_stores"] + r["spill_loads"],
                         f"{r['shared'] / 1024:.0f}", loop["instructions"], f"{loop['mma']} x{loop['mma_count']}",
                         f"{loop['async_bytes'] // (32 * r['num_warps'] * 16)} x 16 B" if loop["async_widths"] == [16]
                         else loop["async_widths"], loop["calls"], loop["divisions"]])
        return ("## The yardstick\n\nTriton's tutorial matmul (03-matrix-multiplication, as published, without "
                "its activation: 128x128x64 tiles, GROUP_SIZE_M 8, 8 warps, 3 stages, row-major 4096x4096 "
                "operands), compiled in the same run:\n\n"
                + _table(["dtype", "regs", "spills", "smem KiB", "instr/iter", "MMA", "cp.async per thread",
                          "calls", "div"], rows))

    def sources_section(self):
        out = ["## Where the K-loop instructions come from\n",
               ("For each kind, in bf16, the compile at 128x128x64 w8 s3 that the most layers reach (the most "
                "K-loop instructions among those), and the one with the worst ratio where that is another code "
                "path: the K loop's instructions per "
                "source line (the line table that `ptxas -lineinfo` keeps; the 15 busiest lines), its opcodes "
                "and its calls.\n")]
        for kind in KINDS:
            mine = [r for r in self.results
                    if r["kind"] == kind and r["gemm"] and r["loop"] and r["dtype"] == "bfloat16"]
            if not mine:
                continue
            busiest = max(mine, key=lambda r: (config(r) == YARDSTICK, r["launches"], r["loop"]["instructions"]))
            worst = max(mine, key=issued)
            for r in [busiest] + ([worst] if worst["path"] != busiest["path"] or worst["ones"] != busiest["ones"]
                                  else []):
                out.append(self._sources(kind, r))
        return "\n".join(out)

    def _sources(self, kind, r):
        loop = r["loop"]
        rows = [[_where(place), n, f"`{_source(place)}`"] for place, n in list(loop["sources"].items())[:15]]
        calls = "".join(f" Calls {c['calls']} x `{name}` ({c['length']} instructions)."
                        for name, c in loop["called"].items())
        return (f"### {kind}: {_config_text(r)}, {_path_text(r)}, ints equal to 1: {' '.join(r['ones']) or 'none'} "
                f"({r['launches']} layers)\n\n{loop['instructions']} instructions, ratio "
                f"{issued(r) / issued(self.yardstick[r['dtype']]):.2f}.\n\n" + _table(["line", "instr", "source"], rows)
                + "\nOpcodes: " + ", ".join(f"{op} {n}" for op, n in loop["opcodes"].items()) + "." + calls + "\n")

    def others_section(self):
        rows = [[SHORT.get(r["dtype"], r["dtype"]), r["kernel"], ", ".join(r["launchers"]), _path_text(r),
                 r["num_warps"], *(["compile failed", "", "", "", ""] if r["error"] else
                                   [r["registers"], r["spill_stores"] + r["spill_loads"], f"{r['shared'] / 1024:.0f}",
                                    "/".join(map(str, r["load_widths"])) or "-", r["calls"]])]
                for r in sorted(self.results, key=lambda r: (r["kernel"], _path_text(r), r["dtype"] or ""))
                if not r["gemm"]]
        return ("## Other kernels\n\nThe launches without a `tl.dot` (epilogues, batch norm, pooling, softmax, "
                "reductions), each code path at its first GPU config: global loads are the widths in bytes per "
                "thread of every LDG and LDGSTS.\n\n"
                + _table(["dtype", "kernel", "launchers", "path", "warps", "regs", "spills", "smem KiB",
                          "global loads B", "calls"], _merged(rows)))


def _where(place):
    """'kernels/conv.py:146' for a line-table path of any checkout ('triton/language/...' for Triton's)."""
    path, _, line = place.rpartition(":")
    return re.sub(r"^.*/((kernels|triton)/.*)$", r"\1", path) + f":{line}" if path else place


def _source(place):
    path, _, line = place.rpartition(":")
    return linecache.getline(path, int(line)).strip().replace("|", "\\|") if path else ""


def page(data):
    p = Page(data)
    v = data["versions"]
    compiles = len(data["results"])
    return f"""# Hopper kernel quality: the GEMM kernels' SASS against Triton's tutorial matmul

Generated by `python benchmarks/hopper_report.py` (4 to 10 minutes on two cores, no GPU); do not
edit by hand: rerun it after changing kernels/. Kernels at {v['kernels']}; Triton {v['triton']},
{v['ptxas']}, torch {v['torch']}.

Every launch of a training step and an eval forward of `examples/resnet18.cnn` (3x224x224) and
`examples/cifar_small.cnn` at batch 64, in bf16 and fp16 ({data['launches']} distinct launches,
recorded under Triton's interpreter with the kernels skipped), is compiled for sm_90a (Triton
compiles capability 90 as `.target sm_90a` and `ptxas --gpu-name=sm_90a`, so wgmma is there) with
every GPU config its autotuner tries: {compiles} compiles. Each is read from `ptxas -v` and from
its SASS (`nvdisasm`): the K loop is the innermost loop holding the MMA instructions, and its
instruction count is static (each side of a branch inside counted once). `tests/test_hopper_speed.py`
checks the same criteria on a sample in CI.

Columns: config is BLOCK_M x BLOCK_N x BLOCK_K, warps, stages; path the constexprs that pick the
code path; layers the recorded launches that compile to the binary; spills the bytes of spill
stores and loads; MMA the K loop's matrix instructions per iteration (wgmma is HGMMA, mma.sync
HMMA); async loads the bytes per thread of each cp.async (LDGSTS) in the K loop, then its
synchronous global loads; calls the CALLs in the K loop; div its integer divisions; instr/iter its
SASS instructions; ratio = instr/iter x warps / (BLOCK_M x BLOCK_N x BLOCK_K) over the same for the
tutorial (warp instructions per multiply-add); tutorial@config the tutorial's instructions per
iteration at the same config and ours over it (informative).

The criteria (tests/test_hopper_speed.py): wgmma in the K loop; async16, every cp.async of
{ASYNC_WIDTH} bytes, no synchronous global load, both operand tiles carried; spills at most
{MAX_SPILL_BYTES} bytes; calls at most {MAX_LOOP_CALLS} in the K loop; ratio at most {MAX_RATIO}.

{p.yardstick_section()}
{p.summary()}
{chr(10).join(p.kind_section(kind) for kind in KINDS)}
{p.sources_section()}
{p.others_section()}"""
