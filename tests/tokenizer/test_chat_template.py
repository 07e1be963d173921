"""The chat template: rendered as transformers renders it, the ChatML fallback, the sandbox
(unsafe access blocked, work bounded), its helpers, message validation and the kwargs table."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moeflow.errors import RequestError
from moeflow.tokenizer import DEFAULT_CHAT_TEMPLATE, MAX_TEMPLATE_OUTPUT_CHARS, Tokenizer
from tests.tokenizer.samples import CONVERSATIONS


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_gguf_chat_template_matches_hf(
    tok: Tokenizer, hf_tok: Any, conversation: list[dict[str, Any]]
) -> None:
    for add in (True, False):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=add)
        theirs = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
        assert ours == theirs
        assert tok.encode(ours) == hf_tok.encode(theirs)


def test_fallback_template(gguf_metadata: dict[str, Any]) -> None:
    meta = {k: v for k, v in gguf_metadata.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in DEFAULT_CHAT_TEMPLATE


# ---- the sandbox and validation -------------------------------------------------------------
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
