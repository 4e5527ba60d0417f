"""Seeded random VALID .cnn networks: convs with random kernel, stride, padding (int, HxW,
same, valid), dilation and groups; pools with padding; batchnorm; every activation; dropout;
residuals with identity or projection shortcuts; parameterised, nested and repeated blocks;
dense heads after flatten or global_avgpool; an optional softmax. The generator tracks the
shapes and the parameter count itself, by PyTorch's rules, so each network checks that
parse succeeds, the output shape and parameter total are the generator's, every node's
inferred shape is the shape the reference backend computes, the module holds as many
parameters and BN buffers as the summary counts, and the summary's multiply-adds, per layer
and in total, are what torch.utils.flop_counter counts for the reference forward."""

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cnndsl

COUNT = 150
SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 19, 23, 24, 29, 31, 32, 37]
ACTIVATIONS = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]

# Blocks every network defines (unused ones included); each has a simulator below.
BLOCKS = """
block cbr(c, k=3, p=1, s=1) {
    conv c k stride=s pad=p bias=false
    batchnorm
    relu
}

block basic(c) {
    residual {
        cbr(c)
        conv c 3x3 pad=1 bias=false
        batchnorm
    }
    relu
}

block down(c, s=2) {
    residual {
        cbr(c, s=s)
        conv c 3 pad=1
    } shortcut {
        conv c 1 stride=s bias=false
        batchnorm
    }
    silu
}

block wide(c, m=2) {
    conv c * m 1x1
    gelu
    conv c 1 groups=c
}

block stage(c, n, s=2) {
    down(c, s)
    basic(c) x n
}
"""


def out_size(size, k, s, p_total, d=1):
    return (size + p_total - d * (k - 1) - 1) // s + 1


def fmt(pair):
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


