"""End-of-tick write batching (edgeproxy.tick): what is added during a tick is flushed once, when
the tick ends, and one failing flush does not hold back the others."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgeproxy.tick import TickFlusher


class _Item:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log = log
        self.name = name
        self.fail = fail

    def flush_tick(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("boom")


async def test_items_of_one_tick_flush_together_at_its_end() -> None:
    flusher = TickFlusher()
    log: list[str] = []
    flusher.add(_Item(log, "a"))
    flusher.add(_Item(log, "b"))
    assert log == []  # nothing leaves before the tick ends
    await asyncio.sleep(0)
    assert log == ["a", "b"]
    flusher.add(_Item(log, "c"))  # a later tick schedules its own flush
    await asyncio.sleep(0)
    assert log == ["a", "b", "c"]


async def test_a_failing_flush_does_not_hold_back_the_others(caplog: pytest.LogCaptureFixture) -> None:
    flusher = TickFlusher()
    log: list[str] = []
    flusher.add(_Item(log, "bad", fail=True))
    flusher.add(_Item(log, "good"))
    with caplog.at_level(logging.ERROR, logger="edgeproxy.tick"):
        await asyncio.sleep(0)
    assert log == ["bad", "good"]
    assert "flushing queued writes failed" in caplog.text
    flusher.add(_Item(log, "next"))  # still schedules after a failure
    await asyncio.sleep(0)
    assert log[-1] == "next"
