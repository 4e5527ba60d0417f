"""The front end on valid input: every grammar construct, checked on the AST
(`cnndsl.parse.parse_program`) and on the IR (`cnndsl.parse(text)` -> Network).
Output shapes are cross-checked against torch.nn.functional on CPU (floor and ceil mode)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cnndsl
from cnndsl import ast
from cnndsl.ir import Op
from cnndsl.parse import parse_program

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))


def header(shape="3x32x32", name="t"):
    return f"network {name}\ninput {shape}\n"


def net_of(body, shape="3x32x32"):
    return cnndsl.parse(header(shape) + body)


def names(net):
    return [n.name for n in net.nodes]


def node(net, name):
    found = [n for n in net.nodes if n.name == name]
    assert len(found) == 1, f"{name!r} in {names(net)}"
    return found[0]


def layers(net):
    """(name, keyword, shape) of every node after the input."""
    return [(n.name, n.keyword, n.shape) for n in net.nodes[1:]]


def stmt(body, shape="1x8x8"):
    """The AST of the first statement of `body`."""
    return parse_program(header(shape) + body).stmts[0]


def value(expr):
    """An AST expression as plain data, without spans."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.Dims):
        return ("dims", expr.values)
    if isinstance(expr, ast.Ref):
        return ("ref", expr.name)
    assert isinstance(expr, ast.BinOp), expr
    return (expr.op, value(expr.left), value(expr.right))


def args(layer):
    return [(a.name, value(a.value)) for a in layer.args]


# --- header, comments, layout -------------------------------------------------------------------


def test_header_on_the_ast():
    prog = parse_program("network my_net\ninput 3x224x200\nrelu\n")
    assert prog.name == "my_net"
    assert prog.input.values == (3, 224, 200)
    assert (prog.input.span.line, prog.input.span.column) == (2, 7)
    assert prog.input.span.end_column == 7 + len("3x224x200")
    assert len(prog.stmts) == 1 and isinstance(prog.stmts[0], ast.Layer)


def test_header_on_the_ir():
    net = cnndsl.parse("network my_net\ninput 3x224x200\nrelu\n")
    assert isinstance(net, cnndsl.Network)
    assert net.name == "my_net"
    assert net.input_shape == (3, 224, 200)
    first = net.nodes[0]
    assert (first.op, first.name, first.shape, first.inputs) == (Op.INPUT, "input", (3, 224, 200), ())
    assert net.output_shape == (3, 224, 200)


def test_comments_and_blank_lines_everywhere():
    src = ("# a comment before the header\n"
           "\n"
           "   # an indented one\n"
           "network c   # trailing comment on the header\n"
           "\n"
           "# between the header lines\n"
           "input 3x8x8 # trailing\n"
           "\n\n"
           "conv 4 3x3   # 4x6x6\n"
           "      # indented comment\n"
           "\t\trelu\t# tabs\n"
           "\n"
           "# a comment on the last line, no newline")
    net = cnndsl.parse(src)
    assert net.name == "c"
    assert layers(net) == [("conv1", "conv", (4, 6, 6)), ("relu1", "relu", (4, 6, 6))]
    # the spans still count the comment lines
    assert node(net, "conv1").span.line == 10
    assert node(net, "relu1").span.line == 12
    assert node(net, "relu1").span.column == 3


def test_hash_inside_a_statement_starts_a_comment():
    net = net_of("conv 4 3 #stride=2 is commented out\n")
    assert node(net, "conv1").attrs.stride == (1, 1)


def test_crlf_line_endings_give_the_same_network():
    src = ("# comment\nnetwork crlf\ninput 3x16x16\nblock b(c, s=1) {\n  conv c 3 stride=s pad=1\n  relu\n}\n"
           "b(8) x2\nresidual {\n  conv 8 3 pad=same\n} shortcut {\n  conv 8 1\n}\nflatten\ndense 10\nsoftmax\n")
    lf = cnndsl.parse(src)
    crlf = cnndsl.parse(src.replace("\n", "\r\n"))
    assert crlf.nodes == lf.nodes  # same ops, attributes, shapes, names and spans
    assert layers(crlf)[-1] == ("softmax1", "softmax", (10,))


@pytest.mark.parametrize("ending", ["relu", "relu\n", "relu   ", "relu # c", "relu\n\n\n", "relu\r\n", "relu x2"])
def test_no_trailing_newline_needed(ending):
    net = cnndsl.parse("network a\ninput 1x4x4\n" + ending)
    assert net.nodes[1].keyword == "relu"


def test_backslash_continues_a_line():
    net = net_of("conv 4 3x3 \\\n     stride=2 \\\n     pad=1\nrelu\n", "3x8x8")
    conv = node(net, "conv1")
    assert (conv.attrs.stride, conv.attrs.padding, conv.shape) == ((2, 2), (1, 1), (4, 4, 4))
    assert node(net, "relu1").span.line == 6


def test_spaces_around_equals_and_commas():
    a = net_of("conv(4 , 3x3 , stride = 2 , pad = 1)\n", "3x8x8")
    b = net_of("conv 4 3x3 stride=2 pad=1\n", "3x8x8")
    assert [n.attrs for n in a.nodes] == [n.attrs for n in b.nodes]


