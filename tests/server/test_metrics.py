"""metrics.py: the Prometheus text format parses line by line; histograms are cumulative."""

from __future__ import annotations

import math
import re
import threading

import pytest

from moeflow.server.metrics import Counter, Gauge, Histogram, Registry, ServerMetrics

_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\[\\\"n])*\",?)*)\})?"
    r" (?P<value>\S+)"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(metric name -> type, samples); fails on any line the text format does not allow."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            labels = {
                k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                for k, v in _LABEL.findall(m["labels"] or "")
            }
            name = m["name"]
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in types or types.get(base) == "histogram", f"no TYPE before {name}"
            samples.append((name, labels, float(m["value"])))
    return types, samples


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    (v,) = [v for n, ls, v in samples if n == name and ls == labels]
    return v


def test_counter_gauge_labels_and_escaping() -> None:
    r = Registry()
    c = r.counter("x_total", 'Help with \\ and\nnewline "quotes".', ("kind",))
    g = r.gauge("y", "A gauge.")
    c.inc(kind='a"b\\c\nd')
    c.inc(2.5, kind='a"b\\c\nd')
    c.inc(kind="plain")
    g.set(-3)
    text = r.render()
    assert "# HELP x_total Help with \\\\ and\\nnewline" in text
    types, samples = parse(text)
    assert types == {"x_total": "counter", "y": "gauge"}
    assert value(samples, "x_total", kind='a"b\\c\nd') == 3.5
    assert value(samples, "x_total", kind="plain") == 1
    assert value(samples, "y") == -3
    with pytest.raises(ValueError):
        c.inc(-1, kind="plain")
    with pytest.raises(ValueError):
        c.inc()  # its label is missing
    with pytest.raises(ValueError):
        g.set(1, extra="x")
    with pytest.raises(ValueError):
        r.gauge("y", "again")
    with pytest.raises(ValueError):
        Counter("bad name", "h")
    with pytest.raises(ValueError):
        Gauge("ok", "h", ("le",))


def test_histogram_cumulative() -> None:
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", buckets=(1.0, 0.1, 5))  # sorted for us
    observations = [0.05, 0.1, 0.2, 1.0, 3, 100, 7]
    for x in observations:
        h.observe(x)
    types, samples = parse(r.render())
    assert types == {"lat_seconds": "histogram"}
    buckets = [(ls["le"], v) for n, ls, v in samples if n == "lat_seconds_bucket"]
    assert [le for le, _ in buckets] == ["0.1", "1", "5", "+Inf"]
    counts = [v for _, v in buckets]
    assert counts == [2, 4, 5, 7]  # le is inclusive: 0.1 falls in the 0.1 bucket
    assert counts == sorted(counts)
    assert counts[-1] == value(samples, "lat_seconds_count") == len(observations)
    assert math.isclose(value(samples, "lat_seconds_sum"), sum(observations))
    for bound, count in zip((0.1, 1.0, 5.0, math.inf), counts, strict=True):
        assert count == sum(x <= bound for x in observations)
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(1, 1))


def test_callbacks_read_at_render() -> None:
    r = Registry()
    box = {"n": 1.0}
    r.gauge("g", "From a callback.", fn=lambda: box["n"])
    r.counter("by_kind_total", "Counted elsewhere.", ("kind",), fn=lambda: {"a": 2, "b": 3})
    r.gauge("broken", "Raises.", fn=lambda: 1 / 0)
    r.gauge("special", "Odd values.", ("v",), fn=lambda: {("inf",): math.inf, ("nan",): math.nan})
    _, samples = parse(r.render())
    assert value(samples, "g") == 1.0
    box["n"] = 0.25
    _, samples = parse(r.render())
    assert value(samples, "g") == 0.25
    assert value(samples, "by_kind_total", kind="b") == 3
    assert not [s for s in samples if s[0] == "broken"]  # left out; the rest still renders
    assert value(samples, "special", v="inf") == math.inf
    assert math.isnan(value(samples, "special", v="nan"))


def test_thread_safe() -> None:
    r = Registry()
    c = r.counter("n_total", "n")
    h = r.histogram("h", "h", buckets=(0.5,))

    def work() -> None:
        for _ in range(2000):
            c.inc()
            h.observe(0.1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, samples = parse(r.render())
    assert value(samples, "n_total") == 8000
    assert value(samples, "h_count") == value(samples, "h_bucket", le="0.5") == 8000


def test_server_metrics() -> None:
    m = ServerMetrics()
    types, samples = parse(m.render())  # before bind: every metric present, zeros
    expected = {
        "moeflow_requests_total": "counter",
        "moeflow_requests_accepted_total": "counter",
        "moeflow_running_requests": "gauge",
        "moeflow_waiting_requests": "gauge",
        "moeflow_kv_blocks_free": "gauge",
        "moeflow_kv_blocks_total": "gauge",
        "moeflow_prefix_cache_hit_rate": "gauge",
        "moeflow_prompt_tokens_total": "counter",
        "moeflow_generation_tokens_total": "counter",
        "moeflow_time_to_first_token_seconds": "histogram",
        "moeflow_inter_token_latency_seconds": "histogram",
        "moeflow_e2e_request_latency_seconds": "histogram",
    }
    assert types == expected
    for outcome in ("finished", "aborted", "error", "rejected"):
        assert value(samples, "moeflow_requests_total", outcome=outcome) == 0
    m.bind(
        outcomes=lambda: {"accepted": 5, "finished": 3, "aborted": 1},
        running=lambda: 1,
        waiting=lambda: 2,
        kv_blocks_free=lambda: 90,
        kv_blocks_total=lambda: 100,
        prefix_cache_hit_rate=lambda: 0.5,
    )
    m.prompt_tokens.inc(12)
    m.generation_tokens.inc(4)
    m.ttft.observe(0.02)
    m.itl.observe(0.01)
    m.e2e.observe(1.5)
    _, samples = parse(m.render())
    assert value(samples, "moeflow_requests_accepted_total") == 5
    assert value(samples, "moeflow_requests_total", outcome="finished") == 3
    assert value(samples, "moeflow_requests_total", outcome="error") == 0
    assert value(samples, "moeflow_kv_blocks_free") == 90
    assert value(samples, "moeflow_prefix_cache_hit_rate") == 0.5
    assert value(samples, "moeflow_prompt_tokens_total") == 12
    assert value(samples, "moeflow_e2e_request_latency_seconds_count") == 1
    with pytest.raises(ValueError):
        m.bind(nonsense=lambda: 1)
