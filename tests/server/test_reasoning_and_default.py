"""The <think> split on a scripted model (its greedy output is "<think>abc</think>XYZ"), streamed
and not, with and without the template opening the block; and the default model answering the
capital-of-France question through the server with curl."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers.server import Server, start_server, stop_server

MSG = [{"role": "user", "content": "think about it"}]


@pytest.fixture(scope="module")
def scripted_server(
    scripted_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        str(scripted_checkpoint),
        tmp_path_factory.mktemp("scripted"),
        "--dtype",
        "float32",
        "--max-model-len",
        "128",
        "--served-model-name",
        "scripted",
    )
    yield server
    assert stop_server(server) == 0


@pytest.mark.parametrize("open_in_template", [False, True])
def test_reasoning_split(scripted_server: Server, open_in_template: bool) -> None:
    client = openai.OpenAI(base_url=scripted_server.base_url, api_key="x", max_retries=0)
    extra = {"chat_template_kwargs": {"enable_thinking": open_in_template}}
    resp = client.chat.completions.create(
        model="scripted",
        messages=MSG,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=0,
        extra_body=extra,
    )
    msg = resp.choices[0].message
    assert msg.content == "XYZ"
    assert getattr(msg, "reasoning_content", None) == "abc"
    assert resp.choices[0].finish_reason == "stop"
    usage = resp.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == (4 if open_in_template else 5)

    chunks = list(
        client.chat.completions.create(
            model="scripted",
            messages=MSG,  # type: ignore[arg-type]
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body=extra,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "XYZ"
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "abc"


def test_thinking_disabled_by_the_template_still_splits(scripted_server: Server) -> None:
    """The chat_template_kwargs allow-list passes enable_thinking; unknown keys are dropped."""
    body = {
        "model": "scripted",
        "messages": MSG,
        "max_tokens": 20,
        "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False, "evil": "{{ 7*7 }}"},
    }
    status, _, resp = scripted_server.request("POST", "/v1/chat/completions", body)
    assert status == 200, resp
    assert json.loads(resp)["choices"][0]["message"]["content"] == "XYZ"


@pytest.mark.slow
def test_default_model_answers_paris_over_curl(tmp_path: Path) -> None:
    server = start_server(None, tmp_path)
    try:
        curl = shutil.which("curl")
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 32,
            }
        )
        if curl is not None:
            out = subprocess.run(
                [
                    curl,
                    "-sS",
                    f"http://127.0.0.1:{server.port}/v1/chat/completions",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    body,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
        else:
            out = server.request("POST", "/v1/chat/completions", body)[2].decode()
        assert "Paris" in json.loads(out)["choices"][0]["message"]["content"]
    finally:
        assert stop_server(server) == 0
