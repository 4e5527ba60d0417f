"""Zero-copy concatenation (cnndsl/slabs.py, kernels/concat.py): a branch whose last group is a
conv block writes its output straight into its channel slice of the concat's NHWC output, so the
concat copies nothing of it. Shown by the launches themselves: the writers' kernels store with
the concat's pixel stride at their channel offsets of one tensor, and no copy kernel runs in
forward for them; the values and gradients are the reference backend's (fp32 whole network,
bf16 step by step), and the plan says which branches write in place and why the others do not."""

import json

import pytest
import torch

import cnndsl
from cnndsl.cli import main
from cnndsl.kernels._common import check_out, even_rows, row_stride
from cnndsl.kernels.batchnorm_backward import batchnorm_backward_on_load
from cnndsl.kernels.conv import (
    conv2d_backward_input,
    conv2d_backward_weight,
    conv2d_forward,
)
from cnndsl.kernels.epilogue import epilogue_forward
from cnndsl.kernels.prologue import GradPrologue
from cnndsl.plan import plan
from cnndsl.specs import NO_ACT, Act, ConvGeometry, Window

from helpers import DTYPES, launches, run_both
from test_triton_backend import BRANCHES

# An Inception module's four kinds of branch end: conv + batch norm + relu (1x1, and after a
# 3x3), a plain conv after a max pool, a conv + relu; 4 + 6 + 2 + 5 = 17 channels.
INCEPTION = """
network inception
input 8x6x6
concat {
    branch {
        conv 4 1 bias=false
        batchnorm
        relu
    }
    branch {
        conv 4 1 bias=false
        batchnorm
        relu
        conv 6 3 pad=1 bias=false
        batchnorm
        relu
    }
    branch {
        maxpool 3 stride=1 pad=1
        conv 2 1
    }
    branch {
        conv 5 3 pad=1
        relu
    }
}
global_avgpool
flatten
dense 3
softmax
"""


# Branch ends of 16 channels, whose backward reads its slice of the concat's gradient in place.
INCEPTION16 = """
network inception16
input 16x4x4
concat {
    branch {
        conv 16 1 bias=false
        batchnorm
        relu
    }
    branch {
        conv 16 1
        relu
    }
    branch {
        conv 16 3 pad=1 bias=false
    }
    branch {
        maxpool 3 stride=1 pad=1
        conv 16 1 bias=false
        batchnorm
        relu
    }
}
global_avgpool
flatten
dense 3
softmax
"""


