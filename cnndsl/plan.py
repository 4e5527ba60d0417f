"""Planning: group the IR's ops into the kernels that run them. With fuse=False every
op is its own group (flatten is a free view). Each group lists its ops and the kernels
it launches forward and backward."""

from dataclasses import dataclass

from . import ir
from .ir import Op

# op -> (forward kernels, backward kernels) that its unfused group launches
KERNELS = {
    Op.CONV: (("conv_fwd",), ("conv_bwd_input", "conv_bwd_weight")),
    Op.BATCHNORM: (("bn_stats", "bn_update_running", "bn_apply"), ("bn_bwd_reduce", "bn_bwd_apply")),
    Op.ACTIVATION: (("activation_fwd",), ("activation_bwd",)),
    Op.POOL: (("pool_fwd",), ("pool_bwd",)),
    Op.GLOBAL_AVGPOOL: (("global_avgpool_fwd",), ("global_avgpool_bwd",)),
    Op.FLATTEN: ((), ()),
    Op.DENSE: (("dense_fwd",), ("dense_bwd_input", "dense_bwd_weight")),
    Op.DROPOUT: (("dropout_fwd",), ("dropout_bwd",)),
    Op.SOFTMAX: (("softmax_fwd",), ("softmax_bwd",)),
    Op.ADD: (("add_fwd",), ()),
}


@dataclass(frozen=True)
class Group:
    nodes: tuple[ir.Node, ...]
    forward: tuple[str, ...]
    backward: tuple[str, ...]
    reason: str | None = None  # why the group is not fused further, where it could have been

    @property
    def name(self) -> str:
        return self.nodes[0].name if len(self.nodes) == 1 else f"{self.nodes[0].name}..{self.nodes[-1].name}"

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(n.op.value for n in self.nodes)


@dataclass(frozen=True)
class Plan:
    network: str
    groups: tuple[Group, ...]
    fused: bool

    def __str__(self) -> str:
        lines = [f"plan for {self.network}: {len(self.groups)} groups ({'fused' if self.fused else 'unfused'})"]
        for i, g in enumerate(self.groups):
            kernels = ", ".join(g.forward) or "(view, no kernel)"
            lines.append(f"  {i:>3}  {g.name:<28} {'+'.join(g.ops):<34} {kernels}")
        return "\n".join(lines)


def plan(net: ir.Network, fuse: bool = True) -> Plan:
    """One group per op (fusion rules are added by the fusion planner when fuse=True)."""
    groups = tuple(Group((n,), *KERNELS[n.op]) for n in net.nodes[1:])
    return Plan(net.name, groups, fused=False)
