"""Parsers for what the lab reads back (pure): `birdc show protocols`, `ip -ts monitor route`
lines, `ip route` nexthops, flap schedules."""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

_PROTO = re.compile(
    r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?|\S+)\s*(?P<info>.*)$"
)


@dataclass(frozen=True)
class Protocol:
    name: str
    proto: str
    state: str
    info: str

    @property
    def established(self) -> bool:
        return self.proto == "BGP" and self.state == "up" and self.info.startswith("Established")


def parse_show_protocols(text: str) -> dict[str, Protocol]:
    out: dict[str, Protocol] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Name ")):
            continue
        m = _PROTO.match(line.strip())
        if m:
            out[m["name"]] = Protocol(m["name"], m["proto"], m["state"], m["info"].strip())
    return out


_MON = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\]\s*(?P<rest>.*)$")


@dataclass(frozen=True)
class RouteEvent:
    ts: float  # wall clock, seconds since the epoch
    deleted: bool
    prefix: str
    text: str


def parse_monitor_line(line: str) -> RouteEvent | None:
    """One line of `ip -ts monitor route` (local-time timestamp in brackets)."""
    m = _MON.match(line.strip())
    if not m:
        return None
    rest = m["rest"]
    deleted = rest.startswith("Deleted ")
    if deleted:
        rest = rest[len("Deleted "):]
    words = rest.split()
    if not words:
        return None
    prefix = words[0]
    if prefix in ("unicast", "local", "broadcast", "blackhole", "unreachable", "multicast") and len(words) > 1:
        prefix = words[1]
    ts = dt.datetime.fromisoformat(m["ts"]).timestamp()
    return RouteEvent(ts, deleted, prefix, rest)


_VIA = re.compile(r"\bvia (\d+\.\d+\.\d+\.\d+)")


def route_nexthops(text: str) -> list[str]:
    """Gateways of an `ip route show <prefix>` answer (one, or several for a multipath route)."""
    return _VIA.findall(text)


@dataclass(frozen=True)
class Schedule:
    kind: str  # once | periodic | random
    period: float = 0.0
    seed: int = 0
    mean: float = 0.0

    def intervals(self, count: int) -> Iterator[float]:
        """Seconds to wait before each flap (the first is 0); at most `count` values."""
        rng = random.Random(self.seed)
        for i in range(count if self.kind != "once" else 1):
            if i == 0:
                yield 0.0
            elif self.kind == "periodic":
                yield self.period
            else:
                yield rng.expovariate(1.0 / self.mean)


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if not m:
        raise ValueError(f"expected a duration like 5s, 500ms or 2m, got {text!r}")
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m[2]]


def parse_schedule(text: str) -> Schedule:
    """`once`, `periodic:5s`, or `random:SEED:MEAN` (exponential gaps, e.g. random:7:10s)."""
    if text == "once":
        return Schedule("once")
    kind, _, rest = text.partition(":")
    if kind == "periodic":
        period = _duration(rest)
        if period <= 0:
            raise ValueError("periodic: the period must be > 0")
        return Schedule("periodic", period=period)
    if kind == "random":
        seed, _, mean = rest.partition(":")
        if not seed.isdigit() or not mean:
            raise ValueError(f"expected random:SEED:MEAN (e.g. random:7:10s), got {text!r}")
        m = _duration(mean)
        if m <= 0:
            raise ValueError("random: the mean must be > 0")
        return Schedule("random", seed=int(seed), mean=m)
    raise ValueError(f"schedule must be once, periodic:DURATION or random:SEED:MEAN, got {text!r}")
