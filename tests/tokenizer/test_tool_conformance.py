"""Conformance: canitoolcall's recorded fixtures (PyPI, test-only, pinned in pyproject) for the
formats we parse (qwen3-hermes, llama), through the server's chain (reasoning split, then the
tool parser), whole and streamed one character at a time. A fixture with `expected` must give
exactly its content, reasoning and calls; one with `expected_error` must give one of the
outcomes it accepts. Llama's pythonic-list fixtures (another format) are skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from moeflow.tokenizer import ReasoningSplitter, prompt_opens_reasoning
from moeflow.tokenizer.tool_parser import TOOL_PARSERS

FAMILIES = {"qwen3-hermes": "hermes", "llama": "llama3_json"}
# Fixtures we fail, and why (each one a bug to fix, not a format to skip).
KNOWN_FAILURES = {
    "qwen3-hermes/marker-in-arguments": "ReasoningSplitter opens a think block at a <think> "
    "anywhere in the output, here inside a call's argument string",
}
PYTHONIC = "Llama 3.2/4's pythonic list [f(a=1)] is vLLM's pythonic parser, not llama3_json"


def _fixtures() -> list[Any]:
    spec = importlib.util.find_spec("canitoolcall")
    if spec is None or not spec.submodule_search_locations:
        return [pytest.param(None, id="canitoolcall-not-installed", marks=pytest.mark.skip)]
    root = Path(spec.submodule_search_locations[0]) / "_data" / "fixtures"
    out = []
    for family, parser in FAMILIES.items():
        for path in sorted((root / family).glob("*.jsonl")):
            for line in path.read_text().splitlines():
                fx = json.loads(line)
                out.append(pytest.param((parser, fx), id=fx["id"]))
    return out


def _run(parser_name: str, fx: dict[str, Any], pieces: list[str]) -> tuple[Any, ...]:
    prompt = fx.get("generation_prompt") or ""
    splitter = ReasoningSplitter(in_reasoning=prompt_opens_reasoning(prompt))
    parser = TOOL_PARSERS[parser_name]()
    reasoning, content, calls = "", "", []
    for piece in [*pieces, None]:
        r, c = splitter.feed(piece) if piece is not None else splitter.finish()
        c, new = parser.feed(c)
        if piece is None:
            tail, more = parser.finish()
            c, new = c + tail, new + more
        reasoning, content = reasoning + r, content + c
        calls += [(t.name, json.loads(t.arguments)) for t in new]
    return (reasoning if splitter.has_reasoning else None), (content or None), calls


@pytest.mark.parametrize("case", _fixtures())
def test_fixture(case: tuple[str, dict[str, Any]]) -> None:
    parser_name, fx = case
    text = fx["raw_output"]
    if parser_name == "llama3_json" and text.removeprefix("<|python_start|>").startswith("["):
        pytest.skip(PYTHONIC)
    if fx["id"] in KNOWN_FAILURES:
        pytest.xfail(KNOWN_FAILURES[fx["id"]])
    whole = _run(parser_name, fx, [text])
    assert _run(parser_name, fx, list(text)) == whole  # streamed == whole
    reasoning, content, calls = whole
    if "expected" in fx:
        want = fx["expected"]
        want_calls = [(c["name"], c["arguments"]) for c in want["tool_calls"] or ()]
        assert calls == want_calls
        assert content == want["content"]
        assert reasoning == want["reasoning_content"]
    else:
        outcomes = {"no_tool_calls", "content_passthrough"} if not calls else set()
        assert outcomes & set(fx["expected_error"]["accept"]), (calls, content)