def test_keywords_may_come_before_positionals():
    a = net_of("conv stride=2 8 3\n", "1x8x8")
    assert node(a, "conv1").attrs == node(net_of("conv 8 3 stride=2\n", "1x8x8"), "conv1").attrs


# --- values on the AST ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected, kind", [
    ("64", 64, int),
    ("0", 0, int),
    ("0.1", 0.1, float),
    ("1e-5", 1e-5, float),
    ("1E3", 1000.0, float),
    (".5", 0.5, float),
    ("5.", 5.0, float),
    ("2.5e+2", 250.0, float),
])
def test_number_literals(text, expected, kind):
    (arg,) = stmt(f"dropout {text}\n").args
    assert isinstance(arg.value, ast.Number)
    assert arg.value.value == expected and type(arg.value.value) is kind


def test_dims_literals():
    layer = stmt("conv 8 3x5 stride=2x1 pad=0x2\n")
    assert args(layer) == [(None, 8), (None, ("dims", (3, 5))), ("stride", ("dims", (2, 1))),
                           ("pad", ("dims", (0, 2)))]
    dims = layer.args[1].value
    assert (dims.span.line, dims.span.column, dims.span.end_column) == (3, 8, 11)


def test_words_are_refs_on_the_ast():
    layer = stmt("conv 8 3 pad=same bias=false\n")
    assert args(layer)[2:] == [("pad", ("ref", "same")), ("bias", ("ref", "false"))]


def test_arithmetic_precedence_and_associativity():
    block = stmt("block b(c, n) {\n  conv c + 2 * 3 3\n  conv c / 2 + 1 3\n  conv c - n - 1 3\n"
                 "  conv c * 4 / 2 3\n}\n")
    exprs = [value(s.args[0].value) for s in block.body]
    assert exprs == [
        ("+", ("ref", "c"), ("*", 2, 3)),
        ("+", ("/", ("ref", "c"), 2), 1),
        ("-", ("-", ("ref", "c"), ("ref", "n")), 1),
        ("/", ("*", ("ref", "c"), 4), 2),
    ]


def test_paren_and_bare_arguments_give_the_same_ast():
    bare, paren = stmt("conv 8 3x3 stride=2\n"), stmt("conv(8, 3x3, stride=2)\n")
    assert args(bare) == args(paren) == [(None, 8), (None, ("dims", (3, 3))), ("stride", 2)]
    assert stmt("relu()\n").args == stmt("relu\n").args == ()


def test_layer_ast_fields():
    layer = stmt("fc: dense 10 bias=false x3\n")
    assert isinstance(layer, ast.Layer)
    assert (layer.name, layer.label) == ("dense", "fc")
    assert args(layer) == [(None, 10), ("bias", ("ref", "false"))]
    assert value(layer.repeat.count) == 3
    assert (layer.name_span.line, layer.name_span.column, layer.name_span.end_column) == (3, 5, 10)
    keyword = layer.args[1]
    assert (keyword.span.column, keyword.span.end_column) == (14, 24)


@pytest.mark.parametrize("text, count", [
    ("relu x2\n", 2),
    ("relu x 2\n", 2),
    ("relu x   12\n", 12),
    ("relu\tx\t3\n", 3),
    ("relu x n\n", ("ref", "n")),
    ("relu x n - 1\n", ("-", ("ref", "n"), 1)),
    ("relu x n * 2 + 1\n", ("+", ("*", ("ref", "n"), 2), 1)),
    ("conv 8 3 x 3\n", 3),  # `3 x 3` is a repetition, not a kernel
])
def test_repetition_on_the_ast(text, count):
    layer = stmt(text)
    assert layer.repeat is not None and value(layer.repeat.count) == count


def test_no_repetition():
    assert stmt("relu\n").repeat is None
    assert stmt("conv 8 3x3\n").repeat is None  # `3x3` is dims, not `3` then `x3`


def test_residual_ast():
    res = stmt("r: residual {\n  relu\n  conv 1 1\n} shortcut {\n  tanh\n} x2\n")
    assert isinstance(res, ast.Residual)
    assert res.label == "r" and value(res.repeat.count) == 2
    assert [s.name for s in res.body] == ["relu", "conv"]
    assert [s.name for s in res.shortcut] == ["tanh"]
    plain = stmt("residual {\n  relu\n}\n")
    assert plain.shortcut is None and plain.label is None and plain.repeat is None
    assert (plain.span.line, plain.span.end_line) == (3, 5)


def test_block_ast():
    block = stmt("block b(c, k=3, s=c * 2) {\n  conv c k\n\n  # comment\n  relu\n}\n")
    assert isinstance(block, ast.Block)
    assert block.name == "b"
    assert [(p.name, None if p.default is None else value(p.default)) for p in block.params] == [
        ("c", None), ("k", 3), ("s", ("*", ("ref", "c"), 2))]
    assert [s.name for s in block.body] == ["conv", "relu"]
    assert (block.name_span.line, block.name_span.column) == (3, 7)
    for text in ("block b {\n  relu\n}\n", "block b() {\n  relu\n}\n"):
        assert stmt(text).params == ()
    assert stmt("block e {\n}\n").body == ()


