"""Access log: one JSON object per line for every response, with PoP id and request id.

Lines are buffered and flushed at most every `flush_interval` seconds (and at close), so a busy PoP
does not make one write(2) per request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class AccessLog:
    def __init__(self, target: str, pop_id: str, flush_interval: float = 0.5) -> None:
        self.pop_id = pop_id
        self._own = False
        self._out: IO[str] | None
        if target == "":
            self._out = None
        elif target == "-":
            self._out = sys.stdout
        else:
            self._out = open(target, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
            self._own = True
        self._buf: list[str] = []
        self._flush_interval = flush_interval
        self._last_flush = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._out is None:
            return
        record["pop"] = self.pop_id
        self._buf.append(json.dumps(record, separators=(",", ":")))
        now = time.monotonic()
        if now - self._last_flush >= self._flush_interval or len(self._buf) >= 512:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._out is None or not self._buf:
            return
        self._out.write("\n".join(self._buf) + "\n")
        self._out.flush()
        self._buf.clear()
        self._last_flush = time.monotonic() if now is None else now

    def close(self) -> None:
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
        self._out = None
