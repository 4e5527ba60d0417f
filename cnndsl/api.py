"""The Python API: `parse` (path or text -> Network), `compile` (-> torch.nn.Module),
`load_weights` and `load_ops`. Torch is imported only when a model is compiled or ops loaded."""

import re
from os import PathLike
from pathlib import Path

from .elaborate import elaborate
from .errors import CnnError, CnnInputError, CnnSyntaxError
from .files import FileTooLarge, NotRegularFile, read_regular
from .ir import Network
from .limits import MAX_SOURCE_CHARS
from .parse import parse_program

_MAX_BYTES = 4 * MAX_SOURCE_CHARS  # UTF-8 takes at most 4 bytes a character
_SOURCE_START = re.compile(r"\ufeff?\s*(#|network\s)")


def _is_path(src) -> bool:
    """A PathLike, or a one-line str ending in .cnn that does not begin as source text does
    (`#`, `network `): a network's text has at least two lines, a path none."""
    return isinstance(src, PathLike) or (isinstance(src, str) and "\n" not in src and src.endswith(".cnn")
                                         and not _SOURCE_START.match(src))


def read_file(path: Path) -> str:
    """A .cnn file's text: a regular file (never a FIFO or device that blocks or never ends),
    refused from its size before reading when it cannot be a network's source."""
    try:
        return read_regular(path, _MAX_BYTES).decode("utf-8-sig")
    except NotRegularFile:
        raise CnnInputError("not a regular file (a pipe, socket or device)", filename=str(path)) from None
    except FileTooLarge as err:
        raise CnnInputError(f"too large for a .cnn file: {err.size:,} bytes, at most {MAX_SOURCE_CHARS:,} "
                            "characters", filename=str(path)) from None


def read_source(src: str | PathLike) -> tuple[str, str | None]:
    """Decide whether `src` is a path or .cnn text, and read it."""
    if _is_path(src):
        path = Path(src)
        try:
            return read_file(path), str(path)
        except CnnInputError:
            raise
        except FileNotFoundError:
            raise CnnInputError("no such file", filename=str(path)) from None
        except IsADirectoryError:
            raise CnnInputError("is a directory, not a .cnn file", filename=str(path)) from None
        except UnicodeDecodeError as err:
            raise CnnInputError(f"not UTF-8 text ({err.reason} at byte {err.start})", filename=str(path)) from None
        except OSError as err:
            raise CnnInputError(f"cannot read: {err.strerror}", filename=str(path)) from None
        except (ValueError, UnicodeError) as err:  # a NUL byte or a lone surrogate in the path
            raise CnnInputError(f"not a usable path ({err})", filename=repr(str(src))) from None
    if not isinstance(src, str):
        raise CnnInputError(f"expected a path, .cnn text or a Network, got {type(src).__name__}")
    return src, None


def parse(src: str | PathLike | Network, filename: str | None = None) -> Network:
    """Parse and check a .cnn file (a Path, or a one-line str ending in .cnn that does not begin
    with `#` or `network `) or source text into a Network; a Network is returned as it is."""
    if isinstance(src, Network):
        return src
    text, path = read_source(src)
    return parse_text(text, filename or path)


def parse_text(text: str, filename: str | None = None) -> Network:
    """.cnn source text into a Network, always as text, never as a path (a file or an editor's
    document whose whole text is `other.cnn` must not make fmt or the language server read and
    quote another file)."""
    try:
        return elaborate(parse_program(text, filename), text, filename)
    except CnnError as err:
        raise err.attach(text, filename) from None
    except RecursionError:
        raise CnnSyntaxError("the network is nested too deeply", filename=filename) from None


def compile(src, backend: str = "triton", fuse: bool | str = True, device=None, dtype=None):
    """Build a torch.nn.Module for a Network, path or text.

    backend: "triton" (Triton kernels, fused per `fuse`) or "torch" (the reference).
    fuse: True (cross-layer: blocks also hand their batch norm and activation to the next conv's
    loads in training), "block" (block-level fusion only) or False (one kernel per layer).
    device: default "cuda" when available, else "cpu"; dtype: default torch.float32."""
    net = parse(src)
    from .runtime import build_module
    return build_module(net, backend=backend, fuse=fuse, device=device, dtype=dtype)


def load_weights(model, source) -> dict:
    """Load weights into a compiled model: `source` a torch state dict (a dict, or a .pt/.pth
    file, read with weights_only=True), a .safetensors file or a cnndsl checkpoint. Tensors are
    matched by name where every name matches, else in declaration order (torchvision's and timm's
    models of the same architecture load as they are); every shape is checked first, and a
    mismatch raises CnnWeightsError naming both sides and loads nothing. -> {model name: source name}."""
    from .weights import load_weights as load
    return load(model, source)


def load_ops() -> None:
    """Register cnndsl's torch custom ops (`torch.ops.cnndsl.conv_block`, ...) in this process, as
    compiling a model does: a program saved by torch.export names them, so a process that
    compiled no model calls this before `torch.export.load`."""
    from .runtime import triton_module  # noqa: F401 - importing it defines every op
