"""asyncio.timeout turns its own expiry into TimeoutError even in a task that had handled an
earlier cancellation: CPython 3.11.0-3.11.2 (Debian 12's) raised CancelledError there (gh-102780),
which ended the task silently. edgeproxy.timeout_backport brings 3.11.3's rule to them."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

import edgeproxy.timeout_backport as backport


async def test_expiry_after_a_handled_cancellation_is_a_timeout() -> None:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # handled without uncancel(): cancelling() stays 1
        await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)


async def test_an_outside_cancellation_still_cancels() -> None:
    async def victim() -> None:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(1)

    t = asyncio.ensure_future(victim())
    await asyncio.sleep(0.01)
    t.cancel()  # not the timeout's: must stay a cancellation
    with pytest.raises(asyncio.CancelledError):
        await t


def test_applied_exactly_where_needed() -> None:
    assert backport.apply() is (sys.version_info < (3, 11, 3))