# --- every layer keyword and option on the IR -----------------------------------------------------


def conv_shape(in_shape, filters, kernel, stride=1, padding=0, dilation=1, groups=1):
    c, h, w = in_shape
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.zeros(1, c, h, w)
    weight = torch.zeros(filters, c // groups, *k)
    return tuple(F.conv2d(x, weight, None, stride, padding, dilation, groups).shape[1:])


@pytest.mark.parametrize("text, in_shape, attrs, torch_args", [
    ("conv 8 3", (3, 9, 9), {"kernel": (3, 3), "stride": (1, 1), "padding": (0, 0)}, {"kernel": 3}),
    ("conv 8 3x5", (3, 9, 9), {"kernel": (3, 5)}, {"kernel": (3, 5)}),
    ("conv filters=8 kernel=3", (3, 9, 9), {"kernel": (3, 3)}, {"kernel": 3}),
    ("conv 8 3 stride=2", (3, 9, 9), {"stride": (2, 2)}, {"kernel": 3, "stride": 2}),
    ("conv 8 3 stride=2x1", (3, 10, 10), {"stride": (2, 1)}, {"kernel": 3, "stride": (2, 1)}),
    ("conv 8 3 stride=3", (3, 10, 10), {"stride": (3, 3)}, {"kernel": 3, "stride": 3}),  # floor
    ("conv 8 3 pad=1", (3, 9, 9), {"padding": (1, 1)}, {"kernel": 3, "padding": 1}),
    ("conv 8 3x5 pad=1x2", (3, 9, 9), {"padding": (1, 2)}, {"kernel": (3, 5), "padding": (1, 2)}),
    ("conv 8 3 pad=valid", (3, 9, 9), {"padding": (0, 0), "same": False}, {"kernel": 3}),
    ("conv 8 3 pad=0", (3, 9, 9), {"padding": (0, 0)}, {"kernel": 3}),
    ("conv 8 3 dilation=2", (3, 9, 9), {"dilation": (2, 2)}, {"kernel": 3, "dilation": 2}),
    ("conv 8 3 dilation=2x1 pad=2x1", (3, 9, 9), {"dilation": (2, 1)},
     {"kernel": 3, "dilation": (2, 1), "padding": (2, 1)}),
    ("conv 8 3 groups=4", (4, 9, 9), {"groups": 4}, {"kernel": 3, "groups": 4}),
    ("conv 4 3 groups=4", (4, 9, 9), {"groups": 4}, {"kernel": 3, "groups": 4}),  # depthwise
    ("conv 8 3 bias=false", (3, 9, 9), {"bias": False}, {"kernel": 3}),
    ("conv 8 3 bias=true", (3, 9, 9), {"bias": True}, {"kernel": 3}),
    ("conv 8 7x7 stride=2 pad=3 bias=false", (3, 224, 224), {"kernel": (7, 7), "stride": (2, 2)},
     {"kernel": 7, "stride": 2, "padding": 3}),
    ("conv 8 1x1 stride=2", (3, 7, 7), {"kernel": (1, 1)}, {"kernel": 1, "stride": 2}),
    ("conv(8, 3, stride=2, pad=1)", (3, 8, 8), {"stride": (2, 2), "padding": (1, 1)},
     {"kernel": 3, "stride": 2, "padding": 1}),
])
def test_conv_options(text, in_shape, attrs, torch_args):
    net = net_of(text + "\n", "x".join(map(str, in_shape)))
    conv = node(net, "conv1")
    assert conv.op is Op.CONV and conv.keyword == "conv"
    for key, expected in attrs.items():
        assert getattr(conv.attrs, key) == expected, key
    assert conv.attrs.filters == (4 if text.startswith("conv 4") else 8)
    assert conv.shape == conv_shape(in_shape, conv.attrs.filters, **torch_args)


def test_conv_defaults():
    a = node(net_of("conv 8 3\n"), "conv1").attrs
    assert (a.stride, a.padding, a.dilation, a.groups, a.bias, a.same) == ((1, 1), (0, 0), (1, 1), 1, True, False)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kernel, dilation, size", [
    (3, 1, (9, 9)), (2, 1, (9, 9)), (4, 1, (8, 9)), ((2, 4), 1, (7, 10)), ((1, 6), 1, (5, 6)),
    (2, 2, (9, 9)), (4, 3, (16, 15)), ((3, 2), (1, 2), (8, 8)),
])
def test_pad_same_keeps_the_size_for_any_kernel(kernel, dilation, size):
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    kt = "x".join(map(str, k)) if isinstance(kernel, tuple) else str(kernel)
    dt = "x".join(map(str, d)) if isinstance(dilation, tuple) else str(dilation)
    net = net_of(f"conv 6 {kt} pad=same dilation={dt}\n", f"2x{size[0]}x{size[1]}")
    conv = node(net, "conv1")
    assert conv.shape == (6, *size)
    assert conv.attrs.same is True
    # PyTorch pads d*(k-1)//2 at the top/left, the remainder at the bottom/right
    assert conv.attrs.padding == tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
    x, weight = torch.zeros(1, 2, *size), torch.zeros(6, 2, *k)
    assert tuple(F.conv2d(x, weight, padding="same", dilation=d).shape[1:]) == conv.shape


