"""The offline API, vLLM-shaped: `LLM(model=...)`, `llm.generate(prompts, params)`,
`llm.chat(messages, params)`. One output per prompt, in order."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

from moeflow.config import EngineArgs, EngineConfig
from moeflow.engine.factory import build_engine, load
from moeflow.engine.output_processor import OutputProcessor, RequestState
from moeflow.engine.sampler import TokenLogprobs
from moeflow.errors import RequestError
from moeflow.loading.loader import LoadedModel
from moeflow.sampling_params import SamplingParams
from moeflow.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        hf_overrides: dict[str, Any] | None = None,
        quantize: str | None = None,
        enforce_eager: bool = False,
        overlap_schedule: bool | None = None,
    ) -> None:
        """`model`: None (the embedded SmolLM2), a Hugging Face folder, a .gguf file (any shard
        of a split set), "org/name" or "org/name-GGUF:Q4_K_M" found in the local Hugging Face
        cache, or "preset:<name>" (a real shape with random weights, moeflow/loading/presets.py);
        `hf_overrides` changes config.json fields of a preset (e.g. fewer layers); `quantize`
        ("q8_0" | "q4_0" | "q4_k") quantises the float linear layers and MoE experts on load
        for the CPU kernels; `enforce_eager` keeps decode out of CUDA graphs (on a GPU they are
        captured at start);
        `overlap_schedule` launches each step before reading the previous step's tokens
        (default: on for a CUDA device, where the host's work then hides behind the GPU's).
        The other knobs are EngineArgs' (moeflow/config.py); "auto" and None are resolved by
        engine/factory.py."""
        args = EngineArgs(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            kv_cache_tokens=kv_cache_tokens,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            hf_overrides=hf_overrides,
            quantize=quantize,
            enforce_eager=enforce_eager,
            overlap_schedule=overlap_schedule,
        )
        self.loaded: LoadedModel = load(args)
        self.engine = build_engine(args, self.loaded)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLM:
        return cls(**{f.name: getattr(args, f.name) for f in fields(args)})

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def kv_cache_bytes(self) -> int:
        return self.engine.kv_cache_bytes

    @property
    def tokenizer(self) -> Tokenizer:
        return self.loaded.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, or a list of token ids) as raw text."""
        batch = _as_prompt_list(prompts)
        ids = [
            p if isinstance(p, list) else self.tokenizer.encode(p, add_special_tokens=True)
            for p in batch
        ]
        return self._run(ids, params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {role, content}) or a list of conversations, through
        the model's own chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.encode_chat(conv, chat_template_kwargs) for conv in conversations]  # type: ignore[arg-type]
        return self._run(ids, params)

    def encode_chat(
        self, messages: list[Message], chat_template_kwargs: dict[str, Any] | None = None
    ) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Generate for one prompt, yielding text deltas as tokens arrive (never a split UTF-8
        character). Stop strings end the stream before the stop string is yielded."""
        engine, outputs = self.engine, self._outputs
        state = outputs.add_request(prompt_ids, params)
        try:
            while not state.finished:
                outputs.process(engine.step())
                delta = state.text.next_delta()
                if delta:
                    yield delta
            if state.req.error is not None:
                raise RequestError(state.req.error)
        finally:
            if not state.finished:
                outputs.abort(state.request_id)

    @functools.cached_property
    def _outputs(self) -> OutputProcessor:
        """Text and stop strings of every request this LLM runs, whichever call steps the
        engine (a suspended `stream` keeps its text while `generate` runs)."""
        return OutputProcessor(self.engine)

    def _run(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        per_prompt = (
            [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        )
        if len(per_prompt) != len(prompt_ids):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompt_ids)} prompts")
        engine, outputs = self.engine, self._outputs
        states: list[RequestState] = []
        try:
            for ids, p in zip(prompt_ids, per_prompt, strict=True):
                states.append(outputs.add_request(ids, p))
            while engine.has_unfinished():  # as run_to_completion, through the processor
                outputs.process(engine.step())
        except BaseException:
            for s in states:
                outputs.abort(s.request_id)
            raise
        for s in states:
            if s.req.error is not None:
                raise RequestError(s.req.error)
        return [_to_output(s) for s in states]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _to_output(state: RequestState) -> RequestOutput:
    req = state.req
    return RequestOutput(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_ids,
        text=state.text.text,
        token_ids=list(state.token_ids),
        finish_reason=state.finish_reason,
        stop_reason=state.stop_reason,
        logprobs=state.logprobs,
        num_cached_tokens=req.num_cached_tokens,
    )
