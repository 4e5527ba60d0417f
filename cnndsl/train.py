"""`cnndsl train` and `cnndsl eval`: a network file, a data set (data.py), a torch
optimizer and checkpoints (checkpoint.py, checked against the run by resume.py), in an
output folder that one run holds at a time (rundir.py).

A run is a recipe: parse and summarise the network, load and check the data, compile
(printing the fused plan), then per epoch a seeded shuffle, the optimizer steps with a
progress bar, a line of loss, accuracy and images per second, and an atomic checkpoint;
at the end the accuracy on the held-out split. With the same seed a resumed run repeats an
uninterrupted one bit for bit on the CPU: the shuffle of epoch e depends only on (seed, e),
and the checkpoint holds the torch RNG state that dropout draws its seeds from."""

import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import (
    api,
    augment,
    checkpoint,
    data,
    distributed,
    finetune,
    loop,
    metrics,
    plot,
    recipe,
    resume,
    runconfig,
    rundir,
    schedule,
)
from .errors import CnnInputError, CnnTrainError, printable, terminal_safe
from .limits import MAX_SIZE
from .loop import DTYPES
from .runtime import check_batch_memory, check_run_device

CHECKPOINT = "last.pt"  # in the output folder
MAX_EPOCHS = 1_000_000  # --epochs and the options counted in epochs: far beyond any run
MAX_SEED = 2**40
MAX_HYPER = 1e30  # --lr, --momentum, --weight-decay: far past any use, well inside fp32
CONFIG = "config.json"  # every option of the run, in the output folder (`cnndsl train --config`)
METRICS, BEST = "metrics.csv", "best.pt"  # one row per epoch; the checkpoint of the best validation accuracy
CURVES = "curves.png"  # loss and accuracy against epochs (with matplotlib)


def _shown(value, spec: str = "") -> str:
    """A whole number as the option messages show it (format(value, spec)): one of more than 30
    digits (a config.json can hold thousands) by its first digits and its length."""
    digits = len(str(abs(value))) if isinstance(value, int) else 0
    return format(value, spec) if digits <= 30 else f"{str(value)[:20]}... ({digits:,} digits)"