def test_batchnorm_options():
    net = net_of("conv 4 1\nbatchnorm\nbatchnorm eps=1e-3 momentum=0.01 affine=false\n"
                 "batchnorm(eps=0.5, momentum=1, affine=true)\nbatchnorm momentum=0\n")
    bns = [n for n in net.nodes if n.op is Op.BATCHNORM]
    assert [n.name for n in bns] == ["batchnorm1", "batchnorm2", "batchnorm3", "batchnorm4"]
    assert [(b.attrs.eps, b.attrs.momentum, b.attrs.affine) for b in bns] == [
        (1e-5, 0.1, True), (1e-3, 0.01, False), (0.5, 1.0, True), (1e-5, 0.0, True)]
    assert all(b.shape == (4, 32, 32) for b in bns)


def test_batchnorm_on_a_flat_input():
    net = net_of("flatten\nbatchnorm\n", "2x3x3")
    assert node(net, "batchnorm1").shape == (18,)


@pytest.mark.parametrize("text, kind, slope", [
    ("relu", "relu", None),
    ("sigmoid", "sigmoid", None),
    ("tanh", "tanh", None),
    ("gelu", "gelu", None),
    ("silu", "silu", None),
    ("leaky_relu", "leaky_relu", 0.01),
    ("leaky_relu 0.2", "leaky_relu", 0.2),
    ("leaky_relu slope=0.3", "leaky_relu", 0.3),
    ("leaky_relu(0.1)", "leaky_relu", 0.1),
    ("leaky_relu(slope=1)", "leaky_relu", 1.0),
    ("leaky_relu slope=0 - 0.2", "leaky_relu", -0.2),
    ("leaky_relu 0", "leaky_relu", 0.0),
])
def test_activations(text, kind, slope):
    net = net_of(text + "\n", "2x5x5")
    act = net.nodes[1]
    assert (act.op, act.keyword, act.attrs.kind, act.shape) == (Op.ACTIVATION, kind, kind, (2, 5, 5))
    assert act.name == f"{kind}1"
    if slope is not None:
        assert act.attrs.slope == pytest.approx(slope)


def test_activations_on_flat_input():
    net = net_of("flatten\nrelu\nsigmoid\ntanh\ngelu\nsilu\nleaky_relu\n", "2x2x2")
    assert all(n.shape == (8,) for n in net.nodes[1:])


@pytest.mark.parametrize("text, in_hw, kernel, stride, pad", [
    ("maxpool 2", (8, 8), (2, 2), (2, 2), (0, 0)),
    ("maxpool 2", (7, 9), (2, 2), (2, 2), (0, 0)),  # floor mode drops the last row/column
    ("maxpool 3", (10, 10), (3, 3), (3, 3), (0, 0)),  # stride defaults to the kernel
    ("maxpool 3 stride=2", (10, 10), (3, 3), (2, 2), (0, 0)),
    ("maxpool 3 stride=2 pad=1", (112, 112), (3, 3), (2, 2), (1, 1)),
    ("maxpool 3x3 stride=2 pad=1", (11, 11), (3, 3), (2, 2), (1, 1)),
    ("maxpool 2x3", (8, 9), (2, 3), (2, 3), (0, 0)),
    ("maxpool 2x3 stride=1x2", (8, 9), (2, 3), (1, 2), (0, 0)),
    ("maxpool kernel=2 stride=1", (5, 5), (2, 2), (1, 1), (0, 0)),
    ("maxpool(4, pad=2)", (9, 9), (4, 4), (4, 4), (2, 2)),
    ("maxpool 3 pad=1x0", (9, 9), (3, 3), (3, 3), (1, 0)),
    ("avgpool 2", (7, 7), (2, 2), (2, 2), (0, 0)),
    ("avgpool 3 stride=1 pad=1", (6, 6), (3, 3), (1, 1), (1, 1)),
    ("avgpool 5x5 stride=3", (17, 16), (5, 5), (3, 3), (0, 0)),
])
def test_pools(text, in_hw, kernel, stride, pad):
    net = net_of(text + "\n", f"3x{in_hw[0]}x{in_hw[1]}")
    pool = net.nodes[1]
    mode = text[:3]
    assert (pool.op, pool.keyword, pool.attrs.mode) == (Op.POOL, f"{mode}pool", mode)
    assert (pool.attrs.kernel, pool.attrs.stride, pool.attrs.padding) == (kernel, stride, pad)
    fn = F.max_pool2d if mode == "max" else F.avg_pool2d
    expected = fn(torch.zeros(1, 3, *in_hw), kernel, stride, pad)  # ceil_mode=False
    assert pool.shape == tuple(expected.shape[1:])


