"""The OpenAI API's requests (pydantic, every field bounded: shared/RELIABILITY.md) and responses
(plain dicts in OpenAI's shapes), the error envelope, and a strict JSON body parser.
Never imports torch or fastapi."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from pydantic import model_validator as _model_validator

from moeflow.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP

MAX_N = 16
MAX_MESSAGES = 4096
MAX_PROMPTS = 64
MAX_TEXT_CHARS = 1_000_000
MAX_STOP_CHARS = 1024
MAX_JSON_DEPTH = 64
# chat_template_kwargs keys passed to templates; anything else is dropped.
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort"})

Float = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class BadRequestBody(ValueError):
    """The body is not acceptable JSON (400)."""


# ---- requests --------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None

    @_model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content (or tool_calls)")
        return self

    def model_dump_for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # parts -> one string, as text-only models expect
            out["content"] = "".join(p.text for p in self.content)
        return out


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]

    @_model_validator(mode="after")
    def _only_text(self) -> ResponseFormat:
        if self.type != "text":
            raise ValueError(f"response_format {self.type!r} is not supported yet")
        return self


class _Sampling(_Strict):
    """The sampling fields both endpoints share."""

    model: Annotated[str, Field(max_length=256)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(max_length=MAX_STOP),
        ]
        | None
    ) = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    logit_bias: Annotated[dict[str, Float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    user: Annotated[str, Field(max_length=256)] | None = None

    @_model_validator(mode="after")
    def _check_bias(self) -> _Sampling:
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
            if not -100 <= value <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return self

    def _common_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs}
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "seed",
        ):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.stop is not None:
            kw["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.logit_bias:
            kw["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        kw["ignore_eos"] = self.ignore_eos
        kw["skip_special_tokens"] = self.skip_special_tokens
        return kw


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @_model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.chat_template_kwargs:
            self.chat_template_kwargs = {
                k: v for k, v in self.chat_template_kwargs.items() if k in CHAT_TEMPLATE_KWARGS
            }
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._common_kwargs(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump_for_template() for m in self.messages]


Prompt = (
    Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]],
        Field(min_length=1, max_length=MAX_PROMPTS),
    ]
    | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT_CHARS)]],
        Field(min_length=1, max_length=MAX_PROMPTS),
    ]
)


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    suffix: str | None = None

    @_model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported yet")
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        return self

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def sampling_kwargs(self) -> dict[str, Any]:
        return self._common_kwargs(self.max_tokens, self.logprobs)


def validation_error_to_param(exc: ValidationError) -> tuple[str, str]:
    """(one-line message naming the field, the field path like "messages[0].content")."""
    err = exc.errors()[0]
    path = ""
    for part in err.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]") or "[" in str(part):
            continue  # union branch names pydantic adds to the location
        else:
            path += ("." if path else "") + str(part)
    path = path or "body"
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{path}: {message}", path


def error_body(
    message: str,
    type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- strict JSON ---------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise BadRequestBody(f"JSON literal {name} is not allowed")


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body: UTF-8 only, no NaN/Infinity, no lone surrogates, bounded depth."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestBody("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BadRequestBody(f"the body is not valid JSON: {e.msg} at {e.pos}") from None
    except RecursionError:
        raise BadRequestBody("the body is nested too deeply") from None
    _check_value(value, 0)
    return value


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise BadRequestBody(f"the body is nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, str):
        _check_str(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_str(k)
            _check_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_value(v, depth + 1)


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestBody("the body holds a lone surrogate (invalid Unicode)") from None


def require_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequestBody("the body must be a JSON object")
    return value


# ---- responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def logprobs_content_entry(
    token: str, token_id: int, logprob: float, top: list[tuple[str, float]]
) -> dict[str, Any]:
    del token_id  # the text is what clients read; kept in the signature for callers' clarity
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [
            {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in top
        ],
    }


def legacy_logprobs(
    tokens: list[str],
    token_logprobs: list[float],
    top_logprobs: list[dict[str, float]],
    text_offset: list[int],
) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[int, str, str | None, dict[str, Any] | None, str | None]],
    usage_: dict[str, Any],
) -> dict[str, Any]:
    """choices: (index, content, reasoning_content, logprobs, finish_reason)."""
    out = []
    for index, content, reasoning, logprobs, finish in choices:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        out.append(
            {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
        )
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": usage_,
    }


def chat_completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def completion_response(
    rid: str,
    created: int,
    model: str,
    choices: list[tuple[int, str, dict[str, Any] | None, str | None]],
    usage_: dict[str, Any],
) -> dict[str, Any]:
    """choices: (index, text, logprobs, finish_reason)."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            for i, text, lp, finish in choices
        ],
        "usage": usage_,
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def now() -> int:
    return int(time.time())
