"""Cross-layer fusion (fuse=True): which blocks defer their epilogue to the next conv and why
(plan.py), the fusion levels, the byte model, and the networks it changes computing what the
reference does, fused (cross-layer) = block-level = unfused, in training, across mode switches
and in low precision step by step."""

import pytest
import torch

import cnndsl
from cnndsl.cli import main
from cnndsl.errors import CnnInputError
from cnndsl.plan import plan, traffic, training_notes
from cnndsl.traffic import group_bytes

from helpers import launches, run_both

# Every reason a block's output is written (no conv bias before a batch norm: its gradient is 0),
# and deferral with and without batch norm or an activation, strided, grouped and depthwise readers.
CHAIN = """network chain
input 3x8x8
conv 16 3 pad=1 bias=false
batchnorm
relu
conv 32 3 stride=2 pad=1 bias=false
batchnorm
leaky_relu 0.1
conv 32 3 pad=1 groups=2
tanh
conv 32 3 pad=2 dilation=2 groups=32 bias=false
batchnorm
sigmoid
conv 8 1
relu
conv 16 3 pad=1 bias=false
batchnorm
relu
residual {
    conv 16 3 pad=1 bias=false
    batchnorm
    conv 16 3 pad=1 bias=false
    batchnorm
}
relu
conv 16 1 bias=false
batchnorm
maxpool 2
global_avgpool
flatten
dense 10
"""


def _notes(src, fuse=True):
    return [(g.name, g.deferred, g.output_note) for g in plan(cnndsl.parse(src), fuse).groups if g.output_note]


def test_each_block_says_whether_its_output_is_written():
    assert _notes(CHAIN) == [
        ("conv1..relu1", True, "its output is not written: conv2 normalises and activates z as it loads it"),
        ("conv2..leaky_relu1", True, "its output is not written: conv3 normalises and activates z as it loads it"),
        ("conv3..tanh1", True, "its output is not written: conv4 activates z as it loads it"),
        ("conv4..sigmoid1", True, "its output is not written: conv5 normalises and activates z as it loads it"),
        ("conv5..relu2", False, ("its output is written: conv6 reads 8 channels per group, padded to 16 with zeros "
                                 "that normalising on load would not keep zero")),
        ("conv6..relu3", False, "its output is written: 2 layers read it (residual1.conv1, residual1.add)"),
        ("residual1.conv1..residual1.batchnorm1", True,
         "its output is not written: residual1.conv2 normalises z as it loads it"),
    ]


def test_fusion_levels():
    net = cnndsl.parse(CHAIN)
    cross, block, unfused = plan(net, True), plan(net, "block"), plan(net, False)
    assert (cross.level, block.level, unfused.level) == ("fused", "fused, block-level", "unfused")
    assert [g.ops for g in cross.groups] == [g.ops for g in block.groups]
    assert not any(g.deferred or g.output_note for g in block.groups + unfused.groups)
    first, second = cross.groups[0], cross.groups[1]
    assert "epilogue_fwd" not in first.forward and "epilogue_fwd" in block.groups[0].forward
    assert second.forward[0] == "prologue+conv_fwd+stats" and second.backward[-1] == "prologue+conv_bwd_weight"
    assert (first.deferred, first.prologue, second.deferred, second.prologue) == (True, False, True, True)
    third = cross.groups[2]
    # batch norm's sums of a deferred block: from its reader's input gradient, not a pass over dy and z
    assert third.backward == ("dz_on_load+conv_bwd_input", "prologue+dz_on_load+conv_bwd_weight")
    assert first.backward[0] == second.backward[0] == "bn_sums_in_reader"
    assert block.groups[0].backward[0] == "bn_bwd_reduce"
    assert first.dz_on_load and third.dz_on_load and not any(g.dz_on_load for g in block.groups + unfused.groups)
    with pytest.raises(ValueError, match='fuse: expected True'):
        plan(net, "cross")
    with pytest.raises(CnnInputError, match='fuse: expected True .cross-layer fusion.'):
        cnndsl.compile(net, fuse=1, device="cpu")


