"""Triton kernels: each module holds private kernels and their launchers.

Importing this package (the first triton-backend compile does) decides where kernels run:
with no CUDA device it sets TRITON_INTERPRET=1 so that the same kernels run on CPU tensors in
Triton's interpreter, and says so once (cnndsl.InterpreterWarning). Triton reads the variable
when `triton.jit` wraps a function, its own library functions included, so a Triton imported
earlier (torch.optim imports it) is dropped from sys.modules (all but its compiled extension)
and imported afresh: without a GPU it had nothing to run on.

In the interpreter, Triton's int32 overflow checks follow TRITON_DEBUG as on a GPU: the
interpreter computes a check for every integer add, sub and mul (an int64 copy and two
compares each: half its time in a conv kernel) and then drops it, its device_assert asserting
only under its own debug flag, which TRITON_DEBUG does not set. Here both are on under
TRITON_DEBUG=1 and off otherwise."""

import dataclasses
import os
import sys
import warnings

import torch

from ..errors import InterpreterWarning


def _user_level() -> int:
    """warnings.warn's stacklevel, for its caller, of the first frame outside cnndsl and importlib: the
    user's line that compiled the model. (The kernels are a directory of their own in a source
    checkout; warn does not count the frames of importlib's bootstrap, so neither does this.)"""
    ours = (os.path.dirname(__file__), os.path.dirname(sys.modules[InterpreterWarning.__module__].__file__))
    internal = lambda f: "importlib" in f.f_code.co_filename and "_bootstrap" in f.f_code.co_filename
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(ours) or "importlib" in
                                        frame.f_code.co_filename):
        frame = frame.f_back
        level += not internal(frame)
    return level


if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [n for n in sys.modules if (n == "triton" or n.startswith("triton.")) and not n.startswith("triton._C")]:
        del sys.modules[name]
    warnings.warn("cnndsl: no CUDA device found; Triton kernels run in Triton's interpreter on the CPU "
                  "(TRITON_INTERPRET=1), correct but slow", InterpreterWarning, stacklevel=_user_level())
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    from triton.runtime import interpreter

    interpreter.interpreter_builder.options = dataclasses.replace(
        interpreter.interpreter_builder.options, debug=triton.knobs.runtime.debug,
        sanitize_overflow=triton.knobs.runtime.debug)
