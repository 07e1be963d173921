"""moeflow: run open-weight Mixture-of-Experts (and dense) language models near the hardware
limit. The offline API: `from moeflow import LLM, SamplingParams`."""

from moeflow.api import LLM
from moeflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
