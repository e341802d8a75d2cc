"""HTTP/1.1 front end: client connections over TCP or TLS, handed to the pipeline.

This module owns everything specific to HTTP/1.1 framing: keep-alive, pipelining, timeouts (408),
limits (413, 431, 501), request-smuggling defences, 100-continue, Upgrade tunnels (only after the
origin's 101) and the rule that a connection whose request body was not fully read is never reused.

The connection state machine is h11's (`h11.Connection` or `h1fast.FastServerConnection`, which
parses with llhttp behind h11's interface). The socket side is an `asyncio.Protocol`, not streams:
a fresh cache hit is answered inside `data_received` without creating a task, and everything else
runs in one task per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h11

from ..config import LimitsSection
from ..metrics import Registry
from ..tick import TickFlusher
from .errors import reason
from .h1fast import FastServerConnection, data_event, prevalidated_response
from .handler import DirectExchange, RequestHandler
from .messages import (
    Body,
    BodyError,
    HTTPError,
    RequestHead,
    ResponseHead,
    ResponseSink,
    event_data,
    header_all,
)

log = logging.getLogger("edgeproxy.h1")

READ_CHUNK = 65536
# Unread request body the server will still read and discard to keep a connection alive (e.g.
# after a cache hit); anything larger closes the connection instead.
DRAIN_LIMIT = 256 * 1024
DRAIN_TIMEOUT = 2.0
TUNNEL_BUFFER = 256 * 1024
_EOM = h11.EndOfMessage()  # events are immutable: one serves every response
# Writes smaller than this are joined with the others of the same event-loop tick.
CORK_LIMIT = 16 * 1024


class Codec(Protocol):
    """The subset of `h11.Connection` (server role) this module drives."""

    @property
    def our_state(self) -> Any: ...

    @property
    def their_state(self) -> Any: ...

    @property
    def they_are_waiting_for_100_continue(self) -> bool: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Any: ...

    def send(self, event: Any) -> bytes | None: ...

    def start_next_cycle(self) -> None: ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]: ...


def codec_factory(parser: str) -> Callable[[int], Codec]:
    """`h11` (pure Python) or `httptools` (llhttp behind h11's interface, see h1fast)."""
    if parser == "h11":
        return lambda limit: h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    if parser == "httptools":
        from .h1fast import FastServerConnection

        return lambda limit: FastServerConnection(max_incomplete_event_size=limit)
    raise ValueError(f"unknown HTTP/1.1 parser {parser!r}")


class Tunnel(Protocol):
    """The origin side of an upgraded connection (origin.client.OriginTunnel)."""

    async def read(self, max_bytes: int = 65536) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class ConnectionObserver(Protocol):
    """Told about accepted client connections (TCP steering publishes the long-lived ones)."""

    def opened(self, local: Any, peer: Any) -> None: ...

    def closed(self, local: Any, peer: Any) -> None: ...


class _Close(Exception):
    """The connection ends here (peer went away, timeout, or a response that closes it)."""


class _H1Body:
    """Request body read on demand: the protocol stops reading the socket whenever a chunk arrives
    that nobody is waiting for, so reading is the backpressure."""

    def __init__(self, conn: H1Protocol, length: int | None, limit: int) -> None:
        self._conn = conn
        self._limit = limit
        self.length = length
        self.done = length == 0
        self.received = 0

    async def read(self) -> bytes:
        if self.done:
            return b""
        conn = self._conn
        codec = conn.codec
        if codec.they_are_waiting_for_100_continue and codec.our_state is h11.SEND_RESPONSE:
            await conn.send_raw(codec.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            try:
                event = codec.next_event()
            except h11.RemoteProtocolError as e:
                conn.must_close = True
                raise HTTPError(e.error_status_hint, _protocol_error_detail(e), close=True) from None
            if event is h11.NEED_DATA:
                await conn.wait_for_data(conn.limits.body_timeout, "request body")
                continue
            if isinstance(event, h11.Data):
                data = event_data(event)
                self.received += len(data)
                if self.received > self._limit:
                    conn.must_close = True
                    raise HTTPError(413, f"request body larger than {self._limit} bytes", close=True)
                return bytes(data)
            if isinstance(event, h11.EndOfMessage):
                self.done = True
                return b""
            conn.must_close = True
            raise BodyError("client closed the connection during the request body")


class _H1Sink:
    """Writes one response with h11 framing (Content-Length, chunked, or close-delimited for
    HTTP/1.0 clients) and waits for the socket when its buffer is full (backpressure)."""

    def __init__(self, conn: H1Protocol) -> None:
        self._conn = conn
        self._started = False
        self.ended = False

    @property
    def started(self) -> bool:
        return self._started

    async def start(self, head: ResponseHead) -> None:
        self._started = True
        await self._conn.send_raw(self._conn.response_bytes(head))

    async def write(self, data: bytes) -> None:
        if data:
            await self._conn.send_raw(self._conn.codec.send(data_event(data)))

    async def end(self) -> None:
        out = self._conn.codec.send(_EOM)
        self.ended = True
        await self._conn.send_raw(out)

    def abort(self) -> None:
        # Closing without the terminating chunk (or short of Content-Length) is how HTTP/1.1 tells
        # the client the response is incomplete.
        self._conn.must_close = True
        self._conn.abort()

    async def tunnel(self, origin: Tunnel) -> None:
        """After a 101 from the origin: relay raw bytes both ways until both sides have finished,
        each direction half-closed on its own (as TCP allows)."""
        conn = self._conn
        conn.must_close = True
        self.ended = True
        leftover, _ = conn.codec.trailing_data
        inbound = conn.start_tunnel()

        async def client_to_origin() -> None:
            if leftover:
                await origin.write(leftover)
            while data := await inbound.get():
                await origin.write(data)
            origin.write_eof()

        async def origin_to_client() -> None:
            while data := await origin.read(READ_CHUNK):
                await conn.send_raw(data)
            conn.write_eof()

        try:
            async with asyncio.timeout(conn.limits.idle_timeout * 60):
                await asyncio.gather(client_to_origin(), origin_to_client())
        except (TimeoutError, BodyError, _Close, ConnectionError, OSError):
            pass
        finally:
            origin.close()


class _TunnelInbound:
    """Client bytes after a 101, queued for the origin; reading pauses while the queue is full."""

    def __init__(self, conn: H1Protocol) -> None:
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > TUNNEL_BUFFER:
            self._conn.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes:
        while not self._chunks:
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= TUNNEL_BUFFER:
            self._conn.resume_reading()
        return data


class H1Protocol(asyncio.Protocol):
    def __init__(self, server: H1Server) -> None:
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.codec: Codec = server.new_codec(server.limits.max_header_bytes)
        # The same object, natively typed, when it is ours (see _whole_response).
        self._fast: FastServerConnection | None = (
            self.codec if isinstance(self.codec, FastServerConnection) else None
        )
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_addr: tuple[str, int] = ("", 0)
        self.must_close = False
        self.busy = False  # a request is being handled by a task
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.direct: DirectExchange | None = None  # a request answered in callbacks (no task)
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        # One deadline at a time (idle or request head), checked by the server's sweeper: cheaper
        # than a loop timer armed and cancelled twice per request.
        self.deadline = 0.0  # loop time; 0 = none
        self._on_deadline: Callable[[], None] | None = None
        self._waiting_for_head = False  # bytes of a request head are buffered, header_timeout runs
        self._tunnel: _TunnelInbound | None = None
        self._cork: list[bytes] = []
        self._corked = False  # a flush of _cork is scheduled for the end of this tick
        self._cork_size = 0
        self._observed: tuple[Any, Any] | None = None  # (local, peer) told to the observer

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= self.limits.max_connections or server.closing:
            server.conn_refused.inc(server.protocol)
            self.closed = True
            self.abort()
            return
        peer = transport.get_extra_info("peername")
        if peer and len(peer) >= 2:
            self.client_addr = (str(peer[0]), int(peer[1]))
        server.connections.add(self)
        server.conn_total.inc(server.protocol)
        server.conn_open.inc(server.protocol)
        self._arm(self.limits.idle_timeout, self._on_idle)
        observer = server.connection_observer
        if observer is not None:
            try:
                local = transport.get_extra_info("sockname")
                observer.opened(local, peer)
                self._observed = (local, peer)
            except Exception:  # an observer never breaks a connection
                log.exception("connection observer failed")

    def data_received(self, data: bytes) -> None:
        self.server.bytes_in.inc(amount=len(data))
        if self._tunnel is not None:
            self._tunnel.feed(data)
            return
        self.codec.receive_data(data)
        if self.busy:
            waiter = self._data_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            else:
                self.pause_reading()  # nobody reads yet: let TCP push back on the client
            return
        if not self._waiting_for_head:
            self._waiting_for_head = True
            self._arm(self.limits.header_timeout, self._on_header_timeout)
        self._process()

    def eof_received(self) -> bool:
        if self._tunnel is not None:
            self._tunnel.feed_eof()
            return True
        self.codec.receive_data(b"")
        if self.busy:
            waiter = self._data_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            self._process()
        return True  # keep the write side open: a half-closed client still gets its response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        for waiter in (self._data_waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._tunnel is not None:
            self._tunnel.feed_eof()
        server = self.server
        if self in server.connections:
            server.connections.discard(self)
            server.conn_open.dec(server.protocol)
        if self._observed is not None and server.connection_observer is not None:
            try:
                server.connection_observer.closed(*self._observed)
            except Exception:
                log.exception("connection observer failed")
            self._observed = None
        if self.task is not None and not self.task.done() and self._tunnel is None:
            self.task.cancel()  # the client is gone: stop the origin fetch it was waiting for
        direct = self.direct
        if direct is not None:
            self.direct = None
            direct.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- I/O helpers ------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self._corked:
                self._flush()
            self.transport.close()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            if self._corked:
                self._flush()
            self.transport.write_eof()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.bytes_out.inc(amount=len(data))
        if self._corked:
            self._flush()
        self.transport.write(data)

    def _queue(self, data: bytes) -> None:
        """Queues a small write to leave with the others of this event-loop tick: one send(2)
        per connection per tick, and the server sends every connection's at the end of the
        tick (`tick.TickFlusher`), back to back, so a client woken by the first need not
        be woken again for each of the others."""
        self._cork.append(data)
        self._cork_size += len(data)
        if self._cork_size >= CORK_LIMIT:
            self._flush()
        elif not self._corked:
            self._corked = True
            self.server.flusher.add(self)

    def flush_tick(self) -> None:
        if self._corked:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._cork)
        self._cork.clear()
        self._cork_size = 0
        self._corked = False
        if data and not self.closed and self.transport is not None:
            self.server.bytes_out.inc(amount=len(data))
            self.transport.write(data)

    async def send_raw(self, data: bytes | None) -> None:
        """Queues `data` for the socket. Writes made within one event-loop tick (a response's
        head, body and end, typically) leave in one send(2); large ones go at once."""
        if self.closed:
            raise _Close("client connection closed")
        if not data:
            return
        if len(data) >= CORK_LIMIT:
            self._write(data)
        else:
            self._queue(data)
        if self._write_paused:
            self._drain_waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(self.limits.send_timeout):
                    await self._drain_waiter
            except TimeoutError:
                self.abort()
                raise _Close("client stopped reading (send_timeout)") from None
            if self.closed:
                raise _Close("client connection closed")

    async def wait_for_data(self, timeout: float, what: str) -> None:
        if self.closed:
            raise BodyError(f"client closed the connection during the {what}")
        self._data_waiter = self.loop.create_future()
        self.resume_reading()
        try:
            async with asyncio.timeout(timeout):
                await self._data_waiter
        except TimeoutError:
            self.must_close = True
            raise HTTPError(408, f"client too slow sending the {what} ({timeout:g}s)", close=True) from None

    def start_tunnel(self) -> _TunnelInbound:
        self._tunnel = _TunnelInbound(self)
        self._cancel_timer()
        self.resume_reading()
        return self._tunnel

    def response_bytes(self, head: ResponseHead, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
        """The serialised head. `extra` fields are spliced in after the codec's serialisation, so
        a head shared between requests (`head.memo`) keeps one h11 event for all of them."""
        if self.server.draining and head.status != 101:
            self.must_close = True  # the PoP drains: this is the connection's last response
        if extra is not None and head.memo is not None and head.status != 101 and not self.must_close:
            event = head.memo.get("h11")
            if event is None:
                event = head.memo["h11"] = self._response_event(head)
            out = self.codec.send(event) or b""
            # Every serialised head ends with its blank line; the extra fields go just before it.
            return out[:-2] + b"".join(k + b": " + v + b"\r\n" for k, v in extra) + b"\r\n"
        if extra:
            head = ResponseHead(head.status, [*head.headers, *extra], head.reason)
        return self.codec.send(self._response_event(head)) or b""

    def _response_event(self, head: ResponseHead) -> Any:
        # `_parsed=True` skips h11's per-header regex validation (a third of a cache hit's cost):
        # every header here was validated when parsed from an origin response, or is the edge's
        # own. h11 is pinned (<0.17) for this keyword.
        headers = [(k, v) for k, v in head.headers if k not in (b"connection", b"transfer-encoding")]
        if head.status == 101:
            headers.append((b"connection", b"upgrade"))
            return h11.InformationalResponse(status_code=101, headers=headers, reason=head.reason or b"Switching Protocols", _parsed=True)
        if self.must_close:
            headers.append((b"connection", b"close"))
        return _response(head.status, headers, head.reason or reason(head.status))

    # -- timers -----------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self.deadline = self.loop.time() + delay
        self._on_deadline = callback

    def _cancel_timer(self) -> None:
        self.deadline = 0.0
        self._on_deadline = None

    def expire(self, now: float) -> None:
        """Called by the server's sweeper: fires the pending deadline if it has passed."""
        if self.deadline and now >= self.deadline and self._on_deadline is not None:
            callback = self._on_deadline
            self._cancel_timer()
            callback()

    def _on_idle(self) -> None:
        if not self.busy:
            self.close()  # an idle keep-alive connection just closes, without a 408

    def _on_header_timeout(self) -> None:
        if not self.busy and not self.closed:
            timeout = self.limits.header_timeout
            self._reject(HTTPError(408, f"client too slow sending the request headers ({timeout:g}s)", close=True), None, self.handler.new_request_id())

    # -- requests ---------------------------------------------------------------------------

    def _process(self) -> None:
        """Parses and answers requests until one needs a task, more bytes, or the end."""
        while not self.busy and not self.closed:
            request_id = ""
            try:
                event = self.codec.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.ConnectionClosed):
                    self.close()
                    return
                if not isinstance(event, h11.Request):
                    raise HTTPError(400, "unexpected data before a request", close=True)
                self._cancel_timer()
                self._waiting_for_head = False
                request_id = self.handler.new_request_id()
                head, length = self._request_head(event, request_id)
            except h11.RemoteProtocolError as pe:
                self._reject(HTTPError(pe.error_status_hint, _protocol_error_detail(pe), close=True), None, request_id or self.handler.new_request_id())
                return
            except HTTPError as e:
                self._reject(e, None, request_id or self.handler.new_request_id())
                return
            if length == 0:
                # A bodiless request's EndOfMessage is already parsed; take it so the codec's
                # request side is DONE.
                if not isinstance(self.codec.next_event(), h11.EndOfMessage):
                    self._reject(HTTPError(400, "malformed request framing", close=True), head, request_id)
                    return
                fast = self.handler.respond_fresh(head)
                if fast is not None:
                    self._queue(self._whole_response(fast.head, fast.body, fast.extra))
                    if not self._next_cycle():
                        return
                    continue
            self.busy = True
            if length == 0:
                self.direct = self.handler.forward_now(head, self)
                if self.direct is not None:
                    return
            self.task = self.loop.create_task(self._handle(head, length))
            return

    def _whole_response(self, head: ResponseHead, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
        """A whole response (head, body, end) as the codec writes it; one codec call when the
        codec is ours and the head is per request (`extra` goes with shared, memoized heads)."""
        fast = self._fast
        if fast is not None and extra is None and not self.must_close and not self.server.draining:
            # Lowercase names already (parsed, or the edge's own), as _response would make them.
            items = [(k, k, v) for k, v in head.headers]
            out = fast.send_whole(head.status, head.reason or reason(head.status), items, body)
            if out is not None:
                return out
        out = self.response_bytes(head, extra)
        if body:
            out += self.codec.send(data_event(body)) or b""
        return out + (self.codec.send(_EOM) or b"")

    # -- DirectClient: a response the handler answers from callbacks ---------------------------

    def direct_respond(self, head: ResponseHead, body: bytes) -> None:
        self.direct = None
        self.busy = False
        if self.closed:
            return
        self._queue(self._whole_response(head, body))
        self.resume_reading()
        if self._next_cycle():
            self._process()

    def direct_continue(self, head: RequestHead, run: Callable[[Body, ResponseSink], Awaitable[None]]) -> None:
        self.direct = None
        self.task = self.loop.create_task(self._handle(head, 0, run))

    def direct_abort(self) -> None:
        self.direct = None
        self.must_close = True
        self.abort()

    def _next_cycle(self) -> bool:
        """After a complete exchange: ready for the next request (True), or closing."""
        codec = self.codec
        if self.must_close or self.server.closing or codec.our_state is not h11.DONE or codec.their_state is not h11.DONE:
            self.close()  # HTTP/1.0, Connection: close, an error, or shutting down
            return False
        codec.start_next_cycle()
        if codec.trailing_data[0]:
            self._waiting_for_head = True
            self._arm(self.limits.header_timeout, self._on_header_timeout)
        else:
            self._waiting_for_head = False
            self._arm(self.limits.idle_timeout, self._on_idle)
        return True

    async def _handle(
        self, head: RequestHead, length: int | None, run: Callable[[Body, ResponseSink], Awaitable[None]] | None = None
    ) -> None:
        body = _H1Body(self, length, self.limits.max_body_bytes)
        sink = _H1Sink(self)
        try:
            await (self.handler.handle(head, body, sink) if run is None else run(body, sink))
            if self._tunnel is not None:
                self.close()
                return
            if not sink.ended or self.must_close or self.server.closing or self.closed:
                self.close()
                return
            if self.codec.their_state is h11.SEND_BODY and not await self._drain_body(body):
                self.close()
                return
        except _Close:
            self.close()
            return
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:
            log.exception("request %s: handler failed", head.request_id)
            if not sink.started:
                self._reject(HTTPError(500, "internal error", close=True), head, head.request_id)
            else:
                self.abort()
            return
        finally:
            self.busy = False
            self.task = None
        self.resume_reading()
        if self._next_cycle():
            self._process()

    async def _drain_body(self, body: _H1Body) -> bool:
        """Reads and discards what is left of the request body; False if the connection must close."""
        if self.codec.they_are_waiting_for_100_continue:
            return False
        if body.length is not None and body.length - body.received > DRAIN_LIMIT:
            return False
        try:
            drained = self._discard_buffered(0)
            if drained >= 0 and self.codec.their_state is h11.SEND_BODY:
                # The rest is still on its way (usually it is not: a bodiless request's end is
                # already buffered, and takes no timer).
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    while drained >= 0 and self.codec.their_state is h11.SEND_BODY:
                        await self.wait_for_data(DRAIN_TIMEOUT, "request body")
                        drained = self._discard_buffered(drained)
        except (TimeoutError, h11.RemoteProtocolError, HTTPError, BodyError):
            return False
        return drained >= 0 and self.codec.their_state is h11.DONE

    def _discard_buffered(self, drained: int) -> int:
        """Discards the request body received so far: the running total of discarded bytes, or
        -1 when the connection cannot be kept (more than DRAIN_LIMIT, or not a body)."""
        codec = self.codec
        while codec.their_state is h11.SEND_BODY:
            event = codec.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Data):
                drained += len(event_data(event))
                if drained > DRAIN_LIMIT:
                    return -1
            elif not isinstance(event, h11.EndOfMessage):
                return -1
        return drained

    def _request_head(self, req: h11.Request, request_id: str) -> tuple[RequestHead, int | None]:
        """Validates framing (the smuggling defences) and builds the protocol-neutral head."""
        headers = [(name, value) for _raw, name, value in req.headers._full_items]  # lowercase names (h11 private: see h1fast)
        # One pass over the fields for everything framing needs. h11 bounds only a head that
        # arrives in pieces; one that arrives whole is measured here.
        head_size = len(req.method) + len(req.target) + 12
        hosts: list[bytes] = []
        te = cl = False
        for k, v in headers:
            head_size += len(k) + len(v) + 4
            if k == b"host":
                hosts.append(v)
            elif k == b"content-length":
                cl = True
            elif k == b"transfer-encoding":
                te = True
        if head_size > self.limits.max_header_bytes:
            raise HTTPError(431, f"request head of {head_size} bytes is larger than {self.limits.max_header_bytes}", close=True)
        version = req.http_version.decode()
        if te and cl:
            raise HTTPError(400, "Content-Length together with Transfer-Encoding", close=True)
        if te and version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
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
            length = int(header_all(headers, b"content-length")[0])  # the codec checked it is valid and consistent
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

    def _reject(self, err: HTTPError, head: RequestHead | None, request_id: str) -> None:
        """Edge-generated error, serialised by hand (the codec may be in its ERROR state); the
        connection always closes after it, since the codec did not see this response."""
        self.must_close = True
        self._cancel_timer()
        if self.closed or self.transport is None:
            return
        if self.codec.our_state is not h11.SEND_RESPONSE and self.codec.our_state is not h11.IDLE:
            self.abort()
            return
        rhead, body = self.handler.reject(self.server.protocol, err.status, err.detail, head, self.client_addr, request_id)
        lines = [b"HTTP/1.1 %d %s\r\n" % (rhead.status, rhead.reason)]
        lines += [k + b": " + v + b"\r\n" for k, v in rhead.headers if k != b"connection"]
        lines.append(b"connection: close\r\n\r\n")
        if head is None or head.method != b"HEAD":
            lines.append(body)
        self._write(b"".join(lines))
        self.transport.close()


def _response(status: int, headers: list[tuple[bytes, bytes]], reason: bytes) -> Any:
    """`h11.Response(..., _parsed=True)`, built without running h11's constructor (a tenth of a
    proxied response's cost). What that constructor would still do here is done the same way:
    names lowercased (raw names kept), Transfer-Encoding left out by the caller. A head it would
    refuse or rewrite (a status out of range, a repeated or listed Content-Length) goes to h11."""
    items: list[tuple[bytes, bytes, bytes]] = []
    lengths = 0
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            lengths += 1 if value.isdigit() else 2  # h11 would trim or merge a listed value
        items.append((name, lower, value))
    if lengths > 1 or not 200 <= status < 1000:
        return h11.Response(status_code=status, headers=headers, reason=reason, _parsed=True)
    return prevalidated_response(items, status, reason)


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
        parser: str = "httptools",
        connection_observer: ConnectionObserver | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.scheme = scheme
        self.new_codec = codec_factory(parser)
        self.protocol = "https" if scheme == "https" else "http"
        self.connections: set[H1Protocol] = set()
        self.closing = False
        self.draining = False  # set by the PoP's drain: responses carry Connection: close
        # Told about every accepted connection: `opened(local, peer)` / `closed(local, peer)`.
        self.connection_observer: ConnectionObserver | None = connection_observer
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.flusher = TickFlusher()  # small writes of a tick leave together at its end
        # Deadline checks run this often: a tenth of the shortest timeout, within [10 ms, 1 s].
        self.sweep_interval = min(1.0, max(0.01, min(limits.header_timeout, limits.idle_timeout) / 10))
        self.conn_open = metrics.gauge("edgeproxy_connections_open", "Open client connections.", ["protocol"])
        self.conn_total = metrics.counter("edgeproxy_connections_total", "Client connections accepted.", ["protocol"])
        self.conn_refused = metrics.counter("edgeproxy_connections_refused_total", "Client connections closed at once (limits.max_connections).", ["protocol"])
        bytes_total = metrics.counter("edgeproxy_bytes_total", "Bytes from and to clients.", ["protocol", "direction"])
        # Bound once: these are bumped for every read and write.
        self.bytes_in = _Bound(bytes_total, (self.protocol, "in"))
        self.bytes_out = _Bound(bytes_total, (self.protocol, "out"))

    async def listen(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> asyncio.Server:
        """`reuse_port` lets the workers of one host share the port (the kernel spreads new
        connections over them)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: H1Protocol(self),
            host,
            port,
            ssl=ssl_context,
            backlog=backlog,
            ssl_handshake_timeout=self.limits.header_timeout if ssl_context else None,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return server

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            for conn in [c for c in self.connections if c.deadline and now >= c.deadline]:
                conn.expire(now)

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle keep-alive connections, let requests in flight finish for up
        to `grace` seconds, then cut what is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


class _Bound:
    """A counter with its labels fixed, for the hot path."""

    def __init__(self, counter: Any, labels: tuple[str, ...]) -> None:
        self._values = counter.values
        self._key = labels

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._key] = self._values.get(self._key, 0.0) + amount
