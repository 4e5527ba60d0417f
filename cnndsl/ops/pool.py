"""maxpool and avgpool: a window slid over H and W taking the max or the mean, with PyTorch's
options: floor mode unless ceil_mode=true; avg counts the padding in its divisor unless
count_include_pad=false (an avgpool option: maxpool refuses it)."""

from dataclasses import dataclass

from ..errors import CnnArgumentError, CnnShapeError
from ..limits import MAX_POOL_WINDOW
from ..options import KERNEL, Option
from ..specs import Window, window_out
from .base import Kernels, Keyword, OpDef, spatial, window

Pair = tuple[int, int]


@dataclass(frozen=True)
class Pool:
    mode: str  # max or avg
    kernel: Pair
    stride: Pair
    padding: Pair
    ceil_mode: bool = False
    count_include_pad: bool = True  # avg only


def spec(node) -> Window:
    a = node.attrs
    return Window(a.mode, a.kernel, a.stride, a.padding, node.shape[1:], a.ceil_mode, a.count_include_pad)


def _build(v) -> Pool:
    return Pool(v["mode"], v["kernel"], v["kernel"] if v["stride"] is KERNEL else v["stride"], v["pad"],
                v["ceil_mode"], v["count_include_pad"])


def _shape(a: Pool, shape, span):
    c, h, w = spatial(f"{a.mode}pool", shape, span)
    if a.mode == "max" and not a.count_include_pad:
        raise CnnArgumentError("count_include_pad=false is for avgpool only: maxpool never counts padding", span,
                               hint="remove count_include_pad=false, or use avgpool")
    if a.kernel[0] * a.kernel[1] > MAX_POOL_WINDOW:  # every output reads every tap of its window
        raise CnnArgumentError(f"{a.mode}pool window {a.kernel[0]}x{a.kernel[1]} has more than {MAX_POOL_WINDOW:,} "
                               "taps", span, hint="to average a whole feature map use global_avgpool" if a.mode == "avg" else
                               None)
    for k, p in zip(a.kernel, a.padding):
        if 2 * p > k:
            raise CnnShapeError(f"{a.mode}pool padding {p} is more than half its kernel {k}", span,
                                hint="PyTorch requires pad <= kernel/2")
    out = []
    for size, k, s, p, axis in zip((h, w), a.kernel, a.stride, a.padding, ("height", "width")):
        window(f"{a.mode}pool", size, k, s, 2 * p, 1, axis, span)  # refuses a window larger than the input
        out.append(window_out(size, k, s, 2 * p, 1, a.ceil_mode))
    return (c, *out)


def _reference(layer, a, xs, training):
    import torch.nn.functional as F
    if a.mode == "max":
        return F.max_pool2d(xs[0], a.kernel, a.stride, a.padding, ceil_mode=a.ceil_mode)
    return F.avg_pool2d(xs[0], a.kernel, a.stride, a.padding, ceil_mode=a.ceil_mode,
                        count_include_pad=a.count_include_pad)


_OPTIONS = (Option("kernel", "pair"), Option("stride", "pair", KERNEL), Option("pad", "nonneg_pair", 0),
            Option("ceil_mode", "bool", False), Option("count_include_pad", "bool", True))

POOL = OpDef(
    "pool", _build, _shape,
    keywords={"maxpool": Keyword(_OPTIONS, 1, (("mode", "max"),)), "avgpool": Keyword(_OPTIONS, 1, (("mode", "avg"),))},
    runner="pool.pool_layer",
    step=lambda net, node: (node.inputs, (), spec(node)),
    kernels=Kernels(("pool_fwd",), ("pool_bwd",)),
    reference=_reference,
)
