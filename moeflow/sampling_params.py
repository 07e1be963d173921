"""SamplingParams (validated on construction), StructuredOutputsParams, KVTransferParams and
FinishReason. Leaf
module: the engine and the API both import it; api.py re-exports them."""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from moeflow.errors import RequestError

MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024
MAX_CHOICES = 1024
# A KV transfer id: what a router may put in a header and a log line.
TRANSFER_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-9 would overflow
# float32.
GREEDY_EPS = 1e-5


@dataclass
class StructuredOutputsParams:
    """What the output must match, vLLM's shape: exactly one of a JSON schema (`json`, a dict or
    its JSON text), any JSON object (`json_object`), a regular expression (`regex`), one of some
    strings (`choice`) or a Lark grammar (`grammar`, llguidance's dialect). Enforced by
    engine/structured_output.py as a token mask; `param` is the request field an error names."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        kinds = [
            self.json is not None,
            self.json_object,
            self.regex is not None,
            self.choice is not None,
            self.grammar is not None,
        ]
        _check(
            sum(kinds) == 1, self.param, "needs one of json, json_object, regex, choice, grammar"
        )
        if self.choice is not None:
            _check(
                0 < len(self.choice) <= MAX_CHOICES
                and all(isinstance(c, str) for c in self.choice),
                self.param,
                f"choice must be 1 to {MAX_CHOICES} strings",
            )

    def key(self) -> str:
        """The cache key of the compiled grammar: equal constraints, equal keys."""
        if self.json is not None:
            if isinstance(self.json, str):
                return "json:" + self.json
            return "json:" + json.dumps(self.json, sort_keys=True)
        if self.json_object:
            return "json_object"
        if self.regex is not None:
            return "regex:" + self.regex
        if self.choice is not None:
            return "choice:" + json.dumps(self.choice)
        return "grammar:" + str(self.grammar)


@dataclass(frozen=True)
class KVTransferParams:
    """Prefill/decode disaggregation (moeflow/disagg/, docs/DISAGGREGATION.md), vLLM's field
    names: on a prefill instance `do_remote_decode` sends the prompt's KV to the decode instance
    when the request finishes; on a decode instance `do_remote_prefill` takes the prompt's KV
    (and first token) from the prefill instance instead of computing it. `transfer_id` links
    the two halves of one request."""

    transfer_id: str
    do_remote_decode: bool = False
    do_remote_prefill: bool = False

    def __post_init__(self) -> None:
        _check(
            isinstance(self.transfer_id, str)
            and TRANSFER_ID_PATTERN.fullmatch(self.transfer_id) is not None,
            "kv_transfer_params.transfer_id",
            "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
        )
        _check(
            self.do_remote_decode != self.do_remote_prefill,
            "kv_transfer_params",
            "needs exactly one of do_remote_decode (a prefill instance) and do_remote_prefill "
            "(a decode instance)",
        )


@dataclass
class SamplingParams:
    """vLLM-shaped. temperature 0 means greedy; max_tokens None means the rest of the context."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0: only the sampled)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    structured_outputs: StructuredOutputsParams | None = None  # a constraint on the output
    kv_transfer: KVTransferParams | None = None  # prefill/decode disaggregation
    # Generations per prompt: LLM.generate and the server run n engine requests (choice i of a
    # seeded prompt gets seed + i); one engine request is always n = 1.
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be >= 1")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (off) or positive")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(
            _finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
            "repetition_penalty",
            "must be in (0, 10]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_finite(v) and -2 <= v <= 2, name, "must be in [-2, 2]")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be in [0, {MAX_LOGPROBS}]",
        )
        _check(len(self.stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings")
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS}")
        _check(
            all(
                isinstance(t, int) and t >= 0 and _finite(b) and -100 <= b <= 100
                for t, b in self.logit_bias.items()
            ),
            "logit_bias",
            "maps token ids >= 0 to biases in [-100, 100]",
        )

    @property
    def is_greedy(self) -> bool:
        """Temperatures this close to 0 take the argmax (vLLM's _SAMPLING_EPS): the one
        definition the engine (no generator) and the sampler (no draw) share."""
        return self.temperature < GREEDY_EPS


# generation_config.json keys that are sampling defaults (vLLM's --generation-config auto reads
# the same ones; max_new_tokens is left out: a default must never exceed what the context leaves).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams defaults a checkpoint's generation_config.json sets; validated (a bad
    value is a RequestError naming it)."""
    defaults = {k: generation_config[k] for k in GENERATION_CONFIG_KEYS if k in generation_config}
    SamplingParams(**defaults)
    return defaults


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, param: str, what: str) -> None:
    if not ok:
        raise RequestError(f"{param} {what}", param=param)
