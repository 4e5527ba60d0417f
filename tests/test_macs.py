"""Multiply-adds (the summary's per-layer and total `macs`, per sample) against PyTorch's own
count: torch.utils.flop_counter.FlopCounterMode over the reference backend's forward, whose
conv and linear flops are 2 per multiply-add. The model runs on meta tensors (shapes only,
no arithmetic), so vgg16 and resnet50 at 224x224 cost nothing. Grouped and depthwise convs
(groups 2, 4, C and C with a channel multiplier, with stride, dilation and padding) are the
cases where a count that forgets `// groups` goes wrong."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cnndsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BATCH = 3

GROUPED = {  # input, the conv under test; a dense head follows
    "groups2": ("4x9x9", "conv 8 3 groups=2"),
    "groups4-stride-dilation": ("8x13x11", "conv 12 3x2 stride=2x1 dilation=1x2 pad=1x0 groups=4 bias=false"),
    "depthwise": ("6x11x11", "conv 6 3 stride=2 pad=1 groups=6"),
    "depthwise-multiplier": ("5x10x12", "conv 15 3x5 dilation=2 pad=same groups=5"),
    "depthwise-1x1": ("7x4x4", "conv 7 1 groups=7 bias=false"),
}


def torch_counts(net) -> dict[str, int]:
    """Multiply-adds per sample of each conv and linear module, by its qualified name, and of
    the whole forward ("Global"), as FlopCounterMode counts them for a batch of BATCH."""
    with torch.device("meta"):
        model = cnndsl.compile(net, backend="torch", device="meta").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(BATCH, *net.input_shape, device="meta"))
    counts = {}
    for name, ops in counter.get_flop_counts().items():
        flops = sum(ops.values())
        assert flops % (2 * BATCH) == 0, f"{name}: {flops} flops is not 2 x batch {BATCH} x a count"
        counts[name.removeprefix("ReferenceModule.")] = flops // (2 * BATCH)
    return counts


def check_macs(net):
    summary = net.to_json()
    theirs = torch_counts(net)
    ours = {layer["name"]: layer["macs"] for layer in summary["layers"]}
    for name, n in ours.items():
        if n or name in theirs:
            assert theirs.get(name) == n, f"{net.name}: {name}: summary {n:,} multiply-adds, torch {theirs.get(name)}"
    assert summary["macs"] == theirs["Global"], \
        f"{net.name}: summary total {summary['macs']:,} multiply-adds, torch {theirs['Global']:,}"
    assert summary["macs"] > 0


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.cnn")), ids=lambda p: p.stem)
def test_example_macs_match_torch(path):
    check_macs(cnndsl.parse(path))


@pytest.mark.parametrize("shape,conv", GROUPED.values(), ids=GROUPED.keys())
def test_grouped_conv_macs_match_torch(shape, conv):
    net = cnndsl.parse(f"network g\ninput {shape}\n{conv}\nrelu\nflatten\ndense 3\n")
    assert net.nodes[1].attrs.groups > 1
    check_macs(net)
