"""Every kernel launch that cnndsl's networks make, compiled for a Hopper GPU (sm_90)
without one: what only a GPU compile shows (a plain-int global read inside @triton.jit
code, a bf16 `tl.dot`, a tile config the interpreter never runs) stays invisible to the
interpreter tests. Nothing here needs a GPU; the compile test skips where Triton's NVIDIA
backend or its ptxas is missing.

1. Record (tests/hopper.py). Under Triton's interpreter, `InterpretedFunction.run` is
   wrapped so that every launch records its kernel (module and name), the value of every argument (tensors as
   dtype and pointer alignment; ints, floats, None, bools, strings and tl dtypes as they
   are; the autotuner's interpreter config among them) and the launch options (num_warps,
   ...), with the kernels skipped (no launch depends on what a kernel computed:
   test_hopper_speed.py checks it). The launches come from `_drive`: a training step (forward, loss, backward) and an
   eval forward of RESIDUAL and EVERYTHING (from test_triton_backend; EVERYTHING with its
   dropout layer) in fp32 and bf16, unfused too where the unfused plan differs; BRANCHES in bf16;
   one fp32
   training step of examples/cifar_small.cnn at batch 2 (its eval forward repeats the same
   launches; bf16 would add 40 s of interpreter time and no kernel or constexpr value that
   the rest does not record); and direct
   launcher calls for what the networks do not reach: the fused-activation epilogues (every
   activation through dense, gelu through conv), rows wider than softmax's widest block, a
   dropout seed past int32 and the cumulative (momentum=None) BatchNorm update.
2. What a GPU launches instead (tests/hopper_gpu.py). The kernel package is imported a
   second time as a GPU process imports it (TRITON_INTERPRET=0). While recording, the launchers use its value of
   every module constant that differs (batchnorm's tile sizes), and every helper that reads
   `INTERPRET` returns its interpreter value tagged with its GPU values: dot_dtype's bf16
   `tl.dot` operands, dot_precision's "ieee" and "tf32" (either, as torch's TF32 switch says).
3. Compile (tests/hopper_jit.py). One subprocess (TRITON_INTERPRET=0, a fresh Triton
   cache) imports the kernel modules (real JITFunctions) and turns each recorded launch into
   what `JITFunction.run` would compile on the GPU (Triton's own binder and `_pack_args`:
   ints pick i32/i64, ints equal to 1 become constexprs, pointers and ints divisible by 16
   get the attribute), with an autotuned kernel's GPU configs (`tuner.gpu_configs`) in place
   of the interpreter's config (and any `triton.heuristics` under the autotuner recomputed
   for that config). Each runs through `triton.compile` for GPUTarget("cuda", 90, 32) down to a cubin
   (ptxas), two processes at a time; a kernel needing more shared memory than an sm_90 block
   has fails too.

   What is compiled, to fit CI (a minute and a half of CPU on two cores): every code path (a
   kernel with one set of argument types, declared constexprs and options; launches that
   differ only in int values, divisibility or ints equal to 1 compile once) with the GPU's
   defaults (fp32 `tl.dot` in ieee precision: torch's TF32 switch off) and the smallest GPU
   config, not the first (the largest tiles: up to 30 s each for an fp32 FMA `tl.dot`); and
   the two GPU configs of each autotuned kernel that stage the most shared memory and hold the
   most accumulator per thread (smaller ones fit where they do), for one code path, in fp32 where
   the kernel runs in it (4-byte elements: the most registers and shared memory a tile) with TF32 on where that is
   a choice (tensor-core tf32, which stages the most shared memory; the GEMM kernels' 16-bit
   configs are test_hopper_speed.py's, which compiles each of them). CNNDSL_HOPPER_ALL_CONFIGS=1
   compiles every code path with every GPU config and both precisions instead (about a thousand
   compiles, 9 minutes on two cores; CNNDSL_HOPPER_PROCESSES sets the pool size).

A second test checks that the recording reaches every `_..._kernel` defined in kernels/*.py,
so that a new kernel cannot escape the compile."""

import json
import os

import pytest
import torch
from hopper import ROOT, nvidia_backend_or_skip, record, run_worker, train_and_eval
from hopper_gpu import KERNELS
from test_zero_copy import DENSE

import cnndsl

from test_triton_backend import BRANCHES, EVERYTHING, RESIDUAL