@pytest.mark.parametrize("text, in_hw", [
    ("maxpool 3 stride=2 ceil_mode=true", (112, 112)),
    ("maxpool 2 ceil_mode=true", (7, 9)),  # ceil mode keeps the last, partial row and column
    ("maxpool 3 stride=2 pad=1 ceil_mode=true", (8, 11)),
    ("maxpool 2 pad=1 ceil_mode=true", (5, 5)),  # the window past the input (in the padding) is dropped
    ("avgpool 3 stride=2 ceil_mode=true", (10, 9)),
    ("avgpool 3 stride=2 pad=1 ceil_mode=true count_include_pad=false", (9, 12)),
    ("avgpool 3 stride=1 pad=1 count_include_pad=false", (6, 6)),
    ("avgpool 2 ceil_mode=false count_include_pad=true", (7, 7)),
])
def test_pool_ceil_mode_and_count_include_pad(text, in_hw):
    net = net_of(text + "\n", f"3x{in_hw[0]}x{in_hw[1]}")
    a = net.nodes[1].attrs
    ceil, include = "ceil_mode=true" in text, "count_include_pad=false" not in text
    assert (a.ceil_mode, a.count_include_pad) == (ceil, include)
    x = torch.zeros(1, 3, *in_hw)
    if a.mode == "max":
        expected = F.max_pool2d(x, a.kernel, a.stride, a.padding, ceil_mode=ceil)
    else:
        expected = F.avg_pool2d(x, a.kernel, a.stride, a.padding, ceil_mode=ceil, count_include_pad=include)
    assert net.nodes[1].shape == tuple(expected.shape[1:])


def test_ceil_mode_in_the_summary():
    floor, ceil = (net_of(f"maxpool 3 stride=2{option}\n", "1x112x112") for option in ("", " ceil_mode=true"))
    assert floor.nodes[1].shape == (1, 55, 55) and ceil.nodes[1].shape == (1, 56, 56)
    assert re.search(r"maxpool +1x55x55", floor.summary()) and re.search(r"maxpool +1x56x56", ceil.summary())
    assert "1x56x56" not in floor.summary() and "1x55x55" not in ceil.summary()


def test_global_avgpool_flatten_dense_dropout_softmax():
    net = net_of("global_avgpool\nflatten\ndense 10\ndense units=7 bias=false\ndropout\ndropout 0.25\n"
                 "dropout p=0\ndropout(0.9)\nsoftmax\n", "5x7x9")
    assert layers(net) == [
        ("global_avgpool1", "global_avgpool", (5, 1, 1)),
        ("flatten1", "flatten", (5,)),
        ("dense1", "dense", (10,)),
        ("dense2", "dense", (7,)),
        ("dropout1", "dropout", (7,)),
        ("dropout2", "dropout", (7,)),
        ("dropout3", "dropout", (7,)),
        ("dropout4", "dropout", (7,)),
        ("softmax1", "softmax", (7,)),
    ]
    ops = [n.op for n in net.nodes[1:]]
    assert ops == [Op.GLOBAL_AVGPOOL, Op.FLATTEN, Op.DENSE, Op.DENSE] + [Op.DROPOUT] * 4 + [Op.SOFTMAX]
    assert (node(net, "dense1").attrs.units, node(net, "dense1").attrs.bias) == (10, True)
    assert (node(net, "dense2").attrs.units, node(net, "dense2").attrs.bias) == (7, False)
    assert [node(net, f"dropout{i}").attrs.p for i in range(1, 5)] == [0.5, 0.25, 0.0, 0.9]
    assert net.ends_in_softmax


def test_flatten_orders_c_h_w_and_is_idempotent():
    net = net_of("flatten\nflatten\ndropout 0.1\n", "3x4x5")
    assert [n.shape for n in net.nodes[1:]] == [(60,), (60,), (60,)]


def test_every_node_reads_the_previous_one():
    net = net_of("conv 4 3\nbatchnorm\nrelu\nmaxpool 2\nflatten\ndense 3\n")
    assert [n.inputs for n in net.nodes] == [(), (0,), (1,), (2,), (3,), (4,), (5,)]
    assert [n.id for n in net.nodes] == list(range(7))


# --- labels and names -----------------------------------------------------------------------------


def test_labels_and_automatic_names():
    net = net_of("stem: conv 8 3\nconv 8 3\nbatchnorm\nconv 8 3\nhead: relu\nrelu\nflatten\nfc: dense 10\n")
    assert names(net) == ["input", "stem", "conv1", "batchnorm1", "conv2", "head", "relu1", "flatten1", "fc"]
    assert node(net, "fc").keyword == "dense"


def test_automatic_names_skip_taken_labels():
    net = net_of("conv1: relu\nconv 4 1\nconv 4 1\n")
    assert names(net) == ["input", "conv1", "conv2", "conv3"]


def test_labels_with_repetition_get_an_index():
    net = net_of("a: relu x3\nb: relu x1\nrelu x2\n")
    assert names(net)[1:] == ["a.0", "a.1", "a.2", "b", "relu1", "relu2"]


