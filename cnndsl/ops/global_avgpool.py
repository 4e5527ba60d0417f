"""global_avgpool: the mean over H and W of each channel, a 1x1 map."""

from dataclasses import dataclass

from .base import Kernels, Keyword, OpDef, spatial


@dataclass(frozen=True)
class GlobalAvgPool:
    pass


def _reference(layer, a, xs, training):
    import torch.nn.functional as F
    return F.adaptive_avg_pool2d(xs[0], 1)


GLOBAL_AVGPOOL = OpDef(
    "global_avgpool", lambda v: GlobalAvgPool(), lambda a, s, span: (spatial("global_avgpool", s, span)[0], 1, 1),
    keywords={"global_avgpool": Keyword()},
    runner="pool.global_avgpool_layer",
    kernels=Kernels(("global_avgpool_fwd",), ("global_avgpool_bwd",)),
    reference=_reference,
)
