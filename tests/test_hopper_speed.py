"""Issue 11's criteria for the GEMM kernels on Hopper, checked without a GPU. Every launch of a
training step and an eval forward of examples/resnet18.cnn (3x224x224) and
examples/cifar_small.cnn at batch 64 in bf16 and fp16 is recorded with the kernels skipped
(tests/hopper.py), compiled for sm_90a with the GPU autotune configs and read from ptxas's report
and the SASS (tests/hopper_measure.py, tests/hopper_sass.py), beside Triton's tutorial matmul
(128x128x64, 3 stages, 8 warps) compiled in the same run: the yardstick.

For each kind of product (conv forward, conv input-grad, conv weight-grad, dense) and each
criterion, one check over every compile of that kind (the limits are the constants below):
- wgmma: the K loop's MMAs are HGMMA (wgmma), not HMMA (mma.sync);
- async16: every async copy (cp.async, LDGSTS) in the K loop moves ASYNC_WIDTH bytes per thread,
  the loop has no synchronous global load, and its async copies (or TMA loads) carry both
  operand tiles;
- spills: at most MAX_SPILL_BYTES bytes of spill stores and loads (ptxas -v);
- calls: at most MAX_LOOP_CALLS CALL instructions in the K loop (a 64-bit division is one);
- ratio: the K loop's instructions per unit of MMA work (its static SASS count, issued once per
  warp, over BLOCK_M * BLOCK_N * BLOCK_K) at most MAX_RATIO times the tutorial's.

What is compiled: in CI, in bf16, every GPU config of each kind at one code path (the first
launch its prune lets through), every code path at one config (the first its prune keeps) and
at the tutorial's 128x128x64 (8 warps, 3 stages), and in fp16 that config at one code path
(about 100 compiles, 30 to 60 seconds on two cores); CNNDSL_HOPPER_SPEED_ALL=1 compiles every
code path with every config (about 760, 4 to 10 minutes), as benchmarks/hopper_report.py does
for docs/performance.md. The input images need no gradient (as in a real training step). The
checks that fail today are marked xfail(strict=True) with the values measured on CI's sample:
when a kernel change makes one pass, it fails as XPASS and its mark must go."""

import os

import pytest
import torch
from hopper import (
    measure,
    nvidia_backend_or_skip,
    record,
    record_networks,
    train_and_eval,
)
from hopper_sass import loop_metrics, parse, ptxas_usage

from test_triton_backend import EVERYTHING, RESIDUAL

MAX_RATIO = 1.5  # K-loop instructions per unit of MMA work, over the tutorial matmul's
MAX_SPILL_BYTES = 0  # spill stores + spill loads
MAX_LOOP_CALLS = 0  # CALL instructions in the K loop
ASYNC_WIDTH = 16  # bytes per thread of every async copy in the K loop
NETWORKS = ("resnet18", "cifar_small")
DTYPES = (torch.bfloat16, torch.float16)
BATCH = 64
KINDS = ("conv forward", "conv input-grad", "conv weight-grad", "dense")
YARDSTICK = (128, 128, 64, 8, 3)  # the tutorial's BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
ALL = os.environ.get("CNNDSL_HOPPER_SPEED_ALL") == "1"
SAMPLE = [{"dtypes": ["bfloat16"], "one_path": True},  # every config, at one code path
          {"dtypes": ["bfloat16"], "one_config": True},  # every code path, at one config
          {"dtypes": ["bfloat16"], "tiles": [YARDSTICK]},  # every code path at the tutorial's config
          {"dtypes": ["float16"], "tiles": [YARDSTICK], "one_path": True}]


def config(result):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a measured compile."""
    return (*result["tile"].values(), result["num_warps"], result["num_stages"])


def issued(result):
    """Warp instructions per multiply-add: the K loop's static count, issued by each warp, over the
    tile's BLOCK_M * BLOCK_N * BLOCK_K multiply-adds per iteration."""
    tile = result["tile"]
    return result["loop"]["instructions"] * result["num_warps"] / (tile["BLOCK_M"] * tile["BLOCK_N"] * tile["BLOCK_K"])


