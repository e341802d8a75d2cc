"""The built-in demo origin: a small HTTP/1.1 server that shows what the edge does.

  /                  an HTML page, cacheable for 30 s, with an ETag
  /time              the origin's clock, `Cache-Control: no-store` (never cached)
  /cached/<anything> a text body cacheable for 60 s (stale-while-revalidate 30 s, stale-if-error
                     10 min), with an ETag it honours in If-None-Match; `?ms=N` delays it
  /private           `Cache-Control: private` (passed through, never shared)
  /vary              cacheable, `Vary: Accept-Language`; the body names the language asked for
  /slow?ms=N         answers after N ms
  /stream?mb=N       streams N MiB (max 4096) in 64 KiB chunks
  /echo              echoes the request body, up to 64 MiB (any method)
  /sink              reads and discards the request body, answers its length
  /headers           the request headers it received, as JSON
  /upgrade-echo      with `Upgrade: echo`: 101, then echoes raw bytes until the client closes
  /healthz           200 "ok"
Each response carries `x-origin-hits`, the origin's request count, so caching is visible; the last
requests are kept in `recent` (method, target, headers) for tests and the demo's curious users.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import hashlib
import json
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import h11

PAGE = """<!doctype html>
<html><head><title>edgeproxy demo</title></head>
<body><h1>edgeproxy demo origin</h1>
<p>Served by the demo origin at {now}. The edge caches this page for 30 seconds:
reload and watch the <code>x-cache</code> and <code>age</code> response headers.</p>
</body></html>
"""

CHUNK = b"x" * 65536


class DemoOrigin:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # for Date headers; tests move it with the edge's clock
        self.hits = 0
        self.connections = 0
        self.recent: collections.deque[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = collections.deque(maxlen=1000)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)
        self.connections += 1
        try:
            while True:
                event = await self._next(conn, reader)
                if not isinstance(event, h11.Request):
                    return
                self.recent.append((bytes(event.method), bytes(event.target), list(event.headers)))
                body = bytearray()
                received = 0
                while True:
                    ev = await self._next(conn, reader)
                    if isinstance(ev, h11.Data):
                        received += len(ev.data)
                        if len(body) < 64 * 1024**2 and not bytes(event.target).startswith(b"/sink"):
                            body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                self.hits += 1
                if bytes(event.target) == b"/upgrade-echo" and conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    await self._upgrade_echo(conn, reader, writer)
                    return
                if bytes(event.target).startswith(b"/sink"):
                    body = bytearray(str(received).encode())
                await self._respond(conn, writer, event, bytes(body))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, OSError):
            return
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _upgrade_echo(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        headers = [(b"upgrade", b"echo"), (b"connection", b"upgrade")]
        writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
        leftover, _ = conn.trailing_data
        if leftover:
            writer.write(leftover)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    @staticmethod
    async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(65536))

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request, body: bytes) -> None:
        parts = urlsplit(bytes(req.target).decode("latin-1"))
        query = parse_qs(parts.query)
        path = parts.path
        now = self.clock()
        headers: list[tuple[bytes, bytes]] = [
            (b"date", email.utils.formatdate(now, usegmt=True).encode()),
            (b"server", b"edgeproxy-demo-origin"),
            (b"x-origin-hits", str(self.hits).encode()),
        ]
        status = 200
        payload: bytes | None = b""
        if path == "/":
            payload = PAGE.format(now=email.utils.formatdate(now, usegmt=True)).encode()
            headers += [(b"content-type", b"text/html; charset=utf-8"), (b"cache-control", b"public, max-age=30")]
            headers.append((b"etag", b'"' + hashlib.sha1(payload).hexdigest()[:16].encode() + b'"'))
        elif path == "/time":
            payload = f"{now:.6f}\n".encode()
            headers += [(b"content-type", b"text/plain"), (b"cache-control", b"no-store")]
        elif path.startswith("/cached/"):
            if "ms" in query:
                await asyncio.sleep(min(int(query["ms"][0] or 0), 60000) / 1000)
            payload = f"cached object {path} made at {now:.6f}\n".encode()
            etag = b'"' + hashlib.sha1(path.encode()).hexdigest()[:16].encode() + b'"'
            headers += [(b"cache-control", b"max-age=60, stale-while-revalidate=30, stale-if-error=600"), (b"etag", etag)]
            if etag in [v for k, v in req.headers if k == b"if-none-match"]:
                status, payload = 304, None
            else:
                headers.append((b"content-type", b"text/plain"))
        elif path == "/vary":
            lang = next((v for k, v in req.headers if k == b"accept-language"), b"none")
            payload = b"language: " + lang + b"\n"
            headers += [(b"content-type", b"text/plain"), (b"cache-control", b"max-age=60"), (b"vary", b"Accept-Language")]
        elif path == "/private":
            payload = f"private answer at {now:.6f}\n".encode()
            headers += [(b"content-type", b"text/plain"), (b"cache-control", b"private, max-age=60")]
        elif path == "/slow":
            ms = min(int(query.get("ms", ["1000"])[0] or 0), 60000)
            await asyncio.sleep(ms / 1000)
            payload = f"slept {ms} ms\n".encode()
            headers += [(b"content-type", b"text/plain")]
        elif path == "/stream":
            mb = max(0, min(int(query.get("mb", ["1"])[0] or 0), 4096))
            headers += [(b"content-type", b"application/octet-stream"), (b"content-length", str(mb * 1024**2).encode())]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
            if req.method != b"HEAD":
                for _ in range(mb * 16):
                    writer.write(conn.send(h11.Data(data=CHUNK)))
                    await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        elif path == "/headers":
            payload = json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers]).encode()
            headers += [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        elif path in ("/echo", "/sink"):
            payload = body
            headers += [(b"content-type", b"application/octet-stream")]
        elif path == "/healthz":
            payload = b"ok\n"
            headers += [(b"content-type", b"text/plain"), (b"cache-control", b"no-store")]
        else:
            status = 404
            payload = f"no such demo page: {path}\n".encode()
            headers += [(b"content-type", b"text/plain")]
        if payload is not None:
            headers.append((b"content-length", str(len(payload)).encode()))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if payload and req.method != b"HEAD":
            writer.write(conn.send(h11.Data(data=payload)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
