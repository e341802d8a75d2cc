"""Accepted TCP connections -> this PoP's entries in the flow table.

The HTTP/1.1 front end reports every accepted connection (``opened(local, peer)``) and its end
(``closed(local, peer)``) to a :class:`FlowPublisher`:

* a connection still open ``min_age`` seconds after it was accepted is published (short
  requests never reach the table: they rarely outlive a route change, and they would cost every
  PoP a map element);
* a published flow is refreshed every ``ttl / 3`` seconds, so it stays alive fleet-wide while
  the connection lasts and expires by itself ``ttl`` after a crash;
* after close the entry is kept ``linger`` seconds (covering the socket's FIN_WAIT/TIME_WAIT, so
  the last ACKs and retransmitted FINs still reach the socket), then deleted (a tombstone).

The key is :func:`gossip.flowtable.tcp_key` of the flow as it arrives at a PoP: client address
and port first, then the (anycast) local address and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from gossip.flowtable import FlowKey, FlowTable, FlowTableFull, tcp_key

log = logging.getLogger("edgeproxy.steering")


def flow_key(local: Any, peer: Any) -> FlowKey | None:
    """The flow-table key of a connection, or None for sockets without an IP 4-tuple."""
    try:
        return tcp_key(str(peer[0]), int(peer[1]), str(local[0]), int(local[1]))
    except (TypeError, ValueError, IndexError):
        return None


class FlowPublisher:
    def __init__(
        self,
        table: FlowTable,
        *,
        min_age: float,
        linger: float,
        ttl: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.table = table
        self.min_age = min_age
        self.linger = linger
        self.ttl = ttl
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock = clock
        self._young: dict[FlowKey, asyncio.TimerHandle] = {}  # open, not yet published
        self._live: set[FlowKey] = set()  # open and published
        self._lingering: dict[FlowKey, asyncio.TimerHandle] = {}  # closed, entry kept
        self._refresher: asyncio.Task[None] | None = None
        self.counters: Counter[str] = Counter()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self._clock() if self._clock is not None else self.loop.time()

    def start(self) -> None:
        if self._refresher is None:
            self._refresher = self.loop.create_task(self._refresh_loop())

    # -- the connection observer ----------------------------------------------------------

    def opened(self, local: Any, peer: Any) -> None:
        key = flow_key(local, peer)
        if key is None:
            return
        self.counters["opened"] += 1
        handle = self._lingering.pop(key, None)
        if handle is not None:  # the same 4-tuple again within the linger time
            handle.cancel()
        if self.min_age <= 0:
            self._publish(key)
        else:
            old = self._young.pop(key, None)
            if old is not None:
                old.cancel()
            self._young[key] = self.loop.call_later(self.min_age, self._publish, key)

    def closed(self, local: Any, peer: Any) -> None:
        key = flow_key(local, peer)
        if key is None:
            return
        self.counters["closed"] += 1
        handle = self._young.pop(key, None)
        if handle is not None:
            handle.cancel()
            return
        if key not in self._live:
            return
        self._live.discard(key)
        if self.linger > 0:
            self.table.refresh(key, self.now(), self.linger)
            self._lingering[key] = self.loop.call_later(self.linger, self._retire, key)
        else:
            self._retire(key)

    # -- internals ------------------------------------------------------------------------

    def _publish(self, key: FlowKey) -> None:
        self._young.pop(key, None)
        try:
            self.table.publish(key, self.now(), self.ttl)
        except FlowTableFull:
            self.counters["table_full"] += 1
            return
        self.counters["published"] += 1
        self._live.add(key)

    def _retire(self, key: FlowKey) -> None:
        self._lingering.pop(key, None)
        if self.table.delete(key, self.now()):
            self.counters["deleted"] += 1

    async def _refresh_loop(self) -> None:
        interval = max(0.05, self.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            now = self.now()
            for key in list(self._live):
                if self.table.refresh(key, now, self.ttl) is None:
                    # another PoP claimed the flow with a higher epoch: stop announcing it
                    self._live.discard(key)
                    self.counters["lost"] += 1

    def stats(self) -> dict[str, Any]:
        return {"young": len(self._young), "published": len(self._live), "lingering": len(self._lingering),
                "counters": dict(self.counters)}

    async def close(self) -> None:
        """Stop: cancel timers and retire every entry of ours (tombstones for the fleet)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        for h in [*self._young.values(), *self._lingering.values()]:
            h.cancel()
        now = self.now()
        for key in [*self._live, *self._lingering]:
            self.table.delete(key, now)
        self._young.clear()
        self._live.clear()
        self._lingering.clear()
