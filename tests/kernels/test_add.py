"""The add kernel against torch, every dtype, odd sizes, and its launcher checks."""

import pytest
import torch

from cnndsl.kernels.add import add_forward

from helpers import DTYPES, assert_close


@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 5, 3, 17), (4099,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add(shape, dtype):
    a, b = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    assert_close(add_forward(a, b).float(), a.float() + b.float(), dtype, name="a + b")


def test_add_rejects_mismatch():
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        add_forward(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="expected dtype"):
        add_forward(torch.zeros(3), torch.zeros(3, dtype=torch.float16))
