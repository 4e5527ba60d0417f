"""Time one training step (forward, loss, backward) and one inference forward of a
network on the GPU, for the triton backend (fused and unfused) and the reference backend
(eager PyTorch, cuDNN), measured side by side in one run with triton.testing.do_bench.

    python benchmarks/step_time.py examples/resnet18.cnn --batch 64 --dtype bf16
"""

import argparse
import json

import torch
import triton

import cnndsl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(model, x, target, train: bool):
    model.train(train)
    if train:
        def step():
            model.zero_grad(set_to_none=True)
            model.loss(x, target).backward()
    else:
        def step():
            with torch.no_grad():
                model(x)
    step()  # compile and autotune outside the timing
    return triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/step_time.py needs a CUDA GPU")
    dtype, net = DTYPES[args.dtype], cnndsl.parse(args.file)
    x = torch.randn(args.batch, *net.input_shape, device="cuda", dtype=dtype)
    target = torch.randint(0, net.output_shape[0], (args.batch,), device="cuda")
    rows = []
    for name, kw in (("triton-unfused", {"backend": "triton", "fuse": False}), ("torch-eager", {"backend": "torch"})):
        model = cnndsl.compile(net, device="cuda", dtype=dtype, **kw)
        for train in (False, True):
            med, p20, p80 = measure(model, x, target, train)
            rows.append({"provider": name, "mode": "train" if train else "infer", "dtype": args.dtype,
                         "batch": args.batch, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                         "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
