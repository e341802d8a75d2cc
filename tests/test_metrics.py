"""Prometheus text rendering of the metrics registry."""

from __future__ import annotations

import pytest

from edgeproxy.metrics import Registry


def test_counter_gauge_histogram_render() -> None:
    r = Registry()
    c = r.counter("x_total", "Things.", ["kind"])
    c.inc("a")
    c.inc("a", amount=2)
    c.inc('q"uote')
    g = r.gauge("open", "Open.")
    g.inc()
    g.inc()
    g.dec()
    h = r.histogram("lat_seconds", "Latency.", ["p"], buckets=(0.1, 1.0))
    h.observe(0.05, "h1")
    h.observe(0.5, "h1")
    h.observe(5.0, "h1")
    text = r.render()
    assert "# TYPE x_total counter" in text
    assert 'x_total{kind="a"} 3' in text
    assert 'x_total{kind="q\\"uote"} 1' in text
    assert "open 1" in text
    assert 'lat_seconds_bucket{p="h1",le="0.1"} 1' in text
    assert 'lat_seconds_bucket{p="h1",le="1"} 2' in text
    assert 'lat_seconds_bucket{p="h1",le="+Inf"} 3' in text
    assert 'lat_seconds_count{p="h1"} 3' in text
    assert 'lat_seconds_sum{p="h1"} 5.55' in text


def test_registering_twice_returns_the_same_metric_or_fails_on_shape() -> None:
    r = Registry()
    a = r.counter("n", "N.", ["x"])
    assert r.counter("n", "N.", ["x"]) is a
    with pytest.raises(ValueError):
        r.counter("n", "N.", ["y"])
    with pytest.raises(ValueError):
        a.inc("1", "2")
