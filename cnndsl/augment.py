"""Image preprocessing for `cnndsl train`: per-channel normalisation and augmentation, on the
model's device, a batch at a time.

Normalisation (`--normalize`): x' = (x - mean[c]) / std[c] with the mean and the standard
deviation of each channel over the training split (the validation and test splits are not
looked at), stored in the checkpoint and applied again by `cnndsl eval` and `cnndsl export`.

Augmentation (`--augment crop,flip`), as torchvision's RandomCrop(size, padding=pad) and
RandomHorizontalFlip(): each training image, every epoch, is shifted by up to `pad` pixels each
way (padded with black: the value 0 before normalisation) and, with `flip`, mirrored left to
right with probability 1/2. The draws of epoch e depend only on (seed, e), like its shuffle, so
a resumed run repeats an uninterrupted one."""

from dataclasses import dataclass

import torch

from .errors import CnnInputError

KINDS = ("crop", "flip")
DEFAULT = "crop,flip"  # what a bare --augment means (cli.py says it too: it imports no torch)
STREAM = 50_000_017  # the draws' generator: seed * 100_003 + epoch + STREAM (the shuffle's without it)


def parse(text: str | None) -> tuple[str, ...]:
    """The augmentations `--augment` names: a comma-separated subset of KINDS (or none)."""
    if not text:
        return ()
    kinds = tuple(k.strip() for k in text.split(","))
    bad = [k for k in kinds if k not in KINDS]
    if bad or len(set(kinds)) != len(kinds):
        raise CnnInputError(f"--augment takes {', '.join(KINDS)} or both, comma-separated (e.g. {DEFAULT}); got "
                            f"{text!r:.60}")
    return kinds


def crop_padding(height: int, width: int) -> int:
    """The shift of a random crop: an eighth of the image's smaller side, at least 1 (4 pixels at
    32x32, as is usual for CIFAR-10; 1 at digits' 8x8)."""
    return max(1, min(height, width) // 8)


@dataclass(frozen=True)
class Normalize:
    mean: torch.Tensor  # (C,) fp32
    std: torch.Tensor  # (C,) fp32, > 0

    @staticmethod
    def of(x: torch.Tensor) -> "Normalize":
        """The statistics of images x (N, C, H, W); a constant channel gets std 1 (left unscaled)."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        std = flat.std(dim=1, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return Normalize(flat.mean(dim=1).float().cpu(), std.float().cpu())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (t.to(x.device, x.dtype).view(1, -1, 1, 1) for t in (self.mean, self.std))
        return (x - mean) / std

    def record(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @staticmethod
    def from_record(record: dict | None) -> "Normalize | None":
        return None if record is None else Normalize(record["mean"].float(), record["std"].float())


class Augment:
    """Random crops and flips of the batches of one epoch (draws for all of its n images up front,
    on the CPU, so that they follow the seed alone)."""

    def __init__(self, kinds: tuple[str, ...], shape: tuple[int, int, int], fill: torch.Tensor, seed: int,
                 epoch: int, n: int, device):
        c, h, w = shape
        self.kinds, self.pad, self.fill = kinds, crop_padding(h, w), fill.reshape(1, c, 1, 1)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch + STREAM)
        self.shift = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen).to(device)
        self.flip = (torch.rand(n, generator=gen) < 0.5).to(device)

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The batch x (B, C, H, W) of the epoch's images start, start + 1, ...: augmented."""
        n, c, h, w = x.shape
        if "crop" in self.kinds:
            p = self.pad
            padded = self.fill.to(x.device, x.dtype).expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
            shift = self.shift[start:start + n]
            rows = shift[:, 0:1] + torch.arange(h, device=x.device)  # (B, H): the rows each image keeps
            cols = shift[:, 1:2] + torch.arange(w, device=x.device)
            batch = torch.arange(n, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if "flip" in self.kinds:
            x = torch.where(self.flip[start:start + n].view(n, 1, 1, 1), x.flip(3), x)
        return x.contiguous()
