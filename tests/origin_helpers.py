"""A scriptable HTTP/1.1 origin server on 127.0.0.1 for the origin backhaul tests.

Hand-written on asyncio streams rather than built on h11, so the tests do not check the client
against the very parser it uses, and so a test can send exactly the (broken) bytes it wants.

Routes of the default handler (any method; request bodies are read unless noted):
  /health         status `server.health_status`
  /status/NNN     that status
  /delay/SECS     wait, then 200
  /chunked        chunked response "a", "bb", "ccc"
  /trickle/N/SECS chunked response of N pieces b"piece<i>", one every SECS seconds
  /http10         HTTP/1.0 close-delimited response, then close
  /connclose      200 with Connection: close, then close
  /close          read the request, close without answering
  /stall          Content-Length 10, send 5 bytes, then hang
  /cut            Content-Length 10, send 5 bytes, then close
  /big/N          N bytes of body, written with backpressure (progress in `sent_bytes`)
  /sink           stream the body in (after `sink_delay`), answer "<count> <sha256>"
  /echo           answer with the request body
  /continue       "100 Continue", then 200
  /early          answer 413 without reading the body, then hang around unread
  /ack-first      answer 200 at once, then read the body (kept in `requests[i].body`)
  /garbage        a line that is not HTTP
  /upgrade        101, b"hello-from-origin" right behind the head, then echo raw bytes
  anything else   200 "hello <path>" (no body for HEAD)
`drop_reused`: close without answering any request that arrives on a connection that already
served one (the stale keep-alive race, made deterministic).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    conn_id: int
    conn_request_no: int  # 0 for the first request on its connection
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


Handler = Callable[
    ["OriginServer", Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]
]


def response(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    reason: str = "X",
    head_only: bool = False,
) -> bytes:
    hs = list(headers or [])
    if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hs):
        hs.append(("Content-Length", str(len(body))))
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in hs]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return out if head_only else out + body


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, list[tuple[str, str]]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append((k.strip().lower(), v.strip()))
    return method, target, headers


async def body_chunks(req: Request, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The request body as it arrives (Content-Length or chunked)."""
    te = req.header("transfer-encoding")
    if te is not None and "chunked" in te.lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return
            remaining = size
            while remaining:
                data = await reader.read(min(remaining, 65536))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                yield data
            await reader.readexactly(2)
        return
    remaining = int(req.header("content-length") or "0")
    while remaining:
        data = await reader.read(min(remaining, 65536))
        if not data:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(data)
        yield data


async def read_body(req: Request, reader: asyncio.StreamReader) -> bytes:
    return b"".join([c async for c in body_chunks(req, reader)])