def test_residual_names_and_inputs():
    net = net_of("conv 8 3 pad=1\nresidual {\n  conv 8 3 pad=1\n  relu\n}\n"
                 "proj: residual {\n  conv 16 3 stride=2 pad=1\n} shortcut {\n  conv 16 1 stride=2\n  batchnorm\n}\n")
    assert names(net) == ["input", "conv1",
                          "residual1.conv1", "residual1.relu1", "residual1.add",
                          "proj.conv1", "proj.shortcut.conv1", "proj.shortcut.batchnorm1", "proj.add"]
    add1, add2 = node(net, "residual1.add"), node(net, "proj.add")
    ids = {n.name: n.id for n in net.nodes}
    assert (add1.op, add1.keyword, add1.shape) == (Op.ADD, "residual", (8, 32, 32))
    assert add1.inputs == (ids["residual1.relu1"], ids["conv1"])  # branch, then the identity
    assert node(net, "residual1.conv1").inputs == (ids["conv1"],)
    assert node(net, "proj.conv1").inputs == (ids["residual1.add"],)
    assert node(net, "proj.shortcut.conv1").inputs == (ids["residual1.add"],)  # both start from the input
    assert add2.inputs == (ids["proj.conv1"], ids["proj.shortcut.batchnorm1"])
    assert add2.shape == (16, 16, 16)


def test_empty_shortcut_is_the_identity():
    net = net_of("residual {\n  relu\n} shortcut {\n}\n", "2x4x4")
    assert node(net, "residual1.add").inputs == (1, 0)


def test_nested_residuals():
    net = net_of("residual {\n  residual {\n    relu\n  }\n  tanh\n}\n", "2x4x4")
    assert names(net)[1:] == ["residual1.residual1.relu1", "residual1.residual1.add", "residual1.tanh1",
                              "residual1.add"]


def test_residual_repetition():
    net = net_of("residual {\n  conv 4 3 pad=1\n} x 3\nr: residual {\n  relu\n} x2\n", "4x8x8")
    assert names(net)[1:] == ["residual1.conv1", "residual1.add", "residual2.conv1", "residual2.add",
                              "residual3.conv1", "residual3.add", "r.0.relu1", "r.0.add", "r.1.relu1", "r.1.add"]
    # each copy feeds the next
    ids = {n.name: n.id for n in net.nodes}
    assert node(net, "residual2.add").inputs == (ids["residual2.conv1"], ids["residual1.add"])


def test_qualified_names_in_resnet18():
    net = cnndsl.parse(ROOT / "examples" / "resnet18.cnn")
    expected = {
        "conv1": (64, 112, 112),
        "maxpool1": (64, 56, 56),
        "layer1.0.residual1.conv1": (64, 56, 56),
        "layer1.1.residual1.conv2": (64, 56, 56),
        "layer1.1.relu1": (64, 56, 56),
        "layer2.residual1.conv1": (128, 28, 28),
        "layer2.residual1.shortcut.conv1": (128, 28, 28),
        "layer2.residual1.add": (128, 28, 28),
        "basic1.residual1.conv1": (128, 28, 28),
        "layer4.residual1.shortcut.batchnorm1": (512, 7, 7),
        "basic3.relu1": (512, 7, 7),
        "global_avgpool1": (512, 1, 1),
        "fc": (1000,),
        "softmax1": (1000,),
    }
    for name, shape in expected.items():
        assert node(net, name).shape == shape, name
    assert node(net, "layer2.residual1.shortcut.conv1").attrs.stride == (2, 2)


def test_qualified_names_in_resnet50_and_vgg16():
    r50 = cnndsl.parse(ROOT / "examples" / "resnet50.cnn")
    assert node(r50, "layer1.bottleneck_down1.residual1.conv_bn1.conv1").shape == (64, 56, 56)
    assert node(r50, "layer1.bottleneck_down1.residual1.shortcut.conv_bn1.conv1").shape == (256, 56, 56)
    assert node(r50, "layer1.bottleneck2.residual1.add").shape == (256, 56, 56)
    assert node(r50, "layer3.bottleneck5.relu1").shape == (1024, 14, 14)
    assert not any(n.name.startswith("layer3.bottleneck6") for n in r50.nodes)  # x n - 1 with n = 6
    assert node(r50, "layer4.bottleneck_down1.residual1.conv_bn2.conv1").shape == (512, 7, 7)
    vgg = cnndsl.parse(ROOT / "examples" / "vgg16.cnn")
    assert node(vgg, "stage3.conv_relu3.conv1").shape == (256, 56, 56)
    assert node(vgg, "stage5.maxpool1").shape == (512, 7, 7)
    assert node(vgg, "flatten1").shape == (25088,)
    assert node(vgg, "fc3").shape == (1000,)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_names_are_unique_and_keywords_known(path):
    net = cnndsl.parse(path)
    assert len(set(names(net))) == len(net.nodes)
    assert net.name == path.stem
    assert net.filename == str(path)
    assert net.output.op is Op.SOFTMAX


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse_from_text_path_and_str(path):
    text = path.read_text()
    a, b, c = cnndsl.parse(text), cnndsl.parse(path), cnndsl.parse(str(path))
    assert a.nodes == b.nodes == c.nodes
    assert a.filename is None and b.filename == str(path)
    assert cnndsl.parse(a) is a  # a Network is returned as it is


# --- blocks ---------------------------------------------------------------------------------------

BLOCKS = """\
block conv_bn(c, k=3, stride=1, pad=1) {
    conv c k stride=stride pad=pad bias=false
    batchnorm
}
block widen(c, out=c * 4) {
    conv_bn(c, 1, pad=0)
    relu
    conv_bn(out, 1, pad=0)
}
"""


