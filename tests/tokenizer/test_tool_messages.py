"""Agent-loop histories (an assistant message with content null and tool_calls, then `tool`
messages) and `tools` render in every template: a template that knows tool calls gets them as
transformers passes them (checked against transformers' own render of the same template), one
that does not (SmolLM2's ChatML) gets Hermes-style blocks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moeflow.tokenizer import Tokenizer
from moeflow.tokenizer.chat_template import hermes_tools_prompt

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]

# Our own template in the style of tool-aware checkpoints: it renders `tools`, reads
# tool_call.function.arguments as an object (| tojson) and tests content for none.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is not none %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} "
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}"
    "{% if m.role == 'tool' %} (for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(
        tok.backend, bos_token_id=1, eos_token_ids=[2], add_bos_token=False, chat_template=template
    )


def test_tool_aware_template_matches_transformers(tok: Tokenizer, hf_tok: Any) -> None:
    ours = _with_template(tok, TOOL_TEMPLATE).apply_chat_template(HISTORY, tools=TOOLS)
    # transformers' convention: arguments as an object, content null passed through
    hf_history = json.loads(json.dumps(HISTORY))
    hf_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    theirs = hf_tok.apply_chat_template(
        hf_history,
        tools=TOOLS,
        chat_template=TOOL_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ours == theirs
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in ours
    assert '"name": "get_weather"' in ours  # the tools reached the template


def test_plain_chatml_template_gets_hermes_blocks(tok: Tokenizer) -> None:
    """SmolLM2's template knows neither tools nor tool_calls (it used to raise on content
    null): the calls become <tool_call> blocks, results <tool_response> user turns, and the
    tools a system prompt."""
    out = tok.apply_chat_template(HISTORY, tools=TOOLS)
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert f"<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>" in out
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in out
    assert out.startswith("<|im_start|>system\n" + hermes_tools_prompt(TOOLS) + "<|im_end|>")
    assert out.endswith("<|im_start|>assistant\n")
    # without tools: no tools prompt, SmolLM2's default system prompt
    assert "<tools>" not in tok.apply_chat_template(HISTORY)


def test_system_message_gets_the_tools(tok: Tokenizer) -> None:
    out = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *HISTORY], tools=TOOLS
    )
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools")


@pytest.mark.parametrize("arguments", ["not json", '["a list"]', ""])
def test_odd_arguments_kept(tok: Tokenizer, arguments: str) -> None:
    history = json.loads(json.dumps(HISTORY))
    history[1]["tool_calls"][0]["function"]["arguments"] = arguments
    out = _with_template(tok, TOOL_TEMPLATE).apply_chat_template(history)
    want = {} if arguments == "" else arguments
    assert f"<tool_call>get_weather {json.dumps(want)}</tool_call>" in out
