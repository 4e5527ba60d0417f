"""The conv launchers' geometry: checking a layer's stride, padding, dilation and groups against
its weight, the stride phases an input gradient runs as (each a forward-like gather), and the
zero padding of channel groups narrower than a tl.dot's reduction."""

from ..specs import ConvGeometry
from ._common import check


def pair(v, name, minimum):
    """v (an int or two) as a pair of ints >= minimum, checked."""
    v = (v, v) if isinstance(v, int) else tuple(v)
    check(len(v) == 2 and all(isinstance(i, int) and i >= minimum for i in v),
          f"{name}: expected two ints >= {minimum}, got {v}")
    return v


def check_geometry(w_shape, c, k, geometry: ConvGeometry):
    """Validate the conv's geometry against C and the weight shape (K, C/g, R, S) -> (stride,
    padding, dilation, out_hw) as pairs."""
    check(isinstance(geometry, ConvGeometry), f"geometry: expected a ConvGeometry, got {geometry!r}")
    check(len(w_shape) == 4 and all(isinstance(d, int) and d > 0 for d in w_shape),
          f"w: expected a positive shape (K, C/groups, R, S), got {tuple(w_shape)}")
    groups = geometry.groups
    check(isinstance(groups, int) and groups >= 1, f"groups: expected an int >= 1, got {groups}")
    check(c % groups == 0 and k % groups == 0,
          f"groups={groups} must divide both C={c} and K={k}")
    check(w_shape[0] == k, f"w: expected {k} output channels, got shape {tuple(w_shape)}")
    check(w_shape[1] * groups == c,
          f"w: expected C/groups = {c // groups} input channels, got shape {tuple(w_shape)}")
    return (pair(geometry.stride, "stride", 1), pair(geometry.padding, "padding", 0),
            pair(geometry.dilation, "dilation", 1), pair(geometry.out_hw, "out_hw", 0))


def stride_phases(size, k, stride, pad, dil, transposed):
    """Per stride phase of one dim, the kernel's (P0, count, DST_S, SRC_S, SRC_O, R0, RSTEP, taps,
    D0, D_STEP): forward, one phase reading x[i*stride - pad + r*dil]; for the input gradient,
    dx pixels a, a + stride, ... are reached by the taps r with stride | a + pad - r*dil, reading
    dy[i + (a + pad - r*dil) / stride], so consecutive taps of a phase shift by -rstep*dil/stride."""
    if not transposed:
        return [(0, size, 1, stride, -pad, 0, 1, k, 0, dil)]
    phases = []
    for a in range(stride):
        taps = [r for r in range(k) if (a + pad - r * dil) % stride == 0]
        r0, step = (taps[0], taps[1] - taps[0] if len(taps) > 1 else 1) if taps else (0, 1)
        phases.append((a, max(0, -(-(size - a) // stride)), stride, 1, 0, r0, step, len(taps),
                       (a + pad - r0 * dil) // stride, -(step * dil) // stride))
    return phases


MIN_GEMM_K = 16  # channels per group that a tl.dot reduces over at least: fewer are padded with zeros


def pad_channels(src, wt, groups, cin_g):
    """src (N, H, W, G*cin_g) and wt (G, R, S, cin_g, cout_g) with each group's channels padded with
    zeros to MIN_GEMM_K: every A load is then 16-byte and asynchronous, where a tap of 1-15 channels
    would be scalar synchronous loads (the stem conv's 3)."""
    n, h, w, _ = src.shape
    padded = src.new_zeros((n, h, w, groups, MIN_GEMM_K))
    padded[..., :cin_g] = src.view(n, h, w, groups, cin_g)
    wt_padded = wt.new_zeros((*wt.shape[:3], MIN_GEMM_K, wt.shape[4]))
    wt_padded[:, :, :, :cin_g] = wt
    return padded.view(n, h, w, groups * MIN_GEMM_K), wt_padded
