"""The conv launchers' geometry: checking a layer's stride, padding, dilation and groups against
its weight, and the zero padding of channel groups narrower than a tl.dot's reduction (the
stride phases an input gradient runs as are specs.stride_phases, which the byte model shares)."""

from ..specs import MIN_GEMM_K, ConvGeometry
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
