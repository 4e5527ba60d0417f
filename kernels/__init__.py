"""Triton kernels: each module holds private kernels and their launchers.

Importing this package first decides where kernels run: with no CUDA device it sets
TRITON_INTERPRET=1 (before Triton is imported) so the same kernels run on CPU
tensors in Triton's interpreter, and says so once."""

import os
import sys
import warnings

import torch


class InterpreterWarning(UserWarning):
    """Kernels run in Triton's interpreter: correct, but orders of magnitude slower."""


if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton" in sys.modules:
        raise ImportError("cnndsl: no CUDA device, and Triton was imported before cnndsl could set "
                          "TRITON_INTERPRET=1; set it yourself or import cnndsl first")
    os.environ["TRITON_INTERPRET"] = "1"
    warnings.warn("cnndsl: no CUDA device found; Triton kernels run in Triton's interpreter on the CPU "
                  "(TRITON_INTERPRET=1), correct but slow", InterpreterWarning, stacklevel=2)