def step_macs(result):
    """The multiply-adds of one K step: the tile's, and the weight gradient's 16-wide bias column
    sums (a product with ones beside the tile) where it has a bias."""
    tile = result["tile"]
    bias = result["kernel"] == "_conv_dw_kernel" and result["path"].get("HAS_BIAS")
    return tile["BLOCK_M"] * (tile["BLOCK_N"] + 16 * bool(bias)) * tile["BLOCK_K"]


def _wgmma(r, _):
    loop = r["loop"]
    return loop["mma"] == "wgmma", f"{loop['mma_count']} {loop['mma']} per iteration"


def _async16(r, _):
    loop, tile = r["loop"], r["tile"]
    operands = (tile["BLOCK_M"] + tile["BLOCK_N"]) * tile["BLOCK_K"] * getattr(torch, r["dtype"]).itemsize
    ok = (loop["async_widths"] == [ASYNC_WIDTH] and loop["sync_loads"] == 0
          and (loop["async_bytes"] >= operands or loop["tma_loads"] > 0))
    return ok, (f"cp.async of {loop['async_widths']} bytes carrying {loop['async_bytes']} of {operands} operand "
                f"bytes, {loop['sync_loads']} synchronous loads of {loop['sync_load_widths']} bytes")


def _spills(r, _):
    spilled = r["spill_stores"] + r["spill_loads"]
    return spilled <= MAX_SPILL_BYTES, f"{spilled} spill bytes, {r['registers']} registers"


def _overlap(r, _):
    serial = r["serialized"]
    return not serial, ("ptxas serializes the wgmma pipeline (C7515: non-wgmma instructions define its "
                        "accumulator registers)" if serial else "the wgmma pipeline overlaps")


def _calls(r, _):
    loop = r["loop"]
    return loop["calls"] <= MAX_LOOP_CALLS, f"{loop['calls']} calls {sorted(loop['called'])}"


def _ratio(r, tutorial):
    ratio = issued(r) / issued(tutorial)
    return ratio <= MAX_RATIO, f"{r['loop']['instructions']} instructions per iteration, {ratio:.2f}x the tutorial"


CRITERIA = {"wgmma": _wgmma, "overlap": _overlap, "async16": _async16, "spills": _spills, "calls": _calls,
            "ratio": _ratio}


def verdict(result, tutorials, criterion):
    """(passes, what was measured) of one compile for one criterion."""
    if result["error"]:
        return False, f"compile failed: {result['error'].strip().splitlines()[-1]}"
    if result["loop"] is None and criterion != "spills":
        return False, "no MMA loop in the SASS"
    return CRITERIA[criterion](result, tutorials[result["dtype"]])


def describe(r):
    tile = "x".join(str(v) for v in r["tile"].values())
    path = " ".join(f"{k}={v}" for k, v in r["path"].items() if k not in ("DOT_DTYPE", "PRECISION"))
    return (f"{r['kernel']} {r['dtype']} {tile} w{r['num_warps']} s{r['num_stages']} [{path}] "
            f"({', '.join(r['launchers'])})")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under Triton's interpreter (TRITON_INTERPRET=1); this process runs a GPU")
    nvidia_backend_or_skip()
    launches, _, _, record_s = record_networks(NETWORKS, DTYPES, BATCH)
    results, measure_s = measure(launches, "all" if ALL else SAMPLE, YARDSTICK, tmp_path_factory.mktemp("hopper-speed"))
    print(f"\nhopper speed: {len(launches)} launches recorded in {record_s:.0f} s, {len(results)} compiles measured "
          f"in {measure_s:.0f} s")
    tutorials = {r["dtype"]: r for r in results if r["kind"] == "tutorial" and config(r) == YARDSTICK}
    return results, tutorials