def test_cross_layer_fusion_saves_the_epilogue_pass_and_dz():
    net = cnndsl.parse(CHAIN)
    cross, block = plan(net, True).groups, plan(net, "block").groups
    moved = lambda g, kernels: group_bytes(net, g.nodes, kernels, 4, 2, True)
    # forward: a deferred block's epilogue pass that read z and wrote y (batch 4, bf16: z and y have one size)
    z = 4 * 2 * 16 * 8 * 8
    assert moved(block[0], block[0].forward) - moved(cross[0], cross[0].forward) == 2 * z
    # backward of conv6..relu3 (stride 1, 16x4x4): batch norm's sums (2z), the pass that read dy and z and
    # wrote dz (3z), and the GEMMs' two reads of dz (2z), against the sums (2z) and the GEMMs reading dy and z
    # where they read dz (4z); and its output's two gradients (residual1.conv1's and the shortcut's) summed
    # apart (3z) against the shortcut's read in residual1.conv1's input gradient (z)
    assert block[5].name == "conv6..relu3" and cross[5].dz_on_load and not cross[5].deferred
    assert cross[5].backward[-1] == "fork_sum_in_reader" and cross[6].token and cross[7].redirects == cross[5].output.id
    z5 = 4 * 2 * 16 * 4 * 4
    assert moved(block[5], block[5].backward) - moved(cross[5], cross[5].backward) == (2 + 3 + 2 - 2 - 4 + 2) * z5
    assert traffic(net, block[0], 4, 2)["inference"] == traffic(net, cross[0], 4, 2)["inference"]


def test_dz_on_load_only_where_it_moves_fewer_bytes():
    net = cnndsl.parse(CHAIN)
    for cross, block in zip(plan(net, True).groups, plan(net, "block").groups):
        if cross.rule == "conv_block" and "pool" not in cross.ops:
            saves = traffic(net, block, 4, 2)["training"][0] - traffic(net, cross, 4, 2)["training"][0]
            assert saves > 0 if cross.dz_on_load or cross.deferred else saves == 0, (cross.name, saves)
    # conv2 (3x3, stride 2): its input gradient's four phases would each read dy and z
    assert not plan(net, True).groups[1].dz_on_load
    # the residual branch's last block (batch norm, then the add): its gather pass writes da once, as the
    # shortcut's gradient
    last = next(g for g in plan(net, True).groups if g.name.startswith("residual1.conv2"))
    assert last.dz_on_load and last.backward[0] == "epilogue_bwd+bn_sums"


