"""IncrementalDetokenizer: deltas concatenate to the full decode, never split a UTF-8 character,
honour skip_special_tokens and keep a small window. OutputText: without a stop string its final
text is the full decode; with stop strings it ends where a whole-text search after each token
ends it; its deltas never run ahead of the final text."""

from __future__ import annotations

import random

import tokenizers
from tokenizers import decoders, models

from moeflow.tokenizer import IncrementalDetokenizer, OutputText, Tokenizer
from tests.tokenizer.samples import TEXTS


def _stream(tok: Tokenizer, out: list[int], rng: random.Random) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    deltas: list[str] = []
    i = 0
    while i < len(out):
        n = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add(out[i : i + n]))
        i += n
    deltas.append(detok.flush())
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
    for text in TEXTS:
        for out in (tok.encode(text, False), _byte_token_ids(tok, text)):
            deltas = _stream(tok, out, rng)
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
        deltas = _stream(tok, out, rng)
        full = tok.decode(out)
        assert "".join(deltas) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_partial_character(tok: Tokenizer) -> None:
    ids = _byte_token_ids(tok, "😀")  # four byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids] == ["", "", "", "😀"]
    assert detok.flush() == ""
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:2]) == ""
    assert detok.flush() == tok.decode(ids[:2])


def test_detokenizer_special_tokens(tok: Tokenizer) -> None:
    out = tok.encode("<|im_start|>hello<|im_end|>", False)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = "".join(detok.add([i]) for i in out) + detok.flush()
    assert text == "<|im_start|>hello<|im_end|>"
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([i]) for i in out) + detok.flush() == "hello"


def test_detokenizer_long_stream_window_stays_small(tok: Tokenizer) -> None:
    out = tok.encode("word " * 3000, False)
    detok = IncrementalDetokenizer(tok)
    deltas = []
    for i in out:
        deltas.append(detok.add([i]))
        assert detok._read_offset - detok._prefix_offset <= 8
    assert "".join(deltas) + detok.flush() == tok.decode(out)


def test_detokenizer_sentencepiece_first_token_as_full_decode() -> None:
    """A Metaspace vocabulary: the first output token loses its leading space, as in
    decode(output_ids); later ones keep theirs."""
    backend = tokenizers.Tokenizer(
        models.WordLevel({"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3}, "<unk>")
    )
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend)
    out = [1, 2, 3, 2]
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in out]
    assert deltas == ["Hello", " world", "!", " world"]
    assert "".join(deltas) + detok.flush() == tok.decode(out) == "Hello world! world"


# ---- OutputText ------------------------------------------------------------------------------
def _feed(text: OutputText, out: list[int], rng: random.Random) -> list[str]:
    """Feed `out` in random chunks as steps would, taking a delta after each; then finish."""
    deltas: list[str] = []
    i = 0
    while i < len(out) and not text.finished:
        n = rng.choice([1, 1, 1, 2, 3])
        text.update(out[i : i + n])
        i += n
        deltas.append(text.next_delta())
    text.finish()
    deltas.append(text.next_delta())
    assert text.next_delta() == ""
    return deltas


def _reference_stop(tok: Tokenizer, out: list[int], stop: list[str]) -> tuple[int, str, str]:
    """(ids taken, final text, stop string or ""): after each token, search the whole text
    decoded so far; the first token whose text holds a stop string ends it at the earliest."""
    detok = IncrementalDetokenizer(tok)
    text = ""
    for k, token in enumerate(out, 1):
        text += detok.add([token])
        hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
        if hits:
            index, s = min(hits)
            return k, text[:index], s
    return len(out), tok.decode(out), ""


def test_output_text_without_stop_is_the_full_decode(tok: Tokenizer) -> None:
    rng = random.Random(3)
    byte_ids = _byte_token_ids(tok, "é中😀ß한")  # characters split byte by byte
    for _ in range(200):
        out = [
            rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randrange(1, 40))
        ]
        text = OutputText(tok)
        deltas = _feed(text, out, rng)
        full = tok.decode(out)
        assert "".join(deltas) == text.text == full
        assert text.num_ids == len(out) and text.stop_string is None
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_output_text_stops_where_a_whole_text_search_does(tok: Tokenizer) -> None:
    rng = random.Random(4)
    checked_stops = 0
    for sample in TEXTS:
        for out in (tok.encode(sample, False), _byte_token_ids(tok, sample)):
            full = tok.decode(out)
            for _ in range(4):
                stop = ["never there \x00"]
                for _ in range(rng.randint(1, 3)):
                    if full:
                        start = rng.randrange(len(full))
                        stop.append(full[start : start + rng.randint(1, 6)])
                want_ids, want_text, want_stop = _reference_stop(tok, out, stop)
                text = OutputText(tok, stop)
                deltas = _feed(text, out, rng)
                assert (text.num_ids, text.text, text.stop_string or "") == (
                    want_ids,
                    want_text,
                    want_stop,
                )
                assert "".join(deltas) == want_text
                checked_stops += bool(want_stop)
    assert checked_stops > 50


def test_output_text_holds_back_what_may_become_a_stop_string() -> None:
    tok = Tokenizer.byte_level()  # one token per byte
    text = OutputText(tok, stop=["abc", "zz"])
    text.update(tok.encode("xyab"))
    assert text.next_delta() == "xy"  # "ab" may still become "abc"
    text.update(tok.encode("d"))
    assert text.next_delta() == "a"  # the hold-back is a length: always the last 2 characters
    assert text.update(tok.encode("zzq")) == "zz"
    assert text.num_ids == 7  # "q" after the stop string is not taken
    assert text.finished and text.next_delta() == "bd" and text.text == "xyabd"
    plain = OutputText(tok)
    plain.update(tok.encode("é")[:1])
    assert plain.next_delta() == ""  # half a character is never sent
    plain.finish()
    assert plain.next_delta() == "\ufffd" == tok.decode(tok.encode("é")[:1])
