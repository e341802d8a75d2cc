"""Backport of CPython's fix for gh-102780 to Python 3.11.0-3.11.2, which Debian 12 ships.

There, `asyncio.timeout()` that expires raises CancelledError instead of TimeoutError whenever its
task had been cancelled before and had handled that (`Task.cancelling()` above 0 on entry): the
caller's `except TimeoutError` is skipped and the whole task ends, silently. 3.11.3 compares the
count with the one taken on entry; `apply()` gives the running interpreter's `asyncio.Timeout`
that comparison. It does nothing on 3.11.3 and later. Applied when `edgeproxy` (and so `lab`) or
the standalone gossip agent is imported.
"""

from __future__ import annotations

import sys
from asyncio import exceptions, tasks, timeouts
from types import TracebackType
from typing import Any

_FIXED = (3, 11, 3)
_State: Any = getattr(timeouts, "_State")  # private, and the module this patches  # noqa: B009


async def _aenter(self: Any) -> Any:
    self._state = _State.ENTERED
    self._task = tasks.current_task()
    if self._task is None:
        raise RuntimeError("Timeout should be used inside a task")
    self._cancelling = self._task.cancelling()
    self.reschedule(self._when)
    return self


async def _aexit(
    self: Any, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
) -> bool | None:
    assert self._state in (_State.ENTERED, _State.EXPIRING)
    if self._timeout_handler is not None:
        self._timeout_handler.cancel()
        self._timeout_handler = None
    if self._state is _State.EXPIRING:
        self._state = _State.EXPIRED
        # Only the cancellation this timeout made is turned into TimeoutError (3.11.3's rule).
        if self._task.uncancel() <= self._cancelling and exc_type is exceptions.CancelledError:
            raise TimeoutError from exc_val
    elif self._state is _State.ENTERED:
        self._state = _State.EXITED
    return None


def apply() -> bool:
    """Patches `asyncio.Timeout` where needed; True if it did (now or before)."""
    if sys.version_info >= _FIXED:
        return False
    cls: Any = timeouts.Timeout
    cls.__aenter__ = _aenter
    cls.__aexit__ = _aexit
    return True


apply()
