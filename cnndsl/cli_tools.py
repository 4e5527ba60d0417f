"""The command line's editor and picture tools: `cnndsl draw` (draw.py), `cnndsl fmt` (fmt.py)
and `cnndsl lsp` (lsp.py), registered by cli.py."""

import os
import sys
from pathlib import Path

from . import api
from .errors import CnnInputError, printable
from .files import write_file


def _draw(args) -> int:
    from .draw import dot, write
    from .plan import plan
    net = api.parse(Path(args.file))
    text = dot(net, plan(net, args.fuse_of(args)))
    if args.output in (None, "-"):
        print(text, end="")
        return 0
    try:
        print(f"wrote {printable(write(text, args.output))}", file=sys.stderr)
    except OSError as err:
        raise CnnInputError(f"cannot write {args.output}: {err.strerror}") from None
    return 0


def _fmt(args) -> int:
    from .fmt import format_source
    changed = []
    for name in args.files:
        path = Path(name)
        text, _ = api.read_source(path)  # a regular file, bounded: a FIFO or /dev/zero is refused unread
        text = text.replace("\r\n", "\n")  # (CRLF line ends are the same layout; fmt writes LF)
        formatted = format_source(text, str(path))
        if formatted != text:
            changed.append(path)
            if not args.check:
                _rewrite(path, formatted)
    verb = "would reformat" if args.check else "reformatted"
    for path in changed:
        print(f"{verb} {printable(path)}", file=sys.stderr)
    print(f"{len(changed)} of {len(args.files)} file(s) {verb}", file=sys.stderr)
    return 1 if args.check and changed else 0


def _rewrite(path: Path, text: str) -> None:
    """The file at path (through its links: a linked source stays linked) replaced by text as a
    new file renamed over it: a failed write (a full disk, a file-size limit) leaves it whole."""
    try:
        write_file(Path(os.path.realpath(path)), text)
    except OSError as err:
        raise CnnInputError(f"cannot write {path}: {err.strerror or err}; it is unchanged") from None


def _lsp(args) -> int:
    try:
        from .lsp import main
    except ImportError as err:
        raise CnnInputError(f"cnndsl lsp needs pygls ({err}): pip install 'cnndsl[editor]', or pip install "
                            "pygls") from None
    main()
    return 0


def add_commands(sub, fusion_options, fuse_of) -> None:
    """Register draw, fmt and lsp on the subparsers `sub`; fusion_options adds --no-fuse and
    --block-fusion, fuse_of reads them (cli.py's)."""
    dr = sub.add_parser("draw", help="draw the network: layers, shapes, branches and fused groups",
                        description="Write the network as a graph: each layer with its output shape, edges as the "
                                    "data flows (branches, residuals), each fused group of the plan as a cluster. "
                                    "DOT text always; .svg and .png through Graphviz's dot, if it is installed.")
    dr.add_argument("file", help="the .cnn file")
    dr.add_argument("-o", "--output", help="net.dot, net.svg or net.png (default: DOT on standard output)")
    fusion_options(dr)
    dr.set_defaults(run=_draw, fuse_of=fuse_of)
    fm = sub.add_parser("fmt", help="lay out .cnn files canonically (indentation, spacing, aligned comments)",
                        description="Rewrite .cnn files in the canonical layout: four spaces per block level, one "
                                    "space between words, comments kept and aligned. The network each file "
                                    "describes is checked to be unchanged; a file that does not compile is not "
                                    "touched.")
    fm.add_argument("files", nargs="+", metavar="FILE", help="the .cnn files")
    fm.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not canonical")
    fm.set_defaults(run=_fmt)
    ls = sub.add_parser("lsp", help="run the language server for editors (stdio)",
                        description="Run a Language Server Protocol server on standard input and output: the "
                                    "compiler's errors as you type, hover (shape, parameters, fused group), go to a "
                                    "block's definition, completion and the outline. Editors start it themselves "
                                    "(editors/vscode/). Needs pygls: pip install 'cnndsl[editor]'.")
    ls.set_defaults(run=_lsp)
