"""What crosses the line between the compiler and the kernels: the typed, frozen records that
codegen writes into each launch step, the runtime hands to a runner of kernels/, the kernels'
launchers check and `cnndsl emit` writes out as literals (their repr is Python that rebuilds
them); and what a fused kernel can hold, which the planner must respect. Plain Python: no
torch, no triton, nothing from the rest of cnndsl, so that the front end and an emitted
module can both use it."""

import ast
import functools
from dataclasses import dataclass, field

Pair = tuple[int, int]

# What one fused kernel holds: the taps of a pooling window in a conv tile (rows per pooled
# pixel, rounded up to a power of two), and the classes of a softmax in a dense tile's columns.
MAX_POOL_TAPS = 16
MAX_SOFTMAX_UNITS = 1024
# A conv kernel's taps on each axis: the conv kernels keep each row's in-bounds taps as the bits
# of an int32, so that the K loop tests two bits instead of four bounds.
MAX_CONV_TAPS = 31


@dataclass(frozen=True)
class Machine:
    """What the weight gradient's split of its rows depends on (and so the bytes its fp32 partials
    move): the GPU's SM count; the rows a split holds are a multiple of `grain`, rounded to a power
    of two with `pow2` (Triton's interpreter, which sizes one row block to a split)."""

    sms: int = 132  # an H100 SXM's
    grain: int = 256
    pow2: bool = False


H100 = Machine()
INTERPRETER = Machine(2, 32, True)


# Channels per group that a conv's GEMM reduces over at least: fewer are padded with zeros, so that
# every tile load is a 16-byte vector (kernels/conv_geometry.py, kernels/conv_backward.py).
MIN_GEMM_K = 16


