"""metrics.py on prometheus_client: /metrics parses with prometheus_client's own parser, carries
vLLM's names with model_name, moeflow's own beside them and the process metrics; values move as
requests run (a real server); energy appears only with a meter, dollars only with a price."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moeflow.server.metrics import EngineTotals, FinishedRequest, ServerMetrics
from tests.helpers.server import Server

COST_KEYS = (
    "prefill_seconds",
    "decode_seconds",
    "reasoning_seconds",
    "cached_tokens",
    "joules",
    "energy_source",
    "usd",
)
VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}


def parse(text: str | bytes) -> tuple[dict[str, str], list[Sample]]:
    """(family name -> type, samples) by prometheus_client's parser."""
    text = text.decode() if isinstance(text, bytes) else text
    families = list(text_string_to_metric_families(text))
    return {f.name: f.type for f in families}, [s for f in families for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    (v,) = [s.value for s in samples if s.name == name and s.labels == labels]
    return v


def _totals(**changes: object) -> EngineTotals:
    fields: dict[str, object] = {
        "num_running": 1,
        "num_waiting": 2,
        "kv_cache_usage": 0.25,
        "num_kv_blocks": 100,
        "prefix_cache_queries": 64,
        "prefix_cache_hits": 16,
        "num_preemptions": 3,
        "num_accepted": 5,
        "num_rejected": 1,
        "finished_reasons": {"stop": 2, "length": 1},
        "seconds": {"prefill": 1.5, "decode": 3.0, "idle": 10.0},
        "joules": None,
        "energy_source": None,
    }
    fields.update(changes)
    return EngineTotals(**fields)  # type: ignore[arg-type]


def test_vllm_names_with_model_name_before_and_after_bind() -> None:
    m = ServerMetrics("tiny")
    types, samples = parse(m.render())  # before bind: every family there, engine values 0
    for name, kind in VLLM_FAMILIES.items():
        assert types.get(name) == kind, name
    for s in samples:
        if s.name.startswith(("vllm:", "moeflow:")):
            assert s.labels["model_name"] == "tiny", s
    assert value(samples, "vllm:num_requests_running", model_name="tiny") == 0
    assert "process_resident_memory_bytes" in types  # the process collector (Linux)
    assert value(samples, "process_resident_memory_bytes") > 0
    assert "moeflow:energy_joules" not in types and "moeflow:request_cost_usd" not in types

    m.bind(_totals)
    m.prompt_tokens.inc(12)
    m.generation_tokens.inc(4)
    m.ttft.observe(0.02)
    m.itl.observe(0.03)
    m.e2e.observe(1.5)
    m.observe_finished(FinishedRequest(0.5, 0.25, 2.0, 12, 4))
    _, samples = parse(m.render())
    t = {"model_name": "tiny"}
    assert value(samples, "vllm:num_requests_waiting", **t) == 2
    assert value(samples, "vllm:kv_cache_usage_perc", **t) == 0.25
    assert value(samples, "vllm:prefix_cache_queries_total", **t) == 64
    assert value(samples, "vllm:prefix_cache_hits_total", **t) == 16
    assert value(samples, "vllm:num_preemptions_total", **t) == 3
    assert value(samples, "vllm:request_success_total", **t, finished_reason="stop") == 2
    assert value(samples, "vllm:request_success_total", **t, finished_reason="error") == 0
    assert value(samples, "moeflow:requests_accepted_total", **t) == 5
    assert value(samples, "vllm:prompt_tokens_total", **t) == 12
    assert value(samples, "vllm:generation_tokens_total", **t) == 4
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(samples, f"{name}_count", **t) == 1
        assert value(samples, f"{name}_bucket", **t, le="0.025") == 0
        assert value(samples, f"{name}_bucket", **t, le="0.05") == 1
    assert value(samples, "vllm:request_queue_time_seconds_sum", **t) == 0.5
    assert value(samples, "vllm:request_inference_time_seconds_sum", **t) == 2.25
    assert value(samples, "vllm:request_generation_tokens_bucket", **t, le="5.0") == 1
    assert value(samples, "moeflow:engine_seconds_total", **t, phase="idle") == 10
    assert value(samples, "moeflow:request_decode_seconds_total", **t) == 3


def test_energy_only_with_a_meter_and_dollars_only_with_a_price() -> None:
    m = ServerMetrics("tiny", price_per_hour=7.2)
    joules = {"prefill": 2.0, "decode": 5.0, "idle": 1.0}
    m.bind(lambda: _totals(joules=joules, energy_source="rapl"))
    types, samples = parse(m.render())
    assert types["moeflow:energy_joules"] == "counter"
    t = {"model_name": "tiny", "energy_source": "rapl"}
    assert value(samples, "moeflow:energy_joules_total", **t, phase="decode") == 5
    usd = value(samples, "moeflow:request_cost_usd_total", model_name="tiny")
    assert usd == 7.2 * (1.5 + 3.0) / 3600


def test_a_failing_source_leaves_the_rest() -> None:
    m = ServerMetrics("tiny")
    m.bind(lambda: 1 / 0)  # type: ignore[arg-type, return-value]
    types, _ = parse(m.render())
    assert "vllm:num_requests_running" not in types
    assert types["vllm:e2e_request_latency_seconds"] == "histogram"


def test_values_move_as_requests_run(tiny_server: Server) -> None:
    def scrape() -> tuple[dict[str, str], list[Sample]]:
        status, headers, body = tiny_server.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return parse(body)

    types, before = scrape()
    for name, kind in VLLM_FAMILIES.items():
        assert types.get(name) == kind, name
    t = {"model_name": "tiny"}
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "ignore_eos": True}
    status, _, resp = tiny_server.request("POST", "/v1/completions", body)
    assert status == 200
    usage = json.loads(resp)["usage"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, _, raw = tiny_server.request("POST", "/v1/completions", stream)
    assert status == 200
    _, after = scrape()

    def moved(name: str, **labels: str) -> float:
        def get(samples: list[Sample]) -> float:
            return value(samples, name, **t, **labels)

        return get(after) - get(before)

    assert moved("vllm:prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert moved("vllm:generation_tokens_total") == 12
    assert moved("vllm:request_success_total", finished_reason="length") == 2
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time"):
        assert moved(f"vllm:{name}_seconds_count") == 2, name
    assert moved("vllm:time_to_first_token_seconds_count") == 2
    assert moved("vllm:inter_token_latency_seconds_count") >= 1  # the stream's later updates
    assert moved("vllm:request_generation_tokens_sum") == 12
    assert moved("vllm:prefix_cache_queries_total") > 0
    assert moved("moeflow:request_prefill_seconds_total") > 0
    assert moved("moeflow:request_decode_seconds_total") > 0
    assert value(after, "vllm:num_requests_running", **t) == 0
    assert value(after, "process_resident_memory_bytes") > 0

    # usage.cost, in the full response and in the stream's usage chunk.
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line[6:7] == "{"]
    for cost in (usage["cost"], chunks[-1]["usage"]["cost"]):
        assert set(cost) == set(COST_KEYS)
        assert cost["prefill_seconds"] > 0 and cost["decode_seconds"] > 0
        assert cost["reasoning_seconds"] == 0 and cost["usd"] is None  # no think block, no price
        if cost["energy_source"] is None:  # this machine has no readable meter
            assert cost["joules"] is None
        else:
            assert cost["joules"] >= 0
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, _, resp = tiny_server.request("POST", "/v1/chat/completions", chat)
    assert status == 200 and set(json.loads(resp)["usage"]["cost"]) == set(COST_KEYS)


def test_the_grafana_dashboard_reads_only_metrics_we_serve() -> None:
    dashboard = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
    panels = json.loads(dashboard.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    m = ServerMetrics("tiny", price_per_hour=1.0)
    m.bind(lambda: _totals(joules={"prefill": 1.0}, energy_source="rapl"))
    m.itl.observe(0.1)  # a histogram's samples are there before any observation too
    _, samples = parse(m.render())
    served = {s.name for s in samples}
    used = {n for e in exprs for n in re.findall(r"\b(?:vllm:|moeflow:|process_)\w+", e)}
    assert len(used) > 20 and used <= served, used - served
    for name in VLLM_FAMILIES:
        assert any(n.startswith(name) for n in used), f"no panel reads {name}"