def _both_plans(src, dtype):
    """`train_and_eval` fused, and unfused where that plans other kernels."""
    from cnndsl.plan import plan
    train_and_eval(src, dtype)
    net = cnndsl.parse(src)
    if plan(net, True).groups != plan(net, False).groups:
        train_and_eval(src, dtype, fuse=False)


def _launcher_extras(dtype):
    """Launches that the networks do not make: the activation epilogues of dense (every one) and
    conv (gelu), the conv's residual and pool epilogue, the training epilogue with each pool and
    both batch-norm backwards, dz on load's batch-norm sums and shortcut gather pass, rows wider
    than softmax's widest block, a dropout seed past int32, momentum=None, stochastic depth, a
    conv applying a channel gate as it loads x (forward and weight gradient, with dz on load too),
    a prologue without batch norm into a conv of one channel block, dz on load from an average
    pool's dy, and (bf16) dz on load reading dy as a channel slice of a concat's gradient (zero-copy)."""
    from cnndsl.kernels import (
        batchnorm,
        batchnorm_backward,
        conv,
        dense,
        dropout,
        epilogue,
        epilogue_backward,
        softmax,
        stochastic_depth,
    )
    from cnndsl.kernels.activation import ACTIVATIONS
    from cnndsl.specs import Act, ConvGeometry, Window
    x2, w2, b2 = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype), torch.randn(5, dtype=dtype)
    x4, w4, b4 = torch.randn(1, 4, 4, 3, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype), torch.randn(4, dtype=dtype)
    for act in ACTIVATIONS:  # every epilogue in dense (quick to compile), one in conv (slow)
        dense.dense_forward(x2, w2, b2, Act(act))
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1), 1, (4, 4))
    conv.conv2d_forward(x4, w4, b4, geometry, Act("gelu"))
    res4 = torch.randn(1, 4, 4, 4, dtype=dtype)
    for mode in ("max", "avg"):  # the inference conv block: residual, act2 and a pool in the epilogue
        pool = Window(mode, (2, 2), (2, 2), (0, 0), (2, 2))
        conv.conv2d_forward(x4, w4, b4, geometry, Act("relu"), residual=res4, act2=Act("silu"), pool=pool)
        z = torch.randn(2, 4, 4, 3, dtype=dtype)
        mean, var = torch.zeros(3), torch.ones(3)
        y, arg = epilogue.epilogue_forward(z, mean, var, Act("relu"), z, Act("tanh"), pool)
        for train in (True, False):  # batch norm's backward through batch or running statistics
            bn = epilogue_backward.BatchNormBackward(mean, var, 1e-5, torch.ones(3, dtype=dtype), True, True, train)
            epilogue_backward.epilogue_backward(y, z, mean, var, Act("relu"), z, Act("tanh"), pool, arg, bn)
        # dz on load: batch norm's sums through an activation, dz's coefficients, a shortcut's gather pass
        batchnorm_backward.batchnorm_backward_on_load(z.view(-1, 3), z.view(-1, 3), mean, var, 1e-5, None, False,
                                                      True, mean, var, Act("relu"))
        epilogue_backward.epilogue_backward_on_load(z, z, mean, var, z, Act("relu"), None, None, bn)
    # a deferred block without batch norm (EfficientNet's squeeze conv + silu): the prologue's
    # coefficients are constants, its stand-in pointers the input's dtype
    from cnndsl.kernels.prologue import Prologue
    x16, g16 = torch.randn(2, 4, 4, 16, dtype=dtype), torch.rand(2, 16, dtype=dtype)  # a gate applied on load
    w1 = torch.randn(8, 16, 1, 1, dtype=dtype)
    conv.conv2d_forward(x16, w1, None, ConvGeometry((1, 1), (0, 0), (1, 1), 1, (4, 4)),
                        prologue=Prologue(None, None, Act("silu")))
    one = ConvGeometry((1, 1), (0, 0), (1, 1), 1, (4, 4))
    conv.conv2d_forward(x16, torch.randn(8, 16, 1, 1, dtype=dtype), None, one, gate=g16)
    dy8 = torch.randn(2, 4, 4, 8, dtype=dtype)
    conv.conv2d_backward_weight(x16, dy8, (8, 16, 1, 1), one, True, gate=g16)  # the gate in the weight gradient
    # dz on load from an average pool's dy (a conv + average pool block, DenseNet's transitions)
    from cnndsl.kernels.prologue import GradPrologue
    dy_avg, w16 = torch.randn(2, 2, 2, 16, dtype=dtype), torch.randn(16, 16, 1, 1, dtype=dtype)
    gp = GradPrologue(dy_avg, None, None, Act("none"), pool=Window("avg", (2, 2), (2, 2), (0, 0), (2, 2)))
    conv.conv2d_backward_input(dy_avg, w16, one, (4, 4), grad_prologue=gp)
    conv.conv2d_backward_weight(x16, dy_avg, w16.shape, one, True, grad_prologue=gp)
    if dtype == torch.bfloat16:  # dy's rows 48 channels apart, z's 16: the GP_SLICE paths
        dy, z16 = torch.randn(2, 4, 4, 48, dtype=dtype)[..., 16:32], torch.randn(2, 4, 4, 16, dtype=dtype)
        w16, ones, zeros = torch.randn(16, 16, 1, 1, dtype=dtype), torch.ones(16), torch.zeros(16)
        center, _, _ = batchnorm_backward.batchnorm_backward_on_load(dy.view(-1, 16), z16.view(-1, 16), zeros, ones,
                                                                     1e-5, None, False, True, ones, zeros, Act("relu"))
        gp, g1 = GradPrologue(z16, ones, zeros, Act("relu"), center), ConvGeometry((1, 1), (0, 0), (1, 1), 1, (4, 4))
        conv.conv2d_backward_input(dy, w16, g1, (4, 4), grad_prologue=gp)
        conv.conv2d_backward_weight(z16, dy, w16.shape, g1, False, grad_prologue=gp)
        dz16 = torch.randn(2, 4, 4, 16, dtype=dtype)  # dz on load beside a gate (EfficientNet's project conv)
        gp = GradPrologue(z16, ones, zeros, Act("none"), center)
        conv.conv2d_backward_weight(z16, dz16, w16.shape, g1, False, grad_prologue=gp, gate=g16)
    wide = torch.randn(2, softmax._MAX_BLOCK + 3, dtype=dtype)
    y = softmax.softmax_forward(wide)
    softmax.softmax_backward(torch.randn_like(y), y)
    target = torch.tensor([0, 1])
    _, lse = softmax.cross_entropy_forward(wide, target)
    softmax.cross_entropy_backward(torch.ones(()), wide, target, lse)
    dropout.dropout_forward(x2, 0.5, 2**40)
    stochastic_depth.stochastic_depth_forward(x4, 0.5, 2**40)  # a seed past int32
    mean, var = batchnorm.batchnorm_stats(x2)
    batchnorm.batchnorm_update_running(mean, var, torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype),
                                       torch.zeros((), dtype=torch.int64), None, 3)


