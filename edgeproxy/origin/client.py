"""One persistent HTTP/1.1 client connection to an origin server, and the response it yields.

h11 is the client state machine (the sans-IO core); this module is the asyncio shell around it:
an `asyncio.Protocol` that buffers received bytes with a bound (pausing the socket beyond it) and
exposes write backpressure, plus `OriginConnection`, which moves events between the two. All h11
calls go through `_encode`, `_feed` and `_next_event` so a faster parser can replace it later
without touching the I/O logic.

Requests are half-duplex: `request` returns once the whole request body is sent and the response
head has arrived. An origin that answers early with an error (or `Connection: close`) stops the
upload; one that answers early with success still gets the rest of the body before the response
is handed on, so full-duplex streaming is bounded by socket buffers.

Ownership: `OriginConnection.request` returns an `OriginResponse`; from then on the response owns
the connection until `release()`, `close()` or `detach()`, each of which hands the connection
back through the `on_done` callback (the pool decides from `conn.reusable` / `conn.detached`
whether to keep, drop or forget it). If `request` raises, it has already closed the connection
and called `on_done`.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable
from typing import Any, cast

import h11

from edgeproxy.http.messages import (
    Body,
    BodyError,
    HTTPError,
    RequestHead,
    ResponseHead,
    header_get,
    header_list,
)

MAX_HEAD_BYTES = 64 * 1024
"""Largest response head accepted (h11's default of 16 KiB is too small for cookie-heavy origins)."""

RECV_HIGH_WATER = 256 * 1024
"""Received-but-unread bytes at which the socket stops being read: the memory bound per connection."""
RECV_LOW_WATER = 64 * 1024

RELEASE_DISCARD_LIMIT = 64 * 1024
"""On release, body bytes already buffered up to this much are skipped to keep the connection."""

# Methods whose requests carry content by definition: they get `Content-Length: 0` for an empty
# body (RFC 9110 section 8.6), others none.
_CONTENT_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

# Framing is ours to decide from `body_length`; `expect` is dropped because the body is sent at
# once anyway and a 100 Continue from the origin would only be skipped.
_DROPPED_REQUEST_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})


class OriginError(Exception):
    """Talking to an origin failed."""


class OriginConnectError(OriginError):
    """No connection: refused, unreachable, connect timeout, or the pool stayed exhausted."""


class OriginPoolExhausted(OriginConnectError):
    """Every connection to the server stayed busy for connect_timeout: our limit, not the origin's
    fault, so it does not count towards passive ejection."""


class OriginTimeout(OriginError):
    """The origin did not answer in time (first byte) or stopped reading the request body."""


class OriginProtocolError(OriginError):
    """The origin sent something that is not a valid HTTP/1.1 response."""


class OriginResetBeforeResponse(OriginError):
    """The connection closed before any response byte: typically a keep-alive connection the
    origin had closed while it sat idle (`reused` tells whether it had served a request before)."""

    def __init__(self, message: str, *, reused: bool = False) -> None:
        super().__init__(message)
        self.reused = reused


