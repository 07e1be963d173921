"""The chat-template sandbox: checkpoint templates rendered by an immutable jinja2 sandbox whose
operators, calls, ranges, filters, output and time are bounded, and the one table of the variables
a caller may pass to a template. Nothing from a checkpoint is executed outside it."""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeflow.errors import ModelFormatError, RequestError
from moeflow.utils import is_int

MAX_TEMPLATE_OUTPUT_CHARS = 4 * 1024 * 1024
MAX_TEMPLATE_SECONDS = 5.0
MAX_TEMPLATE_RANGE_ITEMS = 1_000_000  # summed over every range() of one render
MAX_TEMPLATE_FILE_BYTES = 1024 * 1024

# Variables a caller may pass to a chat template besides messages / add_generation_prompt; any
# other is dropped. The value is the type an HTTP request's chat_template_kwargs value must have
# (server/protocol.py checks it); None: only in-process callers (LLM.chat) may pass it, and the
# server drops it from a request.
CHAT_TEMPLATE_KWARGS: dict[str, type | None] = {
    "enable_thinking": bool,
    "thinking": bool,
    "reasoning_effort": str,
    "tools": None,
    "documents": None,
    "date_string": None,
    "builtin_tools": None,
    "tools_in_user_message": None,
    "continue_final_message": None,
}

# Plain ChatML, used when the checkpoint ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat_template(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    kwargs: dict[str, Any],
    source: str = DEFAULT_CHAT_TEMPLATE,
) -> str:
    """Render `messages` after checking and normalising them (normalize_messages, given the
    template's `source`); kwargs outside CHAT_TEMPLATE_KWARGS are dropped. Raises RequestError for
    bad messages and for a render that breaks a bound or fails."""
    _validate_messages(messages)
    variables = {k: v for k, v in kwargs.items() if k in CHAT_TEMPLATE_KWARGS}
    messages = normalize_messages(messages, source, variables.get("tools"))
    if not variables.get("tools") or not template_knows_tools(source):
        variables.pop("tools", None)
    variables.update(
        messages=messages,
        add_generation_prompt=bool(add_generation_prompt),
        bos_token=bos_token,
        eos_token=eos_token,
    )
    return _render(template, variables)


def template_knows_tools(source: str) -> bool:
    """Whether a template renders the `tools` variable itself (HF's apply_chat_template
    convention: a list of {"type": "function", "function": {...}})."""
    return "tools" in source


def normalize_messages(
    messages: list[dict[str, Any]], source: str, tools: Any = None
) -> list[dict[str, Any]]:
    """Copies of `messages` in the shape every template renders, as agent loops send them:
    content None (an assistant that only calls tools) becomes "" unless the template knows tool
    calls (transformers passes it as null to those); each tool call is
    {"id", "type": "function", "function": {"name", "arguments"}} with JSON-string arguments
    parsed into an object (templates write `arguments | tojson`). A template that knows nothing
    of tool calls (no "tool_calls" in its source) gets them as Hermes' <tool_call> blocks in the
    content, and `tool` messages as user messages in <tool_response> blocks; one that ignores
    `tools` gets them in (or as) the system message, Hermes-style. So the model sees its calls and
    their results whatever its template."""
    knows_calls = "tool_calls" in source
    knows_tool_role = knows_calls or "'tool'" in source or '"tool"' in source
    out: list[dict[str, Any]] = []
    for message in messages:
        m = dict(message)
        if m.get("content") is None and not knows_calls:  # such a template expects null
            m["content"] = ""
        calls = m.get("tool_calls")
        if calls:
            m["tool_calls"] = [_normalize_call(c) for c in calls]
            if not knows_calls:
                blocks = "\n".join(
                    "<tool_call>\n"
                    + json.dumps(
                        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                        ensure_ascii=False,
                    )
                    + "\n</tool_call>"
                    for c in m["tool_calls"]
                )
                m["content"] = (m["content"] + "\n" if m["content"] else "") + blocks
                del m["tool_calls"]
        if m.get("role") == "tool" and not knows_tool_role:
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not template_knows_tools(source):
        prompt = hermes_tools_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def hermes_tools_prompt(tools: list[Any]) -> str:
    """The tools' description for a template that does not render `tools` itself, in the Hermes /
    Qwen2.5 wording, so that the model answers with <tool_call> blocks (the hermes parser's)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile `source` in the bounded sandbox; a syntax error is a ModelFormatError."""
    env = _SandboxEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationExtension],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, range=_bounded_range
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelFormatError(
            f"chat template syntax error (line {e.lineno}): {e.message}"
        ) from None
    except RecursionError:
        raise ModelFormatError("chat template is nested too deeply") from None


