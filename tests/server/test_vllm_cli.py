"""`moeflow serve` as a vLLM user starts it: `moeflow serve MODEL --max-model-len ... --max-num-seqs
... --api-key K` with flags from a --config YAML file, through the real `openai` client on
loopback; /tokenize, /detokenize, /version, CORS, generation_config.json's sampling defaults, a
--chat-template, and one log line per request."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from moeflow import env
from moeflow.cli import SERVE_GOMP_SPINCOUNT, build_parser, main
from moeflow.tokenizer import Tokenizer
from tests.helpers.server import Server, start_server, stop_server

KEY = "K-secret"
ORIGIN = "http://app.example"
TEMPLATE = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama whose generation_config.json makes greedy the default."""
    folder = tmp_path_factory.mktemp("gen") / "tiny-llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    return folder


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("vllm-shape")
    config = tmp / "serve.yaml"
    config.write_text(
        "served-model-name: tiny\n"
        "dtype: float32\n"
        "enable-prefix-caching: true\n"
        f'allowed-origins: ["{ORIGIN}"]\n'
        "max-num-seqs: 64\n"  # the command line's 16 wins (test_config_file_json_and_switches)
    )
    server = start_server(
        None,
        tmp,
        *(str(model), "--max-model-len", "256", "--max-num-seqs", "16", "--api-key", KEY),
        *("--config", str(config), "--chat-template", TEMPLATE),
    )
    yield server
    assert stop_server(server) == 0, server.log.read_text()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def _auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_openai_client_with_the_key(client: openai.OpenAI, server: Server) -> None:
    resp = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6)  # type: ignore[arg-type]
    assert resp.usage is not None and resp.usage.completion_tokens == 6
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, _, body = server.request("GET", "/v1/models", headers=_auth())
    assert status == 200 and json.loads(body)["data"][0]["max_model_len"] == 256


def test_a_wrong_key_is_401_in_openai_shape(server: Server) -> None:
    bad = openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    for path in ("/v1/models", "/version"):
        status, _, body = server.request("GET", path)
        error = json.loads(body)["error"]
        assert status == 401 and error["type"] == "authentication_error"
        assert set(error) == {"message", "type", "param", "code"}
    assert server.request("GET", "/health")[0] == 200


def test_generation_config_makes_greedy_the_default(client: openai.OpenAI) -> None:
    """generation_config.json says temperature 0: requests that leave it unset are greedy (at
    vLLM's default of 1.0 two unseeded samples of 24 tokens would differ)."""

    def text(**kw: float) -> str:
        resp = client.completions.create(
            model="tiny", prompt=[3, 4, 5], max_tokens=24, extra_body={"ignore_eos": True}, **kw
        )
        return resp.choices[0].text

    assert text() == text() == text(temperature=0)
    assert text(temperature=1.0, seed=1) != text(temperature=1.0, seed=2)


def test_tokenize_and_detokenize(server: Server, model: Path) -> None:
    tok = Tokenizer.from_hf_folder(model)
    status, _, body = server.request(
        "POST", "/tokenize", {"model": "tiny", "prompt": "hello world"}, _auth()
    )
    out = json.loads(body)
    assert status == 200
    assert out["tokens"] == tok.encode("hello world", add_special_tokens=True)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 256
    plain = json.loads(
        server.request(
            "POST",
            "/tokenize",
            {"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True},
            _auth(),
        )[2]
    )
    assert plain["tokens"] == tok.encode("hello world", add_special_tokens=False)
    assert "".join(plain["token_strs"]) == tok.decode(plain["tokens"], skip_special_tokens=False)
    # messages go through --chat-template (the server's, not the checkpoint's)
    chat = json.loads(server.request("POST", "/tokenize", {"messages": MSG}, _auth())[2])
    assert chat["tokens"] == tok.encode("<<hello there>>", add_special_tokens=False)
    status, _, body = server.request(
        "POST", "/detokenize", {"model": "tiny", "tokens": chat["tokens"]}, _auth()
    )
    assert status == 200 and json.loads(body) == {"prompt": "<<hello there>>"}
    status, _, body = server.request("POST", "/detokenize", {"tokens": [10**6]}, _auth())
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"
    status, _, body = server.request(
        "POST", "/tokenize", {"model": "other", "prompt": "a"}, _auth()
    )
    assert status == 404


def test_version(server: Server) -> None:
    status, _, body = server.request("GET", "/version", headers=_auth())
    assert status == 200 and json.loads(body)["version"] == "0.1.0"


def test_cors_only_for_the_allowed_origin(server: Server) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    status, headers, _ = server.request(
        "OPTIONS", "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight}
    )
    assert status == 200 and headers.get("access-control-allow-origin") == ORIGIN
    status, headers, _ = server.request(
        "OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert status == 400 and "access-control-allow-origin" not in headers


def test_one_log_line_per_request(server: Server, client: openai.OpenAI) -> None:
    resp = client.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=5)
    log = server.log.read_text()
    lines = [line for line in log.splitlines() if resp.id in line]
    assert len(lines) == 1, log
    assert lines[0].startswith("INFO ")
    for part in ("prompt_tokens=4", "output_tokens=5", "ttft=", "finish_reason=length"):
        assert part in lines[0]


# ---- the flags, without a server ----------------------------------------------------------------
def test_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env, "MOEFLOW_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "x"]).api_key == "x"


def test_the_positional_model_wins() -> None:
    args = build_parser().parse_args(["serve", "a-model", "--model", "other"])
    assert (args.model_tag, args.model) == ("a-model", "other")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--no-enable-chunked-prefill"], "--no-enable-chunked-prefill is not supported"),
        (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported yet"),
        (["--chat-template", "no-such-file"], "neither a file nor a jinja template"),
        (["--chat-template", "{% if %}"], "chat template syntax error"),
        (["--override-generation-config", '{"top_q": 1}'], "unknown keys ['top_q']"),
        (["--override-generation-config", '{"temperature": -1}'], "temperature must be >= 0"),
        (["--generation-config", "/no/such/folder"], "not a folder"),
        (["--data-parallel-size", "0"], "and data_parallel_size must be >= 1"),
    ],
)
def test_bad_serve_flags_fail_before_loading(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "preset:qwen3-30b-a3b", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeflow: error: ") and needle in err, err


def test_serve_bounds_openmp_spinning_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """`moeflow serve` sets GOMP_SPINCOUNT before anything loads torch (libgomp reads it once);
    a value in the environment wins."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert main(["serve", "preset:qwen3-30b-a3b", "--kv-cache-dtype", "fp8"]) == 1
    assert os.environ["GOMP_SPINCOUNT"] == str(SERVE_GOMP_SPINCOUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert main(["serve", "preset:qwen3-30b-a3b", "--kv-cache-dtype", "fp8"]) == 1
    assert os.environ["GOMP_SPINCOUNT"] == "7"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("nope: 1\n", "unknown flag 'nope'"),
        ("- a\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files(
    tmp_path: Path, text: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--config", str(path)])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_config_file_json_and_switches(tmp_path: Path) -> None:
    """true is the flag, false its --no- form; the command line wins over the file."""
    from moeflow.server.args import with_config_file

    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {"model": "m", "enable_prefix_caching": False, "port": 9, "enforce-eager": False}
        )
    )
    parser = build_parser()
    argv = with_config_file(parser, ["serve", "--config", str(path), "--port", "10"])
    args = parser.parse_args(argv)
    assert (args.model, args.enable_prefix_caching, args.port, args.enforce_eager) == (
        "m",
        False,
        10,
        False,
    )
