"""Load accounting (pure): per-connection survival, per-request latency and errors, histograms.

A connection *survived* when it was opened once (one handshake), never reset, never timed out and
never closed by the peer, and its first connect worked. A graceful close (the server's
`Connection: close` on a complete response, as a draining PoP sends) loses nothing: the client
opens a new connection for its next request, and that reconnect is not counted against survival. Every request is kept as a compact row
(wall-clock start, connection index, latency in ms, HTTP status or 0, answering PoP or "", error or
"") so the report can place it on a timeline next to the flap log (also wall clock).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

# Latency histogram bucket upper bounds, ms (the last bucket is "above the last bound").
BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
              1500, 2000, 3000, 5000, 10000)
ERROR_KINDS = ("reset", "timeout", "closed", "connect", "http", "protocol")
# Errors that end a connection (it is reopened, with a new handshake): all but an HTTP error status.
FATAL = frozenset({"reset", "timeout", "closed", "connect", "protocol"})


def bucket_index(latency_ms: float) -> int:
    return bisect.bisect_left(BUCKETS_MS, latency_ms)


def histogram(latencies_ms: list[float]) -> dict[str, Any]:
    counts = [0] * (len(BUCKETS_MS) + 1)
    for v in latencies_ms:
        counts[bucket_index(v)] += 1
    return {"le_ms": list(BUCKETS_MS), "counts": counts}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(s)))
    return s[min(rank, len(s)) - 1]


@dataclass
class Conn:
    index: int
    proto: str  # "quic" | "tcp"
    kind: str  # "rr" (request/response at a rate) | "stream" (repeated downloads)
    client: str
    handshakes: int = 0
    connect_failures: int = 0
    resets: int = 0
    timeouts: int = 0
    closed: int = 0
    graceful: int = 0  # graceful closes (Connection: close on a complete response), reconnected
    protocol_errors: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    bytes: int = 0
    pops: list[list[Any]] = field(default_factory=list)  # [ts, pop] on each change of answering PoP
    errors: list[list[Any]] = field(default_factory=list)  # [ts, kind, detail, pop]

    @property
    def survived(self) -> bool:
        return (self.handshakes - self.graceful == 1 and self.connect_failures == 0 and self.resets == 0
                and self.timeouts == 0 and self.closed == 0 and self.protocol_errors == 0)

    @property
    def last_pop(self) -> str:
        return str(self.pops[-1][1]) if self.pops else ""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "proto": self.proto, "kind": self.kind, "client": self.client,
                "survived": self.survived, "handshakes": self.handshakes,
                "connect_failures": self.connect_failures, "resets": self.resets,
                "timeouts": self.timeouts, "closed": self.closed, "graceful": self.graceful, "protocol_errors": self.protocol_errors,
                "requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
                "bytes": self.bytes, "pops": self.pops, "errors": self.errors[:200]}


class Accounting:
    """Everything one load process measured. Not thread-safe (one asyncio loop)."""

    MAX_ERRORS_PER_CONN = 200

    def __init__(self, client: str, max_requests: int = 1_000_000) -> None:
        self.client = client
        self.max_requests = max_requests
        self.conns: list[Conn] = []
        self.requests: list[list[Any]] = []  # [ts, conn, latency_ms, status, pop, error]
        self.downloads: list[list[Any]] = []  # [ts, conn, seconds, bytes, ok, pop, error]
        self.started = 0  # requests started (for --max-requests)

    def new_conn(self, proto: str, kind: str) -> Conn:
        c = Conn(len(self.conns), proto, kind, self.client)
        self.conns.append(c)
        return c

    def may_start(self) -> bool:
        if self.started >= self.max_requests:
            return False
        self.started += 1
        return True

    def handshake(self, c: Conn) -> None:
        c.handshakes += 1

    def _seen(self, c: Conn, ts: float, pop: str) -> None:
        if pop and pop != c.last_pop:
            c.pops.append([round(ts, 6), pop])

    def conn_error(self, c: Conn, ts: float, kind: str, detail: str = "") -> None:
        """A connection-level event: failed connect, reset, timeout, close by the peer."""
        if kind == "connect":
            c.connect_failures += 1
        elif kind == "reset":
            c.resets += 1
        elif kind == "timeout":
            c.timeouts += 1
        elif kind == "closed":
            c.closed += 1
        elif kind == "protocol":
            c.protocol_errors += 1
        if len(c.errors) < self.MAX_ERRORS_PER_CONN:
            c.errors.append([round(ts, 6), kind, detail[:200], c.last_pop])

    def graceful_close(self, c: Conn, ts: float, detail: str = "Connection: close") -> None:
        """The server ended the connection after a complete response (a drain): not a loss."""
        c.graceful += 1
        if len(c.errors) < self.MAX_ERRORS_PER_CONN:
            c.errors.append([round(ts, 6), "graceful", detail[:200], c.last_pop])

    def request(self, c: Conn, ts: float, latency_ms: float, status: int, pop: str, error: str = "") -> None:
        """One finished request. `error` is "" for a good answer, an ERROR_KINDS value otherwise; an
        HTTP status >= 500 with no error counts as an "http" error. For a failed request with no
        answer, the PoP recorded is the one that last answered on the connection."""
        if not error and status >= 500:
            error = "http"
        if pop:
            self._seen(c, ts, pop)
        else:
            pop = c.last_pop
        if error:
            c.requests_failed += 1
        else:
            c.requests_ok += 1
        self.requests.append([round(ts, 6), c.index, round(latency_ms, 3), status, pop, error])

    def download(self, c: Conn, ts: float, seconds: float, nbytes: int, pop: str, error: str = "") -> None:
        if pop:
            self._seen(c, ts, pop)
        else:
            pop = c.last_pop
        c.bytes += nbytes
        if error:
            c.requests_failed += 1
        else:
            c.requests_ok += 1
        self.downloads.append([round(ts, 6), c.index, round(seconds, 4), nbytes, not error, pop, error])

    # -- summaries ----------------------------------------------------------------------------

    def summary(self, elapsed: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for proto in ("quic", "tcp"):
            conns = [c for c in self.conns if c.proto == proto]
            idx = {c.index for c in conns}
            reqs = [r for r in self.requests if r[1] in idx]
            lat = [r[2] for r in reqs if not r[5]]
            dls = [d for d in self.downloads if d[1] in idx]
            out[proto] = {
                "connections": len(conns),
                "survived": sum(c.survived for c in conns),
                "handshakes": sum(c.handshakes for c in conns),
                "resets": sum(c.resets for c in conns),
                "timeouts": sum(c.timeouts for c in conns),
                "requests_ok": sum(1 for r in reqs if not r[5]) + sum(1 for d in dls if d[4]),
                "requests_failed": sum(1 for r in reqs if r[5]) + sum(1 for d in dls if not d[4]),
                "errors": {k: sum(1 for r in reqs if r[5] == k) + sum(1 for d in dls if d[6] == k)
                           for k in ERROR_KINDS},
                "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                               "max": max(lat) if lat else None},
                "histogram": histogram(lat),
                "requests_per_s": round(len(reqs) / elapsed, 2) if elapsed > 0 else None,
                "download_bytes": sum(d[3] for d in dls),
                "download_mbit_s": round(sum(d[3] for d in dls) * 8 / 1e6 / elapsed, 2) if elapsed > 0 else None,
            }
        return out

    def progress(self, elapsed: float) -> str:
        parts = [f"[{self.client}] {elapsed:5.1f}s"]
        for proto in ("quic", "tcp"):
            conns = [c for c in self.conns if c.proto == proto]
            if conns:
                parts.append(f"{proto} {sum(c.survived for c in conns)}/{len(conns)} intact")
        ok = sum(1 for r in self.requests if not r[5])
        failed = len(self.requests) - ok
        lat = [r[2] for r in self.requests[-2000:] if not r[5]]
        p99 = percentile(lat, 99)
        parts.append(f"req {len(self.requests)} ok {ok} failed {failed}")
        parts.append(f"rps {len(self.requests) / elapsed:.0f}" if elapsed > 0 else "rps -")
        parts.append(f"p99 {p99:.1f}ms" if p99 is not None else "p99 -")
        if self.downloads:
            parts.append(f"dl {sum(d[3] for d in self.downloads) / 2**20:.0f} MiB")
        return " ".join(parts)

    def to_json(self, meta: dict[str, Any], elapsed: float) -> dict[str, Any]:
        return {"meta": meta, "summary": self.summary(elapsed),
                "connections": [c.to_json() for c in self.conns],
                "request_columns": ["ts", "conn", "latency_ms", "status", "pop", "error"],
                "requests": self.requests,
                "download_columns": ["ts", "conn", "seconds", "bytes", "ok", "pop", "error"],
                "downloads": self.downloads}
