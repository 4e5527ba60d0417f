"""What every kernel module shares: interpreter detection, dtype and precision
switches for `tl.dot`, autotuning (tiles sized from the problem under the interpreter),
and the launcher checks whose messages carry the numbers."""

import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Heuristics

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton's interpreter has no bf16 arithmetic (its numpy backend lacks the type) and
# computes wrong bf16 dot products, so kernels upcast operands there; on a GPU the dot
# runs in the input dtype on the tensor cores with fp32 accumulation.
_DOT_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_DOT_DTYPE)


def dot_dtype(dtype: torch.dtype):
    """The tl dtype that `tl.dot` operands are cast to for inputs of `dtype`."""
    return tl.float32 if INTERPRET else _DOT_DTYPE[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for `tl.dot`: fp32 inputs use TF32 only when torch allows it."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def autotune(configs, key, interpret, **kwargs):
    """`triton.autotune` over `configs` on a GPU. The interpreter cannot benchmark, and it
    pays per operation rather than per element, so there each tile is sized from the
    problem instead: `interpret` maps a constexpr to (dimension, lo, hi), the dimension an
    argument name or a function of the named arguments, and the tile is the largest power
    of two <= the dimension, clamped to [lo, hi]. Rounding down leaves a second, masked
    tile wherever a dimension is not a power of two, so small tests still cover the
    edges; other constexprs of the first config (e.g. GROUP_M) are kept. Either way the
    kernel object's `best_config` is the config of its last launch."""
    if not INTERPRET:
        decorate = triton.autotune(configs=configs, key=key, **kwargs)
    else:
        sizes = {name: (lambda args, d=dim, lo=lo, hi=hi: _tile(d(args) if callable(d) else args[d], lo, hi))
                 for name, (dim, lo, hi) in interpret.items()}
        fixed = {k: (lambda args, v=v: v) for k, v in configs[0].kwargs.items() if k not in interpret}
        decorate = lambda fn: _Sized(fn, fn.arg_names, {**fixed, **sizes})

    def apply(fn):
        tuner = decorate(fn)
        tuner.gpu_configs = list(configs)  # what the GPU tunes over, for the Hopper compile test
        return tuner
    return apply


class _Sized(Heuristics):
    """triton.heuristics that also remembers its last launch's tiles, as Autotuner does."""

    def run(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        self.best_config = triton.Config({k: size(named) for k, size in self.values.items()})
        return self.fn.run(*args, **kwargs, **self.best_config.kwargs)


def _tile(dim: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(int(dim), 1).bit_length() - 1))


# Row-strided kernels (a channel slice: a concat's rows, read or written where they lie): BLOCK_P rows
# x BLOCK_C channels per program.
ROW_CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
               for p, c, w in ((256, 16, 4), (128, 32, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8))]


def prune_rows(configs, named_args, **kwargs):
    """Channel blocks no wider than the slice (but at least 16: 16-byte rows of bf16)."""
    c = max(16, triton.next_power_of_2(named_args["cols"]))
    return [cf for cf in configs if cf.kwargs["BLOCK_C"] <= c] or configs[:1]


# Elementwise kernels: one BLOCK of contiguous elements per program.
ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


def elementwise_tiles(dim="n"):
    """`interpret` sizes of an elementwise kernel whose element count is argument `dim`."""
    return {"BLOCK": (dim, 16, 1 << 16)}


