"""An origin group: server selection, retries, passive and active health, per-server pools.

`OriginGroup.fetch` is what the request pipeline calls. It picks a server (`health.choose`), sends
the request over a pooled connection and returns the `OriginResponse` once its head has arrived.

Retry rule (the only places a request is sent twice):

1. Failures before any response byte -- connect error (including an exhausted pool), reset before
   the response, first-byte timeout, origin stopped reading the body -- are retried on the next
   server (`health.choose` prefers servers not yet tried) only if the method is in
   IDEMPOTENT_METHODS *and* the body can be replayed: `body_length == 0` or the body is a
   `BytesBody`. At most `retries` extra attempts.
2. Stale keep-alive: a *reused* pooled connection that closes before any response byte is retried
   once more on a fresh connection to the same server, whatever the method, provided that no body
   byte was taken from a non-replayable source: `body_length == 0`, or a `BytesBody`, or a
   streamed body of which nothing had been read yet. This extra attempt does not count against
   `retries` and the stale reset is not a passive failure (the origin merely timed the connection
   out); the fresh attempt's result is.
3. Nothing is retried once the origin answered: a malformed response is a 502 at once, and 5xx
   responses are returned as they are.

Passive health: connect errors (not pool exhaustion), resets, timeouts, malformed responses and
502/503/504 responses are failures; other responses are successes. Errors after the head (body
cut off) are the pipeline's to see and are not fed back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from edgeproxy.config import OriginGroupSection, parse_hostport
from edgeproxy.http.messages import (
    IDEMPOTENT_METHODS,
    Body,
    BytesBody,
    EmptyBody,
    HTTPError,
    RequestHead,
)
from edgeproxy.metrics import Registry

from .client import (
    OriginConnection,
    OriginError,
    OriginPoolExhausted,
    OriginProtocolError,
    OriginResetBeforeResponse,
    OriginResponse,
    OriginTimeout,
)
from .health import ServerHealth, choose, probe_ok
from .pool import OriginPool

log = logging.getLogger(__name__)

PASSIVE_FAILURE_STATUSES = frozenset({502, 503, 504})
PROBE_USER_AGENT = b"edgeproxy-health-check"


class _CountingBody:
    """Counts the bytes taken from a body, for the stale-connection rule."""

    def __init__(self, inner: Body) -> None:
        self._inner = inner
        self.length = inner.length
        self.consumed = 0

    async def read(self) -> bytes:
        chunk = await self._inner.read()
        self.consumed += len(chunk)
        return chunk


class _Recording:
    """Makes a BytesBody replayable without touching its internals: chunks read once are kept,
    and every attempt gets a reader that replays them before reading on. Costs a second copy of
    the (already in-memory) body while the request lasts."""

    def __init__(self, source: Body) -> None:
        self._source = source
        self.length = source.length
        self._chunks: list[bytes] = []
        self._ended = False

    def reader(self) -> Body:
        return _ReplayReader(self)

    async def _chunk(self, index: int) -> bytes:
        if index < len(self._chunks):
            return self._chunks[index]
        if self._ended:
            return b""
        chunk = await self._source.read()
        if chunk:
            self._chunks.append(chunk)
        else:
            self._ended = True
        return chunk


class _ReplayReader:
    def __init__(self, recording: _Recording) -> None:
        self._recording = recording
        self.length = recording.length
        self._index = 0

    async def read(self) -> bytes:
        chunk = await self._recording._chunk(self._index)
        if chunk:
            self._index += 1
        return chunk


class GroupServer:
    """One server of the group: its address, health state, pool and probe task."""

    def __init__(
        self, name: str, host: str, port: int, health: ServerHealth, pool: OriginPool
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.health = health
        self.pool = pool


def _outcome(e: OriginError) -> str:
    if isinstance(e, OriginTimeout):
        return "timeout"
    if isinstance(e, OriginResetBeforeResponse):
        return "reset"
    if isinstance(e, OriginProtocolError):
        return "protocol_error"
    return "connect_error"


class OriginGroup:
    def __init__(
        self,
        section: OriginGroupSection,
        metrics: Registry,
        *,
        clock: Callable[[], float] = time.monotonic,
        parser: str | None = None,
    ) -> None:
        """`clock` drives health decisions (ejection expiry); timeouts use the event loop's time.
        `parser` is the HTTP/1.1 codec for origin responses (`http1.parser`)."""
        if not section.servers:
            raise ValueError(f"origin group {section.name!r} has no servers")
        self.section = section
        self.name = section.name
        self._clock = clock
        self.parser = parser
        self._m_requests = metrics.counter(
            "edgeproxy_origin_requests_total",
            "Requests sent to origin servers, by outcome",
            ("group", "server", "outcome"),
        )
        self._m_latency = metrics.histogram(
            "edgeproxy_origin_response_seconds",
            "Seconds from picking a server to its response head (connect included)",
            ("group", "server"),
        )
        self._m_healthy = metrics.gauge(
            "edgeproxy_origin_healthy",
            "1 if the origin server gets traffic (active checks pass, not ejected), else 0",
            ("group", "server"),
        )
        self._m_connections = metrics.gauge(
            "edgeproxy_origin_connections",
            "Connections to origin servers by state (idle, busy)",
            ("group", "server", "state"),
        )
        self._m_retries = metrics.counter(
            "edgeproxy_origin_retries_total",
            "Extra attempts on another server after a failure before any response",
            ("group",),
        )
        p = section.passive
        h = section.health
        self.servers: list[GroupServer] = []
        for name in section.servers:
            host, port = parse_hostport(name, default_host="127.0.0.1")
            pool = OriginPool(
                (host, port),
                max_connections=section.max_connections,
                max_idle=section.max_idle,
                idle_timeout=section.idle_timeout,
                connect_timeout=section.connect_timeout,
                server=name,
                codec=parser,
            )
            health = ServerHealth(
                rise=h.rise,
                fall=h.fall,
                consecutive_errors=p.consecutive_errors,
                eject_seconds=p.eject_seconds,
            )
            self.servers.append(GroupServer(name, host, port, health, pool))
            self._m_healthy.set(self.name, name, value=1.0)
        self._health = [s.health for s in self.servers]
        metrics.add_collector(self._collect)
        self._rr = 0
        self._panic = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the active health checks (one task per server) if enabled."""
        if self._tasks or self._closed or not self.section.health.enabled:
            return
        for srv in self.servers:
            task = asyncio.create_task(
                self._health_loop(srv), name=f"health {self.name} {srv.name}"
            )
            self._tasks.append(task)

    async def close(self) -> None:
        """Stop the health checks and close every pooled connection (busy ones included)."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for srv in self.servers:
            await srv.pool.close()

    async def __aenter__(self) -> OriginGroup:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def status(self) -> list[dict[str, Any]]:
        """Per-server state for the admin endpoint and logs."""
        now = self._clock()
        return [
            {
                "server": s.name,
                "available": s.health.available(now),
                "healthy": s.health.healthy,
                "ejected": s.health.ejected(now),
                "idle": s.pool.idle_count,
                "busy": s.pool.busy_count,
            }
            for s in self.servers
        ]

    # -- requests --------------------------------------------------------------------------------

    def take_ready(self) -> tuple[GroupServer, OriginConnection] | None:
        """The server a fetch would try first and an idle pooled connection to it, if one is
        free at once (None otherwise: `fetch` then waits or connects). For callers that drive
        a bodiless request in callback mode; they report with `attempt_succeeded` or
        `attempt_failed`, give the connection back with `srv.pool.release`, and after a
        failure call `fetch(..., prior=(srv, error))`, which goes on as if that had been its
        own first attempt."""
        choice = choose(self._health, self.section.policy, self._clock(), self._rr, [])
        srv = self.servers[choice.index]
        conn = srv.pool.take_idle_now()
        if conn is None:
            return None
        self._rr += 1
        self._note_panic(choice.panic)
        return srv, conn

    def attempt_succeeded(self, srv: GroupServer, status: int, latency: float) -> None:
        """Accounts for a response head that arrived (what `fetch` counts per attempt)."""
        self._m_latency.observe(latency, self.name, srv.name)
        self._m_requests.inc(self.name, srv.name, "http_5xx" if status >= 500 else "ok")
        self._passive(srv, ok=status not in PASSIVE_FAILURE_STATUSES)

    def attempt_failed(self, srv: GroupServer, e: OriginError) -> None:
        """Accounts for an attempt that got no response head."""
        self._m_requests.inc(self.name, srv.name, _outcome(e))
        stale = isinstance(e, OriginResetBeforeResponse) and e.reused
        if not stale and not isinstance(e, OriginPoolExhausted):
            self._passive(srv, ok=False)

    async def fetch(
        self,
        head: RequestHead,
        body: Body,
        body_length: int | None,
        *,
        prior: tuple[GroupServer, OriginError] | None = None,
    ) -> OriginResponse:
        """Send the request to a server of the group; the response head has arrived on return.

        The caller must finish the response with release(), close() or detach(). Raises
        HTTPError(502/504) when every attempt failed; exceptions from `body.read()` (client
        upload broken, 413) propagate unchanged. `prior` is a first attempt the caller made
        itself (see `take_ready`): it counts against the retries, and a stale keep-alive reset
        is retried on a fresh connection to the same server, as here.
        """
        if body_length == 0:
            body = EmptyBody()
        recording = _Recording(body) if isinstance(body, BytesBody) and body_length != 0 else None
        replayable = body_length == 0 or recording is not None
        retry_allowed = head.method in IDEMPOTENT_METHODS and replayable
        attempts = 1 + (self.section.retries if retry_allowed else 0)
        tried: list[int] = []
        failures: list[str] = []
        last: OriginError | None = None
        for attempt in range(attempts):
            if attempt == 0 and prior is not None:
                srv, err = prior
                tried.append(self.servers.index(srv))
                if isinstance(err, OriginResetBeforeResponse) and err.reused:
                    try:
                        return await self._attempt(srv, head, body, body_length, fresh=True)
                    except OriginError as e:
                        err = e
                last = err
                failures.append(str(err))
                if isinstance(err, OriginProtocolError):
                    break
                continue
            choice = choose(self._health, self.section.policy, self._clock(), self._rr, tried)
            self._rr += 1
            self._note_panic(choice.panic)
            srv = self.servers[choice.index]
            tried.append(choice.index)
            if attempt:
                self._m_retries.inc(self.name)
            try:
                return await self._try_server(srv, head, body, body_length, recording)
            except OriginError as e:
                last = e
                failures.append(str(e))
                if isinstance(e, OriginProtocolError):
                    break
        assert last is not None
        n = len(failures)
        detail = (
            f"origin group {self.name!r}: no response after {n} attempt{'s' if n > 1 else ''}: "
            + "; ".join(failures)
        )
        if not retry_allowed and self.section.retries and not isinstance(last, OriginProtocolError):
            detail += f" (not retried: {head.method.decode(errors='replace')} request"
            detail += (
                " with a streamed body)"
                if head.method in IDEMPOTENT_METHODS
                else " is not idempotent)"
            )
        raise HTTPError(504 if isinstance(last, OriginTimeout) else 502, detail)

    async def _try_server(
        self,
        srv: GroupServer,
        head: RequestHead,
        body: Body,
        body_length: int | None,
        recording: _Recording | None,
    ) -> OriginResponse:
        counted = _CountingBody(recording.reader() if recording else body)
        try:
            return await self._attempt(srv, head, counted, body_length, fresh=False)
        except OriginResetBeforeResponse as e:
            if not e.reused:
                raise
            if not (body_length == 0 or recording is not None or counted.consumed == 0):
                raise
            log.debug("%s: stale keep-alive connection, retrying on a fresh one", srv.name)
            again = recording.reader() if recording else body
            return await self._attempt(srv, head, again, body_length, fresh=True)

    async def _attempt(
        self,
        srv: GroupServer,
        head: RequestHead,
        body: Body,
        body_length: int | None,
        *,
        fresh: bool,
    ) -> OriginResponse:
        sec = self.section
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            conn = await srv.pool.acquire(fresh=fresh)
            resp = await conn.request(
                head,
                body,
                body_length,
                first_byte_timeout=sec.first_byte_timeout,
                read_timeout=sec.read_timeout,
                on_done=srv.pool.release,
            )
        except OriginError as e:
            self.attempt_failed(srv, e)
            raise
        self.attempt_succeeded(srv, resp.status, loop.time() - start)
        return resp

    # -- health ----------------------------------------------------------------------------------

    def _passive(self, srv: GroupServer, *, ok: bool) -> None:
        now = self._clock()
        if ok:
            srv.health.record_success(now)
        elif srv.health.record_failure(now):
            log.warning(
                "origin %s in group %s ejected for %gs after failed requests",
                srv.name,
                self.name,
                self.section.passive.eject_seconds,
            )

    def _collect(self) -> None:
        """Per-server gauges, read when metrics are scraped rather than kept up to date on
        every request."""
        now = self._clock()
        for srv in self.servers:
            self._m_healthy.set(self.name, srv.name, value=1.0 if srv.health.available(now) else 0.0)
            self._m_connections.set(self.name, srv.name, "idle", value=srv.pool.idle_count)
            self._m_connections.set(self.name, srv.name, "busy", value=srv.pool.busy_count)

    def _note_panic(self, panic: bool) -> None:
        if panic != self._panic:
            self._panic = panic
            if panic:
                log.warning(
                    "origin group %s: no server available, spreading over all (panic)", self.name
                )
            else:
                log.warning("origin group %s: servers available again, panic mode over", self.name)

    async def _health_loop(self, srv: GroupServer) -> None:
        interval = self.section.health.interval
        while True:
            try:
                ok, why = await self._probe(srv)
            except Exception:  # a bug in probing must not silently stop the checks
                log.exception("health probe of %s crashed", srv.name)
                ok, why = False, "probe crashed"
            if srv.health.record_probe(ok):
                log.warning(
                    "origin %s in group %s is now %s (%s)",
                    srv.name,
                    self.name,
                    "healthy" if srv.health.healthy else "unhealthy",
                    why,
                )
            # Jitter keeps the workers of a PoP from probing an origin in lockstep.
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def _probe(self, srv: GroupServer) -> tuple[bool, str]:
        """One active check on its own connection (never pooled, so it tests connecting too)."""
        h = self.section.health
        head = RequestHead(
            b"GET",
            h.path.encode(),
            [(b"user-agent", PROBE_USER_AGENT), (b"connection", b"close")],
            authority=(h.host or srv.name).encode(),
        )
        conn: OriginConnection | None = None
        try:
            async with asyncio.timeout(h.timeout):
                conn = await OriginConnection.connect(
                    srv.host, srv.port, timeout=h.timeout, server=srv.name, codec=self.parser
                )
                resp = await conn.request(
                    head, EmptyBody(), 0, first_byte_timeout=h.timeout, read_timeout=h.timeout
                )
        except TimeoutError:
            return False, f"no answer within {h.timeout:g}s"
        except (OriginError, HTTPError) as e:
            return False, str(e)
        finally:
            if conn is not None:
                conn.close()
        return probe_ok(resp.status, h.expect_status), f"status {resp.status}"
