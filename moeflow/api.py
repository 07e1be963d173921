"""The offline API, vLLM-shaped: `LLM(model=...)`, `llm.generate(prompts, sampling_params)`,
`llm.chat(messages, sampling_params)`. One RequestOutput per prompt, in order, holding
`SamplingParams.n` CompletionOutputs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from moeflow.config import EngineArgs, EngineConfig
from moeflow.engine.cost import usage_cost
from moeflow.engine.factory import build_engine, load, shutdown_executor
from moeflow.engine.output_processor import OutputProcessor, RequestState
from moeflow.engine.sampler import TokenLogprobs
from moeflow.errors import RequestError
from moeflow.loading.loader import LoadedModel
from moeflow.sampling_params import SamplingParams
from moeflow.sampling_params import StructuredOutputsParams as StructuredOutputsParams
from moeflow.tokenizer import Tokenizer

# A prompt: text, token ids, or vLLM's dicts {"prompt": text} / {"prompt_token_ids": ids}.
Prompt = str | list[int] | Mapping[str, Any]
Message = dict[str, Any]


@dataclass
class CompletionOutput:
    """One of a prompt's `n` generations (vLLM's CompletionOutput). `logprobs` holds one
    TokenLogprobs per output token (the sampled token's logprob and the top ones by id) when
    the request asked for logprobs, else None; `cumulative_logprob` is then their sum."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: str | int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One prompt's result (vLLM's RequestOutput): `outputs[i]` for i < n. `prompt` is the
    text when the prompt was given as text, else None. `text`, `token_ids`, `finish_reason`,
    `stop_reason` and `logprobs` are shortcuts to `outputs[0]`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (by outputs[0])
    # What the request cost, its n generations together (engine/cost.py usage_cost, as the
    # server's usage.cost; usd null); reasoning_seconds counts the tokens up to a </think>.
    cost: dict[str, Any] | None = field(default=None, compare=False)  # timings differ per run

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> str | int | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs


class LLM:
    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
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
        use_mmap: bool = True,
        enforce_eager: bool = False,
        overlap_schedule: bool | None = None,
        chat_template: str | None = None,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        data_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        expert_placement: list[list[int]] | None = None,
    ) -> None:
        """`model`: None (the embedded SmolLM2), a Hugging Face folder, a .gguf file (any shard
        of a split set), "org/name" or "org/name-GGUF:Q4_K_M" found in the local Hugging Face
        cache, or "preset:<name>" (a real shape with random weights, moeflow/loading/presets.py);
        `tokenizer`: a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json and
        its chat template) used instead of the model's own, e.g. to pair a GGUF with it;
        `hf_overrides` changes config.json fields of a preset (e.g. fewer layers); `quantize`
        ("q8_0" | "q4_0" | "q4_k") quantises the float linear layers and MoE experts on load
        for the CPU kernels; `enforce_eager` keeps decode out of CUDA graphs (on a GPU they are
        captured at start); `use_mmap=False` (llama.cpp's --no-mmap) reads a GGUF file's
        blocks into the process's own memory on load instead of using them in place from the
        memory-mapped file;
        `overlap_schedule` launches each step before reading the previous step's tokens
        (default: on for a CUDA device, where the host's work then hides behind the GPU's);
        `chat_template` (a jinja source) replaces the checkpoint's chat template;
        `gpu_memory_utilization` (vLLM's) is the share of a GPU's memory the engine may hold in
        all, which sizes the KV cache (default: 0.9 of what the weights leave).
        `tensor_parallel_size` ranks split every layer (`enable_expert_parallel`: the MoE layers
        by expert, `expert_placement` giving each MoE layer's slots), started by
        `distributed_executor_backend` "mp" | "ray" | "external_launcher" (torchrun); this
        process is rank 0 and `shutdown()` stops the others (docs/DISTRIBUTED.md);
        `data_parallel_size` replicas of that group each run their share of the requests
        (round-robin; the whole model per replica, prefix caching off).
        The other knobs are EngineArgs' (moeflow/config.py); "auto" and None are resolved by
        engine/factory.py."""
        args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
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
            use_mmap=use_mmap,
            enforce_eager=enforce_eager,
            overlap_schedule=overlap_schedule,
            chat_template=chat_template,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_expert_parallel=enable_expert_parallel,
            data_parallel_size=data_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            expert_placement=expert_placement,
        )
        try:
            self.loaded: LoadedModel = load(args)
            self.engine = build_engine(args, self.loaded)
        except BaseException:
            shutdown_executor()  # the other ranks, when this one failed to start
            raise

    def shutdown(self) -> None:
        """Stop the other ranks of a parallel engine and leave its group (a no-op in one
        process); this LLM cannot generate after."""
        executor = self.engine.runner.executor
        if executor is not None:
            self.engine.runner.executor = None
            shutdown_executor()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

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
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt as raw text: a string, a list of token ids, {"prompt": text} or
        {"prompt_token_ids": ids}. One SamplingParams for all, or one per prompt."""
        batch = _as_prompt_list(prompts)
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in batch:
            text, prompt_ids = _prompt_parts(p)
            if prompt_ids is None:
                prompt_ids = self.tokenizer.encode(text or "", add_special_tokens=True)
            texts.append(text)
            ids.append(prompt_ids)
        return self._run(ids, texts, sampling_params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {role, content}) or a list of conversations, through
        the model's own chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts: list[str | None] = [
            self.tokenizer.apply_chat_template(
                conv,  # type: ignore[arg-type]
                add_generation_prompt=True,
                **(chat_template_kwargs or {}),
            )
            for conv in conversations
        ]
        ids = [self.tokenizer.encode(t or "", add_special_tokens=False) for t in texts]
        return self._run(ids, texts, sampling_params)

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
        prompt_texts: list[str | None],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[RequestOutput]:
        """Run every prompt's n generations together (generation i of a seeded prompt gets
        seed + i, as the server does)."""
        if params is None:
            params = SamplingParams()
        per_prompt = (
            [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
        )
        if len(per_prompt) != len(prompt_ids):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompt_ids)} prompts")
        engine, outputs = self.engine, self._outputs
        states: list[list[RequestState]] = []
        try:
            for ids, p in zip(prompt_ids, per_prompt, strict=True):
                states.append([])
                for i in range(p.n):
                    seed = None if p.seed is None else (p.seed + i) % 2**63
                    one = dataclasses.replace(p, n=1, seed=seed)
                    states[-1].append(outputs.add_request(ids, one))
            while engine.has_unfinished():  # as run_to_completion, through the processor
                outputs.process(engine.step())
        except BaseException:
            for group in states:
                for s in group:
                    outputs.abort(s.request_id)
            raise
        for group in states:
            for s in group:
                if s.req.error is not None:
                    raise RequestError(s.req.error)
        think_end_id = self.tokenizer.token_to_id("</think>")
        return [
            _to_output(group, text, think_end_id)
            for group, text in zip(states, prompt_texts, strict=True)
        ]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _prompt_parts(prompt: Prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; one of them is None. A dict holds exactly one of
    "prompt" and "prompt_token_ids" (multimodal and embedding inputs are not supported)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, Mapping):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise RequestError(
                f"prompt dict keys {sorted(unknown)} are not supported; give 'prompt' (text) "
                "or 'prompt_token_ids'",
                param="prompt",
            )
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise RequestError(
                "a prompt dict holds exactly one of 'prompt' and 'prompt_token_ids'",
                param="prompt",
            )
        if "prompt" in prompt:
            text = prompt["prompt"]
            if not isinstance(text, str):
                raise RequestError("'prompt' must be a string", param="prompt")
            return text, None
        return None, _token_ids(prompt["prompt_token_ids"])
    return None, _token_ids(prompt)


def _token_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise RequestError("prompt token ids must be a list of ints", param="prompt")
    return list(value)


def _to_output(
    group: list[RequestState], prompt: str | None, think_end_id: int | None
) -> RequestOutput:
    req = group[0].req
    completions = []
    for i, state in enumerate(group):
        logprobs = state.logprobs
        completions.append(
            CompletionOutput(
                index=i,
                text=state.text.text,
                token_ids=list(state.token_ids),
                cumulative_logprob=(
                    None if logprobs is None else sum(lp.logprob for lp in logprobs)
                ),
                logprobs=logprobs,
                finish_reason=state.finish_reason,
                stop_reason=state.stop_reason,
            )
        )
    return RequestOutput(
        request_id=req.request_id,
        prompt=prompt,
        prompt_token_ids=req.prompt_ids,
        outputs=completions,
        num_cached_tokens=req.num_cached_tokens,
        cost=usage_cost([(s.cost(), _reasoning_tokens(s, think_end_id)) for s in group], None),
    )


def _reasoning_tokens(state: RequestState, think_end_id: int | None) -> int:
    """Output tokens up to and including the first </think> (0 without one)."""
    ids = state.token_ids
    return ids.index(think_end_id) + 1 if think_end_id is not None and think_end_id in ids else 0
