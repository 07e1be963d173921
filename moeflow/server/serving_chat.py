"""The chat endpoint (vLLM's OpenAIServingChat): the chat template renders the messages; each
choice's text is split into reasoning_content (<think>...</think>) and content, and tool calls are
parsed from it, streamed as OpenAI's deltas; tool_choice "required" or a named function
constrains the output to such calls. Never imports torch."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moeflow.engine.async_engine import AsyncEngine
from moeflow.engine.output_processor import RequestUpdate
from moeflow.errors import RequestError
from moeflow.sampling_params import StructuredOutputsParams
from moeflow.server import protocol, responses
from moeflow.server.metrics import ServerMetrics
from moeflow.server.serving import (
    THINK_END,
    THINK_START,
    ApiError,
    Choice,
    Job,
    OpenAIServing,
    ServerConfig,
    event_stream,
    request_sampling_params,
)
from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning
from moeflow.tokenizer.tool_parsers import (
    KNOWN_TOOL_PARSERS,
    TOOL_MARKERS,
    TOOL_PARSERS,
    ToolCall,
    ToolCallDelta,
    pick_tool_parser,
    tool_call_grammar,
)


class OpenAIServingChat(OpenAIServing):
    """POST /v1/chat/completions."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        super().__init__(engine, config, metrics)
        self.use_reasoning = config.reasoning == "on" or (
            config.reasoning == "auto"
            and self.tokenizer.token_to_id(THINK_START) is not None
            and self._think_end_id is not None
        )
        self.tool_parser = pick_tool_parser(config.tool_call_parser, self.tokenizer.chat_template)
        # Tool markers this tokenizer holds as special tokens would vanish from decoded text:
        # tool requests then keep special tokens (as vLLM does for these parsers).
        self._keep_special_for_tools = any(
            (tid := self.tokenizer.token_to_id(m)) is not None
            and self.tokenizer.decode([tid], skip_special_tokens=True) == ""
            for m in TOOL_MARKERS
        )

    async def create_chat_completion(
        self, request: Request, req: protocol.ChatCompletionRequest
    ) -> Response:
        self._check_model(req.model)
        kwargs = dict(req.chat_template_kwargs or {})
        sampling = req.sampling_kwargs()
        tools = req.template_tools()
        if tools is not None:
            kwargs["tools"] = tools
            self._constrain_tool_call(req, tools, sampling)
            if self._keep_special_for_tools and sampling.get("skip_special_tokens", True):
                sampling["skip_special_tokens"] = False
        messages = req.template_messages()
        tokenizer = self.tokenizer

        def render() -> tuple[str, list[int]]:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            return text, tokenizer.encode(text, add_special_tokens=False)

        try:
            prompt_text, prompt_ids = await asyncio.to_thread(render)
        except RequestError as e:
            raise ApiError(400, str(e), param=e.param or "messages") from None
        in_reasoning = self.use_reasoning and prompt_opens_reasoning(
            prompt_text, THINK_START, THINK_END
        )
        parser_name = self.tool_parser if tools is not None else None

        def new_choice(index: int, prompt_idx: int) -> Choice:
            parser = TOOL_PARSERS[parser_name](tools) if parser_name is not None else None
            call_tags = parser.call_tags if parser is not None else ()
            splitter = ReasoningSplitter(THINK_START, THINK_END, in_reasoning, call_tags)
            return Choice(index, prompt_idx, splitter if self.use_reasoning else None, parser)

        job = await self._submit(
            [prompt_ids],
            request_sampling_params(sampling, self.config.default_sampling),
            req.n,
            new_choice,
            chat=True,
            want_logprobs=req.logprobs,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )
        if req.stream:
            return event_stream(self._sse(job, self._role_chunks(job), self._chat_chunk))
        if not await self._collect_or_leave(request, job):
            return Response(status_code=499)  # the client is gone; nothing reads this
        return JSONResponse(self._chat_response(job))

    def _constrain_tool_call(
        self, req: protocol.ChatCompletionRequest, tools: list[dict[str, Any]], sampling: dict
    ) -> None:
        """Check that this model's call format is parsed; for tool_choice "required" or a named
        function, constrain the output to such calls (arguments valid against the tools'
        schemas), so that even a small model calls."""
        if self.tool_parser is None:
            raise ApiError(
                400,
                "this model's chat template writes tool calls in a format not known here "
                '(tool_choice "none" works; `moeflow serve --tool-call-parser` picks one of: '
                f"{', '.join(KNOWN_TOOL_PARSERS)})",
                param="tools",
            )
        choice = req.effective_tool_choice
        if choice == "auto":
            return
        if "structured_outputs" in sampling:
            raise ApiError(
                400,
                'tool_choice "required" or a named function cannot be combined with '
                "response_format or another output constraint",
                param="tool_choice",
            )
        name = None if isinstance(choice, str) else choice.function.name
        try:
            grammar = tool_call_grammar(
                self.tool_parser, tools, name, req.parallel_tool_calls, self.tokenizer.token_to_id
            )
        except ValueError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        sampling["structured_outputs"] = StructuredOutputsParams(grammar=grammar, param="tools")

    def _chat_response(self, job: Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            reasoning, content = (
                c.splitter.split(c.final_text) if c.splitter else (None, c.final_text)
            )
            calls: list[ToolCall] = []
            if c.tool_parser is not None:
                content, calls = c.tool_parser.parse(content)
            logprobs = None
            if job.want_logprobs:
                logprobs = responses.chat_logprobs(self._logprob_entries(c, 0, len(c.logprobs)))
            finish = _finish_reason(c.finish_reason, bool(calls))
            choices.append(
                (c.index, content, reasoning, logprobs, finish, [t.to_openai() for t in calls])
            )
        model = self.config.served_model_name
        return responses.chat_completion_response(
            job.rid, job.created, model, choices, self._usage(job)
        )

    def _role_chunks(self, job: Job) -> list[dict[str, Any]]:
        """Chat streams open with each choice's role, as OpenAI's do."""
        model = self.config.served_model_name
        delta = {"role": "assistant", "content": ""}
        return [
            responses.chat_completion_chunk(job.rid, job.created, model, c.index, delta)
            for c in job.choices
        ]

    def _chat_chunk(
        self, job: Job, c: Choice, update: RequestUpdate, delta: str, start: int
    ) -> dict[str, Any] | None:
        entries = self._logprob_entries(c, start, len(c.logprobs)) if job.want_logprobs else None
        finish = update.finish_reason
        reasoning_delta, content_delta = c.splitter.feed(delta) if c.splitter else ("", delta)
        if finish is not None and c.splitter is not None:
            reasoning_tail, content_tail = c.splitter.finish()
            reasoning_delta += reasoning_tail
            content_delta += content_tail
        call_deltas: list[ToolCallDelta] = []  # OpenAI's: id and name first, then arguments
        if c.tool_parser is not None:
            content_delta, call_deltas = c.tool_parser.feed(content_delta)
            if finish is not None:
                content_tail, tail_deltas = c.tool_parser.finish()
                content_delta += content_tail
                call_deltas += tail_deltas
            finish = _finish_reason(finish, bool(c.tool_parser.calls))
        payload: dict[str, Any] = {}
        if content_delta:
            payload["content"] = content_delta
        if reasoning_delta:
            payload["reasoning_content"] = reasoning_delta
        if call_deltas:
            payload["tool_calls"] = [d.to_openai() for d in call_deltas]
        if not (payload or finish is not None or entries):
            return None
        logprobs = responses.chat_logprobs(entries) if entries else None
        model = self.config.served_model_name
        return responses.chat_completion_chunk(
            job.rid, job.created, model, c.index, payload, finish, logprobs
        )

    # ---- logprobs and usage --------------------------------------------------------------------
    def _logprob_entries(self, choice: Choice, start: int, end: int) -> list[dict[str, Any]]:
        """Chat logprobs entries of choice.logprobs[start:end]."""
        decode = self.tokenizer.decode
        out = []
        for lp in choice.logprobs[start:end]:
            text = decode([lp.token_id], skip_special_tokens=False)
            top = [(decode([t], skip_special_tokens=False), v) for t, v in lp.top.items()]
            out.append(responses.logprobs_content_entry(text, lp.logprob, top))
        return out


def _finish_reason(finish: str | None, has_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if finish == "stop" and has_calls else finish