def test_a_shortcuts_gradient_is_added_in_the_convs_input_gradient():
    # conv6..relu3's output forks to residual1.conv1 and the add: fused, residual1.conv1's input gradient
    # adds the shortcut's gradient (no add kernel); block-level, a pass sums the two
    counts = []
    for fuse in (True, "block"):
        model = cnndsl.compile(CHAIN, backend="triton", fuse=fuse, device="cpu")
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        counts.append(launches(lambda m=model, x=x: m(x).sum().backward(), execute=False).count("_add_kernel"))
    assert counts == [0, 1]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_the_chain_trains_as_the_reference_does():
    # (block-level fusion runs every group that does not defer, in every other network test)
    run_both(CHAIN, batch=3, train=True, fuse=True, steps=2)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_train_then_eval_then_a_step():
    net = cnndsl.parse(CHAIN)
    torch.manual_seed(0)
    ref = cnndsl.compile(net, backend="torch", device="cpu")
    tri = cnndsl.compile(net, device="cpu")
    tri.load_state_dict(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (tri, ref)]
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 4, 9])
    for mode in ("train", "eval", "eval_grad", "train"):
        for m, opt in zip((tri, ref), opts):
            m.train(mode == "train")
            opt.zero_grad()
            if mode == "eval":
                with torch.no_grad():
                    m.out = m(x)
            else:
                loss, logits = m.loss_and_logits(x, t)
                loss.backward()
                m.out = logits.detach()
                opt.step()
        torch.testing.assert_close(tri.out, ref.out, rtol=1e-4, atol=1e-5, msg=mode)
    for a, b in zip(tri.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
def test_bf16_step_by_step():
    # Triton's interpreter sums the dot of a tile the prologue computed in another order than that
    # of the same values loaded (numpy's matmul takes another loop), so a relu at a value within a
    # rounding of 0 can decide against the float64 reference; seed 1 has no such value (a GPU runs
    # one wgmma either way).
    run_both(CHAIN, batch=2, dtype=torch.bfloat16, train=True, fuse=True, seed=1)


# Conv blocks that pool in their GEMM in training (relu + max, reading a deferred z through the
# prologue; conv + average, leaky_relu + a padded max) and one that cannot (tanh: its gradient needs
# z); NARROW's has too few channels to compute dz on load (fewer than 16 are padded), so its dz is
# written by a pass of its own.
POOLED = """network pooled
input 3x16x16
conv 16 3 pad=1
relu
conv 16 3 pad=1
relu
maxpool 2
conv 16 3 pad=1
avgpool 2
conv 16 3 pad=1
tanh
maxpool 2
conv 16 3 pad=1
leaky_relu 0.1
maxpool 3 stride=3 pad=1
flatten
dense 10
"""
NARROW = """network narrow
input 3x12x12
conv 8 3 pad=1
leaky_relu 0.1
maxpool 3 stride=3 pad=1
flatten
dense 10
"""


def test_pool_in_the_gemm_in_training():
    net = cnndsl.parse(POOLED)
    cross, block = plan(net, True).groups, plan(net, "block").groups
    assert [g.gemm_pool for g in cross] == [False, True, True, False, True, False]
    assert not any(g.gemm_pool for g in block + plan(net, False).groups)
    assert cross[1].forward == ("prologue+conv_fwd+pool",)
    assert cross[1].backward == ("pooled_dz_on_load+conv_bwd_input", "prologue+pooled_dz_on_load+conv_bwd_weight")
    assert [g.dz_on_load for g in cross] == [True, True, True, False, True, False]
    assert cross[3].forward == ("conv_fwd", "epilogue_fwd")
    narrow = plan(cnndsl.parse(NARROW), True).groups[0]
    assert narrow.gemm_pool and not narrow.dz_on_load and narrow.backward[0] == "pool_bwd_from_y"
    # relu + 2x2 max (batch 4, bf16), beside x and w: block-level, z is written, read by the epilogue
    # pass and by backward's, which writes dz, which both gradient GEMMs read (6z), and y and the
    # argmax are written and read back (2y + 2a); across layers, y and the argmax are written and both
    # GEMMs read the pooled dy, y and argmax (5y + 3a), with y = z/4 and a = z/8 (one byte each)
    z, y, a = 4 * 2 * 16 * 16 * 16, 4 * 2 * 16 * 8 * 8, 4 * 16 * 8 * 8
    moved = lambda g: traffic(net, g, 4, 2)["training"][0]
    assert moved(block[1]) - moved(cross[1]) == 6 * z - 3 * y - a
    text = str(plan(net, True))
    assert "its conv pools in the GEMM: no z written" in text
    assert "its conv's gradients compute it as they load the pooled dy, argmax and y" in text


def test_an_average_pool_in_the_gemm_says_its_backward_reads_no_argmax_or_y(tmp_path, capsys):
    """POOLED's conv + 2x2 average pool pools in its GEMM and computes dz on load from the pooled dy
    alone: `cnndsl plan --train` says so (not y and the argmax, which its max-pool group reads)."""
    groups = plan(cnndsl.parse(POOLED), True).groups
    avg = next(g for g in groups if g.gemm_pool and g.output.attrs.mode == "avg")
    notes = ["its conv pools in the GEMM: no z written; backward reads no argmax or y",
             "its backward writes no dz: its conv's gradients compute it as they load the pooled dy"]
    assert training_notes(avg) == notes
    (tmp_path / "pooled.cnn").write_text(POOLED)
    assert main(["plan", str(tmp_path / "pooled.cnn"), "--train"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(f"       {n}" in out for n in notes)
    assert "       its backward writes no dz: its conv's gradients compute it as they load the pooled dy, argmax and y" \
        in out


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_blocks_train_as_the_reference_does(dtype):
    run_both(POOLED, batch=2, dtype=dtype, train=True, fuse=True)
    run_both(NARROW, batch=2, dtype=dtype, train=True, fuse=True)


# Blocks that defer to a max pool of their own: a stem (stride 2, batch norm, relu; no input
# gradient, so its backward computes dz on load at any stride) before an overlapping pool, and
# a conv + relu before a ceil-mode pool.
STEM = """network stem
input 3x12x12
conv 16 3 stride=2 pad=1 bias=false
batchnorm
relu
maxpool 3 stride=2 pad=1
conv 16 3 pad=1
relu
maxpool 3 stride=2 ceil_mode=true
flatten
dense 10
"""


def test_a_block_defers_to_a_max_pool():
    net = cnndsl.parse(STEM)
    cross, block = plan(net, True).groups, plan(net, "block").groups
    assert _notes(STEM) == [
        ("conv1..relu1", True, "its output is not written: maxpool1 normalises and activates z as it loads it"),
        ("conv2..relu2", True, "its output is not written: maxpool2 activates z as it loads it")]
    assert cross[1].forward == ("prologue+pool_fwd",) and cross[1].prologue
    assert cross[0].dz_on_load and cross[2].dz_on_load  # the stem at stride 2: it has no input gradient
    # the stem (batch 4, bf16, z 16x6x6): the epilogue pass that read z and wrote y (2z) is gone; backward's
    # sums and dz pass (2z + 3z) become the pool's backward reading z for the sums (z) and the weight
    # gradient's extra read (z)
    z = 4 * 2 * 16 * 6 * 6
    moved = lambda g: traffic(net, g, 4, 2)["training"][0]
    assert cross[0].backward[0] == "bn_sums_in_reader"
    assert moved(block[0]) - moved(cross[0]) == 2 * z + (5 - 2) * z
    assert moved(block[1]) == moved(cross[1])


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_deferring_to_a_pool_train_as_the_reference_does(dtype):
    run_both(STEM, batch=2, dtype=dtype, train=True, fuse=True, steps=2 if dtype == torch.float32 else 1)
