"""The OpenAI API's requests: pydantic models, every field bounded (docs/RELIABILITY.md), and
the one-line message naming the field a validation error is about. The body they validate comes
from wire.py's strict JSON parser; the answers are built by responses.py.
Never imports torch or fastapi."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moeflow.sampling_params import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_STOP,
    TRANSFER_ID_PATTERN,
    KVTransferParams,
    StructuredOutputsParams,
)
from moeflow.tokenizer.chat_template import CHAT_TEMPLATE_KWARGS

MAX_N = 16
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
MAX_TOOL_CALLS = 128
MAX_TOOLS = 128
MAX_PROMPTS = 64
MAX_TEXT_CHARS = 1_000_000
MAX_NAME_CHARS = 256
MAX_STOP_CHARS = 1024
MAX_TOP_K = 1_000_000
# Tags of our discriminated unions; validation_error_to_param leaves them out of the path.
_UNION_TAGS = frozenset({"<str>", "<list>", "<ids>", "<batch>"})
_DICT_FIELDS = frozenset(
    {"logit_bias", "chat_template_kwargs", "schema", "json", "guided_json", "parameters"}
)
_CONSTRAINT_FIELDS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


# ---- requests --------------------------------------------------------------------------------
# NOTE: strict=True everywhere: integers must be JSON integers (5.0 and "5" are errors), floats
# take JSON numbers but never strings or booleans, booleans must be true/false.
Float = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
TokenId = Annotated[StrictInt, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


def _check_bias_key(key: str) -> str:
    if not (key.isascii() and key.isdigit() and len(key) <= 10):
        raise ValueError(f'logit_bias keys must be token ids ("0", "42"...), got {key[:20]!r}')
    return key


BiasKey = Annotated[str, AfterValidator(_check_bias_key)]
BiasValue = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


def _str_or_list(value: Any) -> str | None:
    """Union tag for `str | list[...]` fields, so an error names the branch the JSON type picks."""
    if isinstance(value, str):
        return "<str>"
    return "<list>" if isinstance(value, list) else None


def _prompt_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "<str>"
    if not isinstance(value, list):
        return None
    if value and isinstance(value[0], list):
        return "<batch>"
    if value and not isinstance(value[0], str):
        return "<ids>"
    return "<list>"  # strings; an empty list fails there with "at least 1 item"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


Content = Annotated[
    Annotated[Text, Tag("<str>")]
    | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS), Tag("<list>")],
    Discriminator(
        _str_or_list,
        custom_error_type="invalid_content",
        custom_error_message="content must be a string or a list of text parts",
    ),
]


class ToolCallFunction(_Strict):
    name: Name
    arguments: Text = "{}"  # a JSON object, as a string (OpenAI's shape)


class ToolCall(_Strict):
    id: Name | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Content | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: Name | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant with tool_calls)")
        return self

    def model_dump_for_template(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):  # parts -> one string, as text-only models expect
            out["content"] = "".join(p.text for p in self.content)
        return out


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: Name


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Text | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs json_schema')
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` object: exactly one of its fields."""

    json_: Annotated[dict[str, Any] | str | None, Field(alias="json")] = None
    regex: Annotated[str, Field(max_length=MAX_STOP_CHARS * 16)] | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: Text | None = None
    json_object: StrictBool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


Stop = Annotated[
    Annotated[StopString, Tag("<str>")]
    | Annotated[list[StopString], Field(max_length=MAX_STOP), Tag("<list>")],
    Discriminator(
        _str_or_list,
        custom_error_type="invalid_stop",
        custom_error_message="stop must be a string or a list of strings",
    ),
]


def _allowed_template_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    """Keeps the keys a request may set (CHAT_TEMPLATE_KWARGS with a type), type-checked."""
    kept: dict[str, Any] = {}
    for key, v in value.items():
        want = CHAT_TEMPLATE_KWARGS.get(key)
        if want is None:
            continue
        if not isinstance(v, want) or (want is str and len(v) > MAX_NAME_CHARS):
            raise ValueError(f"{key} must be a {want.__name__}")
        kept[key] = v
    return kept


TemplateKwargs = Annotated[
    dict[str, Any], Field(max_length=64), AfterValidator(_allowed_template_kwargs)
]


class KVTransferParamsBody(_Strict):
    """vLLM's kv_transfer_params, as `moeflow router` sets them (docs/DISAGGREGATION.md)."""

    transfer_id: Annotated[str, Field(pattern=f"^{TRANSFER_ID_PATTERN.pattern}$")]
    do_remote_decode: StrictBool = False
    do_remote_prefill: StrictBool = False

    @model_validator(mode="after")
    def _one_side(self) -> KVTransferParamsBody:
        if self.do_remote_decode == self.do_remote_prefill:
            raise ValueError("give exactly one of do_remote_decode and do_remote_prefill")
        return self


