"""The op registry (cnndsl/ops) and the fusion rules (cnndsl/rules.py) are complete: every op
kind has each part its stages need, every table is derived from them, and the front end reads
them without torch."""

import inspect
import subprocess
import sys
from dataclasses import replace

import pytest

from cnndsl.ir import Op
from cnndsl.layers import LAYERS
from cnndsl.ops import KEYWORDS, REGISTRY
from cnndsl.ops.base import Kernels
from cnndsl.options import _KINDS
from cnndsl.rules import RULES
from cnndsl.runtime.triton_module import RUNNERS

RULE_OPS = {s.op.value for r in RULES for s in r.stages if s.required}  # ops that run through a rule


def missing(d) -> list[str]:
    """The parts an op kind lacks, given what it is: a layer keyword needs a reference
    implementation, anything the triton backend may run alone a runner of kernels/ and the
    kernels it launches."""
    lacks = []
    if d.op == "input":
        return lacks
    if not callable(d.build) or not callable(d.shape):
        lacks.append("build and shape")
    if d.reference is None:
        lacks.append("reference")
    if d.op not in RULE_OPS:
        if d.runner is None or d.runner.rsplit(".", 1)[-1] not in RUNNERS:
            lacks.append("runner")
        if d.op != "flatten" and not d.kernels.forward:
            lacks.append("kernels")
    if d.op in RULE_OPS and not d.kernels.forward:
        lacks.append("kernels (when its rule runs it alone)")
    for word, kw in d.keywords.items():
        if any(o.kind not in _KINDS for o in kw.options):
            lacks.append(f"option kinds of {word}")
    return lacks


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_op_has_what_its_stages_need(name):
    assert missing(REGISTRY[name]) == []


def test_the_check_catches_an_op_without_a_part():
    pool = REGISTRY["pool"]
    assert missing(replace(pool, reference=None)) == ["reference"]
    assert missing(replace(pool, runner="pool.no_such_runner")) == ["runner"]
    assert missing(replace(pool, kernels=Kernels())) == ["kernels"]


def test_tables_are_derived_from_the_registry():
    assert [op.value for op in Op] == list(REGISTRY)
    assert LAYERS is KEYWORDS and set(KEYWORDS) == {w for d in REGISTRY.values() for w in d.keywords}
    assert all(KEYWORDS[w].op == d.op for d in REGISTRY.values() for w in d.keywords)
    for rule in RULES:
        assert rule.runner.rsplit(".", 1)[-1] in RUNNERS
        assert all(s.op.value in REGISTRY for s in rule.stages)


def test_every_runner_takes_inputs_then_spec_and_state():
    for name, runner in RUNNERS.items():
        if name not in ("fork", "redirect", "cross_entropy"):  # the executor's and the loss's
            params = inspect.signature(runner).parameters
            if [p.kind for p in params.values()] == [inspect.Parameter.VAR_POSITIONAL]:  # a join of any arity
                assert f"(*{next(iter(params))}, spec, state)" in runner.__doc__, name
            else:
                assert list(params)[-2:] == ["spec", "state"], name


def test_the_front_end_reads_the_registry_without_torch():
    code = ("import sys, cnndsl; from cnndsl.plan import plan; from cnndsl.codegen import lower; "
            "net = cnndsl.parse('examples/resnet18.cnn'); net.summary(); lower(net, plan(net)); "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