def gemm_config(block_m: int, block_n: int, block_k: int, stages: int, warps: int, **meta) -> triton.Config:
    """An autotune config of a GEMM-shaped kernel's tile sizes and pipelining (plus `meta`)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **meta},
                         num_stages=stages, num_warps=warps)


# The most shared memory one block may use on sm_90 (H100/H200), in bytes.
SMEM_LIMIT = 232_448


def fits_shared_memory(config: triton.Config, element_size: int) -> bool:
    """Whether a GEMM config's pipelined A and B tiles fit one block's shared memory."""
    k = config.kwargs
    return (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * element_size * config.num_stages <= SMEM_LIMIT


@triton.jit
def nan_max(a, b):
    """max(a, b), NaN when either is, as torch's max, max pooling and relu (tl.maximum and tl.max
    lower to a max that returns the other operand of a NaN); `tl.reduce(x, axis, nan_max)`
    is the NaN-propagating tl.max."""
    return tl.where((a > b) | (a != a), a, b)  # noqa: PLR0124 - a != a: a is NaN


# The torch.library namespace of cnndsl's custom ops (`cnndsl emit` gives each emitted module its own).
NAMESPACE = "cnndsl"


def define(name: str, schema: str, impl, fake, backward=None, setup=None, mutates=()):
    """The custom op NAMESPACE::name: `impl` launches the kernels (on real tensors), `fake` gives
    its outputs' shapes and dtypes (what torch.compile and torch.export trace with), `backward`
    and `setup` (torch.library.register_autograd's) its gradient, itself through custom ops.
    A custom op is opaque to the compiler, so a traced graph calls the kernels as they are.
    Defined once per process: a module imported again (an emitted one) reuses it."""
    namespace = getattr(torch.ops, NAMESPACE)
    if hasattr(namespace, name):
        return getattr(namespace, name).default
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=mutates, schema=schema)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup)
    return op


def absent(like: torch.Tensor, dtype=None) -> torch.Tensor:
    """What a custom op returns for an output it does not have (it cannot return None)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


def present(t: torch.Tensor | None) -> torch.Tensor | None:
    """None for an `absent` output."""
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


def check(cond: bool, message: str) -> None:
    """Raise ValueError(message) unless cond: launchers validate before they launch."""
    if not cond:
        raise ValueError(message)


def check_like(t, name: str, like: torch.Tensor) -> None:
    """Validate a launcher argument read at another's elements: a contiguous tensor of like's
    shape, dtype and device."""
    check_tensor(t, name, ndim=like.dim(), dtype=like.dtype, device=like.device)
    check(tuple(t.shape) == tuple(like.shape),
          f"{name}: expected a contiguous tensor of shape {tuple(like.shape)}, got {tuple(t.shape)}")


def check_out(out, shape, like: torch.Tensor) -> torch.Tensor:
    """Validate `out`, where a launcher writes its (N, ..., C) result in like's dtype and device: a
    tensor of that shape whose channels are contiguous and whose pixels are evenly strided (a
    channel slice of a concatenation's NHWC output, kernels/concat.py) -> out."""
    check(isinstance(out, torch.Tensor), f"out: expected a torch.Tensor, got {type(out).__name__}")
    check(tuple(out.shape) == tuple(shape), f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    check(out.dtype == like.dtype and out.device == like.device,
          f"out: expected {like.dtype} on {like.device}, got {out.dtype} on {out.device}")
    check(even_rows(out), f"out: expected contiguous channels and evenly strided pixels, got strides {out.stride()}")
    return out


def even_rows(t: torch.Tensor) -> bool:
    """Whether t (..., C) is rows of contiguous channels at one stride (>= C) from the next: a
    contiguous tensor, or a channel slice of one (a concat's output, kernels/concat.py). The
    strides of size-1 dimensions do not count (torch gives them any value: a gradient of an
    (N, C, 1, 1) output permuted to NHWC is contiguous with strides (C, 1, 1, 1))."""
    if t.is_contiguous():
        return True
    if t.dim() < 2 or (t.stride(-1) != 1 and t.shape[-1] > 1):
        return False
    rows, span = row_stride(t), 1
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] > 1 and t.stride(i) != rows * span:
            return False
        span *= t.shape[i]
    return rows >= t.shape[-1]


def row_stride(t: torch.Tensor) -> int:
    """The elements from one row (pixel) of t to the next, for a t that even_rows accepts: C for a
    contiguous t, else the stride of its innermost pixel dimension of more than one."""
    if t.is_contiguous():
        return t.shape[-1]
    return next((t.stride(i) for i in range(t.dim() - 2, -1, -1) if t.shape[i] > 1), t.shape[-1])


def extent(t: torch.Tensor) -> int:
    """The elements t's rows span (its own, a channel slice's: the rows of the tensor it is cut from)."""
    return t.numel() // max(t.shape[-1], 1) * row_stride(t) if t.dim() else t.numel()


def check_tensor(t, name: str, ndim: int | None = None, dtype=None, device=None, rows: bool = False) -> None:
    """Validate a launcher argument: a contiguous floating tensor of the expected rank,
    dtype and device, with the expected and actual values in the message; rows=True: or a
    channel slice of one (even_rows), for a launcher that passes its pixel stride."""
    check(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    check(t.dtype in SUPPORTED_DTYPES,
          f"{name}: dtype {t.dtype} is not supported (float32, float16 or bfloat16)")
    if dtype is not None:
        check(t.dtype == dtype, f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device is not None:
        check(t.device == device, f"{name}: expected device {device}, got {t.device}")
    if rows:
        check(even_rows(t), f"{name}: expected contiguous channels and evenly strided pixels, got strides "
                            f"{t.stride()}")
    else:
        check(t.is_contiguous(), f"{name}: expected a contiguous tensor, got strides {t.stride()}")
