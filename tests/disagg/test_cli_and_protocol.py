"""The disaggregation flags of `moeflow serve` and the request field `kv_transfer_params`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from moeflow import cli
from moeflow.sampling_params import KVTransferParams
from moeflow.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.helpers.checkpoints import make_tiny_checkpoint
from tests.helpers.server import free_port


def test_kv_transfer_params_in_requests() -> None:
    kv = {"transfer_id": "xfer-1", "do_remote_prefill": True}
    req = CompletionRequest.model_validate({"prompt": "a", "kv_transfer_params": kv})
    assert req.sampling_kwargs()["kv_transfer"] == KVTransferParams("xfer-1", False, True)
    chat = {"messages": [{"role": "user", "content": "a"}]}
    assert "kv_transfer" not in ChatCompletionRequest.model_validate(chat).sampling_kwargs()
    for bad in (
        {"transfer_id": "x"},
        {"transfer_id": "x", "do_remote_decode": True, "do_remote_prefill": True},
        {"transfer_id": "x y", "do_remote_decode": True},
        {"transfer_id": "", "do_remote_decode": True},
        {"transfer_id": "x", "do_remote_decode": 1},
        {"do_remote_decode": True},
    ):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**chat, "kv_transfer_params": bad})


def test_serve_role_needs_an_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--role", "prefill"]) == 1
    assert "--role prefill needs --kv-transfer-addr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--role", "both"])
    with pytest.raises(SystemExit):
        cli.main(["serve", "--kv-transfer-timeout", "0"])


def test_serve_exits_when_the_other_instance_never_comes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(make_tiny_checkpoint("qwen3_moe", tmp_path / "m"))
    argv = ["serve", model, "--dtype", "float32", "--max-model-len", "64", "--role", "decode"]
    argv += ["--kv-transfer-addr", f"127.0.0.1:{free_port()}", "--kv-connect-timeout", "1"]
    assert cli.main(argv) == 1
    assert "rendezvous" in capsys.readouterr().err
