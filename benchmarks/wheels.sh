#!/bin/sh
# Build the wheels the GPU machine needs into .whl/ (git-ignored): cnndsl from this working
# tree (its kernels and grammar included), and lark, which the machine's image lacks. Run it
# right before each device call: the wheel is a copy of the tree as it is now, and
# gpu_check.py's env stage warns when the installed copy differs from the tree it runs in.
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl
python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "lark>=1.1.9,<2"
ls .whl
