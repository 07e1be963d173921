"""Tokenizer: a `tokenizers.Tokenizer` loaded from a Hugging Face folder, rebuilt from GGUF
metadata (byte-level BPE split as its family's tokenizer.json splits, or SentencePiece) or made
byte by byte, with its BOS/EOS policy and chat template (rendered by chat_template.py's sandbox).
Reads files with size caps; executes nothing from a checkpoint."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from moeflow.errors import ModelFormatError
from moeflow.tokenizer.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    compile_template,
    render_chat_template,
)
from moeflow.utils import is_int

logger = logging.getLogger(__name__)

MAX_JSON_FILE_BYTES = 64 * 1024 * 1024

# How each GGUF `tokenizer.ggml.pre` splits text before byte-level BPE, as the family's own
# tokenizer.json does (the regexes are data from those files; Kimi K2's from its tiktoken
# `pat_str`; tests/tokenizer/data/pre_tokenizers.json records where each was read and the tests
# compare these against it). Oniguruma, which `tokenizers` uses, reads `(?i:...)`, `\p{Han}` and
# `&&` classes.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_PATTERN = (  # Qwen 3.5 / 3.6: combining marks stay with their letters
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Digits:
    """tokenizer.json's `Digits(individual_digits=true)` step: every digit its own piece."""


