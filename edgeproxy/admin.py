"""Admin endpoint on its own port (loopback by default): health, Prometheus metrics, cache purge.

  GET  /healthz                         200 {"status": "ok", ...}, 503 while draining
  GET  /metrics                         Prometheus text format
  POST /cache/purge?url=URL[&prefix=1]  purge one URL (or every URL under a prefix); JSON result
  GET  /steering[?limit=N&own=1]        TCP steering: kernel entries, sync lag, errors (own=1: this
                                        PoP's published flows)
  POST /steering/inject                 lab/tests only (steering.inject): JSON list of entries merged
                                        as if replicated from their owners
  POST /drain[?deadline=S]              drain (edgeproxy.drain): /healthz 503, keep serving, exit when
                                        idle or after S seconds (default 30); again: new deadline
  DELETE /drain, POST /drain?cancel=1   back to service (before the drain has finished)
  GET  /drain                           the drain's state
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

from .metrics import Registry

log = logging.getLogger("edgeproxy.admin")


class AdminServer:
    def __init__(
        self,
        metrics: Registry,
        *,
        purge: Callable[[bytes, bool], int],
        status: Callable[[], dict[str, Any]],
        steering: Callable[[dict[str, list[str]]], dict[str, Any]] | None = None,
        steering_inject: Callable[[Any], dict[str, Any]] | None = None,
    ) -> None:
        self.metrics = metrics
        self._purge = purge
        self._status = status
        self.steering = steering
        self.steering_inject = steering_inject
        self.drain: Any = None  # an edgeproxy.drain.Drain, set by the PoP
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int) -> asyncio.Server:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return self._server

    def _route(self, method: bytes, target: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        parts = urlsplit(target.decode("latin-1"))
        query = parse_qs(parts.query)
        if parts.path == "/healthz":
            if method not in (b"GET", b"HEAD"):
                return 405, b"application/json", b'{"error": "use GET"}\n'
            info = self._status()
            code = 200 if info.get("status") == "ok" else 503
            return code, b"application/json", json.dumps(info).encode() + b"\n"
        if parts.path == "/metrics":
            if method not in (b"GET", b"HEAD"):
                return 405, b"application/json", b'{"error": "use GET"}\n'
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics.render().encode()
        if parts.path == "/cache/purge":
            if method not in (b"POST", b"PURGE"):
                return 405, b"application/json", b'{"error": "use POST"}\n'
            if not query.get("url") and body:
                with contextlib.suppress(ValueError, AttributeError):
                    data = json.loads(body)
                    query = {"url": [str(data["url"])], "prefix": ["1" if data.get("prefix") else "0"]}
            urls = query.get("url")
            if not urls:
                return 400, b"application/json", b'{"error": "give url=URL (and prefix=1 for a prefix purge)"}\n'
            prefix = query.get("prefix", ["0"])[0] in ("1", "true", "yes")
            removed = sum(self._purge(u.encode("latin-1"), prefix) for u in urls)
            return 200, b"application/json", json.dumps({"purged": removed, "urls": urls, "prefix": prefix}).encode() + b"\n"
        if parts.path == "/steering":
            if method not in (b"GET", b"HEAD"):
                return 405, b"application/json", b'{"error": "use GET"}\n'
            info = self.steering(query) if self.steering is not None else {"enabled": False}
            return 200, b"application/json", json.dumps(info).encode() + b"\n"
        if parts.path == "/steering/inject":
            if self.steering_inject is None:
                return 404, b"application/json", b'{"error": "steering.inject is off"}\n'
            if method != b"POST":
                return 405, b"application/json", b'{"error": "use POST"}\n'
            try:
                result = self.steering_inject(json.loads(body))
            except (ValueError, KeyError, TypeError) as e:
                return 400, b"application/json", json.dumps({"error": str(e)}).encode() + b"\n"
            return 200, b"application/json", json.dumps(result).encode() + b"\n"
        if parts.path == "/drain":
            return self._route_drain(method, query)
        return 404, b"application/json", b'{"error": "no such endpoint: /healthz, /metrics, /cache/purge, /drain"}\n'

    def _route_drain(self, method: bytes, query: dict[str, list[str]]) -> tuple[int, bytes, bytes]:
        drain = self.drain
        if drain is None:
            return 404, b"application/json", b'{"error": "drain is not available"}\n'
        cancel = query.get("cancel", ["0"])[0] in ("1", "true", "yes")
        if method == b"DELETE" or (method == b"POST" and cancel):
            info = drain.cancel()
            code = 409 if info.get("finished") else 200
        elif method == b"POST":
            try:
                deadline = drain.parse_deadline(query.get("deadline", [None])[0], drain.default_deadline)
            except ValueError as e:
                return 400, b"application/json", json.dumps({"error": str(e)}).encode() + b"\n"
            info = drain.start(deadline)
            code = 202
        elif method in (b"GET", b"HEAD"):
            info, code = drain.status(), 200
        else:
            return 405, b"application/json", b'{"error": "use POST, DELETE or GET"}\n'
        return code, b"application/json", json.dumps(info).encode() + b"\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            async with asyncio.timeout(30):
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                        continue
                    if not isinstance(event, h11.Request):
                        return
                    method, target = bytes(event.method), bytes(event.target)
                    body = b""
                    while True:
                        ev = conn.next_event()
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await reader.read(65536))
                        elif isinstance(ev, h11.Data):
                            body += ev.data
                            if len(body) > 65536:
                                return
                        else:
                            break
                    status, ctype, payload = self._route(method, target, body)
                    headers = [(b"content-type", ctype), (b"content-length", str(len(payload)).encode())]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=payload)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (TimeoutError, h11.ProtocolError, ConnectionError, OSError):
            return
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