class _OriginProtocol(asyncio.Protocol):
    """Socket-side buffering: bounded receive queue, write flow control, wakeups."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.bytes_received = 0
        self.eof = False
        self.lost = False
        self.write_paused = False
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_event: Callable[[], None] | None = None
        """Called on data, EOF or loss; the pool uses it to notice idle connections going bad."""

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self.bytes_received += len(data)
        if self.buffered >= RECV_HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        # Keep the transport open: a tunnel may still write after the origin's half-close; the
        # HTTP path closes the connection itself once it has seen the EOF.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = True
        self.write_paused = False
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def _wake(self) -> None:
        # Data also wakes a writer: the HTTP sender watches for an early response while blocked.
        for w in (self._read_waiter, self._write_waiter):
            if w is not None and not w.done():
                w.set_result(None)
        if self.on_event is not None:
            self.on_event()

    # consumer side

    @property
    def readable(self) -> bool:
        return bool(self._chunks) or self.eof

    def take(self, max_bytes: int = 0) -> bytes | None:
        """Next buffered chunk (at most `max_bytes` if > 0); b"" at EOF; None if nothing yet."""
        if not self._chunks:
            return b"" if self.eof else None
        chunk = self._chunks.popleft()
        if 0 < max_bytes < len(chunk):
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        if self._reading_paused and self.buffered <= RECV_LOW_WATER and self.transport:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return chunk

    async def wait_readable(self) -> None:
        if self.readable:
            return
        fut = asyncio.get_running_loop().create_future()
        self._read_waiter = fut
        try:
            await fut
        finally:
            self._read_waiter = None

    async def wait_event_while_paused(self) -> None:
        """Return on the next wakeup (writable again, data, EOF, loss) if writing is paused."""
        if not self.write_paused or self.lost:
            return
        fut = asyncio.get_running_loop().create_future()
        self._write_waiter = fut
        try:
            await fut
        finally:
            self._write_waiter = None

    def write(self, data: bytes) -> bool:
        """Queue bytes; False if the transport is gone (the caller then looks for EOF)."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return False
        t.write(data)
        return True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class OriginConnection:
    """A persistent HTTP/1.1 connection to one origin server; one request at a time."""

    def __init__(self, protocol: _OriginProtocol, server: str) -> None:
        self.server = server
        self._proto = protocol
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        loop = asyncio.get_running_loop()
        self.created_at = loop.time()
        self.idle_since = self.created_at
        """Set by the pool when the connection is parked idle."""
        self.requests_completed = 0
        self.detached = False
        self._busy = False
        self._closed = False
        self._eof_fed = False
        self._rx_mark = 0
        self._in_head_phase = False
        self._reused = False
        self._early_head: h11.Response | h11.InformationalResponse | None = None

    @classmethod
    async def connect(
        cls, host: str, port: int, *, timeout: float, server: str | None = None
    ) -> OriginConnection:
        label = server or f"{host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(_OriginProtocol, host, port)
        except TimeoutError:
            raise OriginConnectError(f"connect to {label} timed out after {timeout:g}s") from None
        except OSError as e:
            # asyncio replaces strerror with "Connect call failed (addr)"; the errno text is clearer.
            why = os.strerror(e.errno) if e.errno else str(e)
            raise OriginConnectError(f"connect to {label} failed: {why}") from None
        return cls(proto, label)

    # -- parser seam: everything h11-specific on the wire path goes through these three ----------

    def _encode(self, event: Any) -> bytes:
        return self._h11.send(event) or b""

    def _feed(self, data: bytes) -> None:
        self._h11.receive_data(data)

    def _next_event(self) -> Any:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as e:
            if self._in_head_phase:
                if self._proto.bytes_received == self._rx_mark:
                    raise self._reset_error() from None
                raise OriginProtocolError(f"bad response from {self.server}: {e}") from None
            raise BodyError(f"broken response body from {self.server}: {e}") from None

    # -- state ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._proto.lost

    @property
    def reusable(self) -> bool:
        """Idle, in a clean state, and nothing unexpected arrived from the origin."""
        t = self._proto.transport
        return (
            not self._busy
            and not self.closed
            and not self.detached
            and t is not None
            and not t.is_closing()
            and not self._proto.readable
            and self._h11.our_state is h11.IDLE
            and self._h11.their_state is h11.IDLE
            and not self._h11.trailing_data[0]
        )

    @property
    def buffered_bytes(self) -> int:
        """Received bytes waiting to be read (bounded by RECV_HIGH_WATER plus one socket read)."""
        return self._proto.buffered

    @property
    def write_buffer_size(self) -> int:
        t = self._proto.transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    def set_idle_watch(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` when the origin sends data, EOF or drops the connection."""
        self._proto.on_event = callback

    def close(self) -> None:
        self._closed = True
        self._proto.on_event = None
        self._proto.close()

    async def wait_closed(self) -> None:
        await self._proto.closed

    def __repr__(self) -> str:
        return f"<OriginConnection {self.server} served={self.requests_completed} closed={self.closed}>"

    # -- request / response --------------------------------------------------------------------

    async def request(
        self,
        head: RequestHead,
        body: Body,
        body_length: int | None,
        *,
        first_byte_timeout: float,
        read_timeout: float,
        on_done: Callable[[OriginConnection], None] | None = None,
    ) -> OriginResponse:
        """Send a request and wait for the response head.

        `head.headers` must already be free of hop-by-hop headers and Host; `Host` is sent first
        from `head.authority` (the server address if empty). Framing follows `body_length`: 0 = no
        body (not read at all), N = Content-Length N, None = chunked. Exceptions raised by
        `body.read()` (the client's upload broke) propagate unchanged.

        `read_timeout` also bounds how long the origin may stop reading the request body
        (-> OriginTimeout). On any exception the connection is closed and `on_done` called.
        """
        if self._busy or self.closed or self.detached:
            raise RuntimeError(f"{self!r} is not free for a request")
        self._busy = True
        self._reused = self.requests_completed > 0
        done = on_done or _noop
        try:
            await self._send(head, body, body_length, read_timeout)
            response_head = await self._receive_head(first_byte_timeout)
        except BaseException:
            self._busy = False
            self.close()
            done(self)
            raise
        return OriginResponse(
            self, response_head, read_timeout=read_timeout, on_done=done, method=head.method
        )

    def _reset_error(self) -> OriginResetBeforeResponse:
        why = " (reused keep-alive connection)" if self._reused else ""
        return OriginResetBeforeResponse(
            f"{self.server} closed the connection before responding{why}", reused=self._reused
        )

    async def _send(
        self, head: RequestHead, body: Body, body_length: int | None, stall_timeout: float
    ) -> None:
        headers = [(b"host", head.authority or self.server.encode())]
        headers += [(k, v) for k, v in head.headers if k.lower() not in _DROPPED_REQUEST_HEADERS]
        if body_length is None:
            headers.append((b"transfer-encoding", b"chunked"))
        elif body_length > 0 or head.method in _CONTENT_METHODS:
            headers.append((b"content-length", str(body_length).encode()))
        self._rx_mark = self._proto.bytes_received
        self._in_head_phase = True
        self._early_head = None
        try:
            data = self._encode(
                h11.Request(method=head.method, target=head.target, headers=headers)
            )
        except h11.LocalProtocolError as e:
            raise HTTPError(400, f"request cannot be forwarded: {e}") from None
        if not self._proto.write(data):
            raise self._reset_error()
        if body_length == 0:
            self._proto.write(self._encode(h11.EndOfMessage()))
            return
        sent = 0
        while True:
            if not await self._wait_writable(stall_timeout):
                return  # the origin answered (or hung up) before taking the whole body
            chunk = await body.read()
            if not chunk:
                break
            if body_length is not None and sent + len(chunk) > body_length:
                raise BodyError(f"request body longer than its declared length {body_length}")
            sent += len(chunk)
            self._proto.write(self._encode(h11.Data(data=chunk)))
        if body_length is not None and sent != body_length:
            raise BodyError(f"request body ended after {sent} of {body_length} bytes")
        self._proto.write(self._encode(h11.EndOfMessage()))

    async def _wait_writable(self, stall_timeout: float) -> bool:
        """Wait until the transport takes more; False if the origin refused the body or went away.

        An origin may answer with an error before reading the whole body (413, 401, ...) and stop
        reading; watching for that keeps us from sending into a socket nobody drains
        (RFC 9112 section 9.5). An early non-error response is kept and the body still sent.
        """
        try:
            async with asyncio.timeout(stall_timeout):
                while True:
                    if (
                        self._early_head is None
                        and self._proto.readable
                        and self._check_early_response()
                    ):
                        return False
                    if self._proto.lost:
                        return False
                    if not self._proto.write_paused:
                        return True
                    await self._proto.wait_event_while_paused()
        except TimeoutError:
            raise OriginTimeout(
                f"{self.server} stopped reading the request body for {stall_timeout:g}s"
            ) from None

    def _check_early_response(self) -> bool:
        """Parse what arrived while sending; True if sending the body should stop: an error
        response or one closing the connection has arrived, or the origin hung up."""
        while True:
            ev = self._pump_nowait()
            if ev is h11.NEED_DATA:
                return self._proto.eof
            if isinstance(ev, h11.InformationalResponse) and ev.status_code != 101:
                continue
            if isinstance(ev, h11.Response | h11.InformationalResponse):
                self._early_head = ev
                closing = any(v.lower() == b"close" for v in header_list(ev.headers, b"connection"))
                return ev.status_code >= 400 or closing
            raise OriginProtocolError(f"unexpected {type(ev).__name__} from {self.server}")

    def _pump_nowait(self) -> Any:
        """Next h11 event using only bytes already received; NEED_DATA if more are needed."""
        while True:
            ev = self._next_event()
            if ev is not h11.NEED_DATA:
                return ev
            chunk = self._proto.take()
            if chunk is None or (not chunk and self._eof_fed):
                return h11.NEED_DATA
            if not chunk:
                if self._in_head_phase and self._proto.bytes_received == self._rx_mark:
                    raise self._reset_error()
                self._eof_fed = True
            self._feed(chunk)

    async def _receive_head(self, timeout: float) -> ResponseHead:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._early_head is not None:
                        ev: Any = self._early_head
                        self._early_head = None
                    else:
                        ev = self._pump_nowait()
                    if ev is h11.NEED_DATA:
                        if self._eof_fed:
                            raise OriginProtocolError(
                                f"{self.server} closed the connection mid-head"
                            )
                        await self._proto.wait_readable()
                        continue
                    if isinstance(ev, h11.InformationalResponse):
                        if ev.status_code != 101:
                            continue  # 100 Continue, 102, 103: nothing the client needs from us
                    elif not isinstance(ev, h11.Response):
                        raise OriginProtocolError(
                            f"unexpected {type(ev).__name__} from {self.server}"
                        )
                    self._in_head_phase = False
                    return ResponseHead(ev.status_code, list(ev.headers), bytes(ev.reason))
        except TimeoutError:
            raise OriginTimeout(
                f"{self.server} sent no response head within {timeout:g}s"
            ) from None

    async def _receive_body(self, timeout: float) -> bytes | None:
        """Next body chunk, or None at the end of the message."""
        while True:
            ev = self._pump_nowait()
            if ev is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        await self._proto.wait_readable()
                except TimeoutError:
                    raise BodyError(
                        f"{self.server} stalled for more than {timeout:g}s within the response body"
                    ) from None
                continue
            if isinstance(ev, h11.Data):
                if ev.data:
                    return bytes(ev.data)
                continue
            if isinstance(ev, h11.EndOfMessage):
                self._finish_cycle()
                return None
            raise BodyError(f"unexpected {type(ev).__name__} in response body from {self.server}")

    def _receive_body_nowait(self, limit: int) -> bool:
        """Consume what is already buffered; True if that reached the end of the message."""
        skipped = 0
        while skipped <= limit:
            ev = self._pump_nowait()
            if isinstance(ev, h11.Data):
                skipped += len(ev.data)
                continue
            if isinstance(ev, h11.EndOfMessage):
                self._finish_cycle()
                return True
            return False
        return False

    def _finish_cycle(self) -> None:
        self._busy = False
        self.requests_completed += 1
        if (
            self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            and not self.closed
        ):
            self._h11.start_next_cycle()

    def _detach_leftover(self) -> bytes:
        self.detached = True
        self._busy = False
        self._proto.on_event = None
        return self._h11.trailing_data[0]

    @property
    def switched(self) -> bool:
        return self._h11.their_state is h11.SWITCHED_PROTOCOL


def _noop(_conn: OriginConnection) -> None:
    pass


def _response_length(method: bytes, head: ResponseHead) -> int | None:
    """Body length the head announces (RFC 9112 section 6.3), None when delimited otherwise."""
    if method == b"HEAD" or head.status < 200 or head.status in (204, 304):
        return 0
    if header_get(head.headers, b"transfer-encoding") is not None:
        return None
    value = header_get(head.headers, b"content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


class OriginResponse:
    """A response whose head has arrived; owns its connection until released.

    `read()` streams the body (b"" at the end, BodyError if the origin breaks it off or stalls
    longer than read_timeout). Finish with exactly one of: `release()` (keeps the connection when
    the body was read to the end and the connection is reusable, closes it otherwise), `close()`
    (always closes), or, for a 101, `detach()`. `async with response:` releases on exit. All
    three are idempotent and safe after errors.
    """

    def __init__(
        self,
        conn: OriginConnection,
        head: ResponseHead,
        *,
        read_timeout: float,
        on_done: Callable[[OriginConnection], None],
        method: bytes = b"GET",
    ) -> None:
        self.head = head
        self.server = conn.server
        self.length = _response_length(method, head)
        """Body size when known from the head (so a response is also a `Body`), else None."""
        self._conn = conn
        self._read_timeout = read_timeout
        self._on_done = on_done
        self._complete = False
        self._finished = False

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def complete(self) -> bool:
        """The whole body has been read."""
        return self._complete

    @property
    def connection(self) -> OriginConnection:
        return self._conn

    async def read(self) -> bytes:
        if self._complete:
            return b""
        if self._finished:
            raise BodyError(f"response from {self.server} was already closed")
        if self.head.status == 101:
            raise BodyError("a 101 response has no body; use detach()")
        try:
            chunk = await self._conn._receive_body(self._read_timeout)
        except BaseException:
            # Cancellation included: a half-read body leaves the connection unusable.
            self.close()
            raise
        if chunk is None:
            self._complete = True
            return b""
        return chunk

    def release(self) -> None:
        if self._finished:
            return
        if not self._complete and self.head.status != 101:
            try:
                self._complete = self._conn._receive_body_nowait(RELEASE_DISCARD_LIMIT)
            except (BodyError, OriginError):
                self._complete = False
        if not (self._complete and self._conn.reusable):
            self._conn.close()
        self._done()

    def close(self) -> None:
        if self._finished:
            return
        self._conn.close()
        self._done()

    def detach(self) -> OriginTunnel:
        """Take the raw byte stream after a 101 Switching Protocols; the tunnel owns the socket.

        The connection leaves its pool (it no longer counts against max_connections); close the
        tunnel when done.
        """
        if self.head.status != 101 or not self._conn.switched:
            raise RuntimeError(f"detach() needs a 101 response, got {self.head.status}")
        if self._finished:
            raise RuntimeError("response already released")
        leftover = self._conn._detach_leftover()
        tunnel = OriginTunnel(self._conn._proto, leftover, self.server)
        self._done()
        return tunnel

    def _done(self) -> None:
        self._finished = True
        self._on_done(self._conn)

    async def __aenter__(self) -> OriginResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class OriginTunnel:
    """Raw bytes to and from the origin after a 101: the front end splices it to the client.

    `read` returns b"" once the origin has finished sending; `write` waits for the transport to
    drain and raises BodyError if the origin is gone. No timeouts here: the caller applies its own
    idle timeout to the whole tunnel.
    """

    def __init__(self, protocol: _OriginProtocol, leftover: bytes, server: str) -> None:
        self.server = server
        self._proto = protocol
        self._leftover = leftover
        protocol.on_event = None

    async def read(self, max_bytes: int = 65536) -> bytes:
        if self._leftover:
            out, self._leftover = self._leftover[:max_bytes], self._leftover[max_bytes:]
            return out
        while True:
            chunk = self._proto.take(max_bytes)
            if chunk is not None:
                return chunk
            await self._proto.wait_readable()

    async def write(self, data: bytes) -> None:
        if not self._proto.write(data):
            raise BodyError(f"tunnel to {self.server} is closed")
        while self._proto.write_paused and not self._proto.lost:
            await self._proto.wait_event_while_paused()
        if self._proto.lost:
            raise BodyError(f"tunnel to {self.server} was closed by the origin")

    def write_eof(self) -> None:
        t = self._proto.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def close(self) -> None:
        self._proto.close()

    async def wait_closed(self) -> None:
        await self._proto.closed
