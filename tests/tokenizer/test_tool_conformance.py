"""Conformance: canitoolcall's recorded fixtures (PyPI, test-only, pinned in pyproject) for the
formats we parse (qwen3-hermes, llama JSON and pythonic, deepseek V3, V3.1 and DSML (V3.2, V4,
V4.1), kimi K2, glm, qwen3-xml), through
the server's chain (reasoning split, then the tool parser), whole and streamed: one character
at a time and in seeded random chunks. A fixture with `expected` must give exactly its content,
reasoning and calls; one with `expected_error` must give one of the outcomes it accepts. The
stream must complete the same calls, and the calls a client assembles from the deltas must be
those calls; only a call the output never finishes (cut by max_tokens) may have been started in
a stream (see moeflow/tokenizer/tool_parsers/base.py). Sub-formats of other parsers are
skipped, each with its reason."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest

from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning
from moeflow.tokenizer.tool_parsers import TOOL_PARSERS, ToolCallDelta

# canitoolcall family -> its reference models' variant -> our parser (a family's default first)
FAMILIES: dict[str, dict[str, str]] = {
    "qwen3-hermes": {"*": "hermes"},
    "llama": {"*": "llama3_json"},  # Llama 4's pythonic outputs: "pythonic" (_parser_of)
    "deepseek": {
        "deepseek-v3": "deepseek_v3",
        "deepseek-v31": "deepseek_v31",
        "deepseek-v32": "deepseek_v32",
        "deepseek-v4": "deepseek_v32",  # the same DSML, its section named tool_calls
        "deepseek-v41": "deepseek_v32",  # and calls, with a space after each ｜DSML｜
    },
    "kimi": {"kimi-k2-thinking": "kimi_k2", "kimi-k2-instruct": "kimi_k2"},
    "glm": {"*": "glm45"},
    "qwen3-xml": {"*": "qwen3_coder"},
}
# Fixtures we fail, and why (each one a bug to fix, not a format to skip).
KNOWN_FAILURES: dict[str, str] = {}
OTHER_FORMAT = {"kimi-k3-xtml": "Kimi K3's XTML markup is not parsed here"}


def _fixtures() -> list[Any]:
    spec = importlib.util.find_spec("canitoolcall")
    if spec is None or not spec.submodule_search_locations:
        return [pytest.param(None, id="canitoolcall-not-installed", marks=pytest.mark.skip)]
    root = Path(spec.submodule_search_locations[0]) / "_data" / "fixtures"
    out = []
    for family, parsers in FAMILIES.items():
        family_json = json.loads((root / family / "family.json").read_text())
        models = {m["repo"]: m for m in family_json["reference_models"]}
        for path in sorted((root / family).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                fx = json.loads(line)
                model = models[fx["models"][0]]
                parser = parsers.get(model["variant"], parsers.get("*"))
                if fx.get("generation_prompt") is None:
                    fx["generation_prompt"] = model["default_generation_prompt"]
                skip = OTHER_FORMAT.get(model["variant"]) if parser is None else None
                marks = [pytest.mark.skip(reason=skip)] if skip else []
                out.append(pytest.param((parser, fx), id=fx["id"], marks=marks))
    return out


def _run(parser_name: str, fx: dict[str, Any], pieces: list[str]) -> tuple[Any, ...]:
    """(reasoning, content, completed calls, the calls a client assembles from the deltas)."""
    parser = TOOL_PARSERS[parser_name](fx.get("tools"))
    opened = prompt_opens_reasoning(fx["generation_prompt"])
    splitter = ReasoningSplitter(in_reasoning=opened, call_tags=parser.call_tags)
    reasoning, content = "", ""
    deltas: list[ToolCallDelta] = []
    for piece in [*pieces, None]:
        r, c = splitter.feed(piece) if piece is not None else splitter.finish()
        c, new = parser.feed(c)
        if piece is None:
            tail, more = parser.finish()
            c, new = c + tail, new + more
        reasoning, content = reasoning + r, content + c
        deltas += new
    calls = [(t.id, t.name, t.arguments) for t in parser.calls]
    # canitoolcall's strict equality: "" is null
    return (reasoning or None), (content or None), calls, _assemble(deltas)


def _assemble(deltas: list[ToolCallDelta]) -> list[tuple[str, str, str]]:
    """What an OpenAI client builds from the deltas: index -> (id, name, arguments)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.id is not None:
            assert d.index not in calls and d.name  # id and name first
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.index in calls and d.arguments
        calls[d.index][2] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [(i, n, a) for i, n, a in calls.values()]


def _chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12)
        out.append(text[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("case", _fixtures())
def test_fixture(case: tuple[str, dict[str, Any]]) -> None:
    parser_name, fx = case
    text = fx["raw_output"]
    if parser_name == "llama3_json" and text.removeprefix("<|python_start|>").startswith("["):
        parser_name = "pythonic"  # Llama 3.2/4's list of calls, [f(a=1)]
    if fx["id"] in KNOWN_FAILURES:
        pytest.xfail(KNOWN_FAILURES[fx["id"]])
    reasoning, content, calls, _ = _run(parser_name, fx, [text])
    for pieces in [[text], list(text), *(_chunks(text, seed) for seed in range(3))]:
        r, c, streamed_calls, streamed = _run(parser_name, fx, pieces)
        assert (r, c, _named(streamed_calls)) == (reasoning, content, _named(calls))
        done = {i for i, _, _ in streamed_calls}
        assert [s for s in streamed if s[0] in done] == streamed_calls  # what a client sees
        started = [s for s in streamed if s[0] not in done]  # calls the output never finished
        assert not started or "truncated" in fx["tags"] or "expected_error" in fx, started
    got = [(name, json.loads(args)) for _, name, args in calls]
    if "expected" in fx:
        want = fx["expected"]
        assert got == [(c["name"], c["arguments"]) for c in want["tool_calls"] or ()]
        assert content == want["content"]
        assert reasoning == want["reasoning_content"]
    else:
        outcomes = {"no_tool_calls", "content_passthrough"} if not calls else set()
        assert outcomes & set(fx["expected_error"]["accept"]), (calls, content)


def _named(calls: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """Calls without their ids (each parse draws new ones)."""
    return [(name, args) for _, name, args in calls]
