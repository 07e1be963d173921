"""GGUF vocabularies against the Hugging Face tokenizer they were converted from: for each
pre-tokenizer a family's GGUF names, a byte-level BPE trained here under that family's real
tokenizer.json normalizer / pre_tokenizer (written below as data), its GGUF fields written as
llama.cpp's convert_hf_to_gguf.py writes them, and a multilingual, code and digits corpus
encoded both ways; SentencePiece ("llama") vocabularies against sentencepiece itself and a
LlamaTokenizerFast built by transformers."""

from __future__ import annotations

import io
import json
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

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KIMI_PAT_STR = "|".join(  # tokenization_kimi.py pat_str (tiktoken; no tokenizer.json upstream)
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}  # fmt: skip


def _seq(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, BPE ignore_merges) of the family's
# tokenizer.json, as data.
FAMILIES: dict[str, tuple[dict[str, Any] | None, dict[str, Any], bool]] = {
    "gpt2": (None, _byte_level(True), False),  # GPT-2, OLMoE
    "smollm": (
        None,
        _seq({"type": "Digits", "individual_digits": True}, _byte_level(True)),
        False,
    ),
    "llama-bpe": (None, _seq(_split(_LLAMA3_SPLIT), _byte_level(False)), True),
    "qwen2": ({"type": "NFC"}, _seq(_split(_QWEN2_SPLIT), _byte_level(False)), False),
    "glm4": (None, _seq(_split(_LLAMA3_SPLIT), _byte_level(False)), False),  # GLM-4.5
    "deepseek-llm": (  # DeepSeek-V2 / DeepSeek-MoE
        {"type": "Sequence", "normalizers": []},
        _seq(
            _split("[\r\n]"),
            _split(
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
                r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+"
            ),
            _split("\\s?[!-/:-~！-／：-～‘-‟　-。]+"),
            _split("\\s+$"),
            _split("[一-龥ࠀ-一가-퟿]+"),
            _split("\\p{N}+"),
            _byte_level(False),
        ),
        False,
    ),
    "deepseek-v3": (  # DeepSeek-V3 / R1
        {"type": "Sequence", "normalizers": []},
        _seq(
            _split("\\p{N}{1,3}"),
            _split("[一-龥\u3040-ゟ゠-ヿ]+"),
            _split(
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*"
                "|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            ),
            _byte_level(False),
        ),
        False,
    ),
    "kimi-k2": (None, _seq(_split(KIMI_PAT_STR), _byte_level(False)), True),
    "tekken": (
        None,
        _seq(
            _split(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            ),
            _byte_level(False),
        ),
        True,
    ),
}


def _hf_tokenizer(pre: str) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on CORPUS under the family's normalizer and pre_tokenizer,
    saved and reloaded as its tokenizer.json."""
    normalizer, pre_tokenizer, ignore_merges = FAMILIES[pre]
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


@pytest.fixture(scope="module", params=list(FAMILIES))
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