def weight_grad_tiles(k: int, groups: int, cin_g: int, taps: int) -> tuple[int, int]:
    """(width, tiles) of a conv weight gradient: the input channels a tap's tile covers per group
    (cin_g, padded to MIN_GEMM_K unless depthwise) and its programs a split (64-wide tiles)."""
    cdiv = lambda a, b: -(-a // b)
    cout_g = k // groups
    if cin_g == 1 and cout_g == 1:  # depthwise
        return 1, cdiv(k, 64) * taps
    width = max(cin_g, MIN_GEMM_K)
    return width, groups * taps * cdiv(cout_g, 64) * cdiv(width, 64)


def stride_phases(size, k, stride, pad, dil, transposed):
    """Per stride phase of one dim, the kernel's (P0, count, DST_S, SRC_S, SRC_O, R0, RSTEP, taps,
    D0, D_STEP): forward, one phase reading x[i*stride - pad + r*dil]; for the input gradient,
    dx pixels a, a + stride, ... are reached by the taps r with stride | a + pad - r*dil, reading
    dy[i + (a + pad - r*dil) / stride], so consecutive taps of a phase shift by -rstep*dil/stride."""
    if not transposed:
        return [(0, size, 1, stride, -pad, 0, 1, k, 0, dil)]
    phases = []
    for a in range(stride):
        taps = [r for r in range(k) if (a + pad - r * dil) % stride == 0]
        r0, step = (taps[0], taps[1] - taps[0] if len(taps) > 1 else 1) if taps else (0, 1)
        phases.append((a, max(0, -(-(size - a) // stride)), stride, 1, 0, r0, step, len(taps),
                       (a + pad - r0 * dil) // stride, -(step * dil) // stride))
    return phases


def weight_grad_split(rows: int, tiles: int, machine: Machine) -> tuple[int, int]:
    """(splits, rows per split) of the conv weight gradient's N*OH*OW rows for `tiles` programs a
    split: about four waves of programs, at least 4 grains of rows a split."""
    cdiv = lambda a, b: -(-a // b)
    split = max(1, min(cdiv(4 * machine.sms, tiles), cdiv(rows, 4 * machine.grain)))
    chunk = cdiv(cdiv(rows, split), machine.grain) * machine.grain
    if machine.pow2:
        chunk = 1 << (chunk - 1).bit_length()
    return cdiv(rows, chunk), chunk


@dataclass(frozen=True)
class Act:
    """An activation stage: kind "none" (the identity: the stage is skipped) or an activation
    name of kernels/activation.py; slope is leaky_relu's."""

    kind: str = "none"
    slope: float = 0.01

    @property
    def grad_from_output(self) -> bool:
        """Whether act'(x) follows exactly from y = act(x), in any dtype: y's sign says where
        relu and leaky_relu (a positive slope) pass the gradient; a backward needs only y."""
        return self.kind in ("none", "relu") or (self.kind == "leaky_relu" and self.slope > 0)


NO_ACT = Act()


@dataclass(frozen=True)
class Window:
    """A pooling window over (H, W) with PyTorch's options: floor mode unless `ceil_mode` (a last,
    partial window that starts inside the input or its left padding); "avg" divides by the taps in
    the padded input (count_include_pad, as torch clips a ceil-mode window at the padding's end)
    or, without count_include_pad, by the taps inside the input (max pooling keeps it True)."""

    mode: str  # "max" or "avg"
    kernel: Pair
    stride: Pair
    padding: Pair
    out_hw: Pair  # the pooled output's (H, W)
    ceil_mode: bool = False
    count_include_pad: bool = True

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def overlaps(self) -> bool:
        return self.stride[0] < self.kernel[0] or self.stride[1] < self.kernel[1]

    def past_padding(self, in_hw) -> bool:
        """Whether ceil_mode gives windows that floor mode drops over an (H, W) = in_hw input: the
        last window on an axis runs past the padded input's end."""
        return self.ceil_mode and tuple(self.out_hw) != tuple(
            window_out(i, k, s, 2 * p) for i, k, s, p in zip(in_hw, self.kernel, self.stride, self.padding))

    def uneven(self, in_hw) -> bool:
        """Whether an average divides some window by fewer than its taps over an (H, W) = in_hw
        input: a window past the padded input (ceil_mode) or, without count_include_pad, one over
        the padding. Never for max pooling; the fused epilogues divide every window by its taps."""
        return self.mode == "avg" and (self.past_padding(in_hw) or
                                       (not self.count_include_pad and any(self.padding)))


def window_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil: bool = False) -> int:
    """The output size of a window slid over `size` with `padding` in all (both sides together):
    floor((size + padding - dilation (kernel - 1) - 1) / stride) + 1, 0 where it does not fit.
    With `ceil`, PyTorch's ceil mode: rounded up, less the last window if it would start at or
    past the input's end, (out - 1) stride >= size + padding // 2 (the left padding). The one
    formula of the front end's shape rules and the kernels' checks."""
    span = size + padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + padding // 2:
        out -= 1
    return max(0, out)


@dataclass(frozen=True)
class ConvGeometry:
    stride: Pair
    padding: Pair  # top/left; more at the bottom/right falls out of out_hw (PyTorch's `same`)
    dilation: Pair
    groups: int
    out_hw: Pair  # the conv output's (H, W)


@dataclass(frozen=True)
class BatchNormSpec:
    eps: float
    momentum: float  # the running statistics' update weight


@dataclass(frozen=True)
class ConvBlock:
    """A conv block, conv -> [batch norm] -> act1 -> [+ shortcut] -> act2 -> [pool]; a lone conv
    has every other stage off (kernels/conv_block.py). Cross-layer fusion (plan.py): a block with
    `defer` hands its z, scale and shift to the next conv instead of writing its output when it
    trains, and that conv's block, with `prologue` (its producer's act1), normalises and
    activates its input as it loads it. A block with `dz_on_load` (batch norm and act1 only, or
    batch norm, the shortcut and act2) has its conv's gradient kernels apply batch norm's and act1's
    backward as they load dy (da, with a shortcut), so dz is not written. A block with `gemm_pool`
    (conv, an act1 whose gradient follows from its output, a pool; nothing else) pools in its GEMM's
    epilogue in training too, writing y and the argmax but no z; its backward gathers dy through
    the argmax and act1's gradient from y, in a pass that writes dz or, with `dz_on_load` too, as
    its conv's gradient kernels load dy, y and the argmax."""

    geometry: ConvGeometry
    bn: BatchNormSpec | None = None
    act1: Act = NO_ACT
    residual: bool = False
    act2: Act = NO_ACT
    pool: Window | None = None
    prologue: Act | None = None
    defer: bool = False
    dz_on_load: bool = False
    gemm_pool: bool = False

    @property
    def writes_z(self) -> bool:
        """Whether its training forward writes z, the conv's output, for its backward: not where a
        reader applies the epilogue (defer) or the GEMM pools and backward reads y (gemm_pool)."""
        return self.epilogue and not self.defer and not self.gemm_pool

    @property
    def epilogue(self) -> bool:
        """Whether any stage after the conv runs."""
        return (self.bn is not None or self.residual or self.pool is not None
                or self.act1 != NO_ACT or self.act2 != NO_ACT)


@dataclass(frozen=True)
class Flatten:
    permute: bool  # (N, H, W, C) -> (N, C*H*W) in C, H, W order; False where H = W = 1 (a view)


@dataclass(frozen=True)
class DenseBlock:
    """A dense block, [flatten] -> dense -> act -> [dropout] -> [softmax] (kernels/dense.py)."""

    flatten: Flatten | None = None  # a (N, H, W, C) input flattened first
    act: Act = NO_ACT
    p: float = 0.0  # dropout's
    softmax: bool = False


@dataclass(frozen=True)
class NormAct:
    """Batch norm and the activation after it (act1, as a conv block's), with no conv before them
    (kernels/norm_act.py); with `defer` (cross-layer fusion, plan.py) its training pass hands x,
    scale and shift to the conv that reads its output, which normalises and activates as it loads."""

    bn: BatchNormSpec
    act1: Act
    defer: bool = False


@dataclass(frozen=True)
class Dropout:
    p: float


@dataclass(frozen=True)
class StochasticDepth:
    p: float


@dataclass(frozen=True)
class Concat:
    """A concatenation along channels (kernels/concat.py): the channels of each input, in order,
    which inputs their producers wrote straight into the output (zero-copy: plan.py's Group.into),
    and which of the others take their gradient as a view of their slice (slabs.SUMMED)."""

    channels: tuple[int, ...]
    in_place: tuple[bool, ...] = ()
    grad_view: tuple[bool, ...] = ()


@dataclass(frozen=True)
class Step:
    """One launch step of a plan: the group it runs, the runner that runs it (a function of
    kernels/, by name), the values it reads and writes (node ids; None for an absent shortcut),
    the parameters and buffers it takes as (layer name, attribute) in the runner's order (None
    where absent), and its spec; `text` is the spec's repr, what the runner and the custom ops
    it calls take (decode rebuilds the spec)."""

    group: int
    name: str  # the layer whose output it writes
    runner: str
    inputs: tuple[int | None, ...]
    output: int
    params: tuple[tuple[str, str] | None, ...]
    spec: object = None
    # (the concat's output id, the first channel, the concat's channels, whether its backward reads its
    # slice of the concat's gradient in place): the step writes its output there, into the slab the
    # executor keeps for that concat (the concat's own step: offset 0)
    into: tuple[int, int, int, bool] | None = None
    # where a value forks to a conv and a shortcut, or to a deferring batch norm and a concat (cross-layer
    # fusion): the first's step returns its input's gradient token (token), and the other's step sends its
    # input `redirects`' gradient there (kernels/add.py's redirect), which the first's backward adds (the
    # conv's input gradient, the batch norm's bn_act_bwd pass): no pass sums the two
    token: bool = False
    redirects: int | None = None
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "text", repr(self.spec))


_SPECS = {c.__name__: c for c in (Act, Window, ConvGeometry, BatchNormSpec, ConvBlock, Flatten, DenseBlock, NormAct,
                                     Dropout, StochasticDepth, Concat)}


@functools.lru_cache(maxsize=4096)
def decode(text: str):
    """The spec a Step's text writes (its repr), read as data: spec classes called with keyword
    arguments, tuples, numbers, strings, booleans and None; nothing is evaluated."""
    return _literal(ast.parse(text, mode="eval").body)


def _literal(node):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SPECS and not node.args:
        return _SPECS[node.func.id](**{k.arg: _literal(k.value) for k in node.keywords})
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int, float, str, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    raise ValueError(f"not a spec: {ast.dump(node)[:200]}")