class _Sampling(_Strict):
    """The fields both endpoints share. None means "the engine's default"."""

    model: Name | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=MAX_TOP_K)] | None = None  # -1 or 0: off
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: Stop | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    logit_bias: Annotated[dict[BiasKey, BiasValue], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # vLLM extension
    skip_special_tokens: StrictBool = True
    user: Name | None = None  # accepted and ignored
    # structured output: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Annotated[str, Field(max_length=MAX_STOP_CHARS * 16)] | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    guided_grammar: Text | None = None
    kv_transfer_params: KVTransferParamsBody | None = None  # vLLM's; set by `moeflow router`

    @model_validator(mode="after")
    def _one_constraint(self) -> _Sampling:
        given = [n for n in _CONSTRAINT_FIELDS if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
        return self

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's output constraint, its param the field it came from."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutputsParams(json_object=True, param="response_format")
        if rf is not None and rf.json_schema is not None:
            schema = rf.json_schema.schema_
            param = "response_format.json_schema.schema"
            if schema is None:
                return StructuredOutputsParams(json_object=True, param=param)
            return StructuredOutputsParams(json=schema, param=param)
        so = self.structured_outputs
        if so is not None:
            for name, key in (("json", "json_"), ("regex", "regex"), ("choice", "choice"),
                              ("grammar", "grammar")):  # fmt: skip
                value = getattr(so, key)
                if value is not None:
                    return StructuredOutputsParams(
                        **{name: value}, param=f"structured_outputs.{name}"
                    )
            return StructuredOutputsParams(json_object=True, param="structured_outputs")
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                return StructuredOutputsParams(**{name: value}, param=f"guided_{name}")
        return None

    def _common_kwargs(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs}
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                kw[name] = float(value)
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.stop is not None:
            kw["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.logit_bias:
            kw["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        kw["ignore_eos"] = self.ignore_eos
        kw["skip_special_tokens"] = self.skip_special_tokens
        spec = self.structured_outputs_params()
        if spec is not None:
            kw["structured_outputs"] = spec
        kv = self.kv_transfer_params
        if kv is not None:
            kw["kv_transfer"] = KVTransferParams(
                kv.transfer_id, kv.do_remote_decode, kv.do_remote_prefill
            )
        return kw


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, value: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or ()
        if isinstance(value, NamedToolChoice):
            if value.function.name not in {t.function.name for t in tools}:
                raise ValueError(f"names {value.function.name!r}, which is not in tools")
        elif value == "required" and not tools:
            raise ValueError('"required" needs tools')
        return value

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, "none" otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools for the chat template (None when tool_choice is "none" or none given)."""
        if not self.tools or self.effective_tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams; max_tokens None means the rest of the context."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._common_kwargs(max_tokens, logprobs)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump_for_template() for m in self.messages]


Prompt = Annotated[
    Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), Tag("<str>")]
    | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]],
        Field(min_length=1, max_length=MAX_PROMPTS),
        Tag("<list>"),
    ]
    | Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT_CHARS), Tag("<ids>")]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT_CHARS)]],
        Field(min_length=1, max_length=MAX_PROMPTS),
        Tag("<batch>"),
    ],
    Discriminator(
        _prompt_tag,
        custom_error_type="invalid_prompt",
        custom_error_message=(
            "prompt must be a string, a list of strings, a list of token ids "
            "or a list of lists of token ids"
        ),
    ),
]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # top-k count
    echo: StrictBool = False
    suffix: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None

    @model_validator(mode="after")
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
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for SamplingParams; max_tokens None means the rest of the context."""
        return self._common_kwargs(self.max_tokens, self.logprobs)


class TokenizeCompletionRequest(_Strict):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model: Name | None = None
    prompt: Text
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Strict):
    """POST /tokenize with messages, rendered through the chat template (vLLM's shape)."""

    model: Name | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False  # the template writes its own
    return_token_strs: StrictBool = False
    chat_template_kwargs: TemplateKwargs | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump_for_template() for m in self.messages]


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: Name | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_TEXT_CHARS)]


def validation_error_to_param(exc: ValidationError) -> tuple[str, str]:
    """(one-line message naming the field, the field path like "messages[0].content")."""
    err = exc.errors()[0]
    path = ""
    previous: object = None
    for part in err.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS or part == "[key]":
            continue  # our union tags and pydantic's dict-key marker
        elif previous in _DICT_FIELDS or not part.isidentifier():  # a key of a dict field
            path += f"[{json.dumps(part[:32], ensure_ascii=False)}]"
        else:
            path += ("." if path else "") + part
        previous = part
    path = path or "body"
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    message = " ".join(message.split())
    return f"{path}: {message}", path