def _stores(run) -> list[tuple[str, int, int]]:
    """(kernel, y's data pointer, y's pixel stride) of every conv and epilogue launch of `run()`, and
    the copy kernel's launches as ("copy", rows, cols)."""
    def see(kernel, values):
        name = kernel.fn.__name__
        if name in ("_conv_kernel", "_epilogue_fwd_kernel"):
            return name, values["y_ptr"].data_ptr(), values["stride_yp"]
        return ("copy", values["rows"], values["cols"]) if name == "_slice_copy_kernel" else None
    return launches(run, see)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_branch_writes_its_slice_of_one_tensor(train):
    """Without autograd: inference, and training mode's batch statistics (the running ones updated)."""
    model = cnndsl.compile(INCEPTION, device="cpu").train(train)
    unfused = cnndsl.compile(INCEPTION, device="cpu", fuse=False).train(train)
    unfused.load_state_dict(model.state_dict())
    x = torch.randn(2, 8, 6, 6)
    out = []
    with torch.no_grad():
        stores = _stores(lambda: out.append(model(x)))
        torch.testing.assert_close(unfused(x), out[0], rtol=1e-4, atol=1e-5)
    for name, value in unfused.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not [s for s in stores if s[0] == "copy"], "the concat copied a branch"
    # the four branch ends store with the concat's pixel stride, 17 channels, at offsets 0, 4, 10, 12
    into = [(ptr, stride) for _, ptr, stride in stores if stride == 17]
    assert len(into) == 4
    base = min(ptr for ptr, _ in into)
    assert sorted((ptr - base) // 4 for ptr, _ in into) == [0, 4, 10, 12]


def test_a_branch_that_cannot_write_in_place_is_copied_alone():
    """BRANCHES: the second branch of `mixed` is the concat's input, which the first branch also
    reads; its later concat joins a max pool's 18 channels (3x3) and a conv's."""
    model = cnndsl.compile(BRANCHES, device="cpu").eval()
    with torch.no_grad():
        stores = _stores(lambda: model(torch.randn(2, *model.net.input_shape)))
    copies = [s for s in stores if s[0] == "copy"]
    assert copies == [("copy", 2 * 9 * 9, 8), ("copy", 2 * 3 * 3, 18)]  # nothing of the conv branches


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_copy_matches_the_reference(train):
    """Outputs, the input gradient, every parameter gradient and the running statistics; eval
    after training, and without autograd. (Its writers of fewer than 16 channels take their
    gradient through their epilogue pass, from a copy of their slice, as at block level.)"""
    run_both(INCEPTION, batch=2, train=train, fuse=True)


def test_zero_copy_in_bf16_step_by_step():
    """Each writer's output is its slice of the slab, its gradient that slice of the concat's."""
    run_both(INCEPTION, batch=2, dtype=torch.bfloat16, train=True, fuse=True)


def test_the_plan_says_which_branches_write_in_place():
    net = cnndsl.parse(BRANCHES)
    groups = plan(net).groups
    join = next(g for g in groups if g.ops == ("concat",))
    # (the writers' 6 and 4 channels: backward through an epilogue pass, a copy; relu1 forks, and the sum
    # of its gradients reads its slice)
    assert join.in_place == (1, 3, 1)
    assert join.into_note == ("zero-copy: 2 of 3 branches write into their channel slices (mixed.branch1.relu1, "
                              "mixed.branch3.relu61); copied: relu1 is also read by mixed.branch1.conv1, "
                              "mixed.branch3.maxpool1; in backward, 1 of 3 branches reads its slice of the gradient "
                              "in place; the sum of relu1's gradients reads its slice there")
    writers = [g for g in groups if g.into is not None]
    assert sorted(net.nodes[g.into].name for g in writers) == ["concat1.concat", "mixed.concat", "mixed.concat"]
    assert all(not g.into for g in plan(net, fuse=False).groups)  # unfused: every concat copies


def test_plan_json_names_the_concat_each_writer_fills(tmp_path, capsys):
    path = tmp_path / "inception.cnn"
    path.write_text(INCEPTION)
    assert main(["plan", str(path), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert sum(g["into"] == "concat1.concat" for g in groups) == 4
    join = next(g for g in groups if g["ops"] == ["concat"])
    assert join["kernels"] == [] and join["bytes"] == 0
    assert join["zero_copy"].startswith("zero-copy: every branch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_kernels_write_a_channel_slice(dtype):
    """conv2d_forward and epilogue_forward with `out`: the slice is written, the rest untouched."""
    x = torch.randn(2, 5, 5, 16).to(dtype)
    w = torch.randn(8, 16, 3, 3).to(dtype)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))
    slab = torch.full((2, 5, 5, 20), 7.0).to(dtype)
    y = conv2d_forward(x, w, None, geo, Act("relu"), out=slab[..., 3:11]).contiguous()
    assert torch.equal(y, conv2d_forward(x, w, None, geo, Act("relu")))
    assert torch.equal(slab[..., :3], torch.full((2, 5, 5, 3), 7.0).to(dtype)) and (slab[..., 11:] == 7).all()
    pooled = torch.zeros(2, 2, 2, 12).to(dtype)
    win = Window("max", (2, 2), (2, 2), (0, 0), (2, 2))
    epilogue_forward(y, None, None, NO_ACT, None, NO_ACT, win, out=pooled[..., 4:])
    assert torch.equal(pooled[..., 4:], epilogue_forward(y, None, None, NO_ACT, None, NO_ACT, win)[0])


def test_out_is_checked():
    like = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 2, 2, 4\), got \(1, 2, 2, 3\)"):
        check_out(torch.zeros(1, 2, 2, 6)[..., :3], (1, 2, 2, 4), like)
    with pytest.raises(ValueError, match="expected contiguous channels"):
        check_out(torch.zeros(1, 2, 4, 2).transpose(2, 3), (1, 2, 2, 4), like)
    with pytest.raises(ValueError, match="expected torch.float32"):
        check_out(torch.zeros(1, 2, 2, 4, dtype=torch.float16), (1, 2, 2, 4), like)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gradient_kernels_read_a_channel_slice(dtype):
    """What a writer's backward runs on its slice of the concat's gradient (rows 40 channels apart),
    bit for bit as on a copy: the conv's input and weight gradients, and with dz on load batch
    norm's sums pass and both GEMMs computing dz from dy and z as they load them."""
    torch.manual_seed(0)
    slab = torch.randn(2, 5, 5, 40).to(dtype)
    dy, dense = slab[..., 8:24], slab[..., 8:24].contiguous()
    x, z, w = torch.randn(2, 5, 5, 16).to(dtype), torch.randn(2, 5, 5, 16).to(dtype), torch.randn(16, 16, 3, 3).to(dtype)
    geo = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (5, 5))
    zf = z.float().view(-1, 16)
    mean, var = zf.mean(0), zf.var(0, unbiased=False)
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    sums = [batchnorm_backward_on_load(d.view(-1, 16), z.view(-1, 16), mean, var, 1e-5, torch.ones(16).to(dtype),
                                       True, True, scale, shift, Act("relu")) for d in (dy, dense)]
    for a, b in zip(*sums):
        assert torch.equal(a, b)
    for gp in (None, GradPrologue(z, scale, shift, Act("relu"), sums[0][0])):
        got, want = (conv2d_backward_input(d, w, geo, (5, 5), grad_prologue=gp) for d in (dy, dense))
        assert torch.equal(got, want)
        got, want = (conv2d_backward_weight(x, d, w.shape, geo, True, grad_prologue=gp) for d in (dy, dense))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_training_step_copies_no_slice_where_every_writer_reads_its_own():
    """INCEPTION16's branch ends: conv + batch norm + relu and conv + relu (dz on load), a conv alone,
    and a pool then conv + batch norm + relu: no copy kernel forward or backward, and the values
    and gradients are the reference's."""
    model = cnndsl.compile(INCEPTION16, device="cpu").train()
    join = next(g for g in model.plan.groups if g.ops == ("concat",))
    assert join.in_place == (2, 2, 2, 2) and join.forward == join.backward == ()
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    stores = _stores(lambda: model.loss(x, torch.tensor([0, 2])).backward())
    assert not [s for s in stores if s[0] == "copy"]
    run_both(INCEPTION16, batch=2, train=True, fuse=True)


