"""IncrementalDetokenizer: deltas concatenate to the full decode, never split a UTF-8 character,
honour skip_special_tokens and keep a small window."""

from __future__ import annotations

import random

from moeflow.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tokenizer.samples import CONVERSATIONS, TEXTS


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
