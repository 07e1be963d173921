"""moeflow: run open-weight Mixture-of-Experts (and dense) language models near the hardware
limit. The offline API: `from moeflow import LLM, SamplingParams`.

Both names load on first use, so `import moeflow.env` (or `python -m moeflow.kernels.cpu_ext`,
which scripts/setup.sh runs before moeflow's dependencies are installed) imports no engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeflow.api import LLM
    from moeflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from moeflow.api import LLM

        return LLM
    if name == "SamplingParams":
        from moeflow.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'moeflow' has no attribute {name!r}")
