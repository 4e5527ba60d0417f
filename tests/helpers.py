"""Comparison helpers shared by every test: tolerances that scale with the dtype,
the reduction length and the depth of the computation, on norm-wise relative error."""

import math

import torch

# Unit roundoff of each storage dtype.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tolerance(dtype: torch.dtype, reduction: int = 1, depth: int = 1) -> float:
    """Allowed ||a - b|| / ||b||: storage rounding grows with the depth of the chain of
    rounded results, fp32 accumulation error with sqrt(reduction length)."""
    return 8 * EPS[dtype] * depth + 16 * EPS[torch.float32] * math.sqrt(max(reduction, 1))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype=torch.float32, reduction=1, depth=1, name="tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    tol = tolerance(dtype, reduction, depth)
    err = rel_err(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g} ({dtype}, reduction {reduction}, depth {depth})"