@dataclass(frozen=True)
class Options:
    data: str | None = None  # None: the bundled digits (data.py)
    epochs: int = 4
    batch_size: int = 64
    # The optimizer and its hyper-parameters: None means the checkpoint's when resuming, else the default
    lr: float | None = None  # DEFAULT_LR of the optimizer
    optimizer: str | None = None  # DEFAULT_OPTIMIZER
    momentum: float | None = None  # sgd only; DEFAULT_MOMENTUM
    weight_decay: float | None = None  # DEFAULT_WEIGHT_DECAY
    seed: int = 0
    device: str | None = None  # None: cuda when there is one, else cpu
    dtype: str = "fp32"  # what the kernels compute in; bf16, fp16: mixed precision, fp32 weights (loop.py)
    fuse: bool | str = True  # True: cross-layer fusion, "block": block-level, False: unfused
    backend: str = "triton"
    out: str | None = None  # None: runs/<network name>
    resume: str | None = None  # a checkpoint path; "" for <out>/last.pt
    # fine-tuning (finetune.py)
    init: str | None = None  # weights to start from: a state dict, safetensors or a checkpoint
    classes: int | None = None  # a new head of this many classes
    freeze: str | None = None  # a label (everything up to it) or comma-separated labels
    freeze_bn: bool = False  # frozen batch norms in eval mode
    only_classes: str | None = None  # train and test on these classes of the data, e.g. "0-4"
    val_split: float = 0.1  # the fraction of the training data held out for validation after every epoch
    early_stop: int | None = None  # stop after this many epochs without a better validation accuracy
    sched: str = "none"  # a learning-rate schedule of schedule.py
    warmup_epochs: int = 0
    augment: str | None = None  # augment.KINDS, comma-separated
    sync_bn: bool = False  # under torchrun: batch statistics over every process's part of the batch
    normalize: bool = False  # per-channel normalisation by the training split's statistics

    def validate(self) -> None:
        # (the lower bounds of --warmup-epochs and --early-stop, which need other options, are below)
        for name, low, top in (("epochs", 1, MAX_EPOCHS), ("batch_size", 1, MAX_SIZE),
                               ("warmup_epochs", None, MAX_EPOCHS), ("early_stop", None, MAX_EPOCHS)):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if low is not None and value < low:
                raise CnnInputError(f"{flag} must be at least {low}, got {_shown(value)}")
            if value is not None and value > top:
                raise CnnInputError(f"{flag} must be at most {top:,}, got {_shown(value, ',')}")
        if abs(self.seed) > MAX_SEED:  # (each epoch's generators take seed * 100,003 + epoch: 64 bits)
            raise CnnInputError(f"--seed must be a whole number from -{MAX_SEED:,} to {MAX_SEED:,} (2^40), got "
                                f"{_shown(self.seed)}")
        if self.optimizer is not None and self.optimizer not in recipe.OPTIMIZERS:
            raise CnnInputError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(recipe.OPTIMIZERS)}")
        # (the optimizer keeps them as fp32 scalars: a larger one fails inside its first step)
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= MAX_HYPER):
            raise CnnInputError(f"--lr must be a positive number of at most {MAX_HYPER:g}, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_HYPER):
                raise CnnInputError(f"--{name.replace('_', '-')} must be a number from 0 to {MAX_HYPER:g}, got {value}")
        if self.dtype not in DTYPES:
            raise CnnInputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        check_run_device(self.device)
        if not (isinstance(self.val_split, (int, float)) and 0 <= self.val_split < 1):
            raise CnnInputError(f"--val-split must be a fraction in [0, 1), got {self.val_split}")
        if self.early_stop is not None and (self.early_stop < 1 or not self.val_split):
            raise CnnInputError(f"--early-stop must be at least 1 and needs a validation split, got "
                                f"{_shown(self.early_stop)} with --val-split {self.val_split}")
        if self.sched not in schedule.SCHEDULES or self.warmup_epochs < 0:
            raise CnnInputError(f"--sched must be one of {', '.join(schedule.SCHEDULES)} and --warmup-epochs at "
                                f"least 0, got {self.sched!r:.40} and {_shown(self.warmup_epochs)}")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise CnnInputError(f"--warmup-epochs {self.warmup_epochs} must be less than --epochs {self.epochs}: the "
                                "warm-up would take the whole run, and the schedule never begin")
        augment.parse(self.augment)
        if self.sync_bn and self.backend != "triton":
            raise CnnInputError("--sync-bn synchronises the triton backend's fused batch norms; the torch backend "
                                "trains without it (or convert its model with torch.nn.SyncBatchNorm)")
        if self.freeze_bn and not self.freeze:
            raise CnnInputError("--freeze-bn needs --freeze: it keeps the frozen layers' batch norms in eval mode")


def out_folder(out: str | None, network: str) -> Path:
    """The run's folder: --out, else runs/NETWORK."""
    return Path(out) if out else Path("runs") / network


def tensors_of(ds: data.Dataset, model, norm: augment.Normalize | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (normalised by `norm`, in fp32) and labels on the model's device, in its dtype."""
    x = torch.from_numpy(ds.x).to(model.device)
    return (norm(x) if norm is not None else x).to(model.dtype), torch.from_numpy(ds.y).to(model.device)


def classes_of(net) -> int:
    if len(net.output_shape) != 1:
        raise CnnInputError(f"{net.name}: a classifier's output is one score per class, but this network's "
                            f"is {'x'.join(map(str, net.output_shape))}; end it with flatten and dense")
    return net.output_shape[0]


def _record(ckpt_path: Path, net, epoch: int, model, optimizer, config, history, norm, scaler, best) -> None:
    """Rank 0's files after an epoch: the checkpoint, metrics.csv, the curves, best.pt."""
    checkpoint.save(ckpt_path, network=resume.network_record(net), source=net.source, epoch=epoch,
                    model=model.state_dict(), optimizer=optimizer.state_dict(), rng=torch.get_rng_state(),
                    config=config, history=history, normalize=norm.record() if norm is not None else None,
                    scaler=scaler.state_dict() or None)
    metrics.write_csv(ckpt_path.parent / METRICS, history)
    if plot.available():
        plot.draw([ckpt_path.parent], ckpt_path.parent / CURVES)
    if best == epoch:
        metrics.keep_best(ckpt_path, ckpt_path.parent / BEST)


def _normalization(opts: Options, ckpt: dict | None, x: torch.Tensor, log) -> augment.Normalize | None:
    """--normalize's statistics: a resumed run's from its checkpoint, else the training split's."""
    saved = augment.Normalize.from_record(ckpt.get("normalize")) if ckpt is not None else None
    if ckpt is not None and (saved is not None) != opts.normalize:
        given = "with" if saved is not None else "without"
        raise CnnTrainError(f"the checkpoint was trained {given} --normalize: resume it {given} it")
    if not opts.normalize:
        return None
    norm = saved or augment.Normalize.of(x)
    if norm.mean.numel() != x.shape[1]:
        raise CnnTrainError(f"the checkpoint normalises {norm.mean.numel()} channels, the data has {x.shape[1]}")
    show = lambda t: ", ".join(f"{v:.4f}" for v in t.tolist()[:4]) + (", ..." if t.numel() > 4 else "")
    log(f"normalize: mean {show(norm.mean)}, std {show(norm.std)} (the training split's, per channel)")
    return norm


def _where(model) -> str:
    if model.device.type == "cuda":
        return f"compiled Triton kernels on {torch.cuda.get_device_name(model.device)}"
    return "Triton's interpreter on the CPU (no CUDA device; correct but slow)"


def _same_path(given: str, recorded) -> bool:
    """Whether --init names the file the checkpoint's run started from (recorded absolute)."""
    return isinstance(recorded, str) and Path(given).resolve() == Path(recorded).resolve()


def _resume(ckpt: dict, path: Path, net, file, model, optimizer, kind: str) -> tuple[int, list]:
    """Load a verified checkpoint into the model, the optimizer (built for kind from the settled
    options, whose hyper-parameters win over the ones in the checkpoint's param_groups) and the
    RNG, after checking that each part fits; -> (epochs done, history)."""
    resume.check_network(ckpt, net, path, file)
    ckpt = {**ckpt, "model": resume.in_our_names(ckpt["model"], model.state_dict())}
    resume.check_model(ckpt, model.state_dict(), path, cast=False)
    resume.check_optimizer(ckpt, optimizer, recipe.STATE_KEYS[kind], path)
    if ckpt["source"] != net.source:
        print(f"note: {printable(path)} was written from a different version of the network file; the network is the "
              "same, continuing", file=sys.stderr)
    model.load_state_dict(ckpt["model"])
    saved = ckpt["optimizer"]
    groups = [{**{k: v for k, v in own.items() if k != "params"}, "params": group["params"]}
              for own, group in zip(optimizer.param_groups, saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    try:
        torch.set_rng_state(ckpt["rng"])
    except RuntimeError as err:
        raise CnnTrainError(f"{path}: its rng is not a state of torch's generator ({err})") from None
    return ckpt["epoch"], list(ckpt["history"])


def _terminal_safe(log):
    """log, each report made printable (the lines name files and folders a user or a file chose)."""
    return lambda text="": log(terminal_safe(text))


def train(file: str | Path, opts: Options = Options(), log=print) -> dict:
    """Train the network in `file`; returns {"test_accuracy", "history", "checkpoint"}. Under
    torchrun, each process trains its part of every batch (distributed.py)."""
    log = _terminal_safe(log)
    opts.validate()
    net = api.parse(Path(file))
    out = out_folder(opts.out, net.name)
    w = distributed.world()
    distributed.check_batch(opts.batch_size, w.size)
    opts = replace(opts, device=distributed.join(w, opts.device, opts.sync_bn))
    try:
        if not w.leader:  # rank 0 prints and writes; the others train
            return _run(file, net, out / CHECKPOINT, opts, lambda *_: None, w)
        with rundir.claim(out, tuple(f"{f}.*.tmp" for f in (CHECKPOINT, BEST, CONFIG, METRICS, CURVES))) as stale:
            if stale:
                log(f"removed {len(stale)} temporary file(s) an interrupted run left in {out}: {', '.join(stale)}")
            return _run(file, net, out / CHECKPOINT, opts, log, w)
    except torch.distributed.DistError as err:
        raise distributed.broken(err, w) from None
    finally:
        distributed.leave(w)


def _run(file, net, ckpt_path: Path, opts: Options, log, w: distributed.World) -> dict:
    if opts.classes is not None:
        net = finetune.with_classes(net, opts.classes)
    log(net.summary())
    classes = classes_of(net)
    ckpt, resume_from = None, None
    if opts.resume is not None:
        resume_from = Path(opts.resume) if opts.resume else ckpt_path
        ckpt = checkpoint.load(resume_from)
    opts = recipe.settle(opts, ckpt, resume_from)
    if ckpt is not None and opts.init is not None and not _same_path(opts.init, ckpt["config"].get("init")):
        raise CnnTrainError(f"--init {opts.init} with --resume: a resumed run goes on from the weights of its "
                            f"checkpoint {resume_from}, not from --init's; start a new run (another --out) from "
                            f"{opts.init}, or leave --init out")
    train_set, test_set = data.load(opts.data)
    if opts.only_classes:
        train_set, test_set = (finetune.only_classes(ds, opts.only_classes) for ds in (train_set, test_set))
    for ds, part in ((train_set, "training set"), (test_set, "test set")):
        data.check(ds, net.input_shape, classes, part)
    train_set, val_set = metrics.carve(train_set, opts.val_split)
    val = f", {len(val_set)} of them held out for validation" if val_set is not None else ""
    log(f"\ndata: {train_set.name}: {len(train_set) + len(val_set or ())} training images{val} and "
        f"{len(test_set)} test images, {len(train_set.classes)} classes")
    torch.manual_seed(opts.seed)
    model = api.compile(net, backend=opts.backend, fuse=opts.fuse, device=opts.device)  # fp32 master weights
    batch = min(opts.batch_size, len(train_set)) // w.size  # (no batch is larger than the data)
    check_batch_memory(net, max(batch, 1), model.device, DTYPES[opts.dtype].itemsize, training=True)
    if opts.backend == "triton":
        log(f"backend: triton ({model.plan.level}), {_where(model)}")
        log(str(model.plan))
    else:
        log(f"backend: torch (the reference: eager PyTorch) on {model.device}")
    if opts.init is not None and ckpt is None:
        finetune.init(model, opts.init, opts.classes is not None, log)
    if opts.freeze:
        labels = [label.strip() for label in opts.freeze.split(",")]
        frozen = finetune.freeze(model, labels, opts.freeze_bn)
        names = f"{frozen[0]} .. {frozen[-1]}" if len(labels) == 1 and len(frozen) > 2 else ", ".join(frozen)
        bns = f" and their {len(model.frozen_bn)} batch norms run on running statistics" if model.frozen_bn else ""
        log(f"frozen: {len(frozen)} layers ({names}), their parameters take no gradient{bns}")
    optimizer = recipe.make(opts, finetune.trainable(model))
    done, history = 0, []
    if ckpt is not None:
        done, history = _resume(ckpt, resume_from, net, file, model, optimizer, opts.optimizer)
        log(f"resumed from {resume_from} after epoch {done} ({opts.optimizer}, lr {opts.lr:g})")
        if done >= opts.epochs:
            log(f"note: it has trained its {done} epochs of --epochs {opts.epochs}, so none is left; give "
                f"--epochs {done + 1} or more to train on")
    config = {k: v for k, v in asdict(opts).items() if k != "resume"}
    for key in ("data", "init"):  # absolute, as the file is: a resumed or replayed run may start elsewhere
        if config[key] is not None:
            config[key] = str(Path(config[key]).resolve())
    if w.leader and done < opts.epochs:  # (a resume with nothing left to train leaves the run's record as it is)
        runconfig.write(ckpt_path.parent / CONFIG, Path(file).resolve(), config)
    norm = _normalization(opts, ckpt, torch.from_numpy(train_set.x), log)  # every split by the training split's
    x, y = tensors_of(train_set, model, norm)
    xv, yv = tensors_of(val_set, model, norm) if val_set is not None else (None, None)
    xt, yt = tensors_of(test_set, model, norm)
    fill = norm(torch.zeros(1, x.shape[1], 1, 1)).flatten() if norm is not None else torch.zeros(x.shape[1])
    if not plot.available():
        log(f"note: {plot.MISSING}")
    scheduler = schedule.make(optimizer, opts.sched, opts.epochs, -(-len(y) // opts.batch_size), opts.warmup_epochs,
                              done)
    scaler = loop.grad_scaler(model, opts.dtype, ckpt.get("scaler") if ckpt is not None else None)
    step_fn = distributed.stepper(model, w)  # after the resumed weights: DDP sends rank 0's to every rank
    if w.size > 1:
        log(f"processes: {w.size} (torch.distributed), {opts.batch_size // w.size} images each of every batch "
            f"of {opts.batch_size}" + (", batch norm synchronised" if opts.sync_bn else ""))
    kinds = augment.parse(opts.augment)
    if opts.dtype != "fp32":
        log(f"precision: {opts.dtype} kernels on fp32 weights and optimizer state (torch.autocast)"
            + (", the loss scaled (torch.amp.GradScaler)" if opts.dtype == "fp16" else ""))
    for epoch in range(done + 1, opts.epochs + 1):
        try:
            stats = loop.run_epoch(model, optimizer, scheduler, scaler, x, y, opts, epoch,
                                   f"epoch {epoch}/{opts.epochs}", kinds, fill, step_fn, w)
        except CnnTrainError as err:
            kept = f"the last good checkpoint, {ckpt_path}, is kept" if ckpt_path.exists() else \
                "no checkpoint was written"
            raise CnnTrainError(f"{err.message}; {kept}") from None
        if xv is not None:
            with loop.autocast(model, opts.dtype):
                stats.update(metrics.validate(model, xv, yv, opts.batch_size))
        stats["lr"] = optimizer.param_groups[0]["lr"]
        history.append(stats)
        val = f"  val loss {stats['val_loss']:.4f}  val accuracy {stats['val_accuracy']:.4f}" if xv is not None else ""
        log(f"epoch {epoch}/{opts.epochs}  loss {stats['loss']:.4f}  accuracy {stats['accuracy']:.4f}{val}  "
            f"{stats['images_per_second']:,.0f} images/s  ({stats['seconds']:.1f} s)")
        best = metrics.best_epoch(history)
        if w.leader:
            _record(ckpt_path, net, epoch, model, optimizer, config, history, norm, scaler, best)
        if distributed.agree(best is not None and bool(opts.early_stop) and epoch - best >= opts.early_stop, w):
            log(f"early stop: no better validation accuracy in {opts.early_stop} epochs (the best: epoch {best})")
            break

    with loop.autocast(model, opts.dtype):
        acc = metrics.validate(model, xt, yt, opts.batch_size)["val_accuracy"]
    log(f"checkpoint: {ckpt_path}, tested below" + (f"; the best by validation accuracy: {ckpt_path.parent / BEST}"
                                                    if val_set is not None else ""))
    log(f"test accuracy: {acc:.3f}")
    return {"test_accuracy": acc, "history": history, "checkpoint": ckpt_path}
