"""Structured output in the engine: every constraint kind on the default model (SmolLM2-135M),
greedy and sampled, several constrained requests beside an unconstrained one in one batch; the
output matches (jsonschema validates every JSON answer); bad constraints name the field; a
reasoning model (the scripted checkpoint) thinks freely and is constrained after </think>."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.api import StructuredOutputsParams
from moeflow.engine.model_runner import TokenCarry
from moeflow.engine.structured_output import apply_bitmask
from moeflow.errors import RequestError
from moeflow.tokenizer import ReasoningSplitter
from moeflow.tokenizer.tool_parsers import HermesToolParser, tool_call_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(smollm2_gguf: str) -> LLM:
    return LLM(smollm2_gguf, device="cpu", max_model_len=512)


def _chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.encode_chat([{"role": "user", "content": text}])


def test_constraints_in_one_batch(llm: LLM) -> None:
    prompt = _chat_ids(llm, "Describe a person as JSON.")
    kinds = [
        StructuredOutputsParams(json=SCHEMA),
        StructuredOutputsParams(json=json.dumps(SCHEMA)),
        StructuredOutputsParams(json_object=True),
        StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
        StructuredOutputsParams(choice=["yes", "no", "maybe"]),
        StructuredOutputsParams(grammar='start: "x" NUM\nNUM: /[0-9]+/'),
    ]
    params = [SamplingParams(max_tokens=120, temperature=t, seed=3, structured_outputs=k)
              for k in kinds for t in (0.0, 1.0)]  # fmt: skip
    params.append(SamplingParams(max_tokens=8, temperature=0))  # unconstrained neighbour
    outs = llm.generate([prompt] * len(params), params)
    texts = [o.text for o in outs]
    for i in range(4):
        assert outs[i].finish_reason == "stop", texts[i]
        jsonschema.validate(json.loads(texts[i]), SCHEMA)
    for i in (4, 5):
        assert outs[i].finish_reason == "stop"
        assert isinstance(json.loads(texts[i]), dict)
    for i in (6, 7):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[i]), texts[i]
    for i in (8, 9):
        assert texts[i] in ("yes", "no", "maybe")
    for i in (10, 11):
        assert re.fullmatch(r"x[0-9]+", texts[i]), texts[i]
    # the unconstrained request is what it is alone
    alone = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    assert texts[-1] == alone.text


@pytest.mark.parametrize(
    "spec",
    [
        {"json": "{not json"},
        {"json": {"type": "wat"}},
        {"json": [1, 2]},
        {"regex": "(("},
        {"grammar": "start: undefined_rule"},
    ],
)
def test_bad_constraint_names_the_field(llm: LLM, spec: dict) -> None:
    with pytest.raises(RequestError) as e:
        llm.generate([[1, 2, 3]], SamplingParams(structured_outputs=StructuredOutputsParams(
            **spec, param="response_format")))  # fmt: skip
    assert e.value.param == "response_format"
    assert str(e.value).startswith("response_format: ")


def test_one_kind_exactly() -> None:
    with pytest.raises(RequestError):
        StructuredOutputsParams()
    with pytest.raises(RequestError):
        StructuredOutputsParams(regex="a", choice=["a"])


def test_apply_bitmask_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 3), generator=gen, dtype=torch.int64)
    bitmask = words.to(torch.int32)
    out = apply_bitmask(logits, bitmask)
    for r in range(3):
        for t in range(70):
            allowed = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert out[r, t] == (logits[r, t] if allowed else float("-inf"))


@pytest.mark.parametrize("overlap", [False, True])
def test_reasoning_then_constraint(scripted_checkpoint: Path, overlap: bool) -> None:
    """The scripted model writes "<think>abc</think>XYZ": the think block is free, then the
    choice constraint replaces XYZ; under the overlap schedule too (each mask computed once
    the grammar has seen the token before it, </think> included)."""
    llm = LLM(str(scripted_checkpoint), dtype="float32", device="cpu", max_model_len=128,
              overlap_schedule=overlap)  # fmt: skip
    prompt = llm.encode_chat([{"role": "user", "content": "q"}])
    spec = StructuredOutputsParams(choice=["ok"])
    params = SamplingParams(max_tokens=20, temperature=0, structured_outputs=spec)
    out = llm.generate([prompt], params)[0]
    assert out.text.endswith("</think>ok"), out.text
    assert "abc" in out.text


def test_reasoning_then_forced_tool_call(scripted_checkpoint: Path) -> None:
    """Reasoning, then a forced call (tool_choice "required"'s grammar): the scripted model's
    think block stays free, the call after </think> is valid; the server's chain (reasoning
    split, then the tool parser) gives the same reasoning, content and call streamed delta by
    delta as on the whole text, and no markup in either."""
    llm = LLM(str(scripted_checkpoint), dtype="float32", device="cpu", max_model_len=128)
    prompt = llm.encode_chat([{"role": "user", "content": "q"}])
    tools = [{"type": "function", "function": {"name": "ping", "parameters": None}}]
    spec = StructuredOutputsParams(grammar=tool_call_grammar("hermes", tools, None, False))
    params = SamplingParams(max_tokens=100, temperature=0, structured_outputs=spec)
    (out,) = llm.generate([prompt], params)
    assert out.finish_reason == "stop"

    def chain(deltas: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
        splitter, parser = ReasoningSplitter(), HermesToolParser()
        reasoning, content = "", ""
        for d in [*deltas, None]:
            r, c = splitter.feed(d) if d is not None else splitter.finish()
            c, _ = parser.feed(c)
            if d is None:
                c += parser.finish()[0]
            reasoning, content = reasoning + r, content + c
        return reasoning, content, [(t.name, t.arguments) for t in parser.calls]

    whole = chain([out.text])
    assert whole == ("abc", "", [("ping", "{}")])
    assert chain(list(llm.stream(prompt, params))) == whole


def test_rejected_token_ends_the_request_cleanly(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask that admits a token the matcher then rejects (llguidance's promise broken, as a
    matcher in error breaks it) ends the request before that token, "stop" and no error,
    whole and streamed: here the real mask on a request's first step, then one admitting
    every token, so the free model soon writes a token that is no digit."""
    structured = llm.engine.structured
    real = structured.fill_bitmask
    seen: list = []  # the states themselves: kept alive, so a later request's ids never repeat

    def leaky(states: list) -> torch.Tensor | None:
        mask = real(states)
        for i, state in enumerate(states):
            if state is not None and mask is not None and any(s is state for s in seen):
                mask[i] = -1  # every token admitted
            seen.append(state)
        return mask

    monkeypatch.setattr(structured, "fill_bitmask", leaky)
    prompt = _chat_ids(llm, "Write a short story.")
    spec = StructuredOutputsParams(regex=r"[0-9]{40}")
    params = SamplingParams(max_tokens=40, temperature=0, structured_outputs=spec)
    (out,) = llm.generate([prompt], params)
    assert out.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{1,39}", out.text), out.text  # the rejected token is not there
    assert llm.engine.tokenizer.decode(out.token_ids) == out.text
    assert "".join(llm.stream(prompt, params)) == out.text


