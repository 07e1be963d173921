"""The completions endpoint (vLLM's OpenAIServingCompletion): prompts as text or token ids,
several per request, and the legacy logprobs shape. Never imports torch."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moeflow.engine.output_processor import RequestUpdate
from moeflow.server import protocol, responses
from moeflow.server.serving import (
    ApiError,
    Choice,
    Job,
    OpenAIServing,
    event_stream,
    request_sampling_params,
)


class OpenAIServingCompletion(OpenAIServing):
    """POST /v1/completions."""

    async def create_completion(
        self, request: Request, req: protocol.CompletionRequest
    ) -> Response:
        self._check_model(req.model)
        vocab_size = self.engine.vocab_size
        ids: list[list[int]] = []
        for i, p in enumerate(req.prompt_list()):
            if isinstance(p, str):
                ids.append(await asyncio.to_thread(self.tokenizer.encode, p, True))
            else:
                if any(t >= vocab_size for t in p):
                    raise ApiError(400, f"token ids must be < {vocab_size}", param=f"prompt[{i}]")
                ids.append(list(p))
        job = await self._submit(
            ids,
            request_sampling_params(req.sampling_kwargs(), self.config.default_sampling),
            req.n,
            lambda index, prompt_idx: Choice(index, prompt_idx, splitter=None),
            chat=False,
            want_logprobs=req.logprobs is not None,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )
        if req.stream:
            return event_stream(self._sse(job, [], self._completion_chunk))
        if not await self._collect_or_leave(request, job):
            return Response(status_code=499)
        return JSONResponse(self._completion_response(job))

    def _completion_response(self, job: Job) -> dict[str, Any]:
        choices = []
        for c in job.choices:
            logprobs = self._legacy_logprobs(c) if job.want_logprobs else None
            choices.append((c.index, c.final_text, logprobs, c.finish_reason))
        model = self.config.served_model_name
        return responses.completion_response(job.rid, job.created, model, choices, self._usage(job))

    # ---- streaming -----------------------------------------------------------------------------
    def _completion_chunk(
        self, job: Job, c: Choice, update: RequestUpdate, delta: str, start: int
    ) -> dict[str, Any] | None:
        finish = update.finish_reason
        if not (delta or finish is not None or (job.want_logprobs and update.new_logprobs)):
            return None
        logprobs = self._legacy_logprobs(c, start) if job.want_logprobs else None
        model = self.config.served_model_name
        return responses.completion_chunk(
            job.rid, job.created, model, c.index, delta, finish, logprobs
        )

    def _legacy_logprobs(self, choice: Choice, start: int = 0) -> dict[str, Any]:
        """The completions-API logprobs of choice.logprobs[start:]; each call continues the text
        offsets where the previous one stopped, so a stream decodes every token once."""
        decode = self.tokenizer.decode
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in choice.logprobs[start:]:
            text = decode([lp.token_id], skip_special_tokens=False)
            tokens.append(text)
            token_lps.append(lp.logprob)
            tops.append({decode([t], skip_special_tokens=False): v for t, v in lp.top.items()})
            offsets.append(choice.next_text_offset)
            choice.next_text_offset += len(text)
        return responses.legacy_logprobs(tokens, token_lps, tops, offsets)