@pytest.mark.parametrize("call, filters, kernel, stride, pad", [
    ("conv_bn(16)", 16, 3, 1, 1),                       # defaults
    ("conv_bn(16, 5)", 16, 5, 1, 1),                    # positional
    ("conv_bn(16, 1, pad=0)", 16, 1, 1, 0),             # positional then keyword
    ("conv_bn(c=16, stride=2)", 16, 3, 2, 1),           # keywords only
    ("conv_bn(stride=2, c=8)", 8, 3, 2, 1),             # keywords in any order
    ("conv_bn 16 3 stride=2", 16, 3, 2, 1),             # bare arguments
    ("conv_bn c=16 k=5 pad=2", 16, 5, 1, 2),            # bare keywords
    ("conv_bn(4 * 4, 1 + 2, 4 / 2, 3 - 2)", 16, 3, 2, 1),  # arithmetic in arguments
    ("conv_bn(16, 3x1, pad=1x0)", 16, (3, 1), 1, (1, 0)),  # HxW through a parameter
])
def test_block_arguments(call, filters, kernel, stride, pad):
    net = net_of(BLOCKS + call + "\n", "3x16x16")
    conv = node(net, "conv_bn1.conv1")
    pair = (lambda v: v if isinstance(v, tuple) else (v, v))
    assert (conv.attrs.filters, conv.attrs.kernel, conv.attrs.stride, conv.attrs.padding) == (
        filters, pair(kernel), pair(stride), pair(pad))
    assert conv.attrs.bias is False
    assert node(net, "conv_bn1.batchnorm1").shape == conv.shape


def test_default_refers_to_an_earlier_parameter():
    net = net_of(BLOCKS + "widen(8)\nwiden 8 out=16\nwiden(out=6, c=2)\n", "3x16x16")
    assert node(net, "widen1.conv_bn2.conv1").attrs.filters == 32  # out = c * 4
    assert node(net, "widen2.conv_bn2.conv1").attrs.filters == 16
    assert node(net, "widen3.conv_bn2.conv1").attrs.filters == 6
    two = net_of("block b(a, b=a + 1, c=a * b) {\n  conv c 1\n}\nb(3)\n")
    assert node(two, "b1.conv1").attrs.filters == 12  # defaults chain left to right


def test_nested_block_calls_and_names():
    net = net_of(BLOCKS + "w: widen(8)\n", "3x16x16")
    assert names(net)[1:] == ["w.conv_bn1.conv1", "w.conv_bn1.batchnorm1", "w.relu1",
                              "w.conv_bn2.conv1", "w.conv_bn2.batchnorm1"]
    assert node(net, "w.conv_bn2.conv1").shape == (32, 16, 16)


def test_block_called_before_its_definition_and_empty_block():
    net = net_of("b(4)\nnothing\nrelu\nblock b(c) {\n  conv c 1\n}\nblock nothing {\n}\n", "3x4x4")
    assert names(net)[1:] == ["b1.conv1", "relu1"]


def test_block_parameters_hold_words_and_booleans():
    net = net_of("block b(p=same, bias=false, s=1) {\n  conv 4 4 pad=p bias=bias stride=s\n}\n"
                 "b\nb(valid, true)\n", "3x8x8")
    first, second = node(net, "b1.conv1"), node(net, "b2.conv1")
    assert (first.attrs.same, first.attrs.bias, first.shape) == (True, False, (4, 8, 8))
    assert (second.attrs.same, second.attrs.bias, second.shape) == (False, True, (4, 5, 5))


def test_block_body_sees_only_its_parameters():
    # the inner block's `c` is its own, not the caller's
    net = net_of("block inner(c=2) {\n  conv c 1\n}\nblock outer(c) {\n  inner\n  inner(c)\n}\nouter(7)\n")
    assert node(net, "outer1.inner1.conv1").attrs.filters == 2
    assert node(net, "outer1.inner2.conv1").attrs.filters == 7


def test_block_call_with_label_and_repetition():
    net = net_of(BLOCKS + "layer1: conv_bn(8) x2\nconv_bn(8) x 2\n", "3x8x8")
    assert names(net)[1:] == [
        "layer1.0.conv1", "layer1.0.batchnorm1", "layer1.1.conv1", "layer1.1.batchnorm1",
        "conv_bn1.conv1", "conv_bn1.batchnorm1", "conv_bn2.conv1", "conv_bn2.batchnorm1"]


def test_repetition_with_expressions_inside_a_block():
    net = net_of("block stage(c, n) {\n  conv c 3 pad=1\n  conv c 3 pad=1 x n - 1\n  relu x n\n"
                 "  residual {\n    conv c 3 pad=1\n  } x n * 2 - 3\n}\nstage(4, 3)\n", "4x8x8")
    kinds = [n.keyword for n in net.nodes[1:]]
    assert kinds.count("conv") == 1 + (3 - 1) + (3 * 2 - 3)
    assert kinds.count("relu") == 3
    assert kinds.count("residual") == 3 * 2 - 3  # one add per copy
    assert names(net)[-2:] == ["stage1.residual3.conv1", "stage1.residual3.add"]


