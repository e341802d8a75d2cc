"""Prometheus metrics: counters, gauges and histograms with labels, rendered in text format 0.0.4.

One `Registry` per PoP process; components receive it and register their metrics by name. Updates
are plain dict operations (no locks: one event loop per process). Components that keep their own
counters register a collector instead, which copies them into metrics when the registry renders.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = tuple(labels)

    def _key(self, values: Sequence[str]) -> LabelValues:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(str(v) for v in values)

    def _labelstr(self, key: LabelValues, extra: str = "") -> str:
        parts = [f'{n}="{_escape(v)}"' for n, v in zip(self.labels, key, strict=True)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = labels if len(labels) == len(self.labels) else self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(tuple(labels), 0.0)

    def set_total(self, *labels: str, value: float) -> None:
        """Mirror a count a component keeps itself (collectors); it must only grow."""
        self.values[self._key(labels)] = float(value)

    def render(self) -> list[str]:
        out = super().render()
        for key, v in sorted(self.values.items()):
            out.append(f"{self.name}{self._labelstr(key)} {_fmt(v)}")
        return out


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        key = labels if len(labels) == len(self.labels) else self._key(labels)
        self.values[key] = value

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[LabelValues, list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        key = labels if len(labels) == len(self.labels) else self._key(labels)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0.0] * (len(self.buckets) + 3)  # buckets, +Inf, sum, count
        s[bisect.bisect_left(self.buckets, value)] += 1  # non-cumulative; cumulated at render
        s[-2] += value
        s[-1] += 1

    def count(self, *labels: str) -> float:
        s = self.series.get(tuple(labels))
        return s[-1] if s else 0.0

    def render(self) -> list[str]:
        out = super().render()
        for key, s in sorted(self.series.items()):
            acc = 0.0
            for i, bound in enumerate((*self.buckets, math.inf)):
                acc += s[i]
                le = 'le="' + _fmt(bound) + '"'
                out.append(f"{self.name}_bucket{self._labelstr(key, le)} {_fmt(acc)}")
            out.append(f"{self.name}_sum{self._labelstr(key)} {_fmt(s[-2])}")
            out.append(f"{self.name}_count{self._labelstr(key)} {_fmt(s[-1])}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.labels != metric.labels:
                raise ValueError(f"metric {metric.name} registered twice with different shapes")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        m = self._add(Counter(name, help, labels))
        assert isinstance(m, Counter)
        return m

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        m = self._add(Gauge(name, help, labels))
        assert isinstance(m, Gauge)
        return m

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        m = self._add(Histogram(name, help, labels, buckets))
        assert isinstance(m, Histogram)
        return m

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def add_collector(self, collect: Callable[[], None]) -> None:
        """`collect()` runs before every render, to bring metrics up to date."""
        self._collectors.append(collect)

    def render(self) -> str:
        for collect in self._collectors:
            try:
                collect()
            except Exception:  # a broken collector must not take /metrics down
                log.exception("metrics collector failed")
        lines: list[str] = []
        for name in sorted(self._metrics):
            lines.extend(self._metrics[name].render())
        return "\n".join(lines) + "\n"
