"""HTTP/1.1 front end: client connections over TCP or TLS, parsed with h11, handed to the pipeline.

This module owns everything specific to HTTP/1.1 framing: keep-alive, pipelining, timeouts (408),
limits (413, 431, 501), request-smuggling defences, 100-continue, Upgrade tunnels (only after the
origin's 101) and the rule that a connection whose request body was not fully read is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, Protocol

import h11

from ..config import LimitsSection
from ..metrics import Registry
from .errors import reason
from .handler import RequestHandler
from .messages import BodyError, HTTPError, RequestHead, ResponseHead, header_all

log = logging.getLogger("edgeproxy.h1")

READ_CHUNK = 65536
# Unread request body the server will still read and discard to keep a connection alive (e.g.
# after a cache hit); anything larger closes the connection instead.
DRAIN_LIMIT = 256 * 1024
DRAIN_TIMEOUT = 2.0


class Tunnel(Protocol):
    """The origin side of an upgraded connection (origin.client.OriginTunnel)."""

    async def read(self, max_bytes: int = ...) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class _Close(Exception):
    """The connection ends here (peer went away, timeout, or a response that closes it)."""


class _H1Body:
    """Request body read on demand from the connection: reading is the backpressure, because the
    StreamReader stops reading the socket while its buffer is full."""

    def __init__(self, conn: H1Connection, length: int | None, limit: int) -> None:
        self._conn = conn
        self._remaining_limit = limit
        self.length = length
        self.done = length == 0
        self.received = 0

    async def read(self) -> bytes:
        if self.done:
            return b""
        conn = self._conn
        if conn.h11.they_are_waiting_for_100_continue and conn.h11.our_state is h11.SEND_RESPONSE:
            await conn.send_raw(conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        event = await conn.next_event(conn.limits.body_timeout, "request body")
        if isinstance(event, h11.Data):
            self.received += len(event.data)
            if self.received > self._remaining_limit:
                conn.must_close = True
                raise HTTPError(413, f"request body larger than {self._remaining_limit} bytes", close=True)
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.done = True
            return b""
        raise HTTPError(400, "malformed request body", close=True)


class _H1Sink:
    """Writes one response onto the connection with h11 framing (Content-Length, chunked, or
    close-delimited for HTTP/1.0 clients) and awaits the socket between chunks (backpressure)."""

    def __init__(self, conn: H1Connection, head: RequestHead) -> None:
        self._conn = conn
        self._head = head
        self._started = False
        self.ended = False
        self.status = 0
        self.bytes_out = 0

    @property
    def started(self) -> bool:
        return self._started

    async def start(self, head: ResponseHead) -> None:
        conn = self._conn
        self._started = True
        self.status = head.status
        headers = [(k, v) for k, v in head.headers if k not in (b"connection", b"transfer-encoding")]
        if head.status == 101:
            headers += [(b"connection", b"upgrade")]
            data = conn.h11.send(h11.InformationalResponse(status_code=101, headers=headers, reason=head.reason or b"Switching Protocols"))
        else:
            if conn.must_close:
                headers.append((b"connection", b"close"))
            data = conn.h11.send(h11.Response(status_code=head.status, headers=headers, reason=head.reason or reason(head.status)))
        await conn.send_raw(data)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        out = self._conn.h11.send(h11.Data(data=data))
        self.bytes_out += len(data)
        await self._conn.send_raw(out)

    async def end(self) -> None:
        out = self._conn.h11.send(h11.EndOfMessage())
        self.ended = True
        await self._conn.send_raw(out)

    def abort(self) -> None:
        # Closing without the terminating chunk (or short of Content-Length) is how HTTP/1.1 tells
        # the client the response is incomplete.
        self._conn.must_close = True
        self._conn.writer.transport.abort()

    async def tunnel(self, origin: Tunnel) -> None:
        """After a 101 from the origin: relay raw bytes both ways until both sides have finished,
        each direction half-closed on its own (as TCP allows)."""
        conn = self._conn
        conn.must_close = True
        leftover, _ = conn.h11.trailing_data
        self.ended = True

        async def client_to_origin() -> None:
            if leftover:
                await origin.write(leftover)
            while data := await conn.reader.read(READ_CHUNK):
                await origin.write(data)
            origin.write_eof()

        async def origin_to_client() -> None:
            while data := await origin.read(READ_CHUNK):
                await conn.send_raw(data)
                await conn.writer.drain()
            if conn.writer.can_write_eof():
                conn.writer.write_eof()

        try:
            async with asyncio.timeout(conn.limits.idle_timeout * 60):
                await asyncio.gather(client_to_origin(), origin_to_client())
        except (TimeoutError, BodyError, _Close, ConnectionError, OSError):
            pass
        finally:
            origin.close()


class H1Connection:
    def __init__(
        self,
        server: H1Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        peer = writer.get_extra_info("peername") or ("", 0)
        self.client_addr: tuple[str, int] = (str(peer[0]), int(peer[1])) if len(peer) >= 2 else ("", 0)
        self.must_close = False
        self.busy = False

    async def send_raw(self, data: bytes) -> None:
        if not data:
            return
        self.writer.write(data)
        self.server.bytes_total.inc(self.server.protocol, "out", amount=len(data))
        if self.writer.transport.get_write_buffer_size() > 65536:
            try:
                async with asyncio.timeout(self.limits.send_timeout):
                    await self.writer.drain()
            except TimeoutError:
                self.writer.transport.abort()
                raise _Close("client stopped reading (send_timeout)") from None
            except (ConnectionError, OSError) as e:
                raise _Close(str(e)) from None

    async def _receive(self) -> None:
        try:
            data = await self.reader.read(READ_CHUNK)
        except (ConnectionError, OSError) as e:
            raise _Close(str(e)) from None
        self.server.bytes_total.inc(self.server.protocol, "in", amount=len(data))
        self.h11.receive_data(data)

    async def next_event(self, timeout: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self.h11.next_event()
                    if event is not h11.NEED_DATA:
                        return event
                    await self._receive()
        except TimeoutError:
            self.must_close = True
            raise HTTPError(408, f"client too slow sending the {what} ({timeout:g}s)", close=True) from None
        except h11.RemoteProtocolError as e:
            self.must_close = True
            raise HTTPError(e.error_status_hint, _protocol_error_detail(e), close=True) from None

    async def _read_request(self) -> h11.Request | None:
        """Waits up to idle_timeout for a request to begin, then header_timeout for all of it."""
        if not self.h11.trailing_data[0]:
            try:
                async with asyncio.timeout(self.limits.idle_timeout):
                    while True:
                        event = self.h11.next_event()
                        if event is not h11.NEED_DATA:
                            break
                        if self.h11.trailing_data[0] or self.h11.trailing_data[1]:
                            break
                        await self._receive()
            except TimeoutError:
                return None  # an idle keep-alive connection just closes
            except h11.RemoteProtocolError as e:
                raise HTTPError(e.error_status_hint, _protocol_error_detail(e), close=True) from None
            if event is not h11.NEED_DATA:
                return self._request_or_close(event)
        event = await self.next_event(self.limits.header_timeout, "request headers")
        return self._request_or_close(event)

    def _request_or_close(self, event: Any) -> h11.Request | None:
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise HTTPError(400, "unexpected data before a request", close=True)

    def _request_head(self, req: h11.Request, request_id: str) -> tuple[RequestHead, int | None]:
        """Validates framing (the smuggling defences) and builds the protocol-neutral head."""
        headers = list(req.headers)  # h11 gives lowercase names
        # h11 bounds only a head that arrives in pieces; one that arrives whole is measured here.
        head_size = len(req.method) + len(req.target) + 12 + sum(len(k) + len(v) + 4 for k, v in headers)
        if head_size > self.limits.max_header_bytes:
            raise HTTPError(431, f"request head of {head_size} bytes is larger than {self.limits.max_header_bytes}", close=True)
        version = req.http_version.decode()
        te = header_all(headers, b"transfer-encoding")
        cl = header_all(headers, b"content-length")
        if te and cl:
            raise HTTPError(400, "Content-Length together with Transfer-Encoding", close=True)
        if te and version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
        hosts = header_all(headers, b"host")
        if len(hosts) > 1:
            raise HTTPError(400, "more than one Host header", close=True)
        if req.method == b"CONNECT":
            raise HTTPError(405, "CONNECT is not supported: this is a reverse proxy", close=True)
        target = bytes(req.target)
        authority = hosts[0] if hosts else b""
        if not target.startswith(b"/"):
            if target == b"*" and req.method == b"OPTIONS":
                pass
            elif b"://" in target:  # absolute-form (RFC 9112 section 3.2.2): its authority wins
                rest = target.split(b"://", 1)[1]
                auth, slash, path = rest.partition(b"/")
                authority = auth
                target = b"/" + path if slash else b"/"
            else:
                raise HTTPError(400, "request target is not origin-form", close=True)
        length: int | None
        if cl:
            length = int(cl[0])  # h11 has checked it is a valid, consistent number
            if length > self.limits.max_body_bytes:
                raise HTTPError(413, f"request body of {length} bytes is larger than {self.limits.max_body_bytes}", close=True)
        elif te:
            length = None
        else:
            length = 0  # requests are never close-delimited (RFC 9112 section 6.3)
        head = RequestHead(
            method=bytes(req.method),
            target=target,
            headers=headers,
            scheme=self.server.scheme,
            authority=authority,
            http_version=version,
            client_addr=self.client_addr,
            request_id=request_id,
        )
        return head, length

    async def _send_error(self, err: HTTPError, head: RequestHead | None, request_id: str) -> None:
        """Edge-generated error, serialised by hand: h11 may already be in its ERROR state."""
        self.must_close = self.must_close or err.close
        rhead, body = self.handler.reject(self.server.protocol, err.status, err.detail, head, self.client_addr, request_id)
        if self.h11.our_state is not h11.SEND_RESPONSE and self.h11.our_state is not h11.IDLE:
            self.must_close = True
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (rhead.status, rhead.reason)]
        lines += [k + b": " + v + b"\r\n" for k, v in rhead.headers if k != b"connection"]
        lines.append(b"connection: close\r\n" if self.must_close else b"")
        payload = b"".join(lines) + b"\r\n" + (b"" if head is not None and head.method == b"HEAD" else body)
        self.must_close = True  # h11 did not see this response, so its state cannot continue
        with contextlib.suppress(_Close):
            await self.send_raw(payload)

    async def _drain_body(self, body: _H1Body) -> bool:
        """Reads and discards what is left of the request body; False if the connection must close."""
        if self.h11.they_are_waiting_for_100_continue or (body.length is not None and body.length - body.received > DRAIN_LIMIT):
            return False
        drained = 0
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while self.h11.their_state is h11.SEND_BODY:
                    event = self.h11.next_event()
                    if event is h11.NEED_DATA:
                        await self._receive()
                    elif isinstance(event, h11.Data):
                        drained += len(event.data)
                        if drained > DRAIN_LIMIT:
                            return False
                    elif not isinstance(event, h11.EndOfMessage):
                        return False
        except (TimeoutError, h11.RemoteProtocolError, _Close):
            return False
        return self.h11.their_state is h11.DONE

    async def run(self) -> None:
        try:
            while not self.must_close:
                request_id = self.handler.new_request_id()
                head: RequestHead | None = None
                try:
                    req = await self._read_request()
                    if req is None:
                        return
                    self.busy = True
                    head, length = self._request_head(req, request_id)
                except HTTPError as err:
                    await self._send_error(err, head, request_id)
                    return
                body = _H1Body(self, length, self.limits.max_body_bytes)
                sink = _H1Sink(self, head)
                try:
                    await self.handler.handle(head, body, sink)
                except _Close:
                    return
                except Exception:
                    log.exception("request %s: handler failed", request_id)
                    if not sink.started:
                        await self._send_error(HTTPError(500, "internal error", close=True), head, request_id)
                    return
                self.busy = False
                if not sink.ended or self.must_close or self.server.closing:
                    return
                if self.h11.their_state is h11.SEND_BODY and not await self._drain_body(body):
                    return
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return  # HTTP/1.0, Connection: close, or an error state
                self.h11.start_next_cycle()
        except _Close:
            return
        finally:
            self.writer.close()


def _protocol_error_detail(e: h11.RemoteProtocolError) -> str:
    status = e.error_status_hint
    if status == 431:
        return "request headers too large"
    if status == 501:
        return f"unsupported transfer-coding ({e})"
    return f"malformed request: {e}"


class H1Server:
    """HTTP/1.1 listener(s) of one PoP worker: plain TCP or TLS, same pipeline."""

    def __init__(
        self,
        handler: RequestHandler,
        limits: LimitsSection,
        metrics: Registry,
        *,
        scheme: str = "http",
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.scheme = scheme
        self.protocol = "https" if scheme == "https" else "http"
        self.connections: set[H1Connection] = set()
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.conn_open = metrics.gauge("edgeproxy_connections_open", "Open client connections.", ["protocol"])
        self.conn_total = metrics.counter("edgeproxy_connections_total", "Client connections accepted.", ["protocol"])
        self.conn_refused = metrics.counter("edgeproxy_connections_refused_total", "Client connections closed at once (limits.max_connections).", ["protocol"])
        self.bytes_total = metrics.counter("edgeproxy_bytes_total", "Bytes from and to clients.", ["protocol", "direction"])

    async def listen(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, backlog: int = 1024
    ) -> asyncio.Server:
        server = await asyncio.start_server(
            self._accept,
            host,
            port,
            ssl=ssl_context,
            backlog=backlog,
            limit=READ_CHUNK * 2,
            ssl_handshake_timeout=self.limits.header_timeout if ssl_context else None,
            reuse_address=True,
        )
        self._servers.append(server)
        return server

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.limits.max_connections or self.closing:
            self.conn_refused.inc(self.protocol)
            writer.transport.abort()
            return
        conn = H1Connection(self, reader, writer)
        self.connections.add(conn)
        self.conn_total.inc(self.protocol)
        self.conn_open.inc(self.protocol)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            self.conn_open.dec(self.protocol)
            if task is not None:
                self._tasks.discard(task)

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish for up
        to `grace` seconds, then cut what is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.writer.transport.abort()
        deadline = asyncio.get_running_loop().time() + grace
        while self._tasks and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