# Measured on CI's sample of the kernels (docs/performance.md has every config, and each one's count
# beside the tutorial compiled at the same tile).
XFAIL = {
    ("conv forward", "ratio"): "27 of 36 compiles: 93-97 instructions per 128x128x32 w8 iteration (1.8x-1.9x; "
                               "the tutorial at that tile is 77), 2.3x-5.7x at the 64- and 32-wide tiles of "
                               "64- and 32-channel layers, and cross-layer fusion's prologue (the A tile "
                               "normalised and activated in registers): 263 at 64x64x64 (5.1x), 290 at "
                               "128x32x32 (11.3x), 305 at 128x128x64 (3.0x)",
    ("conv input-grad", "ratio"): "21 of 26: 95-98 instructions per 128x128x32 w8 iteration (1.8x-1.9x), up to "
                                  "5.1x at 64x32x64, and dz on load (the dy and z tiles turned into dz in "
                                  "registers): 402-552 at 128x128x64 (3.9x-5.4x), 258-447 at 64x64x64 "
                                  "(5.0x-8.7x), and from a pooled dy, argmax and y 447-490 at the 32-wide tiles "
                                  "of a 32-channel layer (17x-19x)",
    ("conv weight-grad", "ratio"): "11 of 17: cross-layer fusion's prologue and dz on load (from a pooled dy "
                                   "too), 377-526 instructions "
                                   "per iteration (7.3x-10.2x), and without them the tiles under 128x128 of 64- "
                                   "and 16-channel layers, 84-169 (1.6x-9.9x)",
    ("dense", "async16"): "3 of 33: the fused softmax over up to 1024 classes (16x1024x16, 8 warps) makes one "
                          "2-byte load: its 16-row A tile is 512 bytes a stage, 2 a thread, and a 16-byte copy a "
                          "thread needs 4 KB, which beside the 1024-column B tile exceeds shared memory; and "
                          "dense_backward_input of 10 classes (dy rows of 20 bytes) copies 4 bytes",
    ("dense", "ratio"): "28 of 33: tiles under 128x128, 86-161 instructions per iteration (1.7x-6.1x); the "
                        "swapped small-batch tiles 95-156 (2.4x-6.1x), the wide softmax tiles 129-445 (4.3x-5.0x)",
}


@pytest.mark.parametrize(("kind", "criterion"), [
    pytest.param(kind, criterion, id=f"{kind}-{criterion}", marks=[
        pytest.mark.xfail(strict=True, reason=XFAIL[kind, criterion])] if (kind, criterion) in XFAIL else [])
    for kind in KINDS for criterion in CRITERIA])
def test_criterion(measured, kind, criterion):
    results, tutorials = measured
    mine = [r for r in results if r["kind"] == kind and r["gemm"]]
    assert mine, f"no {kind} compile was measured"
    failing = [(r, why) for r in mine for ok, why in [verdict(r, tutorials, criterion)] if not ok]
    assert not failing, f"{len(failing)} of {len(mine)} {kind} compiles fail {criterion}:\n" + "\n".join(
        f"  {describe(r)}: {why}" for r, why in failing)


def test_yardstick_and_loops(measured):
    """The instrument reads the tutorial as the issue describes it (wgmma, 16-byte cp.async for both
    operands, no spills or calls), and every K loop it finds does one BLOCK_K step of its tile."""
    results, tutorials = measured
    assert set(tutorials) == {str(d).removeprefix("torch.") for d in DTYPES}
    for tutorial in tutorials.values():
        for criterion in CRITERIA:
            ok, why = verdict(tutorial, tutorials, criterion)
            assert ok, f"the tutorial fails {criterion}: {why}"
    wrong = [describe(r) for r in results if r["gemm"] and r["loop"] and r["loop"]["mma_macs"] != step_macs(r)]
    assert not wrong, "K loops whose MMAs are not one BLOCK_M x BLOCK_N x BLOCK_K step:\n  " + "\n  ".join(wrong)
    assert not [r for r in results if r["error"]], "compiles failed:\n" + "\n".join(
        f"{describe(r)}:\n{r['error']}" for r in results if r["error"])


@pytest.mark.parametrize("src", [RESIDUAL, EVERYTHING], ids=["residual", "everything"])
def test_skipping_kernels_records_the_same_launches(src):
    """Recording resnet18 at 224x224 skips the kernels: no launch may depend on what one computed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under Triton's interpreter (TRITON_INTERPRET=1)")
    drive = lambda: train_and_eval(src, torch.bfloat16)
    ran, skipped = (record(drive, execute=run, callers=True)[0] for run in (True, False))
    assert skipped == ran


# --- the SASS reader, on hand-written listings ----------------------------------------------

LISTING = """\
        .text.k:
k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R5, R5, 0x2, RZ ;
.L_x_1:
\t//## File "/src/kernels/conv.py", line 20
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64], P0 ;
        /*0030*/                   LDGSTS.E.64 [R3+0x10], desc[UR4][R6.64], P0 ;
        /*0040*/                   I2F.U32.RP R0, R9 ;
        /*0050*/              @P1 BRA `(.L_x_2) ;
        /*0060*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
.L_x_2:
\t//## File "/src/kernels/conv.py", line 21
        /*0070*/                   {INNER_MMA} ;
        /*0080*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
.L_x_3:
        /*0090*/                   SYNCS.PHASECHK.TRANS64 P2, [UR4], R0 ;
        /*00a0*/              @!P2 BRA `(.L_x_3) ;
        /*00b0*/               @P0 BRA `(.L_x_1) ;
        /*00c0*/                   {OUTER_MMA} ;
        /*00d0*/               @P4 BRA `(.L_x_0) ;
.L_x_4:
        /*00e0*/                   FADD R1, R1, R1 ;
        /*00f0*/               @P3 BRA `(.L_x_4) ;
        /*0100*/                   EXIT ;
$__internal_0_$__cuda_sm20_div_s64:
        /*0110*/                   IMAD R1, R1, R1, RZ ;
        /*0120*/                   MUFU.RCP64H R3, R1 ;
        /*0130*/                   RET.REL.NODEC R20 `(k) ;
        /*0140*/                   BRA `(.L_x_5);
.L_x_5:
        /*0150*/                   NOP;
"""
HGMMA = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"


def _listing(inner=HGMMA, outer="FADD R9, R9, R9"):
    return LISTING.replace("{INNER_MMA}", inner).replace("{OUTER_MMA}", outer)


@pytest.mark.parametrize("outer", ["FADD R9, R9, R9", HGMMA])
def test_the_main_loop_is_the_innermost_loop_with_an_mma(outer):
    # an outer loop (with or without an MMA), a wait loop and an epilogue loop around it do not count
    loop = loop_metrics(*parse(_listing(outer=outer)), num_warps=8)
    assert loop["instructions"] == (0xB0 - 0x20) // 0x10 + 1
    assert (loop["mma"], loop["mma_count"], loop["mma_macs"]) == ("wgmma", 1, 64 * 128 * 16 * 2)
    assert loop["calls"] == 1
    assert loop["called"] == {"$__internal_0_$__cuda_sm20_div_s64": {"calls": 1, "length": 3}}
    assert (loop["async_widths"], loop["async_bytes"]) == ([8, 16], 256 * (16 + 8))
    assert (loop["sync_loads"], loop["sync_load_widths"], loop["divisions"]) == (1, [2], 1)
    assert loop["sources"] == {"/src/kernels/conv.py:20": 5, "/src/kernels/conv.py:21": 5}


@pytest.mark.parametrize(("mma", "kind", "macs"), [
    ("HMMA.16816.F32.BF16 R24, R4, R8, R24", "mma.sync", 16 * 8 * 16 * 4),
    ("HMMA.1688.F32.TF32 R24, R4, R8, R24", "mma.sync", 16 * 8 * 8 * 4),
    ("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "wgmma", 64 * 64 * 16),
])
def test_mma_kinds_and_work(mma, kind, macs):
    loop = loop_metrics(*parse(_listing(inner=mma)), num_warps=4)
    assert (loop["mma"], loop["mma_macs"]) == (kind, macs)


def test_a_kernel_without_an_mma_loop_has_no_main_loop():
    assert loop_metrics(*parse(_listing(inner="FFMA R1, R2, R3, R1")), num_warps=4) is None


def test_ptxas_report():
    log = ("ptxas info    : Used 126 registers, used 1 barriers\n"
           "    16 bytes stack frame, 24 bytes spill stores, 8 bytes spill loads\n")
    assert ptxas_usage(log) == {"registers": 126, "stack": 16, "spill_stores": 24, "spill_loads": 8}
    with pytest.raises(ValueError, match="no register or stack-frame line"):
        ptxas_usage("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n")
