"""`cnndsl train` and `cnndsl eval`: a network file, a data set (data.py), a torch
optimizer and checkpoints (checkpoint.py).

A run is a recipe: parse and summarise the network, load and check the data, compile
(printing the fused plan), then per epoch a seeded shuffle, the optimizer steps with a
progress bar, a line of loss, accuracy and images per second, and an atomic checkpoint;
at the end the accuracy on the held-out split. With the same seed a resumed run repeats an
uninterrupted one bit for bit on the CPU: the shuffle of epoch e depends only on (seed, e),
and the checkpoint holds the torch RNG state that dropout draws its seeds from."""

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import api, checkpoint, data
from .errors import CnnInputError, CnnTrainError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
DEFAULT_LR = {"sgd": 0.05, "adam": 0.003, "adamw": 0.003}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_EVERY = 10  # steps between looks at the running loss (each look waits for the device)


@dataclass(frozen=True)
class Options:
    data: str | None = None  # None: the bundled digits (data.py)
    epochs: int = 4
    batch_size: int = 64
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = None  # None: cuda when there is one, else cpu
    dtype: str = "fp32"
    fuse: bool = True
    backend: str = "triton"
    out: str | None = None  # None: runs/<network name>
    resume: str | None = None  # a checkpoint path; "" for <out>/last.pt

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CnnInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise CnnInputError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise CnnInputError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise CnnInputError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise CnnInputError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")


def _optimizer(opts: Options, params):
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[opts.optimizer]
    extra = {"momentum": opts.momentum} if opts.optimizer == "sgd" else {}
    return OPTIMIZERS[opts.optimizer](params, lr=lr, weight_decay=opts.weight_decay, **extra)


def _tensors(ds: data.Dataset, model) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(ds.x).to(model.device, model.dtype), torch.from_numpy(ds.y).to(model.device))


class _Progress:
    """tqdm's bar when tqdm is installed; otherwise one plain line rewritten in place on a
    terminal (nothing mid-epoch when the output is a file)."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr) if tqdm else None
        self.total, self.desc, self.done = total, desc, 0
        self.plain = self.bar is None and sys.stderr.isatty()

    def update(self, n: int, loss: float | None) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.plain and loss is not None:
            print(f"\r{self.desc}: {self.done}/{self.total} images, loss {loss:.4f}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            print("\r\033[K", end="", file=sys.stderr)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The fraction of x whose largest logit is its label, in eval mode without gradients."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += (model.logits(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum()
    model.train(was_training)
    return int(correct) / len(y)


def _classes(net) -> int:
    if len(net.output_shape) != 1:
        raise CnnInputError(f"{net.name}: a classifier's output is one score per class, but this network's "
                            f"is {'x'.join(map(str, net.output_shape))}; end it with flatten and dense")
    return net.output_shape[0]


def _where(model) -> str:
    if model.device.type == "cuda":
        return f"compiled Triton kernels on {torch.cuda.get_device_name(model.device)}"
    return "Triton's interpreter on the CPU (no CUDA device; correct but slow)"


def _resume(path: Path, source: str, model, optimizer, lr: float | None) -> tuple[int, list]:
    ckpt = checkpoint.load(path)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if mine != theirs:
        diff = next((k for k in list(mine) + list(theirs) if mine.get(k) != theirs.get(k)), "?")
        raise CnnTrainError(f"{path} holds weights for a different network: {diff} is "
                            f"{theirs.get(diff, 'absent')} there and {mine.get(diff, 'absent')} here")
    if ckpt["source"] != source:
        print(f"note: {path} was written from a different version of the network file; its weights fit, "
              "continuing", file=sys.stderr)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if lr is not None:  # an --lr given again overrides the checkpoint's
        for group in optimizer.param_groups:
            group["lr"] = lr
    torch.set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt["history"])


def _epoch(model, optimizer, x, y, opts: Options, epoch: int, desc: str) -> dict:
    """One pass over the training set in the epoch's seeded order -> its loss, accuracy, speed."""
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
    order = order.to(y.device)
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    progress, seen, start = _Progress(len(y), desc), 0, time.perf_counter()
    try:
        for step, i in enumerate(range(0, len(y), opts.batch_size)):
            idx = order[i:i + opts.batch_size]
            xb, yb = x[idx], y[idx]
            optimizer.zero_grad(set_to_none=True)
            loss, logits = model.loss_and_logits(xb, yb)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
            last = seen == len(y)
            running = None
            if step % CHECK_EVERY == CHECK_EVERY - 1 or last:
                running = float(total) / seen
                if not math.isfinite(running):
                    raise CnnTrainError(f"the loss became {running} in epoch {epoch} (by image {seen} of "
                                        f"{len(y)}); try a lower --lr")
            progress.update(len(idx), running)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    return {"epoch": epoch, "loss": float(total) / seen, "accuracy": int(correct) / seen,
            "images_per_second": seen / seconds, "seconds": seconds}