@pytest.mark.parametrize("expr, filters", [
    ("c*4", 32), ("c * 4", 32), ("c/2", 4), ("c / 2", 4), ("c+1", 9), ("c - 1", 7),
    ("c / 2 + 1", 5), ("1 + c * 2", 17), ("c * 3 / 4", 6), ("c - 2 - 2", 4), ("c/4*2", 4),
    ("c // 3", 2), ("c//3*3", 6), ("(c + 1) // 2", 4), ("(c - (2 + 1)) * 2", 10), ("((c))", 8),
    ("c - (0 - 7) // 2", 12),  # rounds down, as Python: -7 // 2 is -4
])
def test_arithmetic(expr, filters):
    net = net_of(f"block b(c) {{\n  conv({expr}, 1)\n  conv {expr} 1 x 1\n}}\nb(8)\n" if expr[0] != "("
                 else f"block b(c) {{\n  conv({expr}, 1)\n  conv filters={expr} kernel=1\n}}\nb(8)\n")
    assert node(net, "b1.conv1").attrs.filters == node(net, "b1.conv2").attrs.filters == filters


def test_parentheses_group_and_floor_division_binds_as_division():
    block = stmt("block b(k, d) {\n  conv 8 k pad=(k - 1) // 2 * d\n  conv((k - 1) // 2, 3)\n  relu x (k - 1)\n}\n")
    pad = next(a for a in block.body[0].args if a.name == "pad")
    assert value(pad.value) == ("*", ("//", ("-", ("ref", "k"), 1), 2), ("ref", "d"))
    assert value(block.body[1].args[0].value) == ("//", ("-", ("ref", "k"), 1), 2)
    assert value(block.body[2].repeat.count) == ("-", ("ref", "k"), 1)
    net = net_of("block b(k, d) {\n  conv 8 k pad=(k - 1) // 2 * d dilation=d\n  relu x (k - 1)\n}\nb(5, 2)\n", "3x9x9")
    assert node(net, "b1.conv1").shape == (8, 9, 9) and len(net.nodes) == 1 + 1 + 4


@pytest.mark.parametrize("src, message", [
    ("conv 8 3 pad=2.5 // 2", "`//` divides integers and rounds down; 2.5 is not an integer"),
    ("conv 8 3 pad=2 // (1 - 1)", "division by zero"),
    ("conv (2 + 6) 3", "unexpected '3'"), ("conv 8 3 pad=(1", "unexpected end of line")])
def test_floor_division_and_parentheses_errors(src, message):
    with pytest.raises(cnndsl.CnnError) as err:
        net_of(src + "\n", "3x8x8")
    assert err.value.message == message


def test_float_arithmetic():
    net = net_of("block b(p) {\n  dropout p / 2\n  leaky_relu p * 0.5 - 1\n  batchnorm eps=p/1000\n}\nb(0.5)\n")
    assert node(net, "b1.dropout1").attrs.p == pytest.approx(0.25)
    assert node(net, "b1.leaky_relu1").attrs.slope == pytest.approx(-0.75)
    assert node(net, "b1.batchnorm1").attrs.eps == pytest.approx(5e-4)


# --- whole networks -------------------------------------------------------------------------------


def test_design_brief_illustration():
    src = """network vgg_block_demo
input 3x32x32

block conv_bn_relu(c, stride=1) {
    conv c 3x3 stride=stride pad=1 bias=false
    batchnorm
    relu
}

conv_bn_relu(64) x2
maxpool 2
residual {
    conv_bn_relu(64)
    conv 64 3x3 pad=1 bias=false
    batchnorm
}
relu
global_avgpool
flatten
dense 10
softmax
"""
    net = cnndsl.parse(src)
    assert net.output_shape == (10,)
    assert node(net, "maxpool1").shape == (64, 16, 16)
    assert node(net, "residual1.conv_bn_relu1.relu1").shape == (64, 16, 16)
    assert node(net, "residual1.add").shape == (64, 16, 16)
    summary = net.to_json()
    assert summary["total_params"] == (3 * 9 * 64 + 128) + 3 * (64 * 9 * 64 + 128) + 64 * 10 + 10


@pytest.mark.parametrize("path, output, count", [
    ("lenet5", (10,), 1 + 13), ("cifar_small", (10,), 1 + 13), ("vgg16", (1000,), 1 + 13 * 2 + 5 + 9),
    ("resnet18", (1000,), 1 + 4 + 2 * 7 + 3 * (9 + 7) + 4), ("resnet50", (1000,), 1 + 4 + 16 * 10 + 4 * 2 + 4),
])
def test_example_sizes(path, output, count):
    net = cnndsl.parse(ROOT / "examples" / f"{path}.cnn")
    assert net.output_shape == output
    assert len(net.nodes) == count


def test_utf8_comment_is_fine():
    net = cnndsl.parse("# Größe: 3×32×32 — ünïcödé\nnetwork u\ninput 1x2x2\nrelu  # ✓\n")
    assert names(net) == ["input", "relu1"]


def test_utf8_bom_file_is_accepted(tmp_path):
    path = tmp_path / "bom.cnn"
    path.write_bytes(b"\xef\xbb\xbfnetwork bom\ninput 1x4x4\nrelu\n")
    assert cnndsl.parse(path).name == "bom"
