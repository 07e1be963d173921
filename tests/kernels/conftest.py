"""Fixtures of the kernel tests."""

from __future__ import annotations

from typing import Any

import pytest

from moeflow.kernels import cpu_ext


@pytest.fixture(params=list(cpu_ext.ISAS))
def isa_ops(request: pytest.FixtureRequest) -> Any:
    """The CPU kernels built for one instruction set (skipped where this CPU lacks it): a test
    taking it runs on each instruction set the machine has."""
    module = cpu_ext.ops_for(request.param)
    if module is None:
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return module