# DenseNet's layer: its input, concatenated with the channels computed from it, is read by the layer
# too (the input forks); the 3x3 conv writes its channels into the concat's output.
DENSE = """
network dense
input 16x5x5
block layer {
    concat {
        branch { }
        branch {
            batchnorm
            relu
            conv 16 3 pad=1 bias=false
        }
    }
}
layer x2
global_avgpool
flatten
dense 3
"""


def test_a_forked_input_takes_its_gradient_where_it_lies():
    """Each dense layer copies its input into the concat's output in forward; in backward nothing is
    copied out: the input's gradient from the concat is its slice of the concat's, read in place
    (slabs.SUMMED) beside the layer's own gradient of it: by the fork's add for the network's input,
    and for a layer's output by the next layer's batch norm backward, which adds it as it writes its
    own (cross_layer.redirected: no pass sums the two)."""
    model = cnndsl.compile(DENSE, device="cpu").train()
    joins = [g for g in model.plan.groups if g.ops == ("concat",)]
    assert [g.in_place for g in joins] == [(3, 2), (3, 2)]
    assert [g.backward for g in joins] == [("fork_sum_in_reader",), ()]
    norms = [g for g in model.plan.groups if g.rule == "norm_act"]
    assert [(g.token, g.nodes[0].inputs[0]) for g in norms] == [(False, 0), (True, joins[0].output.id)]
    assert [g.redirects for g in joins] == [None, joins[0].output.id]
    assert joins[1].into_note.endswith("the sum of layer1.concat1.concat's gradients reads its slice there")
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    see = lambda kernel, values: ("copy", values["cols"], values["stride_dst"]) if kernel.fn.__name__ == \
        "_slice_copy_kernel" else ("sum", values["stride_a"], values["stride_b"]) if kernel.fn.__name__ == \
        "_add_rows_kernel" else ("bn_act_bwd+add", values["stride_addm"]) if kernel.fn.__name__ == \
        "_bn_act_bwd_kernel" and values["HAS_ADD"] else None
    loss = []
    forward = launches(lambda: loss.append(model.loss(x, torch.tensor([0, 2]))), see, execute=False)
    backward = launches(lambda: loss[0].backward(), see, execute=False)
    assert forward == [("copy", 16, 32), ("copy", 32, 48)]  # each input into its concat's slab
    # the network input's slice (rows 32 apart) summed with the layer's gradient of it (16 channels);
    # the first concat's (rows 48 apart) added by the second layer's batch norm backward
    assert sorted(backward) == [("bn_act_bwd+add", 48), ("sum", 32, 16)]
    run_both(DENSE, batch=2, train=True, fuse=True, steps=2)
    run_both(DENSE, batch=2, train=False, fuse=True)