class OriginServer:
    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler or default_handler
        self.requests: list[Request] = []
        self.connections = 0
        self.open_connections = 0
        self.max_open_connections = 0
        self.health_status = 200
        self.drop_reused = False
        self.sink_delay = 0.0
        self.sent_bytes = 0
        self.conn_closed = asyncio.Event()  # set whenever a connection ends
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> OriginServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close_connections(self) -> None:
        """Hang up every open connection (as an origin's own keep-alive timeout would)."""
        for w in list(self._writers):
            w.close()

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn_id = self.connections
        self.connections += 1
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        try:
            n = 0
            while True:
                parsed = await read_head(reader)
                if parsed is None:
                    break
                method, target, headers = parsed
                req = Request(method, target, headers, conn_id, n)
                self.requests.append(req)
                if self.drop_reused and n > 0:
                    break
                n += 1
                if not await self.handler(self, req, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels these; ending normally keeps asyncio 3.11's start_server
            # done-callback (which calls task.exception()) from logging a spurious error.
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            self.conn_closed.set()


async def default_handler(
    srv: OriginServer, req: Request, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    path = req.path
    parts = path.strip("/").split("/")
    if path in ("/early", "/upgrade", "/ack-first"):
        pass  # these read (or not) the body themselves
    elif path == "/sink":
        await asyncio.sleep(srv.sink_delay)
        h = hashlib.sha256()
        count = 0
        async for chunk in body_chunks(req, reader):
            h.update(chunk)
            count += len(chunk)
        w.write(response(200, f"{count} {h.hexdigest()}".encode()))
        await w.drain()
        return True
    else:
        req.body = await read_body(req, reader)
    if path == "/health":
        w.write(response(srv.health_status, b"health"))
    elif parts[0] == "status":
        code = int(parts[1])
        if code in (204, 304):  # no body, no framing headers
            w.write(f"HTTP/1.1 {code} X\r\n\r\n".encode())
        else:
            w.write(response(code, f"status {code}".encode()))
    elif parts[0] == "delay":
        await asyncio.sleep(float(parts[1]))
        w.write(response(200, b"delayed"))
    elif path == "/chunked":
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"a", b"bb", b"ccc"):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
            await asyncio.sleep(0.01)
        w.write(b"0\r\n\r\n")
    elif parts[0] == "trickle":
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(int(parts[1])):
            await w.drain()
            await asyncio.sleep(float(parts[2]))
            piece = b"piece%d" % i
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        w.write(b"0\r\n\r\n")
    elif path == "/http10":
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body")
        await w.drain()
        return False
    elif path == "/connclose":
        w.write(response(200, b"bye", [("Connection", "close")]))
        await w.drain()
        return False
    elif path == "/close":
        return False
    elif path in ("/stall", "/cut"):
        w.write(response(200, b"12345", [("Content-Length", "10")]))
        await w.drain()
        if path == "/cut":
            return False
        await asyncio.sleep(3600)
    elif parts[0] == "big":
        total = int(parts[1])
        w.write(response(200, head_only=True, headers=[("Content-Length", str(total))]))
        block = b"x" * 65536
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            w.write(block[:n])
            sent += n
            srv.sent_bytes = sent
            await w.drain()
    elif path == "/echo":
        w.write(response(200, req.body))
    elif path == "/continue":
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(response(200, b"after continue"))
    elif path == "/early":
        w.write(response(413, b"too large", [("Connection", "close")]))
        await w.drain()
        await asyncio.sleep(5)  # keep not reading (the test is over long before)
        return False
    elif path == "/ack-first":
        w.write(response(200, b"accepted"))
        await w.drain()
        req.body = await read_body(req, reader)
    elif path == "/garbage":
        w.write(b"SPDY/9 banana\r\n\r\n")
        await w.drain()
        return False
    elif path == "/upgrade":
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"
            b"hello-from-origin"
        )
        await w.drain()
        while data := await reader.read(65536):
            w.write(data)
            await w.drain()
        return False
    else:
        w.write(response(200, f"hello {path}".encode(), head_only=req.method == "HEAD"))
    await w.drain()
    return True


def unused_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound then released: connecting gets refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def origin_servers(
    n: int = 1, handler: Handler | None = None
) -> AsyncIterator[list[OriginServer]]:
    servers = [await OriginServer(handler).start() for _ in range(n)]
    try:
        yield servers
    finally:
        for s in servers:
            await s.close()


async def eventually(cond: Callable[[], bool], timeout: float = 2.0, step: float = 0.01) -> None:
    """Wait until `cond()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


@dataclass
class StreamBody:
    """A streamed (non-replayable) body: `chunks` of `size` bytes, optional pause per chunk."""

    chunks: int
    size: int = 65536
    pause: float = 0.0
    length: int | None = None
    fill: bytes = b"y"
    sent: int = 0
    reads: int = 0
    on_read: Callable[[], None] | None = None
    _block: bytes = field(default=b"", repr=False)

    async def read(self) -> bytes:
        self.reads += 1
        if self.on_read is not None:
            self.on_read()
        if self.sent >= self.chunks * self.size:
            return b""
        if self.pause:
            await asyncio.sleep(self.pause)
        if not self._block:
            self._block = self.fill * self.size
        self.sent += self.size
        return self._block


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
