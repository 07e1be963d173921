"""Tokenizer vs transformers on the real SmolLM2 GGUF (properties, encode, decode) and as a
saved HF folder; config variants and malformed files; the byte-level fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeflow.errors import ModelFormatError
from moeflow.tokenizer import Tokenizer
from tests.tokenizer.samples import CONVERSATIONS, TEXTS


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
    assert [tok.backend.id_to_token(i) for i in (1, 2)] == ["<|im_start|>", "<|im_end|>"]
    assert (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")) == (1, 2)


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
    with pytest.raises(ModelFormatError, match="SentencePiece vocabulary lacks"):
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


def test_byte_level_tokenizer_round_trips_utf8() -> None:
    tok = Tokenizer.byte_level()
    text = "Paris, Zürich 東京"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256 == tok.vocab_size
    assert tok.decode(ids) == text
