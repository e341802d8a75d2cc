"""Connection pool for one origin server: bounded, LIFO idle keep-alive connections, FIFO waiters.

LIFO reuse keeps the most recently used (warmest, least likely closed by the origin's own idle
timer) connections busy and lets the rest age out. Idle connections are dropped when they pass
`idle_timeout` (a timer, so sockets do not linger without traffic), when the origin closes them or
sends anything unsolicited (watched while idle), and are checked once more before reuse.

`max_connections` bounds busy + idle + connecting. When it is reached, `acquire` queues; a
released connection (or the slot of a closed one) goes to the longest waiter first, and new
callers queue behind existing waiters, so nobody starves. Waiting counts against
`connect_timeout`, after which `OriginConnectError("pool exhausted")` is raised.

`idle_count` and `busy_count` are read when metrics are scraped (the group's collector), not
pushed on every acquire and release.

Works with whichever event loop is running when it is used (asyncio or uvloop); nothing binds a
loop at construction.
"""

from __future__ import annotations

import asyncio
import collections

from edgeproxy.tick import TickFlusher

from .client import OriginConnectError, OriginConnection, OriginPoolExhausted

_CLOSED = object()  # wakes waiters when the pool closes


class OriginPool:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_connections: int,
        max_idle: int,
        idle_timeout: float,
        connect_timeout: float,
        server: str | None = None,
        codec: str | None = None,
    ) -> None:
        """`codec` names the HTTP/1.1 parser
        of its connections (`http1.parser`; None: the client's default)."""
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.host, self.port = address
        self.server = server or f"{self.host}:{self.port}"
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.codec = codec
        self._idle: collections.deque[OriginConnection] = collections.deque()  # oldest left
        self._busy: set[OriginConnection] = set()
        self._open = 0  # busy + idle + slots reserved for connects in progress
        self._waiters: collections.deque[asyncio.Future[object]] = collections.deque()
        self._flusher = TickFlusher()  # bodiless requests leave together at the end of the tick
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False
        self.connects = 0
        """Connections opened so far (tests and debugging)."""

    # -- introspection ---------------------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return self._open

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    # -- acquire / release ----------------------------------------------------------------------

    async def acquire(self, *, fresh: bool = False) -> OriginConnection:
        """A connection for one request; give it back with `release` (or via OriginResponse).

        `fresh=True` skips idle connections (retry after a stale keep-alive reset).
        Raises OriginConnectError on connect failure, timeout or exhaustion.
        """
        if self._closed:
            raise OriginConnectError(f"{self.server}: connection pool is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        self._prune_waiters()
        if not self._waiters:
            if not fresh:
                conn = self._take_idle(loop.time())
                if conn is not None:
                    return conn
            if self._open < self.max_connections:
                self._open += 1
                return await self._connect(deadline)
            if fresh and self._idle:
                # Trade the oldest idle connection's slot for the fresh one we were asked for.
                self._idle.popleft().close()
                return await self._connect(deadline)
        fut: asyncio.Future[object] = loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                got = await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self._hand_back(fut.result())  # granted just as we gave up: pass it on
            if isinstance(e, TimeoutError):
                raise OriginPoolExhausted(
                    f"{self.server}: pool exhausted ({self.max_connections} connections busy "
                    f"for {self.connect_timeout:g}s)"
                ) from None
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        if got is _CLOSED:
            raise OriginConnectError(f"{self.server}: connection pool is closed")
        if got is None:  # a slot was reserved for us
            return await self._connect(deadline)
        assert isinstance(got, OriginConnection)
        if fresh:
            self._busy.discard(got)
            got.close()
            return await self._connect(deadline)
        return got

    def take_idle_now(self) -> OriginConnection | None:
        """An idle connection at once, or None (nothing idle, or others queue for one)."""
        if self._closed or not self._idle:
            return None
        self._prune_waiters()
        if self._waiters:
            return None
        return self._take_idle(self._idle[-1].now())  # the loop's clock, as idle_since

    def release(self, conn: OriginConnection) -> None:
        """Return a connection after its response is done; keeps it only if it is reusable."""
        if conn not in self._busy:
            return  # released twice, or the pool closed meanwhile
        self._busy.discard(conn)
        if conn.detached:
            # Upgraded to a tunnel: it lives on outside the pool and frees its slot.
            self._open -= 1
            self._grant_slot()
        elif not self._closed and conn.reusable and self.max_idle > 0:
            waiter = self._next_waiter()
            if waiter is not None:
                self._busy.add(conn)
                waiter.set_result(conn)
            else:
                self._park(conn)
        else:
            conn.close()
            self._open -= 1
            self._grant_slot()

    async def close(self) -> None:
        """Close every connection, idle and busy, and fail the waiters."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(_CLOSED)
        conns = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        self._open = 0
        for c in conns:
            c.close()
        if conns:
            # Bounded: connection_lost follows close() within a loop iteration or two.
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=1.0)

    # -- internals -------------------------------------------------------------------------------

    async def _connect(self, deadline: float) -> OriginConnection:
        """Open a connection for a slot already counted in `_open`."""
        loop = asyncio.get_running_loop()
        try:
            conn = await OriginConnection.connect(
                self.host,
                self.port,
                timeout=max(0.0, deadline - loop.time()),
                server=self.server,
                codec=self.codec,
                flusher=self._flusher,
            )
        except BaseException:
            self._open -= 1
            self._grant_slot()
            raise
        self.connects += 1
        if self._closed:
            conn.close()
            raise OriginConnectError(f"{self.server}: connection pool is closed")
        self._busy.add(conn)
        return conn

    def _take_idle(self, now: float) -> OriginConnection | None:
        while self._idle:
            conn = self._idle.pop()  # newest
            conn.set_idle_watch(None)
            if now - conn.idle_since >= self.idle_timeout or not conn.reusable:
                conn.close()
                self._open -= 1
                continue
            self._busy.add(conn)
            return conn
        return None

    def _park(self, conn: OriginConnection) -> None:
        loop = asyncio.get_running_loop()
        while len(self._idle) >= self.max_idle:
            old = self._idle.popleft()
            old.set_idle_watch(None)
            old.close()
            self._open -= 1
        conn.idle_since = loop.time()
        conn.set_idle_watch(lambda: self._idle_event(conn))
        self._idle.append(conn)
        self._schedule_reap()

    def _idle_event(self, conn: OriginConnection) -> None:
        # The origin closed an idle connection or sent unsolicited bytes: it is of no more use.
        if conn in self._idle:
            self._idle.remove(conn)
            conn.close()
            self._open -= 1
            self._grant_slot()

    def _schedule_reap(self) -> None:
        if self._reaper is not None or not self._idle or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._reaper = loop.call_at(self._idle[0].idle_since + self.idle_timeout, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = asyncio.get_running_loop().time()
        while self._idle and now - self._idle[0].idle_since >= self.idle_timeout:
            conn = self._idle.popleft()
            conn.set_idle_watch(None)
            conn.close()
            self._open -= 1
            self._grant_slot()
        self._schedule_reap()

    def _prune_waiters(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _next_waiter(self) -> asyncio.Future[object] | None:
        self._prune_waiters()
        return self._waiters.popleft() if self._waiters else None

    def _grant_slot(self) -> None:
        """A slot came free: the first waiter may connect in it."""
        if self._closed or self._open >= self.max_connections:
            return
        waiter = self._next_waiter()
        if waiter is not None:
            self._open += 1
            waiter.set_result(None)

    def _hand_back(self, got: object) -> None:
        if isinstance(got, OriginConnection):
            self.release(got)
        elif got is None:
            self._open -= 1
            self._grant_slot()