def _drive():
    for dtype in (torch.float32, torch.bfloat16):
        _both_plans(RESIDUAL, dtype)
        _both_plans(EVERYTHING, dtype)
        _launcher_extras(dtype)
    _both_plans(BRANCHES, torch.bfloat16)  # concat, gate, uneven pools, 1x1 maps: the same kernels in fp32
    train_and_eval(DENSE, torch.bfloat16)  # a dense layer's batch norm adding its input's other gradient
    train_and_eval(ROOT / "examples" / "cifar_small.cnn", torch.float32, evaluate=False)


@pytest.fixture(scope="module")
def recorded():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches under Triton's interpreter (TRITON_INTERPRET=1); this process runs a GPU")
    return record(_drive, execute=False)  # kernels skipped: the same launches (test_hopper_speed.py shows it)


def test_recording_covers_every_kernel(recorded):
    launches, _, defined, _ = recorded
    assert defined, f"no `_..._kernel` found in {KERNELS}"
    seen = {(launch["module"], launch["kernel"]) for launch in launches}
    missing = sorted(f"{m}.{k}" for m, k in defined - seen)
    assert not missing, ("kernels that no recorded launch reaches (add a network or launcher call to "
                         f"tests/test_hopper_compile.py::_drive): {missing}")


# --- compiling ----------------------------------------------------------------------------