_DIGITS = _Digits()
# DeepSeek LLM / MoE / V2: newlines, letters of cased scripts (code points escaped: NFC would
# fold some, e.g. U+1F7D, and empty their ranges), punctuation, trailing spaces, CJK, digits.
_DEEPSEEK_LLM_STEPS: tuple[str | _Digits, ...] = (
    r"[\r\n]",
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}"
    r"\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}"
    r"\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}"
    r"\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}"
    r"\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}"
    r"\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}"
    r"\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}"
    r"\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}"
    r"\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}"
    r"\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}"
    r"\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}"
    r"\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}"
    r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}"
    r"\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}"
    r"\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}"
    r"\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    _DIGITS,
)
_DEEPSEEK_CODER_STEPS: tuple[str | _Digits, ...] = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    _DIGITS,
)
_DEEPSEEK_V3_PATTERNS = (  # DeepSeek V3 / R1: digits in threes, CJK runs, then the main split
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_KIMI_K2_PATTERN = (  # Kimi K2's tiktoken pat_str: Han runs apart from other letters
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_PATTERN = (  # Mistral's tekken (Nemo and later)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """The tokenizer.json's pre-tokenizer steps in order (a regex is a Split, each match
    isolated), then ByteLevel with GPT-2's own regex where `gpt2_regex` (the `use_regex` flag);
    NFC first where the file has that normalizer; and the BPE model's `ignore_merges` (a word
    that is itself a token is not merged: tiktoken-born vocabularies)."""

    steps: tuple[str | _Digits, ...] = ()
    gpt2_regex: bool = False
    nfc: bool = False
    ignore_merges: bool = False


_GPT2 = _PreTokenizer(gpt2_regex=True)
_DIGITS_GPT2 = _PreTokenizer((_DIGITS,), gpt2_regex=True)  # SmolLM, StarCoder: digits alone
_LLAMA3 = _PreTokenizer((_LLAMA3_PATTERN,), ignore_merges=True)
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "olmo": _GPT2,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "dbrx": _PreTokenizer((_LLAMA3_PATTERN,)),
    "smaug-bpe": _PreTokenizer((_LLAMA3_PATTERN,)),
    "glm4": _LLAMA3,  # GLM-4.7 / 5's tokenizer.json sets ignore_merges as Llama 3's does
    "chatglm-bpe": _PreTokenizer((_LLAMA3_PATTERN,)),
    "qwen2": _PreTokenizer((_QWEN2_PATTERN,), nfc=True),
    "deepseek-r1-qwen": _PreTokenizer((_QWEN2_PATTERN,), nfc=True),
    "qwen35": _PreTokenizer((_QWEN35_PATTERN,), nfc=True),
    "deepseek-llm": _PreTokenizer(_DEEPSEEK_LLM_STEPS),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_STEPS),
    "deepseek-v3": _PreTokenizer(_DEEPSEEK_V3_PATTERNS),
    "kimi-k2": _PreTokenizer((_KIMI_K2_PATTERN,), ignore_merges=True),
    "tekken": _PreTokenizer((_TEKKEN_PATTERN,), ignore_merges=True),
}
# llama.cpp's token types (gguf TokenType).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4
# SentencePiece pieces are at most 16 characters by default; this bounds the merge search.
_MAX_SPM_PIECE_CHARS = 256


class Tokenizer:
    """A `tokenizers.Tokenizer` plus BOS/EOS policy and a sandboxed chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """`add_bos_token` None trusts the backend's post-processor; True/False enforces it
        (and then `add_eos_token` appends the first EOS id, as a GGUF may ask)."""
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
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
        """Build from GGUF `tokenizer.*` keys: byte-level BPE ("gpt2") split as its
        `tokenizer.ggml.pre` names, or SentencePiece ("llama") rebuilt as HF's
        LlamaTokenizerFast builds it (merges ranked by the pieces' scores, byte fallback, `▁`
        for spaces). BOS/EOS policy as llama.cpp reads it (SentencePiece adds BOS by default)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ModelFormatError(f"GGUF tokenizer model {kind!r} is not supported")
        tokens = _str_list(metadata, "tokenizer.ggml.tokens")
        token_types = _number_list(metadata, "tokenizer.ggml.token_type", len(tokens), int)
        if kind == "gpt2":
            backend = _bpe_backend(metadata, tokens)
        else:
            backend = _spm_backend(metadata, tokens, token_types)

        # Control (and SentencePiece's unknown) tokens are special, skipped by decode;
        # user-defined ones stay visible text.
        special_types = [_TOKEN_TYPE_CONTROL] + ([_TOKEN_TYPE_UNKNOWN] if kind == "llama" else [])
        added: list[AddedToken] = []
        for i, ttype in enumerate(token_types or ()):
            if ttype in special_types or ttype == _TOKEN_TYPE_USER_DEFINED:
                is_special = ttype in special_types
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
            add_bos_token=add_bos if isinstance(add_bos, bool) else kind == "llama",
            add_eos_token=metadata.get("tokenizer.ggml.add_eos_token") is True,
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

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """The same tokenizer rendering chats with `chat_template` (the source, compiled here:
        a syntax error is a ModelFormatError), as `--chat-template` asks."""
        return Tokenizer(
            self._backend,
            bos_token_id=self._bos_token_id,
            eos_token_ids=self._eos_token_ids,
            add_bos_token=self._add_bos_token,
            chat_template=chat_template,
        )

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
        if add_special_tokens and self._add_eos_token and self._eos_token_ids:
            ids.append(self._eos_token_ids[0])
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


def _bpe_backend(metadata: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """Byte-level BPE from the GGUF tokens and merges, split as `tokenizer.ggml.pre` names."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    spec = _PRE_TOKENIZERS.get(pre) if isinstance(pre, str) else None
    if spec is None:
        logger.warning("unknown GGUF tokenizer.ggml.pre %r; using the GPT-2 split", pre)
        spec = _GPT2
    merge_pairs: list[tuple[str, str]] = []
    for merge in _str_list(metadata, "tokenizer.ggml.merges"):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelFormatError(f"GGUF merge {merge[:40]!r} is not 'left right'")
        merge_pairs.append((left, right))
    try:
        bpe = models.BPE(
            _first_ids(tokens), merge_pairs, fuse_unk=False, ignore_merges=spec.ignore_merges
        )
    except Exception as e:
        raise ModelFormatError(f"GGUF BPE vocabulary is invalid: {e}") from None
    backend = tokenizers.Tokenizer(bpe)
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True)
            if isinstance(step, _Digits)
            else pre_tokenizers.Split(Regex(step), behavior="isolated")
            for step in spec.steps
        ]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.gpt2_regex)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_backend(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int] | None
) -> tokenizers.Tokenizer:
    """SentencePiece BPE as HF's (legacy) LlamaTokenizerFast tokenizer.json and llama.cpp run
    it: spaces become `▁` (one prefixed to each text run when `add_space_prefix`), adjacent
    pieces merge highest score first, characters outside the vocabulary fall back to <0xNN>."""
    scores = _number_list(metadata, "tokenizer.ggml.scores", len(tokens), float)
    if scores is None:
        raise ModelFormatError("GGUF SentencePiece vocabulary lacks tokenizer.ggml.scores")
    if any(math.isnan(s) for s in scores):
        raise ModelFormatError("GGUF tokenizer.ggml.scores holds NaN")
    vocab = _first_ids(tokens)
    is_normal = [t == _TOKEN_TYPE_NORMAL for t in token_types or [_TOKEN_TYPE_NORMAL] * len(tokens)]
    normal = {t: i for t, i in vocab.items() if is_normal[i]}
    # NOTE: a merge for every split of a piece into two pieces, ranked by the merged piece's
    # score: SentencePiece merges any adjacent pair whose concatenation is a piece.
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, i in normal.items():
        if len(piece) > _MAX_SPM_PIECE_CHARS:
            raise ModelFormatError(
                f"GGUF SentencePiece piece {i} is longer than {_MAX_SPM_PIECE_CHARS} characters"
            )
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[i]), normal[left], normal[right], left, right))
    ranked.sort()
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if is_int(unk_id) and 0 <= unk_id < len(tokens) else None
    try:
        bpe = models.BPE(
            vocab,
            [(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as e:
        raise ModelFormatError(f"GGUF SentencePiece vocabulary is invalid: {e}") from None
    backend = tokenizers.Tokenizer(bpe)
    add_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True) is not False
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "▁")]
    decode: list[decoders.Decoder] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
        decode.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(decode)
    return backend


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a text listed twice keeps its first id, as llama.cpp's lookup does."""
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    return vocab


def _number_list(
    metadata: Mapping[str, Any], key: str, length: int, kind: type[int] | type[float]
) -> list[Any] | None:
    """The array under `key` (None when absent), checked: `length` numbers of `kind`."""
    value = metadata.get(key)
    if value is None:
        return None
    ok_types = (int,) if kind is int else (int, float)
    if (
        not isinstance(value, list | tuple)
        or len(value) != length
        or not all(isinstance(v, ok_types) and not isinstance(v, bool) for v in value)
    ):
        raise ModelFormatError(f"GGUF {key} must be {length} numbers, one per token")
    return list(value)
