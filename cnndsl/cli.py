"""The `cnndsl` command line: `check` (summary or --json) and `emit` (a standalone
module). Every CnnError is printed as its rendered message with exit code 1, never a
traceback."""

import argparse
import json
import sys
from pathlib import Path

from . import api
from .errors import CnnError, CnnInputError


def _check(args) -> int:
    net = api.parse(Path(args.file))
    print(json.dumps(net.to_json(), indent=2) if args.json else net.summary())
    return 0


def _emit(args) -> int:
    from .emit import emit
    text = emit(api.parse(Path(args.file)), fuse=not args.no_fuse)
    if args.output in (None, "-"):
        print(text, end="")
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise CnnInputError(f"cannot write {args.output}: {err.strerror}") from None
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnndsl", description="Compile .cnn model files into fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="parse and shape-check a .cnn file; print its summary",
                           description="Parse and shape-check a .cnn file and print a layer table.")
    check.add_argument("file", help="the .cnn file")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.set_defaults(run=_check)
    em = sub.add_parser("emit", help="write the network's Triton kernels and launch sequence as one Python module",
                        description="Write one standalone Python module (needs only torch and triton) with the "
                                    "Triton kernels and the forward/backward launch sequence of the network.")
    em.add_argument("file", help="the .cnn file")
    em.add_argument("-o", "--output", help="where to write the module (default: standard output)")
    em.add_argument("--no-fuse", action="store_true", help="one kernel per layer")
    em.set_defaults(run=_emit)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CnnError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cnndsl check big.cnn | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