class Gen:
    """One random network: `lines` of .cnn text, the running `shape` and `params`."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.params = 0
        self.labels = 0

    # --- helpers ----------------------------------------------------------------------------
    def pair(self, lo, hi, square=0.6):
        a = self.r.randint(lo, hi)
        return (a, a) if self.r.random() < square else (a, self.r.randint(lo, hi))

    def label(self):
        if self.r.random() < 0.15:
            self.labels += 1
            return f"l{self.labels}: "
        return ""

    # --- layers: each returns a line and updates shape/params -------------------------------
    def conv(self, shape, filters=None, stride=None, keep=False):
        """A random conv; keep=True keeps the spatial size (stride 1, 'same' or symmetric pad)."""
        r = self.r
        c, h, w = shape
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        g = r.choice(divisors) if r.random() < 0.35 else 1
        if filters is None:
            filters = g * r.randint(1, max(1, 12 // g))
        elif filters % g:
            g = 1
        k = self.pair(1, 5)
        d = self.pair(1, 3) if r.random() < 0.25 else (1, 1)
        s = stride or ((1, 1) if keep or r.random() < 0.55 else self.pair(1, 3))
        opts = []
        if keep:
            if r.random() < 0.5 or any(ki % 2 == 0 for ki in k):
                pad, totals = "same", [di * (ki - 1) for di, ki in zip(d, k)]
            else:
                p = tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))
                pad, totals = fmt(p), [2 * pi for pi in p]
        else:
            choice = r.random()
            fits = all(di * (ki - 1) + 1 <= n for di, ki, n in zip(d, k, (h, w)))
            if choice < 0.2 and s == (1, 1):
                pad, totals = "same", [di * (ki - 1) for di, ki in zip(d, k)]
            elif choice < 0.35 and fits:
                pad, totals = "valid", [0, 0]
            else:
                p = []
                for di, ki, n in zip(d, k, (h, w)):
                    need = max(0, -(-(di * (ki - 1) + 1 - n) // 2))
                    p.append(need + r.randint(0, 2))
                p = tuple(p) if r.random() < 0.7 else (max(p), max(p))
                pad, totals = fmt(p), [2 * pi for pi in p]
        if pad != "0":
            opts.append(f"pad={pad}" if r.random() < 0.9 or pad in ("same", "valid") else f"pad={p[0]}x{p[1]}")
        if s != (1, 1) or r.random() < 0.1:
            opts.append(f"stride={fmt(s)}")
        if d != (1, 1):
            opts.append(f"dilation={fmt(d)}")
        if g > 1 or r.random() < 0.05:
            opts.append(f"groups={g}")
        bias = r.random() < 0.7
        if not bias:
            opts.append("bias=false")
        elif r.random() < 0.1:
            opts.append("bias=true")
        r.shuffle(opts)
        kernel = fmt(k) if r.random() < 0.5 else f"{k[0]}x{k[1]}"
        head = f"conv {filters} {kernel}" if r.random() < 0.85 else f"conv filters={filters} kernel={kernel}"
        self.params += filters * (c // g) * k[0] * k[1] + (filters if bias else 0)
        oh = out_size(h, k[0], s[0], totals[0], d[0])
        ow = out_size(w, k[1], s[1], totals[1], d[1])
        return " ".join([head, *opts]), (filters, oh, ow)

    def pool(self, shape):
        r = self.r
        c, h, w = shape
        mode = r.choice(["maxpool", "avgpool"])
        k = self.pair(1, 4)
        p = []
        for ki, n in zip(k, (h, w)):
            need = max(0, -(-(ki - n) // 2))
            p.append(r.randint(need, ki // 2))
        opts = []
        if r.random() < 0.5:
            s = self.pair(1, 3)
            opts.append(f"stride={fmt(s)}")
        else:
            s = k
        if p != [0, 0] or r.random() < 0.1:
            opts.append(f"pad={fmt(tuple(p))}")
        line = f"{mode} {fmt(k)}" if r.random() < 0.9 else f"{mode} kernel={fmt(k)}"
        return " ".join([line, *opts]), (c, out_size(h, k[0], s[0], 2 * p[0]), out_size(w, k[1], s[1], 2 * p[1]))

    def batchnorm(self, shape):
        r = self.r
        opts, affine = [], r.random() < 0.8
        if r.random() < 0.3:
            opts.append(f"eps={r.choice(['1e-3', '0.0001', '2e-5'])}")
        if r.random() < 0.3:
            opts.append(f"momentum={r.choice(['0.01', '0.3', '1', '0'])}")
        if not affine:
            opts.append("affine=false")
        elif r.random() < 0.1:
            opts.append("affine=true")
        self.params += 2 * shape[0] if affine else 0
        return " ".join(["batchnorm", *opts]), shape

    def activation(self, shape):
        kind = self.r.choice(ACTIVATIONS)
        if kind == "leaky_relu" and self.r.random() < 0.6:
            kind += self.r.choice([" 0.2", " slope=0.05", " 0.3"])
        return kind, shape

    def dropout(self, shape):
        return self.r.choice(["dropout", "dropout 0.1", "dropout p=0.4", "dropout 0"]), shape

    # --- composite statements: each returns a list of lines --------------------------------
    def residual(self, shape):
        r = self.r
        c, h, w = shape
        lines = []
        project = r.random() < 0.5
        if not project:  # identity: every branch layer keeps the shape
            body = []
            for _ in range(r.randint(1, 3)):
                kind = r.random()
                if kind < 0.5:
                    line, shape2 = self.conv(shape, filters=c, keep=True)
                elif kind < 0.75:
                    line, shape2 = self.batchnorm(shape)
                else:
                    line, shape2 = self.activation(shape)
                assert shape2 == shape
                body.append(line)
            lines.append(f"{self.label()}residual {{")
            lines += ["    " + b for b in body]
            lines.append("}")
            return lines, shape
        c2 = r.randint(1, 16)
        s = r.randint(1, 3) if min(h, w) > 1 else 1
        k = r.choice([1, 3, 5])
        d = r.choice([1, 1, 2])
        p = d * (k - 1) // 2
        self.params += c2 * c * k * k
        body = [f"conv {c2} {k} stride={s} pad={p} dilation={d} bias=false"]
        out = (c2, (h - 1) // s + 1, (w - 1) // s + 1)
        for _ in range(r.randint(0, 2)):
            kind = r.random()
            if kind < 0.4:
                line, _ = self.conv(out, filters=c2, keep=True)
            elif kind < 0.7:
                line, _ = self.batchnorm(out)
            else:
                line, _ = self.activation(out)
            body.append(line)
        if c2 == c and r.random() < 0.3:
            short = [f"{r.choice(['maxpool', 'avgpool'])} 1 stride={s}"]
        else:
            self.params += c2 * c
            short = [f"conv {c2} 1x1 stride={s} bias=false"]
            if r.random() < 0.7:
                line, _ = self.batchnorm(out)
                short.append(line)
        lines.append(f"{self.label()}residual {{")
        lines += ["    " + b for b in body]
        lines.append("} shortcut {")
        lines += ["    " + b for b in short]
        lines.append("}")
        return lines, out

    def call(self, shape):
        """A call of one of BLOCKS, sometimes repeated, sometimes labelled."""
        r = self.r
        c, h, w = shape
        which = r.choice(["cbr", "basic", "down", "wide", "stage"])
        reps = r.choice([1, 1, 1, 2, 3])
        rep = f" x{reps}" if reps > 1 and r.random() < 0.5 else f" x {reps}" if reps > 1 else ""
        label = self.label()
        if which == "cbr":
            cc = r.randint(1, 16)
            k = r.randint(1, 5)
            s = r.choice([1, 1, 2])
            # one padding for every repetition: it must fit the smallest size any of them sees
            smallest = min(h, w) if reps == 1 else 1
            p = max(0, -(-(k - smallest) // 2)) + r.randint(0, 1)
            cin = c
            for _ in range(reps):
                self.params += cc * cin * k * k + 2 * cc
                h, w, cin = out_size(h, k, s, 2 * p), out_size(w, k, s, 2 * p), cc
            args = r.choice([f"cbr({cc}, {k}, {p}, {s})", f"cbr({cc}, k={k}, p={p}, s={s})",
                             f"cbr(c={cc}, s={s}, p={p}, k={k})"])
            return [f"{label}{args}{rep}"], (cc, h, w)
        if which == "basic":
            self.params += reps * (2 * 9 * c * c + 4 * c)
            return [f"{label}basic({c}){rep}"], shape
        if which == "down" or which == "stage":
            cc = r.randint(1, 12)
            s = r.choice([1, 2, 3])
            n = r.randint(1, 2)
            cin = c
            for _ in range(reps):
                self.params += 9 * cc * cin + 2 * cc + 9 * cc * cc + cc + cc * cin + 2 * cc
                h, w, cin = (h - 1) // s + 1, (w - 1) // s + 1, cc
                if which == "stage":
                    self.params += n * (2 * 9 * cc * cc + 4 * cc)
            call = f"down({cc}, s={s})" if which == "down" else r.choice(
                [f"stage({cc}, {n}, {s})", f"stage({cc}, n={n}, s={s})", f"stage(s={s}, c={cc}, n={n})"])
            return [f"{label}{call}{rep}"], (cc, h, w)
        cc = r.randint(1, 8)
        m = r.randint(1, 3)
        cin = c
        for _ in range(reps):
            self.params += cc * m * cin + cc * m + cc * m + cc
            cin = cc
        call = f"wide({cc})" if m == 2 and r.random() < 0.5 else f"wide({cc}, m={m})"
        return [f"{label}{call}{rep}"], (cc, h, w)

    def repeated_layer(self, shape):
        """A plain layer with `x N` that keeps the shape."""
        r = self.r
        n = r.randint(2, 3)
        kind = r.random()
        if kind < 0.5:
            c = shape[0]
            k = r.choice([1, 3])
            self.params += n * (c * c * k * k + c)
            line = f"conv {c} {k} pad={k // 2}"
        elif kind < 0.75:
            line, _ = self.activation(shape)
        else:
            line = "batchnorm affine=false"
        return [f"{self.label()}{line} x{n}"], shape

    # --- the network --------------------------------------------------------------------------
    def network(self, name: str):
        r = self.r
        c = r.randint(1, 5)
        h, w = r.choice(SIZES), r.choice(SIZES)
        if r.random() < 0.5:
            w = h
        shape = (c, h, w)
        lines = [f"network {name}", f"input {c}x{h}x{w}"]
        if r.random() < 0.6:
            lines += BLOCKS.strip("\n").split("\n")
            blocks = True
        else:
            blocks = False
        for _ in range(r.randint(1, 7)):
            kind = r.random()
            if kind < 0.3:
                line, shape = self.conv(shape)
                out = [self.label() + line]
            elif kind < 0.42:
                line, shape = self.pool(shape)
                out = [self.label() + line]
            elif kind < 0.52:
                line, shape = self.batchnorm(shape)
                out = [line]
            elif kind < 0.62:
                line, shape = self.activation(shape)
                out = [line]
            elif kind < 0.66:
                line, shape = self.dropout(shape)
                out = [line]
            elif kind < 0.78:
                out, shape = self.residual(shape)
            elif kind < 0.92 and blocks:
                out, shape = self.call(shape)
            else:
                out, shape = self.repeated_layer(shape)
            lines += out
            if shape[0] * shape[1] * shape[2] > 40000:  # keep the run cheap
                line, shape = self.pool(shape)
                lines.append(line)
        head = r.random()
        softmax = False
        if head < 0.12:  # end on a feature map
            pass
        else:
            if head < 0.45:
                lines += ["global_avgpool", "flatten"]
                shape = (shape[0],)
            else:
                lines.append("flatten")
                shape = (shape[0] * shape[1] * shape[2],)
                if r.random() < 0.1:
                    lines.append("flatten")
            for _ in range(r.randint(0, 2)):
                units = r.randint(1, 24)
                bias = r.random() < 0.8
                self.params += units * shape[0] + (units if bias else 0)
                lines.append(f"dense {units}" + ("" if bias else " bias=false"))
                shape = (units,)
                for _ in range(r.randint(0, 2)):
                    kind = r.random()
                    line, shape = (self.batchnorm if kind < 0.35 else self.activation if kind < 0.8
                                   else self.dropout)(shape)
                    lines.append(line)
            classes = r.randint(1, 12)
            self.params += classes * shape[0] + classes
            lines.append(f"dense units={classes}" if r.random() < 0.2 else f"dense {classes}")
            shape = (classes,)
            softmax = r.random() < 0.5
            if softmax:
                lines.append("softmax")
        batch = r.choice([1, 1, 2, 3, 5])
        text = "\n".join(lines) + "\n"
        return text, shape, self.params, batch


def generate(seed: int):
    return Gen(seed).network(f"random{seed}")


def run_reference(model, x):
    """model(x) on the reference backend; {node id: output shape} of every node it ran."""
    shapes, op = {}, model._op

    def record(node, xs):
        y = op(node, xs)
        shapes[node.id] = tuple(y.shape)
        return y

    model._op = record
    try:
        out = model(x)
    finally:
        del model._op
    return out, shapes


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("seed", range(COUNT))
def test_random_network(seed):
    text, shape, params, batch = generate(seed)
    try:
        net = cnndsl.parse(text)
    except cnndsl.CnnError as err:
        pytest.fail(f"a valid network was rejected:\n{err}\n--- source ---\n{text}")
    where = f"\n--- source ---\n{text}"
    assert net.output_shape == shape, f"output {net.output_shape}, expected {shape}{where}"
    summary = net.to_json()
    assert summary["total_params"] == params, f"params {summary['total_params']}, expected {params}{where}"
    model = cnndsl.compile(net, backend="torch", device="cpu").eval()
    assert sum(p.numel() for p in model.parameters()) == params, where
    bn = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    assert bn == summary["bn_buffers"], where
    x = torch.randn(batch, *net.input_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y, shapes = run_reference(model, x)
    flops = {name.removeprefix("ReferenceModule."): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    for layer in summary["layers"]:  # conv and linear: 2 flops per multiply-add
        if layer["macs"]:
            assert flops.get(layer["name"]) == 2 * batch * layer["macs"], \
                f"{layer['name']}: {layer['macs']:,} multiply-adds per sample, torch {flops.get(layer['name'])}{where}"
    assert flops.get("Global", 0) == 2 * batch * summary["macs"], where
    for node in net.nodes[1:]:
        assert shapes.get(node.id) == (batch, *node.shape), \
            f"{node.name}: inferred {node.shape}, torch {shapes.get(node.id)}{where}"
    assert y.shape == (batch, *shape)
    if net.ends_in_softmax:
        assert torch.allclose(y.sum(1), torch.ones(batch), atol=1e-5)


def test_generator_covers_the_language():
    """The 150 networks together use every feature the generator is meant to exercise."""
    texts = [generate(seed)[0] for seed in range(COUNT)]
    joined = "\n".join(texts)
    for word in ["pad=same", "pad=valid", "dilation=", "groups=", "stride=", "maxpool", "avgpool",
                 "batchnorm", "affine=false", "dropout", "} shortcut {", "residual {", "global_avgpool",
                 "softmax", " x2", " x 2", "cbr(", "basic(", "down(", "wide(", "stage(", "leaky_relu",
                 "sigmoid", "tanh", "gelu", "silu", "relu", "bias=false", "l1: "]:
        assert word in joined, f"no random network uses {word!r}"
    inputs = [t.split("\n")[1] for t in texts]
    assert any(i.endswith("x1x1") for i in inputs) or any("x1x" in i for i in inputs)
    assert any(t.count("\n") and "softmax" not in t for t in texts)
