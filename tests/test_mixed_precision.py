"""Mixed precision: an fp32 model run inside torch.autocast computes in the autocast dtype. The
kernels read 16-bit copies of the fp32 parameters (the master weights), the gradients reach the
fp32 parameters through the casts, and the batch norms' running statistics stay fp32. So a step
under autocast equals, bit for bit, the same step of a model converted to that dtype, and the
trainer's `--dtype bf16|fp16` (fp16 with loss scaling) trains with fp32 weights and optimizer state."""

from pathlib import Path

import pytest
import torch

import cnndsl
from cnndsl.train import Options, train

from helpers import assert_close
from test_triton_backend import RESIDUAL

BATCH = 4
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits.cnn"


def _models(dtype, fuse):
    torch.manual_seed(0)
    master = cnndsl.compile(RESIDUAL, backend="triton", fuse=fuse, device="cpu")
    half = cnndsl.compile(RESIDUAL, backend="triton", fuse=fuse, device="cpu").to(dtype)
    half.load_state_dict(master.state_dict())
    return master, half


@pytest.mark.parametrize(("dtype", "fuse"), [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)],
                         ids=["bf16-fused", "fp16-fused", "bf16-unfused"])
def test_a_step_under_autocast_is_the_step_of_a_16_bit_model(dtype, fuse):
    master, half = _models(dtype, fuse)
    x = torch.randn(BATCH, *master.net.input_shape)
    target = torch.randint(0, master.net.output_shape[0], (BATCH,))
    with torch.autocast("cpu", dtype=dtype):
        loss, logits = master.loss_and_logits(x, target)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    ref_loss, ref_logits = half.loss_and_logits(x.to(dtype), target)
    ref_loss.backward()
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    for (name, p), q in zip(master.named_parameters(), half.parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.equal(p.grad, q.grad.float()), name
    for (name, b), c in zip(master.named_buffers(), half.buffers()):
        assert b.dtype == (torch.int64 if "num_batches" in name else torch.float32), name
        assert_close(b.double(), c.double(), dtype, name=name)  # c was rounded to 16 bits
    master.eval()  # eval folds the fp32 running statistics into 16-bit weights
    half.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = master(x)
    assert out.dtype == dtype
    assert_close(out.double(), half(x.to(dtype)).double(), dtype, reduction=72, depth=6, name="eval")


def test_autocast_leaves_a_16_bit_model_and_fp32_without_it_alone():
    master, half = _models(torch.bfloat16, True)
    x = torch.randn(BATCH, *master.net.input_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert half(x.bfloat16()).dtype == torch.bfloat16
    assert master(x).dtype == torch.float32


def test_the_reference_backend_agrees_under_autocast():
    torch.manual_seed(0)
    tri = cnndsl.compile(RESIDUAL, backend="triton", device="cpu")
    ref = cnndsl.compile(RESIDUAL, backend="torch", device="cpu")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(BATCH, *tri.net.input_shape)
    target = torch.randint(0, tri.net.output_shape[0], (BATCH,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = tri.loss(x, target), ref.loss(x, target)
    a.backward()
    b.backward()
    assert_close(a.double(), b.double(), torch.bfloat16, depth=6, name="loss")
    for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
        assert_close(p.grad.double(), q.grad.double(), torch.bfloat16, reduction=BATCH * 81, depth=6, name=name)


# The loop on the reference backend (fast): the triton backend's steps under autocast are the tests above.
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_in_mixed_precision_keeps_fp32_weights(tmp_path, dtype):
    opts = Options(batch_size=128, dtype=dtype, backend="torch", out=str(tmp_path), val_split=0.0, epochs=2)
    result = train(DIGITS, opts, log=lambda *_: None)
    saved = torch.load(result["checkpoint"], weights_only=True)
    assert all(t.dtype in (torch.float32, torch.int64) for t in saved["model"].values())
    assert all(v.dtype == torch.float32 for s in saved["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")
    assert result["test_accuracy"] > 0.8
    assert ("scaler" in saved) == (dtype == "fp16")  # fp16's loss scale, kept for a resumed run
    if dtype == "fp16":
        assert saved["scaler"]["scale"] > 0
