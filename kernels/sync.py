"""Synchronised batch norm (`cnndsl train --sync-bn` under torchrun): a training batch norm's
statistics over the global batch of every process, keeping the fused kernels. Each process
computes its per-tile partials as always; then

- forward: one all-gather per batch-norm layer of the (count, mean, var) of each process's
  rows, merged by Chan's formula in rank order (var about the global mean: no cancellation),
  and the running variance made unbiased with the global count;
- backward: one all-reduce of the reduction pass's tile partials [sum(g), sum(g (x - mean))]
  (equal shapes: every process holds an equal part of the batch), so that dx uses the global
  sums and count. The weight and bias gradients stay each process's own: DistributedDataParallel
  averages them, as it averages every other gradient.

Off (`group` None) nothing here runs. The run's processes switch it on together (train.py)."""

import torch


class _Sync:
    group = None  # the process group while on (torch.distributed.group.WORLD)


SYNC = _Sync()


def sync_enable(group) -> None:
    SYNC.group = group


def sync_disable() -> None:
    SYNC.group = None


def sync_on() -> bool:
    return SYNC.group is not None


def sync_total(count: int) -> int:
    """The rows of all processes, each holding `count` (the processes' parts are equal)."""
    if SYNC.group is None:
        return count
    import torch.distributed as dist
    return count * dist.get_world_size(SYNC.group)


def sync_moments(mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global (mean, biased var) (C,) fp32 from this process's, over `count` rows."""
    if SYNC.group is None:
        return mean, var
    import torch.distributed as dist
    mine = torch.stack([mean, var, torch.full_like(mean, float(count))])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(SYNC.group))]
    dist.all_gather(every, mine, group=SYNC.group)
    stats = torch.stack(every).double()  # (world, 3, C)
    n = stats[:, 2].sum(0)
    gmean = (stats[:, 2] * stats[:, 0]).sum(0) / n
    gvar = (stats[:, 2] * (stats[:, 1] + (stats[:, 0] - gmean) ** 2)).sum(0) / n
    return gmean.float(), gvar.float()


def sync_sums(part: torch.Tensor) -> torch.Tensor:
    """The backward's tile partials summed over the processes (in place)."""
    if SYNC.group is not None:
        import torch.distributed as dist
        dist.all_reduce(part, group=SYNC.group)
    return part
