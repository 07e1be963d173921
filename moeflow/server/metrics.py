"""A tiny Prometheus text-format registry (counters, gauges, histograms; thread-safe) and the
server's own metrics, all prefixed `moeflow_`. Stdlib only."""

from __future__ import annotations

import threading
from collections.abc import Callable

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Counter:
    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help = name, help_
        self._value = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"] + [
            f"{self.name} {_fmt(self._value)}"
        ]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, buckets
        self._counts = [0] * len(buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1

    def render(self) -> list[str]:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            for bound, count in zip(self.buckets, self._counts, strict=True):
                lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {count}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
            lines.append(f"{self.name}_sum {_fmt(self._sum)}")
            lines.append(f"{self.name}_count {self._count}")
        return lines


class ServerMetrics:
    """Counters and histograms the HTTP layer feeds, plus values read from the engine at render
    time through `bind` (so they are never stale and never double counted)."""

    def __init__(self) -> None:
        self.prompt_tokens = Counter("moeflow_prompt_tokens_total", "Prompt tokens admitted.")
        self.generation_tokens = Counter(
            "moeflow_generation_tokens_total", "Tokens generated and sent."
        )
        self.ttft = Histogram("moeflow_time_to_first_token_seconds", "Time to first token.")
        self.itl = Histogram(
            "moeflow_inter_token_latency_seconds", "Time between streamed updates."
        )
        self.e2e = Histogram("moeflow_e2e_request_latency_seconds", "Request latency, end to end.")
        self._sources: dict[str, Callable[[], object]] = {}

    def bind(self, **sources: Callable[[], object]) -> None:
        """outcomes -> dict[str, int]; running, waiting, kv_blocks_free, kv_blocks_total,
        prefix_cache_hit_rate -> numbers."""
        self._sources.update(sources)

    def render(self) -> str:
        lines: list[str] = []
        outcomes = self._read("outcomes")
        if isinstance(outcomes, dict):
            lines += [
                "# HELP moeflow_requests_accepted_total Requests the engine admitted.",
                "# TYPE moeflow_requests_accepted_total counter",
                f"moeflow_requests_accepted_total {outcomes.get('accepted', 0)}",
                "# HELP moeflow_requests_total Requests ended, by outcome.",
                "# TYPE moeflow_requests_total counter",
            ]
            for outcome in ("finished", "aborted", "error", "rejected"):
                lines.append(
                    f'moeflow_requests_total{{outcome="{outcome}"}} {outcomes.get(outcome, 0)}'
                )
        for key, name, help_ in (
            ("running", "moeflow_running_requests", "Requests running in the engine."),
            ("waiting", "moeflow_waiting_requests", "Requests waiting for admission."),
            ("kv_blocks_free", "moeflow_kv_blocks_free", "Free KV cache blocks."),
            ("kv_blocks_total", "moeflow_kv_blocks_total", "All KV cache blocks."),
            (
                "prefix_cache_hit_rate",
                "moeflow_prefix_cache_hit_rate",
                "Share of prompt tokens found in the prefix cache.",
            ),
        ):
            value = self._read(key)
            if isinstance(value, int | float):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {_fmt(value)}"]
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
            lines += metric.render()
        return "\n".join(lines) + "\n"

    def _read(self, key: str) -> object:
        fn = self._sources.get(key)
        return fn() if fn is not None else None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
