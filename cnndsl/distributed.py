"""Training on several processes with torch.distributed: `torchrun --nproc_per_node N -m cnndsl
train ...` (several machines: torchrun's --nnodes, --node_rank, --master_addr and --master_port,
as its documentation says), or `cnndsl train --nproc N`, which runs torchrun for one machine.

Each process holds the whole model (DistributedDataParallel: the gradients are averaged over the
processes after every backward, the batch norms' running statistics are rank 0's); `--batch-size`
is the global batch, split into equal contiguous parts of the same seeded epoch order, rank r
taking part r. Rank 0 alone prints, writes checkpoints, metrics and curves, and holds the output
folder's lock. Backends: NCCL on CUDA devices (each process on cuda:LOCAL_RANK), gloo on the CPU.
Without --sync-bn a batch norm normalises by the statistics of its process's part of the batch,
as DDP does; with it, by the global batch's, the fused kernels exchanging their statistics
(kernels/sync.py: one all-gather per batch norm forward, one all-reduce backward)."""

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch

from .errors import CnnInputError, CnnTrainError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


SINGLE = World(0, 1, 0)
_PREVIOUS = {}  # signal -> the handler join() replaced, put back by leave()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CnnInputError(f"{name}={value!r:.40} in the environment is not an integer (torchrun sets it)") from None


def world() -> World:
    """This process's place in the run, from torchrun's environment (one process without it)."""
    size = _env_int("WORLD_SIZE", 1)
    return World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0)) if size > 1 else SINGLE


def join(w: World, device: str | None, sync_bn: bool = False) -> str | None:
    """Join the process group of a run of several processes (with sync_bn, its batch norms
    synchronised: kernels/sync.py); -> the device this process trains on."""
    if w.size == 1:
        return device
    import torch.distributed as dist

    from .kernels import sync
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if sync_bn:
        sync.sync_enable(dist.group.WORLD)
    _PREVIOUS[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: _stopped(w))  # how torchrun ends the others
    if cuda:
        torch.cuda.set_device(w.local_rank)
        return f"cuda:{w.local_rank}"
    return "cpu"


def _stopped(w: World):
    """SIGTERM: say why and end at once. Raising instead would surface inside whatever runs (a
    kernel, a collective) wrapped in its errors; a checkpoint being written stays the old one
    (its temporary file goes with the next run), the folder's lock with the process."""
    print(f"training error: rank {w.rank}: stopped by torchrun (SIGTERM), as another process of the run ended; "
          "the last checkpoint rank 0 finished is intact: continue with --resume", file=sys.stderr, flush=True)
    os._exit(1)


def leave(w: World) -> None:
    if w.size > 1:
        import torch.distributed as dist

        from .kernels import sync
        sync.sync_disable()
        if signal.SIGTERM in _PREVIOUS:  # the handler the caller had (train() may be called from a script)
            signal.signal(signal.SIGTERM, _PREVIOUS.pop(signal.SIGTERM))
        if dist.is_initialized():
            dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """The model's (loss, logits) as a forward, for DistributedDataParallel to wrap: DDP syncs the
    gradients of what runs through its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss_and_logits(x, y)


def stepper(model, w: World):
    """What the loop calls for (loss, logits): the model itself, or it under DDP."""
    if w.size == 1:
        return model.loss_and_logits
    from torch.nn.parallel import DistributedDataParallel
    ids = [model.device.index] if model.device.type == "cuda" else None
    return DistributedDataParallel(LossModule(model), device_ids=ids)


def part(idx: torch.Tensor, w: World) -> torch.Tensor:
    """This process's contiguous part of a global batch's indices (they divide evenly: split_batch)."""
    n = len(idx) // w.size
    return idx[w.rank * n:(w.rank + 1) * n]


def check_batch(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise CnnInputError(f"--batch-size {batch_size} is the global batch of {processes} processes: it must divide "
                            f"evenly among them (use a multiple of {processes})")


def agree(flag: bool, w: World) -> bool:
    """Rank 0's `flag` on every process: a decision (stop early) that each rank would otherwise take
    from its own numbers (validation with its own running statistics, without --sync-bn), where
    ranks that disagree would wait on each other's next collective for ever."""
    if w.size == 1:
        return flag
    import torch.distributed as dist
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broken(err: Exception, w: World) -> CnnTrainError:
    """The message for a collective that failed: another process of the run stopped."""
    return CnnTrainError(f"rank {w.rank}: another process of the run stopped ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else 'no detail'}); "
                         "the last checkpoint rank 0 wrote is intact: resume with --resume")


def launch(argv: list[str], nproc: int, device: str | None = None) -> int:
    """`cnndsl train --nproc N ...` (argv: the command line after `cnndsl`): torchrun on this
    machine, N processes each running the same command without --nproc; its exit status. N is
    at most one process per GPU (per CPU core on a CPU)."""
    if nproc < 1:
        raise CnnInputError(f"--nproc must be at least 1, got {nproc}")
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    most, units = (torch.cuda.device_count(), "GPUs") if on_gpu else (os.cpu_count() or 1, "CPU cores")
    if nproc > most:
        raise CnnInputError(f"--nproc {nproc}: more processes than this machine's {most} {units}",
                            hint="one process per GPU (on a CPU, at most one per core); for several machines, "
                                 "run torchrun on each with its multi-node options")
    if "LOCAL_RANK" in os.environ:  # one of torchrun's processes (an abbreviated --nproc kept in argv, say)
        raise CnnInputError("--nproc: this process is one of torchrun's already; under torchrun, run "
                            "`cnndsl train` without --nproc")
    kept, skip = [], False
    for arg in argv:
        if not skip and not arg.startswith("--nproc="):
            skip = arg == "--nproc"
            if not skip:
                kept.append(arg)
        else:
            skip = False
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    status = subprocess.call([*command, "--standalone", f"--nproc_per_node={nproc}", "--module", "cnndsl", *kept])
    if status:
        print(f"training error: the run's {nproc} processes stopped (torchrun's exit status {status}; its report "
              "above names the process that ended first); the last checkpoint in the output folder is intact: "
              "continue with --resume", file=sys.stderr)
    return status
