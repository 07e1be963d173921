"""Tokenizer (HF folder or GGUF metadata), sandboxed chat-template rendering, and the streaming
IncrementalDetokenizer. Nothing from a checkpoint is executed: templates run in a bounded
sandbox."""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tokenizers
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from moeflow.errors import ModelFormatError, RequestError

logger = logging.getLogger(__name__)

MAX_TEMPLATE_OUTPUT_CHARS = 4 * 1024 * 1024
MAX_TEMPLATE_SECONDS = 5.0
MAX_TEMPLATE_RANGE_ITEMS = 1_000_000  # summed over every range() of one render
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024

# Variables a caller may pass to a chat template besides messages / add_generation_prompt.
CHAT_TEMPLATE_KWARGS = frozenset(
    {
        "tools",
        "documents",
        "enable_thinking",
        "thinking",
        "reasoning_effort",
        "date_string",
        "builtin_tools",
        "tools_in_user_message",
        "continue_final_message",
    }
)

# Plain ChatML, used when the checkpoint ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pre-tokenizer split regexes of byte-level BPE vocabularies, keyed by GGUF `tokenizer.ggml.pre`.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_PATTERNS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_PATTERN,),
    "gpt2": (_GPT2_PATTERN,),
    # SmolLM / StarCoder style: every digit alone, then the GPT-2 split.
    "smollm": (r"\p{N}", _GPT2_PATTERN),
    "starcoder": (r"\p{N}", _GPT2_PATTERN),
    "refact": (r"\p{N}", _GPT2_PATTERN),
    "llama-bpe": (_LLAMA3_PATTERN,),
    "llama3": (_LLAMA3_PATTERN,),
    "dbrx": (_LLAMA3_PATTERN,),
    "smaug-bpe": (_LLAMA3_PATTERN,),
    "qwen2": (_QWEN2_PATTERN,),
    "deepseek-r1-qwen": (_QWEN2_PATTERN,),
}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


