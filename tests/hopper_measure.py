"""The compile-and-measure worker behind tests/test_hopper_speed.py and benchmarks/hopper_report.py,
run as a script by tests/hopper.py `measure` (TRITON_INTERPRET=0, a fresh Triton cache):
`hopper_measure.py REQUEST.json OUT.json`.

Each recorded launch of a kernel with a `tl.dot` becomes one compile per GPU config its
autotuner would try (its early prune sees the launch); any other launch one compile as
launched; launches that specialise alike compile once. The request's "select" keeps some of
them (see `select`). Triton's tutorial matmul (03-matrix-multiplication) compiles alongside in
fp16 and bf16 at the request's "yardstick" config (the tutorial's own: 128x128x64 tiles, 8 warps,
3 stages); with "same_tile" also at every other config of the chosen GEMMs, for comparison at
equal tiles. Each compile for sm_90a yields ptxas's -v report (registers, spills), the shared
memory Triton allocates and the SASS listing (`nvdisasm -c -g`), read by tests/hopper_sass.py.
A launch's kind (LAUNCHERS) comes from the launchers that made it (tests/hopper.py Recorder)."""

import os

os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas runs for every compile: its -v report is always printed
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import contextlib  # after the environment that Triton reads at import
import io
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
import traceback

import triton
import triton.language as tl
from hopper_jit import (
    Pointer,
    compile_spec,
    decode,
    exact_key,
    kernel,
    show,
    specialise,
    variants,
)
from hopper_sass import global_loads, loop_metrics, parse, ptxas_usage

# The launchers whose launches are each kind of product, looked up innermost first among a launch's callers.
LAUNCHERS = {"conv2d_forward": "conv forward", "conv2d_backward_input": "conv input-grad",
             "conv2d_backward_weight": "conv weight-grad", "dense_forward": "dense",
             "dense_backward_input": "dense", "dense_backward_weight": "dense"}
TILE = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
@triton.jit
def tutorial_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                           stride_cn, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                           BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    # Triton's tutorial 03-matrix-multiplication, as published (without its activation)
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):  # noqa: PIE808 - as published
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_SIZE_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_SIZE_K, other=0.0)
        accumulator = tl.dot(a, b, accumulator)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    c = accumulator.to(c_ptr.dtype.element_ty)
    offs_cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    tl.store(c_ptrs, c, mask=c_mask)