def read_chat_template(value: str) -> str:
    """`--chat-template`: a file holding a template, or the template itself (vLLM takes both);
    compiled once here so a bad one fails before a model loads (ModelFormatError)."""
    if os.path.isfile(value):
        try:
            if os.path.getsize(value) > MAX_TEMPLATE_FILE_BYTES:
                raise ModelFormatError(f"{value}: larger than {MAX_TEMPLATE_FILE_BYTES} bytes")
            with open(value, encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{value}: cannot read: {e}") from None
    elif "{{" in value or "{%" in value:
        source = value
    else:
        raise ModelFormatError(f"--chat-template {value!r}: neither a file nor a jinja template")
    compile_template(source)
    return source


# ---- the sandbox ----------------------------------------------------------------------------
class _RenderBudget:
    __slots__ = ("deadline", "range_left", "output_left")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        self.range_left = MAX_TEMPLATE_RANGE_ITEMS
        self.output_left = MAX_TEMPLATE_OUTPUT_CHARS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise RequestError(f"chat template took longer than {MAX_TEMPLATE_SECONDS} s")


_BUDGET: contextvars.ContextVar[_RenderBudget] = contextvars.ContextVar("template_budget")


def _budget() -> _RenderBudget:
    budget = _BUDGET.get(None)
    if budget is None:  # rendering outside _render (e.g. a test compiling directly)
        budget = _RenderBudget()
        _BUDGET.set(budget)
    return budget


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | bytes) and len(value) > MAX_TEMPLATE_OUTPUT_CHARS:
        raise RequestError(
            f"chat template built a value longer than {MAX_TEMPLATE_OUTPUT_CHARS} items"
        )
    if isinstance(value, int) and value.bit_length() > 4096:
        raise RequestError("chat template built an integer too large")
    return value


def _check_args(args: Iterable[Any]) -> None:
    for arg in args:
        if is_int(arg) and abs(arg) > MAX_TEMPLATE_OUTPUT_CHARS:
            raise RequestError(f"chat template argument {arg} is too large")


_BIG_WIDTH = re.compile(r"\d{7,}")


def _check_format_string(fmt: Any) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise RequestError("chat template format string has a width that is too large")


class _BoundedCodeGenerator(CodeGenerator):
    """Routes `a ~ b` through a size check (jinja2 otherwise joins strings unchecked)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    """Immutable sandbox whose operators, calls, ranges, filters and output are bounded."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget().tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                is_repeat = isinstance(seq, str | list | tuple) and is_int(n)
                if is_repeat and len(seq) * n > MAX_TEMPLATE_OUTPUT_CHARS:
                    raise RequestError("chat template built a value that is too long")
        elif operator == "**" and is_int(left) and is_int(right):
            if right > 0 and abs(left) > 1 and right * left.bit_length() > 4096:
                raise RequestError("chat template built an integer too large")
        elif operator == "%":
            _check_format_string(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _budget().tick()
        _check_args(args)
        _check_args(kwargs.values())
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(target, "__name__", None) in ("format", "format_map"):
            _check_format_string(getattr(target, "__self__", None))
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def bounded_concat(self, values: Iterable[Any]) -> str:
        _budget().tick()
        return _check_size("".join(map(str, values)))


class _GenerationExtension(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` marker and renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _bounded_range(*args: int) -> range:
    # NOTE: the items of all ranges of one render are summed, so nested empty loops end too.
    _check_args(args)
    rng = range(*args)
    budget = _budget()
    budget.tick()
    if len(rng) > budget.range_left:
        raise RequestError("chat template loops over too many items")
    budget.range_left -= len(rng)
    return rng


def _raise_exception(message: Any) -> None:
    raise RequestError(str(message))


def _strftime_now(fmt: str) -> str:
    _check_format_string(fmt)
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _bounded_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment marker
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        _check_args(args)
        _check_args(kwargs.values())
        if func.__name__ == "do_format" and args:
            _check_format_string(args[0])
        return _check_size(func(*args, **kwargs))

    return wrapper


def _render(template: jinja2.Template, variables: dict[str, Any]) -> str:
    budget = _RenderBudget()
    token = _BUDGET.set(budget)
    pieces: list[str] = []
    try:
        for piece in template.generate(**variables):
            budget.output_left -= len(piece)
            if budget.output_left < 0:
                raise RequestError(
                    f"chat template output exceeds {MAX_TEMPLATE_OUTPUT_CHARS} characters"
                )
            pieces.append(piece)
    except RequestError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise RequestError(f"chat template blocked an unsafe operation: {e}") from None
    except RecursionError:
        raise RequestError("chat template recursed too deeply") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, ZeroDivisionError, OverflowError, MemoryError) as e:  # fmt: skip
        raise RequestError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(token)
    return "".join(pieces)


def _normalize_call(call: Any) -> dict[str, Any]:
    """One tool call of an assistant message in OpenAI's shape, arguments as an object when they
    are a JSON object string (kept as given otherwise)."""
    if not isinstance(call, dict):
        raise RequestError("a tool call must be an object", param="messages")
    function = call.get("function")
    if not isinstance(function, dict):
        function = call
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("a tool call needs function.name", param="messages")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise RequestError(
                f"messages[{i}].content must be a string", param=f"messages[{i}].content"
            )
