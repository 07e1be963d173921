"""`moeflow serve` and `moeflow router`'s flags (vLLM's names where they mean the same),
`serve --config FILE`, and the flag types they share with the other commands. Parsing only:
moeflow/cli.py builds the parser and runs the command."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from moeflow import env
from moeflow.sampling_params import sampling_defaults
from moeflow.tokenizer.tool_parsers import KNOWN_TOOL_PARSERS

# vLLM's --reasoning-parser names of the models whose reasoning is <think>...</think>.
REASONING_PARSERS = ("deepseek_r1", "qwen3", "glm45")


def add_tokenizer_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json with its "
        "chat template) used instead of the model's own, e.g. beside a .gguf file",
    )


def add_serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="OpenAI-compatible HTTP server (`moeflow serve MODEL`, vLLM's flags)",
        description="Serve MODEL (positional, as `vllm serve MODEL`, or --model) over the OpenAI "
        "API, with /tokenize, /detokenize, /version, /health and /metrics. The flags that vLLM "
        "also has mean what they mean there. `--config FILE` reads the same flags from a YAML "
        "or JSON mapping (keys are the flag names without --; flags given on the command line "
        "win).",
    )
    serve.add_argument(
        "model_tag", nargs="?", metavar="MODEL", help="the model, as --model (this one wins)"
    )
    serve.add_argument(
        "--config", default=None, help="YAML or JSON file of these flags ({flag-name: value})"
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=env.MOEFLOW_API_KEY or None,
        help="require `Authorization: Bearer KEY` on every route but /health (default: the "
        "MOEFLOW_API_KEY environment variable; none: no key)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: the model's file or folder name)",
    )
    serve.add_argument(
        "--allowed-origins",
        type=_origins,
        default=(),
        help="CORS origins, a JSON list ('[\"https://a.example\"]', '[\"*\"]') or a comma "
        "list (default: none, CORS off)",
    )
    add_tokenizer_flag(serve)
    _add_serve_engine_flags(serve)
    _add_serve_output_flags(serve)
    _add_disaggregation_flags(serve)


def _add_serve_engine_flags(serve: argparse.ArgumentParser) -> None:
    """Scheduling, KV cache and seed: vLLM's engine flags."""
    serve.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests at most (then 503)"
    )
    serve.add_argument("--max-num-seqs", type=int, default=64, help="running sequences at most")
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens one engine step computes at most (longer prompts are prefilled in chunks)",
    )
    serve.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="the share of the GPU's memory the engine may hold in all (weights, KV cache, "
        "working memory), which sizes the KV cache (default: 0.9 of what the weights leave; "
        "a GPU only)",
    )
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of a prompt prefix seen before (on by default)",
    )
    serve.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill long prompts in chunks of --max-num-batched-tokens beside running "
        "decodes (always on: --no-enable-chunked-prefill is refused)",
    )
    serve.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="auto only: the KV cache is stored in the compute dtype (fp8 is not supported yet)",
    )
    serve.add_argument("--seed", type=int, default=0, help="the engine's random seed")


def _add_serve_output_flags(serve: argparse.ArgumentParser) -> None:
    """How requests become prompts and outputs: template, sampling defaults, parsers, cost."""
    serve.add_argument(
        "--chat-template",
        default=None,
        help="a jinja chat template (a file, or the template itself) instead of the model's",
    )
    serve.add_argument(
        "--generation-config",
        default="auto",
        help="auto: the sampling defaults (temperature, top_p, top_k, min_p, "
        "repetition_penalty) of the model folder's generation_config.json apply to requests "
        "that leave them unset; vllm: none (SamplingParams' own); or a folder holding a "
        "generation_config.json",
    )
    serve.add_argument(
        "--override-generation-config",
        type=json.loads,
        default=None,
        help="JSON of sampling defaults over --generation-config's, e.g. '{\"temperature\": 0}'",
    )
    serve.add_argument(
        "--reasoning-parser",
        choices=["auto", "off", *REASONING_PARSERS],
        default="auto",
        help="split <think>...</think> into reasoning_content: deepseek_r1, qwen3, glm45 (vLLM's "
        "names; all read the same tags) always, off never, auto when the vocabulary has both "
        "tags",
    )
    serve.add_argument(
        "--price-per-hour",
        type=non_negative_float,
        default=None,
        help="the machine's price per hour: each response's usage.cost.usd is it times the "
        "engine seconds booked to the request (default: usd is null)",
    )
    serve.add_argument(
        "--tool-call-parser",
        choices=["auto", *KNOWN_TOOL_PARSERS],
        default="auto",
        help="the tool-call format parsed from the output (vLLM's names; auto: the one the chat "
        "template writes, hermes when it writes none)",
    )


