"""What /metrics shows, on prometheus_client: vLLM's names and `model_name` label for everything
moeflow has (so vLLM's Grafana dashboard, guidellm and the Gateway API Inference Extension read
it unchanged), process metrics (RSS, CPU, open files), and moeflow's own beside them under
`moeflow:`. Never touches the engine: what the engine owns is read through callbacks at scrape
time (`bind`), or handed over by the engine thread when a request finishes (`observe_finished`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Counters get no `_created` samples (as vLLM does): they double the output and nothing reads them.
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so that its dashboard's quantiles match.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Requests end with one of these (vLLM's finished_reason values); "error": the engine failed it.
FINISHED_REASONS = ("stop", "length", "abort", "error")
# Engine time and energy are booked to one of these (engine/cost.py CostLedger).
PHASES = ("prefill", "decode", "idle")


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """One request as it ended, in seconds (monotonic-clock differences) and tokens; the engine
    thread hands it to `ServerMetrics.observe_finished`."""

    queue_s: float  # arrival -> first scheduled
    prefill_s: float  # first scheduled -> first token
    decode_s: float  # first token -> last token
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(frozen=True, slots=True)
class EngineTotals:
    """Counts and gauges the engine keeps, read at scrape time (ServerMetrics.bind)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    num_kv_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, found
    num_preemptions: int
    num_accepted: int  # requests admitted; each ends once, with one of FINISHED_REASONS
    num_rejected: int  # refused at admission
    finished_reasons: Mapping[str, int]
    seconds: Mapping[str, float]  # engine seconds per PHASES entry
    joules: Mapping[str, float] | None  # energy per PHASES entry; None without a meter
    energy_source: str | None


class ServerMetrics:
    """The metrics of one served model. The HTTP layer feeds the token counters and the latency
    histograms it sees (`prompt_tokens`, `generation_tokens`, `ttft`, `itl`, `e2e`); the engine
    thread calls `observe_finished`; `bind` gives the callback read at scrape time."""

    def __init__(self, model_name: str, price_per_hour: float | None = None) -> None:
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, fds
        labels = ("model_name",)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=tuple(buckets))

        m = (model_name,)
        # Fed by the HTTP layer (serving.py).
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens submitted.").labels(*m)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Tokens generated and sent."
        ).labels(*m)
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token in seconds (submission to the first update).",
            TTFT_BUCKETS,
        ).labels(*m)
        self.itl = _Both(
            histogram(
                "vllm:inter_token_latency_seconds",
                "Time between streamed updates in seconds.",
                ITL_BUCKETS,
            ).labels(*m),
            histogram(
                "vllm:time_per_output_token_seconds",
                "Time between streamed updates in seconds (vLLM's older name).",
                ITL_BUCKETS,
            ).labels(*m),
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "End to end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*m)
        self.reasoning_seconds = counter(
            "moeflow:request_reasoning_seconds",
            "Engine seconds of decode steps that produced reasoning tokens (served responses).",
        ).labels(*m)
        # Fed by the engine thread when a request ends.
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited before it was first scheduled, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*m)
        self._prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Time from first scheduled to first token, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*m)
        self._decode = histogram(
            "vllm:request_decode_time_seconds",
            "Time from first token to last token, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*m)
        self._inference = histogram(
            "vllm:request_inference_time_seconds",
            "Time from first scheduled to last token, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*m)
        self._request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", _tokens_buckets()
        ).labels(*m)
        self._request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens per request.", _tokens_buckets()
        ).labels(*m)
        self._engine = _EngineCollector(model_name, price_per_hour)
        r.register(self._engine)

    def bind(self, totals: Callable[[], EngineTotals]) -> None:
        """The engine's counts and gauges, read at every scrape."""
        self._engine.totals = totals

    def observe_finished(self, req: FinishedRequest) -> None:
        """Thread-safe (prometheus_client locks each metric): called by the engine thread."""
        self._queue.observe(req.queue_s)
        self._prefill.observe(req.prefill_s)
        self._decode.observe(req.decode_s)
        self._inference.observe(req.prefill_s + req.decode_s)
        self._request_prompt_tokens.observe(req.num_prompt_tokens)
        self._request_generation_tokens.observe(req.num_generation_tokens)

    def render(self) -> bytes:
        """The Prometheus text format (0.0.4)."""
        return generate_latest(self.registry)


