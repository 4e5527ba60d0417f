"""The progress of a training epoch on the terminal: a tqdm bar per epoch with the running loss
and images per second, cleared at the end of the epoch (the epoch's line in the log stays);
nothing at all when the output is not a terminal (a log file, CI)."""

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, file=None, quiet: bool = False):
        file = sys.stderr if file is None else file
        quiet = quiet or not (hasattr(file, "isatty") and file.isatty())
        self.bar = tqdm(total=total, desc=desc, unit="img", leave=False, file=file, disable=quiet,
                        dynamic_ncols=True)
        self.start, self.done = time.perf_counter(), 0

    def update(self, n: int, loss: float | None) -> None:
        """n more images done; loss: the running loss when it was looked at (None between looks)."""
        self.done += n
        self.bar.update(n)
        if loss is not None and not self.bar.disable:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} img/s", refresh=False)

    def close(self) -> None:
        self.bar.close()
