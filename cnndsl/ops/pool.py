"""maxpool and avgpool: a window slid over H and W taking the max or the mean (floor mode;
avg counts the padding, PyTorch's count_include_pad=True)."""

from dataclasses import dataclass

from ..errors import CnnShapeError
from ..options import KERNEL, Option
from ..specs import Window
from .base import Kernels, Keyword, OpDef, spatial, window

Pair = tuple[int, int]


@dataclass(frozen=True)
class Pool:
    mode: str  # max or avg
    kernel: Pair
    stride: Pair
    padding: Pair


def spec(node) -> Window:
    a = node.attrs
    return Window(a.mode, a.kernel, a.stride, a.padding, node.shape[1:])


def _build(v) -> Pool:
    return Pool(v["mode"], v["kernel"], v["kernel"] if v["stride"] is KERNEL else v["stride"], v["pad"])


def _shape(a: Pool, shape, span):
    c, h, w = spatial(f"{a.mode}pool", shape, span)
    for k, p in zip(a.kernel, a.padding):
        if 2 * p > k:
            raise CnnShapeError(f"{a.mode}pool padding {p} is more than half its kernel {k}", span,
                                hint="PyTorch requires pad <= kernel/2")
    oh = window(f"{a.mode}pool", h, a.kernel[0], a.stride[0], 2 * a.padding[0], 1, "height", span)
    ow = window(f"{a.mode}pool", w, a.kernel[1], a.stride[1], 2 * a.padding[1], 1, "width", span)
    return (c, oh, ow)


def _reference(layer, a, xs, training):
    import torch.nn.functional as F
    return (F.max_pool2d if a.mode == "max" else F.avg_pool2d)(xs[0], a.kernel, a.stride, a.padding)


_OPTIONS = (Option("kernel", "pair"), Option("stride", "pair", KERNEL), Option("pad", "nonneg_pair", 0))

POOL = OpDef(
    "pool", _build, _shape,
    keywords={"maxpool": Keyword(_OPTIONS, 1, (("mode", "max"),)), "avgpool": Keyword(_OPTIONS, 1, (("mode", "avg"),))},
    runner="pool.pool_layer",
    step=lambda net, node: (node.inputs, (), spec(node)),
    kernels=Kernels(("pool_fwd",), ("pool_bwd",)),
    reference=_reference,
)