def train(file: str | Path, opts: Options = Options(), log=print) -> dict:
    """Train the network in `file`; returns {"test_accuracy", "history", "checkpoint"}."""
    opts.validate()
    net = api.parse(Path(file))
    source = Path(file).read_text(encoding="utf-8")
    log(net.summary())
    classes = _classes(net)
    train_set, test_set = data.load(opts.data)
    for ds, part in ((train_set, "training set"), (test_set, "test set")):
        data.check(ds, net.input_shape, classes, part)
    log(f"\ndata: {train_set.name}: {len(train_set)} training and {len(test_set)} held-out images, "
        f"{len(train_set.classes)} classes")
    torch.manual_seed(opts.seed)
    model = api.compile(net, backend=opts.backend, fuse=opts.fuse, device=opts.device, dtype=DTYPES[opts.dtype])
    if opts.backend == "triton":
        log(f"backend: triton ({'fused' if opts.fuse else 'unfused'}), {_where(model)}")
        log(str(model.plan))
    else:
        log(f"backend: torch (the reference: eager PyTorch) on {model.device}")
    optimizer = _optimizer(opts, model.parameters())
    out = Path(opts.out) if opts.out else Path("runs") / net.name
    ckpt_path = out / "last.pt"
    done, history = 0, []
    if opts.resume is not None:
        resume_from = Path(opts.resume) if opts.resume else ckpt_path
        done, history = _resume(resume_from, source, model, optimizer, opts.lr)
        log(f"resumed from {resume_from} after epoch {done}")
    x, y = _tensors(train_set, model)
    config = {k: v for k, v in asdict(opts).items() if k != "resume"}
    for epoch in range(done + 1, opts.epochs + 1):
        try:
            stats = _epoch(model, optimizer, x, y, opts, epoch, f"epoch {epoch}/{opts.epochs}")
        except CnnTrainError as err:
            kept = f"the last good checkpoint, {ckpt_path}, is kept" if ckpt_path.exists() else \
                "no checkpoint was written"
            raise CnnTrainError(f"{err}; {kept}") from None
        history.append(stats)
        log(f"epoch {epoch}/{opts.epochs}  loss {stats['loss']:.4f}  accuracy {stats['accuracy']:.4f}  "
            f"{stats['images_per_second']:,.0f} images/s  ({stats['seconds']:.1f} s)")
        checkpoint.save(ckpt_path, source=source, epoch=epoch, model=model.state_dict(),
                        optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), config=config,
                        history=history)
    xt, yt = _tensors(test_set, model)
    acc = accuracy(model, xt, yt, opts.batch_size)
    log(f"checkpoint: {ckpt_path}")
    log(f"test accuracy: {acc:.3f}")
    return {"test_accuracy": acc, "history": history, "checkpoint": ckpt_path}


def evaluate(file: str | Path, weights: str | Path, data_spec: str | None = None, batch_size: int = 256,
             device: str | None = None, backend: str = "triton", fuse: bool = True, dtype: str = "fp32") -> float:
    """The accuracy of the checkpoint `weights` on the held-out split of `data_spec`."""
    if batch_size < 1:
        raise CnnInputError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in DTYPES:
        raise CnnInputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    net = api.parse(Path(file))
    _classes(net)
    ckpt = checkpoint.load(weights)
    _, test_set = data.load(data_spec)
    data.check(test_set, net.input_shape, _classes(net), "test set")
    model = api.compile(net, backend=backend, fuse=fuse, device=device, dtype=DTYPES[dtype])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CnnTrainError(f"{weights} holds weights for a different network: "
                            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    return accuracy(model, *_tensors(test_set, model), batch_size)