class Tokenizer:
    """A `tokenizers.Tokenizer` plus BOS/EOS policy and a sandboxed chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`add_bos_token` None trusts the backend's post-processor; True/False enforces it."""
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._add_bos_token = add_bos_token
        self._chat_template = chat_template
        self._template = _compile_template(chat_template or DEFAULT_CHAT_TEMPLATE)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """One token per byte (ids 0-255), no merges, no specials: what a random-weight preset
        uses where the embedded SmolLM2 tokenizer is not installed."""
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        backend = tokenizers.Tokenizer(
            models.BPE({ch: i for i, ch in enumerate(alphabet)}, [], fuse_unk=False)
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return cls(backend, add_bos_token=False)

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config, chat_template.*, generation_config)."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(f"{folder}: tokenizer.json is missing")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise ModelFormatError(f"{tokenizer_file}: cannot load: {e}") from None

        config = _read_json_object(folder / "tokenizer_config.json") or {}
        chat_template = _pick_template(
            config.get("chat_template"), folder / "tokenizer_config.json"
        )
        jinja_file = folder / "chat_template.jinja"
        json_file = folder / "chat_template.json"
        if jinja_file.is_file():
            chat_template = _read_text(jinja_file)
        elif json_file.is_file():
            chat_template = _pick_template(
                (_read_json_object(json_file) or {}).get("chat_template"), json_file
            )

        bos_token_id = _token_id(backend, config.get("bos_token"))
        eos_token_ids: list[int] = []
        eos = _token_id(backend, config.get("eos_token"))
        if eos is not None:
            eos_token_ids.append(eos)
        generation = _read_json_object(folder / "generation_config.json") or {}
        gen_eos = generation.get("eos_token_id")
        for tid in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if _is_int(tid) and 0 <= tid < backend.get_vocab_size(with_added_tokens=True):
                eos_token_ids.append(tid)

        add_bos = config.get("add_bos_token")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            chat_template=chat_template,
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF `tokenizer.*` keys; only byte-level BPE ("gpt2") is supported."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind == "llama":
            raise ModelFormatError(
                "GGUF tokenizer model 'llama' (SentencePiece) is not supported yet"
            )
        if kind != "gpt2":
            raise ModelFormatError(f"GGUF tokenizer model {kind!r} is not supported")
        tokens = _str_list(metadata, "tokenizer.ggml.tokens")
        merges = _str_list(metadata, "tokenizer.ggml.merges")
        token_types = metadata.get("tokenizer.ggml.token_type")
        if token_types is not None and (
            not isinstance(token_types, list | tuple) or len(token_types) != len(tokens)
        ):
            raise ModelFormatError("GGUF tokenizer.ggml.token_type does not match the token count")

        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)
        merge_pairs: list[tuple[str, str]] = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ModelFormatError(f"GGUF merge {merge[:40]!r} is not 'left right'")
            merge_pairs.append((left, right))
        try:
            bpe = models.BPE(vocab, merge_pairs, fuse_unk=False)
        except Exception as e:
            raise ModelFormatError(f"GGUF BPE vocabulary is invalid: {e}") from None
        backend = tokenizers.Tokenizer(bpe)

        pre = metadata.get("tokenizer.ggml.pre", "default")
        patterns = _PRE_TOKENIZER_PATTERNS.get(pre) if isinstance(pre, str) else None
        if patterns is None:
            logger.warning("unknown GGUF tokenizer.ggml.pre %r; using the GPT-2 split", pre)
            patterns = (_GPT2_PATTERN,)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()

        # Control tokens are special (skipped by decode); user-defined ones stay visible text.
        added: list[AddedToken] = []
        for i, ttype in enumerate(token_types or ()):
            if ttype in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
                is_special = ttype == _TOKEN_TYPE_CONTROL
                added.append(AddedToken(tokens[i], special=is_special, normalized=False))
        if added:
            backend.add_tokens(added)

        def special_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return value if _is_int(value) and 0 <= value < len(tokens) else None

        bos_token_id = special_id("bos")
        eos_token_ids = [t for t in (special_id("eos"), special_id("eot")) if t is not None]
        add_bos = metadata.get("tokenizer.ggml.add_bos_token")
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            add_bos_token=add_bos is True,
            chat_template=template if isinstance(template, str) else None,
        )

    # ---- vocabulary ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's template source; None means the ChatML fallback is used."""
        return self._chat_template

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added only when the checkpoint asks for it."""
        if self._add_bos_token is None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos_token and self._bos_token_id is not None:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat template ---------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the sandboxed template; unknown kwargs are ignored."""
        _validate_messages(messages)
        variables = {k: v for k, v in kwargs.items() if k in CHAT_TEMPLATE_KWARGS}
        variables.update(
            messages=messages,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=self._token_text(self._bos_token_id),
            eos_token=self._token_text(self._eos_token_ids[0] if self._eos_token_ids else None),
        )
        return _render(self._template, variables)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._backend.id_to_token(token_id) or ""


