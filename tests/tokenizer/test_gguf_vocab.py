"""GGUF vocabularies against the Hugging Face tokenizer they were converted from: for each
pre-tokenizer a family's GGUF names, a byte-level BPE trained here under that family's real
tokenizer.json normalizer / pre_tokenizer (data/pre_tokenizers.json, each entry naming the
published file it was read from), its GGUF fields written as llama.cpp's convert_hf_to_gguf.py
writes them, and a multilingual, code and digits corpus encoded both ways; llama.cpp's own
vocabulary test files (real vocabularies, the ids HF's tokenizer gave each input) where
MOEFLOW_LLAMA_VOCAB_DIR points at them; SentencePiece ("llama") vocabularies against
sentencepiece itself and a LlamaTokenizerFast built by transformers."""

from __future__ import annotations

import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, trainers

from moeflow.errors import ModelFormatError
from moeflow.tokenizer import Tokenizer
from tests.tokenizer.samples import TEXTS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    *TEXTS,
    "Numbers: 1 12 123 1234 12345 123456 1234567 3.14159265 2024-06-01 10:30:59 +1-800-555-0199",
    "全角数字１２３４５ and Arabic-Indic ١٢٣٤٥ and Devanagari ४५६ and ½ ¾ ² ³",
    "ひらがなとカタカナと漢字が混ざった文章。東京タワーは333メートルです。",
    "中文句子，包含标点符号！还有English words和数字2024年。",
    "한국어 문장입니다. 서울은 대한민국의 수도입니다.",
    "ภาษาไทย ไม่มีช่องว่าง; हिन्दी भाषा; Ελληνικά κείμενα; Русский текст.",
    "Décomposé: e\u0301 a\u0300 o\u0308 (NFD) vs é à ö (NFC); ﬁ ligature; Å vs A\u030a",
    "CamelCaseWords HTTPServer getHTTPResponseCode XMLHttpRequest iPhone McDonald's",
    "DON'T Don't don't I'LL we'Ve THEY'RE",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\r\n}\n",
    'fn main() -> Result<(), Box<dyn Error>> {\n    println!("{:?}", x);\n}',
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son';",
    '<div class="x">&nbsp;&lt;tag&gt;</div>   \n\n\n    trailing   ',
    "path/to/file.py:123:45: error: Name 'x' is not defined  [name-defined]",
    "a\u3000b\u2003c\u00a0d\u202fe\u2028f",
    "Greek oxia \u1f7d \u1fd3 \u1fdb, Ohm \u2126, Kelvin \u212a, micro \u00b5",
    "😀😃😄 🇯🇵🇺🇸 👩🏽‍💻 ✔︎ ❤️",
]

# The families' real normalizer / pre_tokenizer / ignore_merges, read from published files (each
# entry names its source: data/README.md), never from moeflow's own table.
REFERENCE = json.loads((Path(__file__).parent / "data" / "pre_tokenizers.json").read_text("utf-8"))
KIMI = REFERENCE["kimi-k2"]  # tokenization_kimi.py's tiktoken pat_str (no tokenizer.json upstream)
KIMI_PAT_STR = "|".join(KIMI["pat_str_parts"])
FAMILIES = [*REFERENCE["families"], "kimi-k2"]


def _family(pre: str) -> tuple[dict[str, Any] | None, dict[str, Any], bool]:
    """(normalizer, pre_tokenizer, BPE ignore_merges) of `pre`'s tokenizer.json, as JSON objects
    `tokenizers` reads: the census lists steps and drops ByteLevel's trim_offsets (it moves
    offsets after post-processing only; the files hold true)."""
    if pre == "kimi-k2":  # tiktoken: pattern pieces, a piece that is a rank taken whole
        split = {"type": "Split", "pattern": {"Regex": KIMI_PAT_STR}, "behavior": "Isolated",
                 "invert": False}  # fmt: skip
        steps = [split, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]
        return None, _sequence(steps), KIMI["ignore_merges"]
    entry = REFERENCE["families"][pre]
    norm = entry["normalizer"]
    return (
        {"type": "Sequence", "normalizers": norm} if norm else None,
        _sequence(entry["pre_tokenizer"]),
        entry["ignore_merges"],
    )