COMPILE_SCRIPT = r'''
import json, multiprocessing, os, re, sys, time, traceback
os.environ["TRITON_INTERPRET"] = "0"
from hopper_jit import MAX_SHARED, compile_spec, decode, exact_key, kernel, show, specialise, variants

launches_path, out_path, mode, processes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# A float max or min that returns the other operand of a NaN (tl.maximum, tl.max); the NaN-propagating
# forms are `max.NaN.f32` or a compare and select (kernels/_common.py nan_max).
NAN_DROPPING = re.compile(r"\b(?:max|min)(?:\.ftz)?\.(?:f32|f16|bf16|f16x2|bf16x2)\b")


def coarse_key(launch, jit, spec):
    # the kernel's code path: argument types (an int specialised to the constexpr 1 counts as an i32), the
    # declared constexprs and the options; not the divisibility attributes
    declared = {p.name for p in jit.params if p.is_constexpr}
    types = {k: "i32" if v == "constexpr" else v for k, v in spec["signature"].items() if k not in declared}
    consts = sorted((k, repr(v)) for k, v in spec["named"].items() if k in declared)
    return json.dumps([launch["module"], launch["kernel"], types, consts, repr(sorted(spec["options"].items()))])


def size(cfg):
    n = cfg.num_warps * cfg.num_stages
    for v in cfg.kwargs.values():
        n *= v if isinstance(v, int) else 1
    return n


jobs = {}  # exact key -> job
errors = []


def add(launch, spec, config, tier):
    key = exact_key(launch, spec)
    if key not in jobs:
        jobs[key] = dict(spec, module=launch["module"], kernel=launch["kernel"], config=config, tier=tier,
                         names=list(launch["args"]))


def expand(launches):
    coarse = set()
    sweep = {}  # (module, kernel, dtype) -> (launch, Kernel): the first such launch
    for launch in launches:
        try:
            k = kernel(launch["module"], launch["kernel"])
            every = list(variants(launch["args"]))
            for args in every if mode == "all" else every[:1]:  # the GPU's defaults: TF32 off
                if k.tuner is None:
                    spec = specialise(k.jit, args, {n: decode(v) for n, v in launch["options"].items()})
                    label = "launch options"
                else:
                    i, cfg = min(enumerate(k.configs), key=lambda c: size(c[1]))
                    spec = k.with_config(args, cfg)
                    label = f"GPU config {i} (the smallest): {cfg}"
                key = coarse_key(launch, k.jit, spec)
                if key in coarse:
                    continue
                coarse.add(key)
                if k.tuner is not None and mode == "all":
                    for i, cfg in enumerate(k.pruned(args)):
                        add(launch, k.with_config(args, cfg), f"GPU config {i}: {cfg}", "all")
                    continue
                add(launch, spec, label, "path")
                if k.tuner is not None:  # one launch a kernel, in fp32 where it has one (its first tensor's dtype)
                    dtype = next((v["tensor"] for v in launch["args"].values()
                                  if isinstance(v, dict) and "tensor" in v), None)
                    name = (launch["module"], launch["kernel"])
                    if name not in sweep or (dtype == "float32" and sweep[name][2] != "float32"):
                        sweep[name] = (launch, k, dtype)
        except Exception:
            errors.append({"kernel": f"{launch['module']}.{launch['kernel']}", "stage": "specialise",
                           "launch": json.dumps(launch["args"]), "error": traceback.format_exc()})
    for launch, k, _ in sweep.values():
        args = list(variants(launch["args"]))[-1]  # GPU values last: TF32 on, where it is a choice
        for i, cfg in extremes(k.pruned(args)):
            try:
                add(launch, k.with_config(args, cfg), f"GPU config {i}: {cfg}", "configs")
            except Exception:
                errors.append({"kernel": f"{launch['module']}.{launch['kernel']}", "stage": "specialise",
                               "launch": json.dumps(launch["args"]), "error": traceback.format_exc()})


def _mnk(cfg):
    """A config's (BLOCK_M, BLOCK_N, BLOCK_K); an elementwise kernel's BLOCK as its K."""
    kw = cfg.kwargs
    return kw.get("BLOCK_M", 1), kw.get("BLOCK_N", 1), kw.get("BLOCK_K", kw.get("BLOCK", 1))


def extremes(configs):
    """(index, config) of the configs most likely to fail on sm_90: the one staging the most
    shared memory (operand tiles times stages) and the one holding the most accumulator per
    thread (registers); smaller ones fit where these do."""
    def staged(i):
        m, n, k = _mnk(configs[i])
        return (m * k + k * n) * configs[i].num_stages

    def held(i):
        m, n, k = _mnk(configs[i])
        return m * n * k / configs[i].num_warps

    picked = {max(range(len(configs)), key=staged), max(range(len(configs)), key=held)}
    return [(i, configs[i]) for i in sorted(picked)]


def compile_one(i):
    job = items[i]
    start = time.perf_counter()
    shared = nan_dropping = None
    try:
        compiled = compile_spec(kernel(job["module"], job["kernel"]).jit, job)
        shared = compiled.metadata.shared
        nan_dropping = sorted(set(NAN_DROPPING.findall(compiled.asm.get("ptx", ""))))
        error = None if compiled.asm.get("cubin") else "no cubin produced"
        if error is None and shared > MAX_SHARED:
            error = (f"OutOfResources: needs {shared} bytes of shared memory, an sm_90 block may use at most "
                     f"{MAX_SHARED} (an autotuner compiles such a config and then skips it; other launches raise)")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    return {"kernel": f"{job['module']}.{job['kernel']}", "tier": job["tier"],
            "signature": {k: v for k, v in job["signature"].items() if v != "constexpr"},
            "constexprs": {k: show(v) for k, v in job["named"].items()},
            "divisible_by_16": [job["names"][p[0]] if len(p) == 1 else str(p) for p, a in job["attrs"].items() if a],
            "config": job["config"], "num_warps": job["options"]["num_warps"],
            "num_stages": job["options"]["num_stages"], "shared": shared, "nan_dropping": nan_dropping,
            "error": error,
            "seconds": round(time.perf_counter() - start, 3)}


if __name__ == "__main__":
    with open(launches_path) as f:
        expand(json.load(f))
    items = list(jobs.values())
    if processes > 1:  # forked before any compile: no MLIR state to inherit
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = list(pool.imap_unordered(compile_one, range(len(items)), chunksize=1))
    else:
        results = [compile_one(i) for i in range(len(items))]
    with open(out_path, "w") as f:
        json.dump({"results": results, "errors": errors}, f)
'''