class IncrementalDetokenizer:
    """Turns a stream of output ids into text deltas that never split a UTF-8 character.

    Decodes only the window ids[prefix_offset:] each step (O(1) per token): prefix_offset..
    read_offset is context already emitted, read_offset.. is new. A delta is withheld while the
    window's text ends in U+FFFD (an incomplete character); `flush()` emits what is left.
    NOTE: for SentencePiece (Metaspace) vocabularies the first delta keeps the leading space
    that `decode(output_ids)` strips, because the window starts inside the prompt.
    """

    _CONTEXT_TOKENS = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-(self._CONTEXT_TOKENS + 1) :])
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self._CONTEXT_TOKENS, 0)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_ids: list[int]) -> str:
        """Append output ids; return the text they complete ("" while a character is partial)."""
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (a trailing incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if len(self._ids) == self._read_offset:
            return ""
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = decode(window[:read], self._skip_special_tokens)
        new_text = decode(window, self._skip_special_tokens)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        delta = new_text[len(prefix_text) :]
        # Slide the window: drop everything before the old read offset.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > 4096:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        if delta:
            self._pieces.append(delta)
        return delta


# ---- chat template sandbox ------------------------------------------------------------------
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
        if _is_int(arg) and abs(arg) > MAX_TEMPLATE_OUTPUT_CHARS:
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
                is_repeat = isinstance(seq, str | list | tuple) and _is_int(n)
                if is_repeat and len(seq) * n > MAX_TEMPLATE_OUTPUT_CHARS:
                    raise RequestError("chat template built a value that is too long")
        elif operator == "**" and _is_int(left) and _is_int(right):
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


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
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


# ---- file and metadata helpers --------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_JSON_FILE_BYTES:
            raise ModelFormatError(f"{path}: larger than {MAX_JSON_FILE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read: {e}") from None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(_read_text(path))
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: not a JSON object")
    return value


def _pick_template(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            t.get("name"): t.get("template")
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
        return None
    raise ModelFormatError(f"{source}: chat_template must be a string or a list of templates")


def _token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _str_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"GGUF {key} must be a list of strings")
    return list(value)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class ReasoningSplitter:
    """Splits a reasoning model's output into reasoning (inside <think>...</think>) and content,
    streamed (`feed` each delta, then `finish`) or whole (`split`); both give the same text.

    As vLLM's deepseek_r1 / qwen3 parsers: text inside the block is reasoning; text before the
    start tag and after the end tag is content (vLLM drops text before the start tag; we keep
    it); a second block after the first is plain content; a block that never closes is all
    reasoning. `in_reasoning=True` when the prompt already opened the block (see
    `prompt_opens_reasoning`): the output starts as reasoning. Newlines at the start and end of
    the reasoning and at the start of the content after the end tag are dropped (templates
    write "<think>\n...\n</think>\n\n"); an unclosed block keeps its trailing newlines.
    NOTE: streaming never emits part of a tag: a tail that could still become a tag (and, inside
    the block, the newlines before it) is held until the next delta or `finish`."""

    def __init__(
        self, start_tag: str = "<think>", end_tag: str = "</think>", in_reasoning: bool = False
    ) -> None:
        if not start_tag or not end_tag:
            raise ValueError("reasoning tags must be non-empty")
        self.start_tag, self.end_tag = start_tag, end_tag
        self.in_reasoning_at_start = in_reasoning
        self._mode = "reasoning" if in_reasoning else "before"  # -> "reasoning" -> "after"
        self._strip = in_reasoning  # drop newlines at the start of the next text
        self._held = ""  # a tail that may be the start of the tag looked for
        self._held_newlines = 0  # inside the block: newlines that may precede the end tag

    @property
    def has_reasoning(self) -> bool:
        """Whether a think block was opened (by the prompt or the output)."""
        return self.in_reasoning_at_start or self._mode != "before"

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for the next piece of output text."""
        text = self._held + delta
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._strip:
                text = text.lstrip("\n")
                if not text:
                    break
                self._strip = False
            if self._mode == "after":
                content.append(text)
                break
            in_block = self._mode == "reasoning"
            tag = self.end_tag if in_block else self.start_tag
            i = text.find(tag)
            if i >= 0:
                if in_block:  # newlines before the end tag are dropped
                    self._emit_reasoning(reasoning, text[:i])
                    self._held_newlines = 0
                    self._mode = "after"
                else:
                    content.append(text[:i])
                    self._mode = "reasoning"
                self._strip = True
                text = text[i + len(tag) :]
                continue
            cut = len(text) - _partial_suffix(text, tag)
            if in_block:
                self._emit_reasoning(reasoning, text[:cut])
            else:
                content.append(text[:cut])
            self._held = text[cut:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what `feed` held back: the output ended, so no tag can complete."""
        held, self._held = self._held, ""
        if self._mode != "reasoning":
            return "", held
        newlines, self._held_newlines = self._held_newlines, 0
        return "\n" * newlines + held, ""

    def _emit_reasoning(self, out: list[str], text: str) -> None:
        """Append `text` minus its trailing newlines, which are counted (not rescanned: a run
        of newlines costs O(1) per delta) and written before the next other character."""
        body = text.rstrip("\n")
        if body:
            out.append("\n" * self._held_newlines + body)
            self._held_newlines = 0
        self._held_newlines += len(text) - len(body)

    def split(self, text: str) -> tuple[str | None, str]:
        """Whole output -> (reasoning, or None when no think block was opened; content).
        Uses a fresh splitter with this one's settings; this one's state is untouched."""
        s = ReasoningSplitter(self.start_tag, self.end_tag, self.in_reasoning_at_start)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        return (r1 + r2 if s.has_reasoning else None), c1 + c2


def prompt_opens_reasoning(
    prompt_text: str, start_tag: str = "<think>", end_tag: str = "</think>"
) -> bool:
    """True when the prompt's last start tag comes after its last end tag: the template opened
    the think block, so the output starts inside it."""
    start = prompt_text.rfind(start_tag)
    return start >= 0 and start > prompt_text.rfind(end_tag)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