def _sequence(steps: list[dict[str, Any]]) -> dict[str, Any]:
    with_trim = [{"trim_offsets": True, **s} if s["type"] == "ByteLevel" else s for s in steps]
    return {"type": "Sequence", "pretokenizers": with_trim}


def _hf_tokenizer(pre: str) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on CORPUS under the family's normalizer and pre_tokenizer,
    saved and reloaded as its tokenizer.json."""
    normalizer, pre_tokenizer, ignore_merges = _family(pre)
    spec = json.loads(tokenizers.Tokenizer(models.BPE()).to_str())
    spec.update(normalizer=normalizer, pre_tokenizer=pre_tokenizer)
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    saved = json.loads(tok.to_str())
    saved["model"]["ignore_merges"] = ignore_merges
    return tokenizers.Tokenizer.from_str(json.dumps(saved))


def _gguf_bpe_metadata(hf: tokenizers.Tokenizer, pre: str) -> dict[str, Any]:
    """The tokenizer.* fields convert_hf_to_gguf.py's get_vocab_base / SpecialVocab write."""
    saved = json.loads(hf.to_str())
    vocab: dict[str, int] = saved["model"]["vocab"]
    added = {t["id"]: t for t in saved["added_tokens"]}
    reverse = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(max(reverse) + 2):  # one id past the end: a [PAD] filler, as for padded vocabs
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(4)  # USER_DEFINED
        elif i in added:
            tokens.append(reverse[i])
            types.append(3 if added[i]["special"] else 4)
        else:
            tokens.append(reverse[i])
            types.append(1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab.get("<|im_start|>", 1),
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, tokenizers.Tokenizer, dict[str, Any]]:
    hf = _hf_tokenizer(request.param)
    return request.param, hf, _gguf_bpe_metadata(hf, request.param)


def test_gguf_bpe_encodes_as_hf_tokenizer_json(
    family: tuple[str, tokenizers.Tokenizer, dict[str, Any]],
) -> None:
    pre, hf, metadata = family
    ours = Tokenizer.from_gguf_metadata(metadata)
    for text in CORPUS:
        assert _pieces(ours.backend, text) == _pieces(hf, text), (pre, text)
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, False), (pre, text)
        assert ours.decode(ids) == hf.decode(ids), (pre, text)


def test_gguf_bpe_ignore_merges_as_hf_tokenizer_json(
    family: tuple[str, tokenizers.Tokenizer, dict[str, Any]],
) -> None:
    """Without merges a word that is itself a token is taken whole only where the family's
    tokenizer.json sets ignore_merges (tiktoken-born vocabularies); else it stays in bytes."""
    pre, hf, metadata = family
    saved = json.loads(hf.to_str())
    saved["model"]["merges"] = []
    hf_unmerged = tokenizers.Tokenizer.from_str(json.dumps(saved))
    ours = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.merges": []})
    for text in CORPUS:
        want = hf_unmerged.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == want, (pre, text)


def test_corpus_tells_the_pre_tokenizers_apart(
    family: tuple[str, tokenizers.Tokenizer, dict[str, Any]],
) -> None:
    """The check above can fail: the GPT-2 split (what an unknown name falls back to) cuts
    this corpus otherwise than every other family's own split."""
    pre, hf, metadata = family
    if pre == "gpt2":
        return
    gpt2 = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "gpt2"}).backend
    assert [t for t in CORPUS if _pieces(gpt2, t) != _pieces(hf, t)], pre


def test_kimi_split_matches_tiktoken_regex_semantics() -> None:
    """Kimi K2 has no tokenizer.json: its split runs tiktoken's pattern through the `regex`
    module's engine (V1: class intersection); ours must cut the same pieces."""
    regex = pytest.importorskip("regex")
    assert KIMI["census_pattern"] == KIMI_PAT_STR  # tokenization_kimi.py and the census agree
    hf = _hf_tokenizer("kimi-k2")
    ours = Tokenizer.from_gguf_metadata(_gguf_bpe_metadata(hf, "kimi-k2")).backend
    pattern = regex.compile(KIMI_PAT_STR, regex.V1)
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(KIMI_PAT_STR), "isolated")
    for text in CORPUS:
        pieces = [p for p, _ in split.pre_tokenize_str(text)]
        assert pieces == pattern.findall(text), text
        assert ours.pre_tokenizer is not None
        byte_pieces = [p for p, _ in ours.pre_tokenizer.pre_tokenize_str(text)]
        assert len(byte_pieces) == len(pieces), text