def test_batch_mask_is_each_rows_own(llm: LLM) -> None:
    """The batch's masks (computed in parallel by llguidance's executor) are, row for row, what
    each matcher computes alone; unconstrained rows admit every token."""
    structured = llm.engine.structured
    tok = llm.engine.tokenizer
    json_spec = StructuredOutputsParams(json=SCHEMA)
    regex_spec = StructuredOutputsParams(regex=r"[0-9]{3}-x")
    rows = [(json_spec, '{"name":"Al'), (json_spec, '{"name":"Bo","age":4'), (json_spec, "")]
    rows.append((regex_spec, "12"))
    states = []
    for spec, prefix in rows:
        state = structured.new_state(spec, [1])
        for t in tok.encode(prefix, add_special_tokens=False):
            assert structured.advance(state, t)
        states.append(state)
    batch = structured.fill_bitmask([states[0], None, *states[1:]])
    assert batch is not None
    words = batch.shape[1]
    for row, state in zip([0, 2, 3, 4], states, strict=True):
        alone = torch.full((words,), -1, dtype=torch.int32)
        state.matcher.unsafe_compute_mask_ptr(alone.data_ptr(), words * 4)
        assert torch.equal(batch[row], alone)
    assert bool((batch[1] == -1).all())
    assert not torch.equal(batch[0], batch[3])  # the rows differ: each is its own


def test_masks_are_computed_while_the_forward_runs(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step's mask computation and forward meet at a barrier: it breaks (the test fails
    with BrokenBarrierError) unless the two run at once, the mask on its worker thread."""
    engine = llm.engine
    barrier = threading.Barrier(2, timeout=30)
    meetings: list[str] = []
    fill, run = engine.structured.fill_bitmask, engine.runner.run

    def fill_spy(states: list) -> torch.Tensor | None:
        barrier.wait()
        meetings.append("mask")
        return fill(states)

    def run_spy(batch, carry=None, profile=None):  # noqa: ANN001, ANN202
        barrier.wait()
        meetings.append("forward")
        return run(batch, carry, profile)

    monkeypatch.setattr(engine.structured, "fill_bitmask", fill_spy)
    monkeypatch.setattr(engine.runner, "run", run_spy)
    spec = StructuredOutputsParams(regex=r"[0-9]{5}")
    params = SamplingParams(max_tokens=5, temperature=0, structured_outputs=spec)
    (out,) = llm.generate([_chat_ids(llm, "A number.")], params)
    assert re.fullmatch(r"[0-9]{5}", out.text), out.text
    assert sorted(meetings) == ["forward"] * 5 + ["mask"] * 5


def test_overlap_schedule_gives_the_same_constrained_outputs(llm: LLM, smollm2_gguf: str) -> None:
    """Constrained requests (greedy, seeded, with penalties) beside a free one: the overlap
    schedule, whose constrained rows take their input token from the device and whose masks
    wait for the grammar to see it, gives the plain schedule's tokens."""
    prompt = _chat_ids(llm, "Describe a person as JSON.")
    json_spec = StructuredOutputsParams(json=SCHEMA)
    params = [
        SamplingParams(max_tokens=48, temperature=0, structured_outputs=json_spec),
        SamplingParams(max_tokens=48, temperature=1.0, seed=5, structured_outputs=json_spec),
        SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.3,
                       structured_outputs=json_spec),
        SamplingParams(max_tokens=24, temperature=0.8, seed=2,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,9}")),
        SamplingParams(max_tokens=24, temperature=0,
                       structured_outputs=StructuredOutputsParams(choice=["yes", "no"])),
        SamplingParams(max_tokens=24, temperature=0),
    ]  # fmt: skip
    prompts = [prompt] * len(params)
    want = [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]

    overlap = LLM(smollm2_gguf, device="cpu", max_model_len=512, overlap_schedule=True)
    pending: list[int] = []  # constrained rows whose input token came from the device
    run = overlap.engine.runner.run

    def spy(batch, carry: TokenCarry | None = None, profile=None):  # noqa: ANN001, ANN202
        pending.append(sum(r.num_pending for r in batch.reqs if r.grammar is not None))
        return run(batch, carry, profile)

    overlap.engine.runner.run = spy  # type: ignore[method-assign]
    got = [(o.token_ids, o.finish_reason) for o in overlap.generate(prompts, params)]
    assert got == want
    assert sum(pending) > 0