def _tutorial_job(dtype, config):
    """The tutorial as its benchmark launches it, row-major (4096, 4096) operands (GROUP_SIZE_M 8),
    with config (BLOCK_SIZE_M, _N, _K, num_warps, num_stages)."""
    n = 4096
    a, b, c = (Pointer(dtype, 0) for _ in range(3))
    block_m, block_n, block_k, warps, stages = config
    args = dict(zip(tutorial_matmul_kernel.arg_names, (a, b, c, n, n, n, n, 1, n, 1, n, 1, block_m, block_n,
                                                       block_k, 8)))
    spec = specialise(tutorial_matmul_kernel, args, {"num_warps": warps, "num_stages": stages})
    return dict(spec, module="__main__", kernel="tutorial_matmul_kernel", kind="tutorial", launchers=["tutorial"],
                launches=1, dtype=dtype, gemm=True, path={}, ones=[],
                tile={"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k})


def _dtype(launch):
    return next((v["tensor"] for v in launch["args"].values() if isinstance(v, dict) and "tensor" in v), None)


def _kind(launch):
    return next((LAUNCHERS[c] for c in launch.get("callers", ()) if c in LAUNCHERS), "other")


def _launcher(launch):
    """The launch's launcher: a kind's (LAUNCHERS), else the innermost public caller, else the kernel."""
    callers = launch.get("callers", ())
    return next((c for c in callers if c in LAUNCHERS), next((c for c in callers if not c.startswith("_")),
                                                             launch["kernel"]))


def _path(spec, declared):
    """The declared constexprs other than the tile that are set (not False): the code path."""
    return {k: show(v) for k, v in spec["named"].items()
            if k in declared and k not in TILE and k != "GROUP_M" and v is not False}


def _code_path(launch, spec):
    """What a compile is but for its tile config: kernel, argument types, constexprs, attributes."""
    return json.dumps([launch["module"], launch["kernel"], spec["signature"], repr(sorted(spec["attrs"].items())),
                       sorted((k, repr(v)) for k, v in spec["named"].items() if k not in TILE)])


def jobs(launches):
    """exact key -> job: every distinct compile of the launches (see the module's docstring), with
    what the report shows of it: kind, the launchers and how many launches reach it, dtype, the
    code path, the ints specialised to 1 and the tile."""
    found = {}
    for launch in launches:
        k = kernel(launch["module"], launch["kernel"])
        gemm = "tl.dot(" in k.jit.src and not launch["args"].get("NO_TAPS")  # (a phase no tap reaches: zeros)
        declared = {p.name for p in k.jit.params if p.is_constexpr}
        launcher = _launcher(launch)
        keys = set()
        for args in variants(launch["args"]):
            if k.tuner is not None and gemm:
                specs = [k.with_config(args, cfg) for cfg in k.pruned(args)]
            elif k.tuner is not None:  # not a GEMM: its first config that the prune keeps
                specs = [k.with_config(args, k.pruned(args)[0])]
            else:
                specs = [specialise(k.jit, args, {n: decode(v) for n, v in launch["options"].items()})]
            for spec in specs:
                key = exact_key(launch, spec)
                job = found.setdefault(key, dict(
                    spec, module=launch["module"], kernel=launch["kernel"], kind=_kind(launch), launchers=[],
                    launches=0, dtype=_dtype(launch), gemm=gemm, path=_path(spec, declared),
                    ones=sorted(n for n, t in spec["signature"].items() if t == "constexpr" and n not in declared),
                    tile={t: spec["named"][t] for t in TILE if t in spec["named"]}, code_path=_code_path(launch, spec)))
                if launcher not in job["launchers"]:
                    job["launchers"].append(launcher)
                keys.add(key)
        for key in keys:
            found[key]["launches"] += 1
    return found


def _config(job):
    return (*job["tile"].values(), job["options"]["num_warps"], job["options"]["num_stages"])


def select(found, rules):
    """The jobs a request's "select" keeps: "all", or the union of rules, each {"dtypes": [...],
    "kinds": [...], "tiles": [[BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages], ...],
    "one_path": bool, "one_config": bool}: the GEMM compiles of those dtypes and kinds whose
    config is one of the tiles (a missing key keeps every value); one_path keeps the first
    compile of each kind, dtype and config (one code path per config), one_config the first of
    each code path (one config per code path: the first its autotuner's prune keeps)."""
    if rules == "all":
        return list(found.values())
    kept = {}
    for rule in rules:
        tiles, seen = {tuple(t) for t in rule.get("tiles", ())}, set()
        for key, job in found.items():
            if not (job["gemm"] and job["dtype"] in rule.get("dtypes", [job["dtype"]])
                    and job["kind"] in rule.get("kinds", [job["kind"]]) and (not tiles or _config(job) in tiles)):
                continue
            group = (job["kind"], job["dtype"], _config(job)) if rule.get("one_path") else \
                job["code_path"] if rule.get("one_config") else key
            if group not in seen:
                seen.add(group)
                kept[key] = job
    return list(kept.values())


def _disassemble(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", "-g", f.name], capture_output=True,
                              text=True, check=True).stdout


CHOSEN = []  # the jobs to compile: set before the pool forks, so that workers read them by index


def measure(i):
    """The numbers of compile CHOSEN[i] (see the module's docstring); the error instead where it fails."""
    job = CHOSEN[i]
    start = time.perf_counter()
    out = {k: job[k] for k in ("module", "kernel", "kind", "launchers", "launches", "dtype", "gemm", "path", "ones",
                               "tile")}
    out.update(num_warps=job["options"]["num_warps"], num_stages=job["options"]["num_stages"], error=None)
    try:
        jit = tutorial_matmul_kernel if job["kind"] == "tutorial" else kernel(job["module"], job["kernel"]).jit
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = compile_spec(jit, job)
        out.update(ptxas_usage(log.getvalue()), shared=compiled.metadata.shared,
                   serialized="C7515" in log.getvalue())  # ptxas: wgmma serialized, the pipeline lost
        instructions, labels = parse(_disassemble(compiled.asm["cubin"]))
        out["loop"] = loop_metrics(instructions, labels, out["num_warps"]) if job["gemm"] else None
        out.update(global_loads(instructions), instructions=len(instructions))
    except Exception:  # noqa: BLE001 - any failure is a result of its own, reported with its traceback
        out["error"] = traceback.format_exc()
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


if __name__ == "__main__":
    request_path, out_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    yardstick = tuple(request["yardstick"])
    CHOSEN += [_tutorial_job(d, yardstick) for d in ("float16", "bfloat16")]
    CHOSEN += select(jobs(request["launches"]), request["select"])
    if request["same_tile"]:  # the tutorial at every other config of the GEMMs chosen
        CHOSEN += [_tutorial_job(d, c) for d, c in sorted({(j["dtype"], _config(j)) for j in CHOSEN if j["gemm"]})
                   if c != yardstick]
    with multiprocessing.get_context("fork").Pool(request["processes"]) as pool:  # forked before any compile
        results = pool.map(measure, range(len(CHOSEN)), chunksize=1)
    with open(out_path, "w") as f:
        json.dump(results, f)
