"""The kernel tests' int32 overflow checks (conftest.py) are live: an overflowing multiply fails."""

import pytest
import torch

import cnndsl.kernels  # noqa: F401  (first: picks Triton's interpreter before triton is imported)

# isort: split
import triton
import triton.language as tl
from triton.runtime import interpreter


@triton.jit
def _square_kernel(x_ptr):  # x: (2,) int32
    offs = tl.arange(0, 2)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, x * x)


def test_an_int32_overflow_fails_a_kernel_test():
    assert interpreter.interpreter_builder.options.debug, "tests/kernels/conftest.py did not turn the checks on"
    with pytest.raises(Exception, match="int32 overflow detected for operation mul"):
        _square_kernel[(1,)](torch.tensor([65536, 3], dtype=torch.int32))
