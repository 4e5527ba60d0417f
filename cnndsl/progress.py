"""The progress of a training epoch on the terminal."""

import sys


class Progress:
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