def _describe(failures):
    """Failures grouped by kernel and error: each error once, with every launch it broke."""
    groups = {}
    for f in failures:
        groups.setdefault((f["kernel"], f["error"]), []).append(f)
    lines = []
    for (kernel, error), fs in sorted(groups.items()):
        lines.append(f"\n=== {kernel}: {len(fs)} compile(s) failed with:\n{error.strip()[:3000]}")
        for f in fs:
            if "signature" not in f:  # the launch could not be specialised
                lines.append(f"  - launch {f['launch']}")
                continue
            lines.append(f"  - signature {f['signature']}, constexprs {f['constexprs']}, divisible by 16: "
                         f"{f['divisible_by_16']}, {f['config']} (num_warps={f['num_warps']}, "
                         f"num_stages={f['num_stages']})")
    return "\n".join(lines)


def test_recorded_launches_compile_for_hopper(recorded, tmp_path):
    nvidia_backend_or_skip()
    launches, changed, _, record_s = recorded
    launches_path, out_path = tmp_path / "launches.json", tmp_path / "results.json"
    launches_path.write_text(json.dumps(launches))
    script = tmp_path / "hopper_compile.py"
    script.write_text(COMPILE_SCRIPT)
    mode = "all" if os.environ.get("CNNDSL_HOPPER_ALL_CONFIGS") == "1" else "ci"
    processes = int(os.environ.get("CNNDSL_HOPPER_PROCESSES", min(2, os.cpu_count() or 1)))
    proc, compile_s = run_worker(script, [launches_path, out_path, mode, processes], tmp_path)
    assert proc.returncode == 0, f"the compile subprocess failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-10000:]}"
    out = json.loads(out_path.read_text())
    results, errors = out["results"], out["errors"]
    failures = errors + [r for r in results if r["error"]]
    kernels = {r["kernel"] for r in results}
    print(f"\nhopper compile: {len(launches)} recorded launches in {record_s:.0f} s; {len(results)} compiles of "
          f"{len(kernels)} kernels for sm_90 in {compile_s:.0f} s; {len(failures)} failed")
    if changed:
        print("GPU values of interpreter-dependent constants used while recording:\n  " + "\n  ".join(changed))
    assert results, "nothing was compiled"
    assert not failures, f"{len(failures)} of {len(results)} sm_90 compiles failed:" + _describe(failures)
    # NaN must propagate as in torch on the GPU too, where the interpreter's numpy max hides the difference.
    dropping = sorted({(r["kernel"], tuple(r["nan_dropping"])) for r in results if r["nan_dropping"]})
    assert not dropping, "float max/min that drops NaN (use _common.nan_max):\n" + "\n".join(
        f"  {kernel}: {', '.join(found)}" for kernel, found in dropping)
