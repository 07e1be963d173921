"""Tokenizer: a `tokenizers.Tokenizer` loaded from a Hugging Face folder, rebuilt from GGUF
metadata (byte-level BPE) or made byte by byte, with its BOS/EOS policy and chat template (rendered
by chat_template.py's sandbox). Reads files with size caps; executes nothing from a checkpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from moeflow.errors import ModelFormatError
from moeflow.tokenizer.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    compile_template,
    render_chat_template,
)
from moeflow.utils import is_int

logger = logging.getLogger(__name__)

MAX_JSON_FILE_BYTES = 64 * 1024 * 1024

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
        self._template = compile_template(chat_template or DEFAULT_CHAT_TEMPLATE)
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
            if is_int(tid) and 0 <= tid < backend.get_vocab_size(with_added_tokens=True):
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
            return value if is_int(value) and 0 <= value < len(tokens) else None

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
        eos = self._eos_token_ids[0] if self._eos_token_ids else None
        return render_chat_template(
            self._template,
            messages,
            add_generation_prompt,
            bos_token=self._token_text(self._bos_token_id),
            eos_token=self._token_text(eos),
            kwargs=kwargs,
            source=self._chat_template or DEFAULT_CHAT_TEMPLATE,
        )

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._backend.id_to_token(token_id) or ""


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
