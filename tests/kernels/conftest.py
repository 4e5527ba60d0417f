"""The kernel tests run with Triton's interpreter checking every int32 add, sub and mul for
overflow, as under TRITON_DEBUG=1 (cnndsl leaves the checks off otherwise, as a GPU compiles them
away: they double the interpreter's time). Tests marked `network` run a whole network of these
kernels at the same small sizes, as the network tests do, without them."""

import dataclasses

import pytest


@pytest.fixture(autouse=True)
def _overflow_checked(request, monkeypatch):
    if request.node.get_closest_marker("network"):
        return
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True, sanitize_overflow=True))
