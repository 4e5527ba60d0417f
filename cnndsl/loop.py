"""One epoch of `cnndsl train`: the seeded shuffle, augmentation (augment.py), the optimizer
steps in the run's precision, the running loss watched for NaN, and the progress bar.

Precision (`--dtype`): the model's parameters and the optimizer's state are always fp32. With
bf16 or fp16 each forward runs inside torch.autocast, so the kernels compute in that dtype on
16-bit copies of the weights (runtime/steps.py) and the gradients reach the fp32 weights; fp16
also scales the loss (torch.amp.GradScaler: a step whose gradients overflow is skipped and the
scale halved), and the scale is kept in the checkpoint."""

import math
import time
import warnings

import torch

from .augment import Augment
from .distributed import SINGLE, World, part
from .errors import CnnTrainError
from .progress import Progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_EVERY = 10  # steps between looks at the running loss (each look waits for the device)


def autocast(model, dtype: str):
    """The context the run's forwards (training, validation, test) run in: torch.autocast on the
    model's device in `dtype`, off for fp32."""
    return torch.autocast(model.device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")


def grad_scaler(model, dtype: str, state: dict | None) -> torch.amp.GradScaler:
    """fp16's loss scaler (a checkpoint's state, if any); disabled (a pass-through) otherwise."""
    scaler = torch.amp.GradScaler(model.device.type, enabled=dtype == "fp16")
    if state:
        scaler.load_state_dict(state)
    return scaler


def run_epoch(model, optimizer, scheduler, scaler, x, y, opts, epoch: int, desc: str, augment: tuple,
              fill: torch.Tensor, step_fn=None, w: World = SINGLE) -> dict:
    """One pass over (x, y) in the epoch's seeded order -> its loss, accuracy, speed. `augment`
    names the augmentations (augment.py), `fill` the crop's padding value per channel; step_fn
    computes (loss, logits) (the model under DistributedDataParallel), and this process takes
    its part `w` of each global batch (distributed.py)."""
    model.train()
    step_fn = step_fn or model.loss_and_logits
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
    order = order.to(y.device)
    draws = Augment(augment, tuple(x.shape[1:]), fill, opts.seed, epoch, len(y), y.device) if augment else None
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    progress, seen, start = Progress(len(y), desc, quiet=not w.leader), 0, time.perf_counter()
    try:
        for step, i in enumerate(range(0, len(y), opts.batch_size)):
            idx = part(order[i:i + opts.batch_size], w)
            if not len(idx):  # the epoch's last batch, smaller than the processes
                continue
            xb, yb = x[idx], y[idx]
            if draws is not None:
                xb = draws(xb, i + w.rank * len(idx))
            optimizer.zero_grad(set_to_none=True)
            with autocast(model, opts.dtype):
                loss, logits = step_fn(xb, yb)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():  # fp16: a first step skipped for overflow is expected
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            total += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
            running = None
            if step % CHECK_EVERY == CHECK_EVERY - 1 or i + opts.batch_size >= len(y):
                running = float(total) / seen
                if not math.isfinite(running):
                    raise CnnTrainError(f"the loss became {running} in epoch {epoch} (by image {seen * w.size} "
                                        f"of {len(y)}); try a lower --lr")
            progress.update(len(idx) * w.size, running)
    finally:
        progress.close()
    if w.size > 1:  # the epoch's figures over every process's part
        import torch.distributed as dist
        sums = torch.stack([total, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                  device=y.device)])
        dist.all_reduce(sums)
        total, correct, seen = sums[0], sums[1].long(), int(sums[2])
    seconds = time.perf_counter() - start
    return {"epoch": epoch, "loss": float(total) / seen, "accuracy": int(correct) / seen,
            "images_per_second": seen / seconds, "seconds": seconds}