def _add_disaggregation_flags(serve: argparse.ArgumentParser) -> None:
    pd = serve.add_argument_group(
        "prefill/decode disaggregation (docs/DISAGGREGATION.md; `moeflow router` in front)"
    )
    pd.add_argument(
        "--role",
        choices=["colocated", "prefill", "decode"],
        default="colocated",
        help="prefill: compute prompts and send their KV to the decode instance; decode: take "
        "prompts' KV from the prefill instance and generate. Both still serve plain requests "
        "(default: colocated, no peer)",
    )
    pd.add_argument(
        "--kv-transfer-addr",
        default=None,
        metavar="HOST:PORT",
        help="where the two instances meet (a torch.distributed gloo pair): the prefill "
        "instance listens there, the decode instance connects; e.g. 127.0.0.1:29700",
    )
    pd.add_argument(
        "--kv-connect-timeout",
        type=positive_float,
        default=300.0,
        help="seconds to wait for the other instance at start (then exit 1)",
    )
    pd.add_argument(
        "--kv-transfer-timeout",
        type=positive_float,
        default=30.0,
        help="decode: seconds a request waits for its KV before --kv-transfer-failure applies",
    )
    pd.add_argument(
        "--kv-transfer-failure",
        choices=["recompute", "error"],
        default="recompute",
        help="decode: when a transfer is lost, late, corrupt or does not match, compute the "
        "prompt here (recompute) or fail the request with an error (error)",
    )


def add_router_parser(sub: argparse._SubParsersAction) -> None:
    router = sub.add_parser(
        "router",
        help="OpenAI-compatible proxy in front of a prefill and a decode instance",
        description="Send each completion to the prefill instance (max_tokens 1; it sends the "
        "prompt's KV to the decode instance), then to the decode instance, which answers "
        "(streamed or whole). /v1/chat/completions, /v1/completions, /v1/models, /health. "
        "Start the instances with `moeflow serve --role prefill|decode --kv-transfer-addr "
        "HOST:PORT` (docs/DISAGGREGATION.md).",
    )
    router.add_argument(
        "--prefill", required=True, metavar="URL", help="e.g. http://127.0.0.1:8100"
    )
    router.add_argument("--decode", required=True, metavar="URL", help="e.g. http://127.0.0.1:8200")
    router.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    router.add_argument("--port", type=int, default=8000)
    router.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        help="seconds one call to an instance may take (while streaming: between two reads)",
    )


def generation_defaults(choice: str, model: str | None) -> dict[str, Any]:
    """--generation-config: "auto" reads the model folder's generation_config.json (a GGUF file,
    a preset or the default model has none), "vllm" none, anything else is a folder."""
    if choice == "vllm":
        return {}
    folder = model if choice == "auto" else choice
    if folder is None or not os.path.isdir(folder):
        if choice == "auto":
            return {}
        raise ValueError(f"--generation-config {choice}: not a folder (auto, vllm or a folder)")
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if choice == "auto":
            return {}
        raise ValueError(f"--generation-config: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return sampling_defaults(data)


def _origins(value: str) -> tuple[str, ...]:
    """--allowed-origins: a JSON list of strings or a comma list."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError("a JSON list of strings")
        return tuple(items)
    return tuple(o.strip() for o in text.split(",") if o.strip())


def with_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`serve --config FILE`: the file's {flag-name: value} mapping becomes flags placed before
    the command line's, so the command line wins. true is the flag, false its --no- form (a
    plain switch is then left off); lists and objects are passed as JSON; `model` is --model."""
    if not argv or argv[0] != "serve":
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv[1:])
    if known.config is None:
        return argv
    data = _read_config(known.config)
    flags = _serve_flags(parser)
    out: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in flags or flag == "--config":
            raise ValueError(f"{known.config}: unknown flag {key!r}")
        if isinstance(value, bool):
            if value:
                out.append(flag)
            elif "--no-" + flag[2:] in flags:
                out.append("--no-" + flag[2:])
        elif isinstance(value, (list, dict)):
            out += [flag, json.dumps(value)]
        elif value is not None:
            out += [flag, str(value)]
    return ["serve", *out, *argv[1:]]


def _read_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping of flag names to values")
    return data


def _serve_flags(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices["serve"]._option_string_actions)
    raise AssertionError("no serve command")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value
