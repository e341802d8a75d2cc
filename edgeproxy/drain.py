"""Graceful drain of one PoP worker (admin `POST /drain`).

While draining, `/healthz` answers 503 (so whatever announces the anycast route withdraws it),
connections already open keep being served (an HTTP/1.1 keep-alive connection gets
`Connection: close` on its next response; QUIC connections go on, their datagrams forwarded by the
other PoPs once the route has moved), and new connections are still accepted (they may arrive
until the route moves). The drain finishes when no client connection is left, or at the deadline;
the worker then stops as on SIGTERM. `cancel()` before that returns the worker to service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edgeproxy.drain")

DEFAULT_DEADLINE = 30.0
MAX_DEADLINE = 86400.0


class Drain:
    """`set_draining(flag)` tells the front ends; `connections()` counts open client connections."""

    def __init__(self, set_draining: Callable[[bool], None], connections: Callable[[], int], *,
                 default_deadline: float = DEFAULT_DEADLINE, poll: float = 0.1) -> None:
        self._set_draining = set_draining
        self._connections = connections
        self.default_deadline = default_deadline
        self.poll = poll
        self.active = False
        self.started_at: float | None = None  # loop time
        self.deadline_at: float | None = None  # loop time
        self.reason = ""  # why the drain finished: "idle" | "deadline"
        self.finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def parse_deadline(text: str | None, default: float) -> float:
        if text is None or text == "":
            return default
        value = float(text)
        if not math.isfinite(value) or value < 0 or value > MAX_DEADLINE:
            raise ValueError(f"deadline must be 0..{MAX_DEADLINE:g} seconds, got {text!r}")
        return value

    def start(self, deadline: float | None = None) -> dict[str, Any]:
        """Starts draining (or, when already draining, moves the deadline)."""
        if self.finished.is_set():
            return self.status()
        loop = asyncio.get_running_loop()
        now = loop.time()
        seconds = self.default_deadline if deadline is None else deadline
        if not self.active:
            self.active = True
            self.started_at = now
            self._set_draining(True)
            self._task = loop.create_task(self._watch())
            log.warning("draining: /healthz 503, exit when idle or in %.1f s", seconds)
        self.deadline_at = now + seconds
        return self.status()

    def cancel(self) -> dict[str, Any]:
        """Back to service, unless the drain has already finished."""
        if self.active and not self.finished.is_set():
            self.active = False
            self._set_draining(False)
            if self._task is not None:
                self._task.cancel()
                self._task = None
            self.started_at = self.deadline_at = None
            log.warning("drain cancelled: back in service")
        return self.status()

    def status(self) -> dict[str, Any]:
        now = asyncio.get_running_loop().time()
        out: dict[str, Any] = {"draining": self.active, "finished": self.finished.is_set(),
                               "connections": self._connections()}
        if self.active and self.started_at is not None and self.deadline_at is not None:
            out["elapsed_s"] = round(now - self.started_at, 3)
            out["deadline_s"] = round(max(0.0, self.deadline_at - now), 3)
        if self.reason:
            out["reason"] = self.reason
        return out

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._connections() == 0:
                self.reason = "idle"
                break
            if self.deadline_at is not None and loop.time() >= self.deadline_at:
                self.reason = "deadline"
                break
            await asyncio.sleep(self.poll)
        log.warning("drain finished (%s): stopping", self.reason)
        self.finished.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