def test_the_gradient_token_holds_in_eval_mode_with_gradients():
    """A dense layer's batch norm in eval mode (a frozen one, or the input gradient of a trained
    model) still takes its input's other gradient by the token: input and weight gradients as the
    reference backend's."""
    torch.manual_seed(0)
    ours = cnndsl.compile(DENSE, device="cpu")
    ref = cnndsl.compile(DENSE, backend="torch", device="cpu")
    ref.load_state_dict(ours.state_dict())
    grads = []
    for model in (ours, ref):
        model.train()
        batch = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(3))
        model.loss(batch, torch.tensor([0, 1, 2, 0])).backward()  # the running statistics move
        model.zero_grad()
        model.eval()
        x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model.loss(x, torch.tensor([0, 2])).backward()
        grads.append([x.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

def test_size_one_dimensions_do_not_count():
    """The gradient of an (N, C, 1, 1) output permuted to NHWC is contiguous with strides (C, 1, 1, 1):
    a writer's slice of it has rows C apart whatever its 1x1 dimensions' strides say."""
    grad = torch.randn(2, 32, 1, 1).permute(0, 2, 3, 1)
    assert grad.stride() == (32, 1, 1, 1) and even_rows(grad[..., 16:]) and row_stride(grad[..., 16:]) == 32
    assert row_stride(grad) == 32 and not even_rows(torch.randn(2, 3, 8).transpose(1, 2)[..., :2])
    src = """
network endcat
input 16x1x1
concat {
    branch {
        conv 16 1
    }
    branch {
        conv 16 1
        relu
    }
}"""
    assert next(g for g in plan(cnndsl.parse(src)).groups if g.in_place).in_place == (2, 2)
    run_both(src, batch=2, train=True, fuse=True)


def test_a_value_concatenated_twice():
    """`branch { }` twice: the concat reads its input twice (copied both times), on both backends."""
    src = """
network twice
input 4x3x3
conv 4 1
concat {
    branch { }
    branch { }
}
flatten
dense 2
"""
    assert next(g for g in plan(cnndsl.parse(src)).groups if g.in_place).in_place == (0, 0)
    run_both(src, batch=2, train=True, fuse=True)
