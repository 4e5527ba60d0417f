"""The `cnndsl` command line: check (summary or --json). Every CnnError is printed
as its rendered message with exit code 1, never a traceback."""

import argparse
import json
import sys

from . import api
from .errors import CnnError


def _check(args) -> int:
    net = api.parse(args.file)
    print(json.dumps(net.to_json(), indent=2) if args.json else net.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnndsl", description="Compile .cnn model files into fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("check", help="parse and shape-check a .cnn file; print its summary",
                           description="Parse and shape-check a .cnn file and print a layer table.")
    check.add_argument("file", help="the .cnn file")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    check.set_defaults(run=_check)
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


if __name__ == "__main__":
    sys.exit(main())
