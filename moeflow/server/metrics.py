"""A tiny Prometheus text-format registry (counters, gauges, histograms; thread-safe) and the
server's own metrics, all prefixed `moeflow_`. Stdlib only; never touches the engine itself:
values the engine owns are read through callbacks at render time."""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelValues = tuple[str, ...]
# A callback returns one number (no labels) or {label values: number}; with one label name the
# key may be the plain string.
Source = Callable[[], object]


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:  # noqa: A002
        self.name, self.help = name, help
        self.labelnames = tuple(labelnames)
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        for label in self.labelnames:
            if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"bad label name {label!r} for {name}")
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._values[()] = 0.0

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _samples(self) -> list[tuple[str, LabelValues, float]]:
        with self._lock:
            return [(self.name, k, v) for k, v in sorted(self._values.items())]

    def render(self) -> list[str]:
        """The HELP and TYPE lines and one line per sample; [] when a callback fails."""
        try:
            samples = self._samples()
        except Exception:  # a broken source must not take /metrics down with it
            logger.exception("metric %s: source failed", self.name)
            return []
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for name, values, value in samples:
            lines.append(f"{name}{_labels(self.labelnames, values)} {_fmt(value)}")
        return lines


_M = TypeVar("_M", bound=_Metric)


class _Callback(_Metric):
    """A metric whose values may instead come from `fn`, called at render time."""

    def __init__(
        self,
        name: str,
        help: str,  # noqa: A002
        labelnames: Iterable[str] = (),
        fn: Source | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.fn = fn

    def _samples(self) -> list[tuple[str, LabelValues, float]]:
        if self.fn is None:
            return super()._samples()
        got = self.fn()
        if not isinstance(got, Mapping):
            if self.labelnames or not isinstance(got, int | float):
                raise ValueError(f"{self.name}: source gave {type(got).__name__}")
            return [(self.name, (), float(got))]
        out = []
        for key, value in got.items():
            values = (key,) if isinstance(key, str) else tuple(str(v) for v in key)
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: source gave labels {values}")
            out.append((self.name, values, float(value)))
        return sorted(out)


class Counter(_Callback):
    """Only goes up. `fn` (optional) reports a count kept elsewhere (e.g. by the engine)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Callback):
    """A value that goes up and down; `fn` (optional) is read at render time instead."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Histogram(_Metric):
    """Cumulative buckets (`le`), `_sum` and `_count`; no labels."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,  # noqa: A002
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds) or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be distinct numbers")
        self.buckets = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last: above all
        self._sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)  # first bound >= value (le is inclusive)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def _samples(self) -> list[tuple[str, LabelValues, float]]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out: list[tuple[str, LabelValues, float]] = []
        running = 0
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            running += count
            out.append((f"{self.name}_bucket", (_fmt(bound),), float(running)))
        out.append((f"{self.name}_sum", (), total))
        out.append((f"{self.name}_count", (), float(running)))
        return out

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} histogram"]
        for name, values, value in self._samples():
            lines.append(f"{name}{_labels(('le',) if values else (), values)} {_fmt(value)}")
        return lines


class Registry:
    """Metrics in registration order; `render` gives the Prometheus text format (0.0.4)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _M) -> _M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(
        self,
        name: str,
        help: str,  # noqa: A002
        labelnames: Iterable[str] = (),
        fn: Source | None = None,
    ) -> Counter:
        return self.register(Counter(name, help, labelnames, fn))

    def gauge(
        self,
        name: str,
        help: str,  # noqa: A002
        labelnames: Iterable[str] = (),
        fn: Source | None = None,
    ) -> Gauge:
        return self.register(Gauge(name, help, labelnames, fn))

    def histogram(
        self,
        name: str,
        help: str,  # noqa: A002
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return self.register(Histogram(name, help, buckets))

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


OUTCOMES = ("finished", "aborted", "error", "rejected")


class ServerMetrics:
    """What /metrics shows. The HTTP layer feeds the token counters and latency histograms; the
    request outcomes and engine gauges are read at render time from callbacks given to `bind`
    (so they are never stale and never counted twice)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests_accepted = r.counter(
            "moeflow_requests_accepted_total", "Requests the engine admitted."
        )
        self.requests = r.counter(
            "moeflow_requests_total", "Requests ended, by outcome.", ("outcome",)
        )
        for outcome in OUTCOMES:
            self.requests.inc(0, outcome=outcome)
        self.running = r.gauge("moeflow_running_requests", "Requests running in the engine.")
        self.waiting = r.gauge("moeflow_waiting_requests", "Requests waiting for admission.")
        self.kv_blocks_free = r.gauge("moeflow_kv_blocks_free", "Free KV cache blocks.")
        self.kv_blocks_total = r.gauge("moeflow_kv_blocks_total", "All KV cache blocks.")
        self.prefix_cache_hit_rate = r.gauge(
            "moeflow_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache."
        )
        self.prompt_tokens = r.counter("moeflow_prompt_tokens_total", "Prompt tokens admitted.")
        self.generation_tokens = r.counter(
            "moeflow_generation_tokens_total", "Tokens generated and sent."
        )
        self.ttft = r.histogram("moeflow_time_to_first_token_seconds", "Time to first token.")
        self.itl = r.histogram(
            "moeflow_inter_token_latency_seconds", "Time between streamed updates."
        )
        self.e2e = r.histogram(
            "moeflow_e2e_request_latency_seconds", "Request latency, end to end."
        )

    def bind(self, **sources: Callable[[], object]) -> None:
        """Callbacks read at render time. outcomes -> {"accepted", "finished", "aborted",
        "error", "rejected": count}; running, waiting, kv_blocks_free, kv_blocks_total,
        prefix_cache_hit_rate -> a number."""
        gauges = {
            "running": self.running,
            "waiting": self.waiting,
            "kv_blocks_free": self.kv_blocks_free,
            "kv_blocks_total": self.kv_blocks_total,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
        }
        for key, fn in sources.items():
            if key == "outcomes":
                self.requests_accepted.fn = _pick(fn, "accepted")
                self.requests.fn = _outcomes(fn)
            elif key in gauges:
                gauges[key].fn = fn
            else:
                raise ValueError(f"unknown metric source {key!r}")

    def render(self) -> str:
        return self.registry.render()


def _pick(fn: Callable[[], object], key: str) -> Callable[[], float]:
    def read() -> float:
        got = fn()
        return float(got.get(key, 0)) if isinstance(got, Mapping) else 0.0

    return read


def _outcomes(fn: Callable[[], object]) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        got = fn()
        got = got if isinstance(got, Mapping) else {}
        return {o: float(got.get(o, 0)) for o in OUTCOMES}

    return read


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _labels(names: tuple[str, ...], values: LabelValues) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
