"""The tiles the two convolution GEMMs tune over on a GPU, and why: the forward and input-gradient
kernel's (conv_kernel.py) and the weight gradient's (conv_backward.py), each with the prune that drops
tiles too wide for a layer or at which a transform on load spills or serializes wgmma, and the
sizes the interpreter takes instead (_common.autotune)."""

import triton

from ._common import INTERPRET, _tile, gemm_config

MIN_BLOCK_M = 16  # the smallest BLOCK_M the interpreter sizes a launch to
# 8-warp BLOCK_K=64 tiles at BLOCK_N=64 are for 64-channel layers (the prune keeps BLOCK_N <= 64 there).
CONV_CONFIGS = [gemm_config(*c) for c in ((128, 128, 32, 3, 8), (128, 128, 64, 3, 8), (128, 64, 32, 4, 4),
                                          (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (256, 64, 32, 3, 8),
                                          (256, 64, 64, 3, 8), (128, 64, 64, 3, 8), (256, 128, 32, 3, 8),
                                          (128, 32, 32, 4, 4), (64, 32, 64, 4, 4))]


def conv_cols(args):
    """The output columns of one group's GEMM (every channel for a depthwise layer)."""
    return args["COUT"] if args["DEPTHWISE"] else args["COUT_G"]


# Cross-layer fusion's loads (the prologue, dz on load) transform the A tile in registers and hand it
# to wgmma from there: at the other tiles ptxas serializes the wgmma pipeline (C7515), measured on sm_90
# (dz on load of a 1x1 conv also at 64x128x32 and 128x32x32).
ON_LOAD_TILES = {(128, 128, 64, 8), (64, 128, 32, 4), (64, 64, 64, 4), (128, 32, 32, 4)}
DZ_ON_LOAD_TILES = {(128, 128, 64, 8), (64, 64, 64, 4)}


def prune_conv(configs, named_args, **kwargs):
    """Drop N tiles far wider than the group's output channels (e.g. depthwise layers), and with a
    transform on load the tiles at which it serializes wgmma."""
    args = {**named_args, **kwargs}
    width = max(32, triton.next_power_of_2(conv_cols(args)))
    configs = [c for c in configs if c.kwargs["BLOCK_N"] <= width] or configs
    if args.get("PROLOGUE") or args.get("GRAD_PRO"):
        tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
        tiles = DZ_ON_LOAD_TILES if args.get("GRAD_PRO") else ON_LOAD_TILES
        configs = [c for c in configs if tile(c) in tiles] or configs
    return configs


def min_rows(m: int) -> int:
    """The fewest rows a tile of a launch of m rows takes (the interpreter's size, or the configs' least)."""
    return _tile(m, MIN_BLOCK_M, 512) if INTERPRET else min(c.kwargs["BLOCK_M"] for c in CONV_CONFIGS)


# BLOCK_M output channels x BLOCK_N input channels of one tap, BLOCK_K rows per step. No 128x128
# tile on 8 warps for 16-bit types: ptxas serializes its wgmma (C7515) with this kernel's row
# bookkeeping. TF32 takes its A tile (M-contiguous, which wgmma reads only for 16-bit types) through
# registers: its tiles are smaller, so that none spills.
WEIGHT_GRAD_CONFIGS_16BIT = [gemm_config(*c) for c in (
    (256, 128, 64, 3, 8), (128, 256, 64, 3, 8), (256, 128, 32, 4, 8), (256, 64, 64, 3, 8), (128, 128, 64, 3, 4),
    (128, 128, 32, 4, 4), (128, 64, 64, 3, 4), (64, 64, 64, 3, 4), (128, 32, 64, 4, 4), (128, 16, 64, 4, 4),
    (64, 16, 64, 4, 4))]
WEIGHT_GRAD_CONFIGS_FP32 = [gemm_config(*c) for c in (
    (128, 128, 32, 3, 8), (256, 64, 32, 3, 8), (256, 128, 16, 4, 8), (128, 64, 32, 3, 4), (64, 128, 32, 3, 4),
    (64, 64, 64, 3, 4), (128, 32, 32, 4, 4), (64, 16, 64, 4, 4))]
# Depthwise: BLOCK_M rows (pixels) x BLOCK_N channels, no dot.
DEPTHWISE_CONFIGS = [gemm_config(*c) for c in ((128, 32, 16, 3, 4), (64, 64, 16, 3, 4), (128, 64, 16, 3, 4),
                                               (32, 128, 16, 3, 4), (64, 128, 16, 3, 8), (256, 64, 16, 3, 8))]


def prune_weight_grad(configs, named_args, **kwargs):
    """The configs of the operands' dtype, less tiles far wider than a group's channels (the padded
    stem's 16). The prologue (x normalised on load) and dz on load hold their tiles in registers
    beside the accumulator, to transform them before they go to shared memory for wgmma: larger
    tiles spill."""
    mine = WEIGHT_GRAD_CONFIGS_FP32 if named_args["x_ptr"].element_size() == 4 else WEIGHT_GRAD_CONFIGS_16BIT
    configs = [c for c in configs if any(c is m for m in mine)]
    args = {**named_args, **kwargs}
    pro, gp = bool(args.get("PROLOGUE") or args.get("GATE")), bool(args.get("GRAD_PRO"))  # (a gate: x * g on load)

    def fits(c):
        m, n, k, threads = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 32 * c.num_warps
        if gp:  # dz (k x m) and x (k x n) in registers beside the accumulator (n x m, transposed: its n rows
            # are the MMA's M, 64 or more for wgmma): spill-free on sm_90 up to 32 values a thread each (measured)
            return n >= 64 and max(k * m, k * n, m * n) <= 32 * threads
        return not pro or (m + 2 * k) * n <= 192 * threads
    configs = [c for c in configs if fits(c)] or configs
    rows = max(64, triton.next_power_of_2(named_args["COUT_G"]))
    cols = max(16, triton.next_power_of_2(named_args["CIN_G"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= cols] or configs


def row_block(args):
    """Row blocks must tile a split's CHUNK rows exactly: its largest power-of-two divisor."""
    return args["CHUNK"] & -args["CHUNK"]
