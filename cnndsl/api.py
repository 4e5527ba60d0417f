"""The Python API: `parse` (path or text -> Network), `compile` (-> torch.nn.Module),
and `emit`. Torch is imported only when a model is compiled."""

from os import PathLike
from pathlib import Path

from .elaborate import elaborate
from .errors import CnnError, CnnInputError, CnnSyntaxError
from .ir import Network
from .parse import parse_program


def _read(src: str | PathLike) -> tuple[str, str | None]:
    """Decide whether `src` is a path or .cnn text, and read it."""
    if isinstance(src, PathLike) or (isinstance(src, str) and "\n" not in src and src.strip().endswith(".cnn")):
        path = Path(src)
        try:
            return path.read_text(encoding="utf-8-sig"), str(path)
        except FileNotFoundError:
            raise CnnInputError("no such file", filename=str(path)) from None
        except IsADirectoryError:
            raise CnnInputError("is a directory, not a .cnn file", filename=str(path)) from None
        except UnicodeDecodeError as err:
            raise CnnInputError(f"not UTF-8 text ({err.reason} at byte {err.start})", filename=str(path)) from None
        except OSError as err:
            raise CnnInputError(f"cannot read: {err.strerror}", filename=str(path)) from None
    if not isinstance(src, str):
        raise CnnInputError(f"expected a path, .cnn text or a Network, got {type(src).__name__}")
    return src, None


def parse(src: str | PathLike | Network, filename: str | None = None) -> Network:
    """Parse and check a .cnn file (a Path, or a str ending in .cnn) or source text into a
    Network; a Network is returned as it is."""
    if isinstance(src, Network):
        return src
    text, path = _read(src)
    filename = filename or path
    try:
        return elaborate(parse_program(text, filename), text, filename)
    except CnnError as err:
        raise err.attach(text, filename) from None
    except RecursionError:
        raise CnnSyntaxError("the network is nested too deeply", filename=filename) from None


def compile(src, backend: str = "triton", fuse: bool = True, device=None, dtype=None):
    """Build a torch.nn.Module for a Network, path or text.

    backend: "triton" (Triton kernels, fused per `fuse`) or "torch" (the reference).
    device: default "cuda" when available, else "cpu"; dtype: default torch.float32."""
    net = parse(src)
    from .runtime import build_module
    return build_module(net, backend=backend, fuse=fuse, device=device, dtype=dtype)