class _Both:
    """Observes into two histograms: vLLM's inter-token latency under its new and old names."""

    def __init__(self, *children: Histogram) -> None:
        self._children = children

    def observe(self, value: float) -> None:
        for child in self._children:
            child.observe(value)


class _EngineCollector(Collector):
    """The engine's counts and gauges as metric families, built at each scrape from one
    EngineTotals (before `bind`: zeros). A failing callback leaves them out of that scrape."""

    def __init__(self, model_name: str, price_per_hour: float | None) -> None:
        self.model_name = model_name
        self.price_per_hour = price_per_hour
        self.totals: Callable[[], EngineTotals] | None = None

    def collect(self) -> Iterator[Metric]:
        try:
            t = self.totals() if self.totals is not None else _ZERO
        except Exception:  # a broken source must not take /metrics down with it
            logger.exception("metrics: reading the engine failed")
            return
        m = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests running in the engine.", t.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", t.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV cache usage: 1 means 100 percent.", t.kv_cache_usage
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            t.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            t.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions",
            "Preemptions (a request's blocks taken back).",
            t.num_preemptions,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Requests that ended, by finished_reason.",
            labels=["model_name", "finished_reason"],
        )
        for reason in FINISHED_REASONS:
            success.add_metric([*m, reason], t.finished_reasons.get(reason, 0))
        yield success
        yield counter(
            "moeflow:requests_accepted",
            "Requests the engine admitted (each ends once, in vllm:request_success).",
            t.num_accepted,
        )
        yield counter(
            "moeflow:requests_rejected",
            "Requests the engine refused at admission (bad input, queue full).",
            t.num_rejected,
        )
        yield gauge("moeflow:kv_cache_blocks", "KV cache blocks in all.", t.num_kv_blocks)
        seconds = CounterMetricFamily(
            "moeflow:engine_seconds",
            "Engine wall seconds: steps booked to their requests' prefill or decode, and idle "
            "(engine/cost.py).",
            labels=["model_name", "phase"],
        )
        for phase in PHASES:
            seconds.add_metric([*m, phase], t.seconds.get(phase, 0.0))
        yield seconds
        yield counter(
            "moeflow:request_prefill_seconds",
            "Engine seconds booked to requests' prefill.",
            t.seconds.get("prefill", 0.0),
        )
        yield counter(
            "moeflow:request_decode_seconds",
            "Engine seconds booked to requests' decode.",
            t.seconds.get("decode", 0.0),
        )
        if self.price_per_hour is not None:
            booked = t.seconds.get("prefill", 0.0) + t.seconds.get("decode", 0.0)
            yield counter(
                "moeflow:request_cost_usd",
                "Engine seconds booked to requests times --price-per-hour.",
                self.price_per_hour * booked / 3600,
            )
        if t.joules is not None:  # no meter: no energy metric at all, never a made-up zero
            energy = CounterMetricFamily(
                "moeflow:energy_joules",
                "Energy read from the meter, booked like the engine seconds.",
                labels=["model_name", "phase", "energy_source"],
            )
            for phase in PHASES:
                energy.add_metric([*m, phase, t.energy_source or ""], t.joules.get(phase, 0.0))
            yield energy


_ZERO = EngineTotals(0, 0, 0.0, 0, 0, 0, 0, 0, 0, {}, {}, None, None)


def _tokens_buckets() -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to a million tokens (vLLM's 1-2-5 series)."""
    return [m * 10**e for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000]