def test_bpe_ignore_merges_and_bad_fields(
    family: tuple[str, tokenizers.Tokenizer, dict[str, Any]],
) -> None:
    pre, _, metadata = family
    if pre != "llama-bpe":
        return
    # A whole word in the vocabulary is taken as is, without its merges (Llama 3's flag).
    md = {**metadata, "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": "llama-bpe"}
    word = next(t for t in md["tokenizer.ggml.tokens"] if len(t) > 3 and t.isalpha())
    assert Tokenizer.from_gguf_metadata(md).encode(word, False) == [
        md["tokenizer.ggml.tokens"].index(word)
    ]
    for key, bad in [
        ("tokenizer.ggml.token_type", [1, 2]),
        ("tokenizer.ggml.token_type", ["1"] * len(md["tokenizer.ggml.tokens"])),
        ("tokenizer.ggml.merges", ["nospace"]),
        ("tokenizer.ggml.merges", [3]),
    ]:
        with pytest.raises(ModelFormatError):
            Tokenizer.from_gguf_metadata({**md, key: bad})


# llama.cpp's models/ggml-vocab-NAME.gguf: a real vocabulary as convert_hf_to_gguf.py wrote it,
# with .inp (texts) and .out (the ids HF's tokenizer gave each, by convert_hf_to_gguf_update.py).
# About 22 MB for these families, so not shipped: MOEFLOW_LLAMA_VOCAB_DIR names that folder.
LLAMA_VOCAB_FILES = [
    "gpt-2", "starcoder", "refact", "llama-bpe", "qwen2", "qwen35", "deepseek-llm",
    "deepseek-coder",
]  # fmt: skip


@pytest.mark.parametrize("name", LLAMA_VOCAB_FILES)
def test_llama_cpp_vocab_files_encode_as_hf(name: str) -> None:
    folder = os.environ.get("MOEFLOW_LLAMA_VOCAB_DIR")
    if not folder:
        pytest.skip("MOEFLOW_LLAMA_VOCAB_DIR (llama.cpp's models/ folder) is not set")
    path = Path(folder) / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    from moeflow.weights.gguf import GGUFReader

    with GGUFReader(path) as reader:
        metadata = dict(reader.metadata)
    assert metadata["tokenizer.ggml.pre"] == name
    ours = Tokenizer.from_gguf_metadata(metadata)
    texts = Path(f"{path}.inp").read_text("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    lines = Path(f"{path}.out").read_text("utf-8").splitlines()
    assert len(texts) == len(lines) >= 46
    checked = 0
    for text, line in zip(texts, lines, strict=True):
        # NOTE: qwen35's file adds NFD texts whose ids are llama.cpp's own (it applies no
        # normalizer and its CI passes them); the tokenizer.json composes them first (NFC).
        if name.startswith("qwen") and unicodedata.normalize("NFC", text) != text:
            continue
        assert ours.encode(text, add_special_tokens=False) == [int(t) for t in line.split()], (
            name,
            text,
        )
        checked += 1
    assert checked >= 46


def _pieces(tok: tokenizers.Tokenizer, text: str) -> list[tuple[str, tuple[int, int]]]:
    """The normalised, pre-tokenised pieces (byte-level alphabet) with their offsets."""
    if tok.normalizer is not None:
        text = tok.normalizer.normalize_str(text)
    assert tok.pre_tokenizer is not None
    return tok.pre_tokenizer.pre_tokenize_str(text)


# ---- SentencePiece ("llama") vocabularies --------------------------------------------------
UNSEEN = ["Ünïcödé 🦀 ꙮ ⅷ", "tab\tand\u00a0nbsp", "   many   spaces   ", "\n"]


@pytest.fixture(scope="module")
def spm_model() -> Any:
    """A SentencePiece BPE model trained on CORPUS as Llama's was: identity normalisation,
    a dummy prefix, whitespace kept, digits split, byte fallback; two control symbols."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in CORPUS if t.strip()] * 3),
        model_writer=out,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        control_symbols=["<|im_start|>", "<|im_end|>"],
        max_sentence_length=100000,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=out.getvalue())


def _gguf_spm_metadata(sp: Any) -> dict[str, Any]:
    """The tokenizer.* fields convert_hf_to_gguf.py's _create_vocab_sentencepiece writes."""
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }


def test_gguf_spm_encodes_as_sentencepiece_and_llama_tokenizer_fast(spm_model: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    sp = spm_model
    metadata = _gguf_spm_metadata(sp)
    ours = Tokenizer.from_gguf_metadata(metadata)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    # transformers' LlamaTokenizerFast model (merges from the scores), with the legacy
    # normalizer of the tokenizer.json files Llama 2 / Mistral / Mixtral ship. NOTE: its default
    # Metaspace(prepend_scheme="first") adds no `▁` before a leading space; sentencepiece,
    # llama.cpp and those files do.
    hf = transformers.LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, scores)
    ).backend_tokenizer
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None  # type: ignore[assignment]
    assert ours.vocab_size == sp.vocab_size() and ours.bos_token_id == sp.bos_id() == 1
    assert sp.is_byte(vocab["<0x0A>"]) and any(sp.get_score(i) != 0 for i in range(300, 400))
    for text in [*CORPUS, *UNSEEN]:
        if "<|im_" in text:
            continue  # control symbols: sentencepiece reads them as text
        want = [sp.bos_id(), *sp.encode(text)]
        ids = ours.encode(text)
        assert ids == want, text
        assert ids[1:] == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == sp.decode(want) == hf.decode(ids, skip_special_tokens=True)


def test_gguf_spm_special_tokens_and_flags(spm_model: Any) -> None:
    sp = spm_model
    metadata = _gguf_spm_metadata(sp)
    ours = Tokenizer.from_gguf_metadata(metadata)
    start, end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    # As llama.cpp: a text run after a special token gets its own `▁` prefix.
    assert ours.encode("<|im_start|>user hi<|im_end|>", False) == [
        start,
        *sp.encode("user hi"),
        end,
    ]
    assert ours.decode([start, *sp.encode("hi")], skip_special_tokens=False) == "<|im_start|> hi"
    assert ours.decode([start, *sp.encode("hi")]) == "hi"
    no_bos = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("hi") == sp.encode("hi")
    with_eos = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_eos_token": True})
    assert with_eos.encode("hi") == [1, *sp.encode("hi"), 2]
    no_prefix = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.add_space_prefix": False})
    assert no_prefix.encode(" hi there", False) == sp.encode("hi there")
    assert no_prefix.encode("hi", False) != sp.encode("hi")
    assert no_prefix.decode(no_prefix.encode(" hi")) == " hi"


def test_gguf_spm_bad_fields(spm_model: Any) -> None:
    metadata = _gguf_spm_metadata(spm_model)
    n = len(metadata["tokenizer.ggml.tokens"])
    for key, bad in [
        ("tokenizer.ggml.scores", None),
        ("tokenizer.ggml.scores", [0.0] * (n - 1)),
        ("tokenizer.ggml.scores", ["x"] * n),
        ("tokenizer.ggml.scores", [float("nan")] * n),
        ("tokenizer.ggml.token_type", [1.5] * n),
        ("tokenizer.ggml.tokens", [*metadata["tokenizer.ggml.tokens"][:-1], "▁" * 300]),
    ]:
        with pytest.raises(ModelFormatError):
            Tokenizer.from_gguf_metadata({**metadata, key: bad})


def test_gguf_spm_file_through_the_reader(spm_model: Any, tmp_path: Any) -> None:
    """The same fields written by gguf-py and read back by moeflow's reader (float32 scores,
    int32 types) build the same tokenizer."""
    gguf = pytest.importorskip("gguf")
    from moeflow.weights.gguf import GGUFReader

    md = _gguf_spm_metadata(spm_model)
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_scores(md["tokenizer.ggml.scores"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    w.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    w.add_unk_token_id(md["tokenizer.ggml.unknown_token_id"])
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFReader(path) as reader:
        from_file = Tokenizer.from_gguf_metadata(reader.metadata)
    direct = Tokenizer.from_gguf_metadata(md)
    for text in CORPUS:
        assert from_file.encode(text) == direct.encode(text), text
