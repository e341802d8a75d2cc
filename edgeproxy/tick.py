"""Writes that leave together at the end of an event-loop tick.

A send(2) to a peer whose thread sleeps wakes it: on loopback and fast LANs that wake-up costs the
sender more than the copy. When many connections each send a little within one tick (responses to
a batch of requests, requests to an origin), sending them back to back at the end of the tick lets
one wake-up of the peer serve them all. The client side (http.h1server) and the origin side
(origin.client) queue their small writes here; nothing waits longer than the current tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("edgeproxy.tick")


class Flushable(Protocol):
    def flush_tick(self) -> None: ...


class TickFlusher:
    """Calls `flush_tick()` of everything added during a tick, once, when the tick ends (on the
    running loop; one flusher may serve several loops one after another, as tests do)."""

    def __init__(self) -> None:
        self._pending: list[Flushable] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # where the pending flush runs

    def add(self, item: Flushable) -> None:
        """Adds `item` for this tick (the caller adds an item at most once per tick)."""
        loop = asyncio.get_running_loop()
        if not self._pending or loop is not self._loop:
            # A loop that stopped with a flush pending never runs it: start afresh here.
            self._pending = []
            self._loop = loop
            loop.call_soon(self._run)
        self._pending.append(item)

    def _run(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            try:
                item.flush_tick()
            except Exception:  # one connection's failure must not hold back the others
                log.exception("flushing queued writes failed")
