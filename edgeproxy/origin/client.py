"""One persistent HTTP/1.1 client connection to an origin server, and the response it yields.

The HTTP/1.1 client state machine (the sans-IO core) is a codec with `h11.Connection(h11.CLIENT)`'s
interface: `FastClientConnection` from `edgeproxy.http.h1fast_client` (llhttp; the default) or h11
itself, picked by `codec_factory` (the same names as the front end's `http1.parser`). This module
is the asyncio shell around it: an `asyncio.Protocol` that buffers received bytes with a bound
(pausing the socket beyond it) and exposes write backpressure, plus `OriginConnection`, which moves
events between the two. All codec calls on the wire path go through `_encode`, `_feed` and
`_next_event`.

Per-request overhead is kept off the hot path (a keep-alive GET costs a few tens of microseconds):
the request head and the end of an empty body go out in one transport write; timeouts use one
`loop.call_at` timer per connection that is only moved when a deadline comes earlier than the one
it is set for (a timer that fires early re-arms itself for the current deadline, one that fires
when nothing waits does nothing), instead of an `asyncio.timeout` scope per wait; nothing is
scheduled and no future is created when the bytes needed are already buffered. Request events
are built without h11's per-field validation, behind an explicit header-injection guard (see
`_request_event`).

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
import re
from collections.abc import Callable
from typing import Any, Protocol, cast

import h11

from edgeproxy.http.h1fast import _TCHAR, data_event, prevalidated_headers
from edgeproxy.http.h1fast_client import FastClientConnection
from edgeproxy.http.messages import (
    IDEMPOTENT_METHODS,
    Body,
    BodyError,
    HTTPError,
    RequestHead,
    ResponseHead,
    event_data,
    header_get,
    header_list,
)
from edgeproxy.tick import TickFlusher

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

# h11's grammar for the request line (RFC 7230 token; visible ASCII for the target).
_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")

_EOM = h11.EndOfMessage()
_NEED_DATA = h11.NEED_DATA

# A timer may run its callback a little before its deadline (uvloop's timers have millisecond
# resolution): within this much, the deadline counts as reached instead of re-arming for it.
_TIMER_SLACK = 0.001

DEFAULT_CODEC = "httptools"
"""Codec for connections whose creator names none: `httptools` (llhttp) or `h11`."""


class Codec(Protocol):
    """The subset of `h11.Connection` (client role) this module drives."""

    @property
    def our_state(self) -> Any: ...

    @property
    def their_state(self) -> Any: ...

    @property
    def trailing_data(self) -> tuple[bytes, bool]: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> Any: ...

    def send(self, event: Any) -> bytes | None: ...

    def start_next_cycle(self) -> None: ...


def codec_factory(parser: str) -> Callable[[int], Codec]:
    """`h11` (pure Python) or `httptools` (llhttp behind h11's interface, see h1fast_client)."""
    if parser == "h11":
        return lambda limit: h11.Connection(h11.CLIENT, max_incomplete_event_size=limit)
    if parser == "httptools":
        return lambda limit: FastClientConnection(max_incomplete_event_size=limit)
    raise ValueError(f"unknown HTTP/1.1 parser {parser!r}")


def _bad_field(items: list[tuple[bytes, bytes, bytes]]) -> str:
    for name, lname, value in items:
        if not lname or lname.translate(None, _TCHAR):
            return f"illegal header name {name!r}"
        if b"\r" in value or b"\n" in value or b"\0" in value:
            return f"illegal header value {value!r} in {name!r}"
    return "illegal header field"  # not reached: only called when one of the above holds


def _request_event(head: RequestHead, host: bytes, body_length: int | None) -> h11.Request:
    """The h11 Request for `head` (see `_request_items`)."""
    req = object.__new__(h11.Request)
    object.__setattr__(req, "method", head.method)
    object.__setattr__(req, "target", head.target)
    object.__setattr__(req, "headers", prevalidated_headers(_request_items(head, host, body_length)))
    object.__setattr__(req, "http_version", b"1.1")
    return req


def _request_items(head: RequestHead, host: bytes, body_length: int | None) -> list[tuple[bytes, bytes, bytes]]:
    """The fields of the request for `head` as h11 keeps them (raw name, lowercase name,
    value), Host first and framing from `body_length`.

    Built without h11's constructor, whose per-field regex validation cost about as much as the
    rest of the request path. The fields come from the front ends' parsers (h11 / llhttp for
    HTTP/1.1, aioquic's checks for HTTP/3) plus edge-added ones, so they are well-formed; what
    must never reach the origin whatever a front end lets through is anything that changes how
    the request is split into lines and fields (header injection, request smuggling). So this
    checks: the method is a token and the target visible ASCII (as h11 does); every field name
    is a non-empty token; no value contains CR, LF or NUL. Values h11 would refuse for other
    reasons (leading or trailing whitespace, other control bytes) are forwarded as they are.
    Framing fields are ours alone (Content-Length / Transfer-Encoding from `body_length`, one
    Host), which is what h11 would otherwise check. Raises HTTPError(400) for a request that
    cannot be forwarded.
    """
    method = head.method
    target = head.target
    if method not in IDEMPOTENT_METHODS and _METHOD.fullmatch(method) is None:
        raise HTTPError(400, f"request cannot be forwarded: illegal method {method!r}")
    if _TARGET.fullmatch(target) is None:
        raise HTTPError(400, f"request cannot be forwarded: illegal target {target!r}")
    items: list[tuple[bytes, bytes, bytes]] = [(b"host", b"host", host)]
    for name, value in head.headers:
        lname = name.lower()
        if lname not in _DROPPED_REQUEST_HEADERS:
            items.append((name, lname, value))
    if body_length is None:
        items.append((b"transfer-encoding", b"transfer-encoding", b"chunked"))
    elif body_length > 0 or method in _CONTENT_METHODS:
        length = str(body_length).encode()
        items.append((b"content-length", b"content-length", length))
    # The guard, on all fields at once (a few C-level scans instead of several per field).
    names = [lname for _, lname, _ in items]
    values = b" ".join([value for _, _, value in items])
    if (
        b"" in names
        or b"".join(names).translate(None, _TCHAR)
        or b"\r" in values
        or b"\n" in values
        or b"\0" in values
    ):
        raise HTTPError(400, f"request cannot be forwarded: {_bad_field(items)}")
    return items


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
        # Set by the pool: small writes then leave at the end of the tick with the others.
        self.flusher: TickFlusher | None = None
        self._outbox: list[bytes] = []

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
        self.wake_waiters()
        if self.on_event is not None:
            self.on_event()

    def wake_waiters(self) -> None:
        """Resume whoever waits for the socket (the connection's timer uses this on timeouts)."""
        for w in (self._read_waiter, self._write_waiter):
            if w is not None and not w.done():
                w.set_result(None)

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
        if self._outbox:
            self.flush_tick()
        t.write(data)
        return True

    def write_soon(self, data: bytes) -> bool:
        """`write`, but with a flusher the bytes leave at the end of this tick."""
        if self.flusher is None:
            return self.write(data)
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return False
        if not self._outbox:
            self.flusher.add(self)
        self._outbox.append(data)
        return True

    def flush_tick(self) -> None:
        if not self._outbox:
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        t = self.transport
        if t is not None and not self.lost and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush_tick()
            self.transport.close()


class OriginConnection:
    """A persistent HTTP/1.1 connection to one origin server; one request at a time."""

    def __init__(self, protocol: _OriginProtocol, server: str, *, codec: str | None = None) -> None:
        self.server = server
        self._proto = protocol
        parser = codec or DEFAULT_CODEC
        self._codec: Codec = codec_factory(parser)(MAX_HEAD_BYTES)
        # The same object, natively typed, when it is ours (see whole_response_nowait).
        self._fast: FastClientConnection | None = (
            self._codec if isinstance(self._codec, FastClientConnection) else None
        )
        # h11 hands out bytearrays; the response head we build always holds bytes.
        self._copy_fields = parser == "h11"
        self._host = server.encode()
        loop = asyncio.get_running_loop()
        self._loop = loop
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
        # The one timer (see the module docstring): `_deadline` is what the current wait may
        # last until (None: nothing waits), `_timer` fires at or before it.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # the deadline `_timer` was set for (TimerHandle.when() rounds)
        self._deadline: float | None = None
        self._timed_out = False
        self.socket_waits = 0  # times a read or write had to wait for the socket

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        server: str | None = None,
        codec: str | None = None,
        flusher: TickFlusher | None = None,
    ) -> OriginConnection:
        label = server or f"{host}:{port}"
        codec_factory(codec or DEFAULT_CODEC)  # an unknown name fails before connecting
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
        proto.flusher = flusher
        return cls(proto, label, codec=codec)

    # -- parser seam: every codec call on the wire path goes through these three ---------------

    def _encode(self, event: Any) -> bytes:
        return self._codec.send(event) or b""

    def _feed(self, data: bytes) -> None:
        self._codec.receive_data(data)

    def _next_event(self) -> Any:
        try:
            return self._codec.next_event()
        except h11.RemoteProtocolError as e:
            if self._in_head_phase:
                if self._proto.bytes_received == self._rx_mark:
                    raise self._reset_error() from None
                raise OriginProtocolError(f"bad response from {self.server}: {e}") from None
            raise BodyError(f"broken response body from {self.server}: {e}") from None

    # -- timeouts ------------------------------------------------------------------------------

    async def _wait(self, deadline: float, *, writable: bool = False) -> bool:
        """Sleep until the socket side wakes us (data, EOF, loss; with `writable`, also the
        transport taking more) or until `deadline`; False if the deadline woke us.

        Callers come here only when the bytes they need are not buffered (or the transport is
        paused): everything that can be done with what has arrived is done without a future.
        Costs one clock read by the caller and, usually, no timer operation: the armed timer is
        kept when it is due before `deadline` (see `_on_timer`).
        """
        self._set_deadline(deadline)
        self.socket_waits += 1
        try:
            if writable:
                await self._proto.wait_event_while_paused()
            else:
                await self._proto.wait_readable()
        finally:
            self._deadline = None
        timed_out = self._timed_out
        self._timed_out = False
        return not timed_out

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        self._timed_out = False
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # armed for a wait that has ended; the next one arms it again
        if self._loop.time() + _TIMER_SLACK >= deadline:
            self._deadline = None
            self._timed_out = True
            self._proto.wake_waiters()
            watcher = self._proto.on_event  # set only in callback mode while a request is out
            if watcher is not None:
                watcher()
        else:
            # Armed for an earlier request's deadline; the current one is later.
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    # -- state ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._proto.lost

    @property
    def reusable(self) -> bool:
        """Idle, in a clean state, and nothing unexpected arrived from the origin."""
        t = self._proto.transport
        if self._busy or self.closed or self.detached or t is None or t.is_closing() or self._proto.readable:
            return False
        fast = self._fast  # the same checks, as native calls
        if fast is not None:
            return fast.our_state is h11.IDLE and fast.their_state is h11.IDLE and not fast.trailing_data[0]
        codec = self._codec
        return codec.our_state is h11.IDLE and codec.their_state is h11.IDLE and not codec.trailing_data[0]

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
        `body.read()` (the client's upload broke) propagate unchanged. A request that cannot be
        forwarded as it is (a field with CR, LF or NUL, a bad method or target) raises
        HTTPError(400).

        `read_timeout` also bounds how long the origin may stop reading the request body
        (-> OriginTimeout). On any exception the connection is closed and `on_done` called.
        """
        self._claim()
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

    def send_bodiless(self, head: RequestHead) -> None:
        """`request`'s first half without waiting, for a request without a body: the bytes leave
        at the end of the tick. Then drive the response in callback mode: `watch`, `head_nowait`,
        `body_nowait`, then the pool's release, or an `OriginResponse` for the rest. Raises
        what `request` raises, with the connection closed (give it back to its pool after).
        """
        self._claim()
        try:
            if not self._proto.write_soon(self._request_bytes(head, 0)):
                raise self._reset_error()
        except BaseException:
            self._busy = False
            self.close()
            raise

    def watch(self, callback: Callable[[], None] | None, deadline: float | None = None) -> None:
        """Callback mode: `callback` runs on data, EOF, loss, and once `deadline` (loop time)
        passes, when `timed_out` turns True. None stops watching (and the deadline)."""
        self._proto.on_event = callback
        if callback is None:
            self._deadline = None
            self._timed_out = False
        elif deadline is not None:
            self._set_deadline(deadline)

    def now(self) -> float:
        """The event loop's clock, which deadlines are in."""
        return self._loop.time()

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    def head_nowait(self) -> ResponseHead | None:
        """The response head if the bytes for it have arrived (1xx but 101 skipped), else None.
        Raises OriginProtocolError, or OriginResetBeforeResponse if the origin hung up first."""
        while True:
            if self._early_head is not None:
                ev: Any = self._early_head
                self._early_head = None
            else:
                ev = self._pump_nowait()
            if ev is _NEED_DATA:
                if self._eof_fed:
                    raise OriginProtocolError(f"{self.server} closed the connection mid-head")
                return None
            etype = type(ev)
            if etype is h11.InformationalResponse:
                if ev.status_code != 101:
                    continue  # 100 Continue, 102, 103: nothing the client needs from us
            elif etype is not h11.Response:
                raise OriginProtocolError(f"unexpected {etype.__name__} from {self.server}")
            self._in_head_phase = False
            return self._response_head(ev)

    def _response_head(self, ev: Any) -> ResponseHead:
        items = ev.headers._full_items
        if self._copy_fields:
            headers = [(bytes(name), bytes(value)) for _, name, value in items]
        else:
            headers = [(name, value) for _, name, value in items]
        return ResponseHead(ev.status_code, headers, bytes(ev.reason))

    def whole_response_nowait(self) -> tuple[ResponseHead, bytes] | None:
        """When what has arrived is exactly one whole response (the codec's `receive_whole`),
        takes it: its head and body, the connection free for its pool again. None: nothing
        taken, use `head_nowait` and `body_nowait`."""
        fast = self._fast
        chunks = self._proto._chunks
        if fast is None or self._early_head is not None or len(chunks) != 1:
            return None
        got = fast.receive_whole(chunks[0])
        if got is None:
            return None
        self._proto.take()
        event, body = got
        self._in_head_phase = False
        self._finish_cycle()
        return self._response_head(event), body

    def body_nowait(self, chunks: list[bytes] | None = None, limit: int = -1) -> bool:
        """Takes the body bytes already received, appending them to `chunks` (None: dropping
        them); True if they reach the end of the message (the connection is then free for its
        pool to take back), False if not, or once more than `limit` (if >= 0) bytes were taken.
        Raises BodyError for a broken body."""
        taken = 0
        while True:
            ev = self._pump_nowait()
            if ev is _NEED_DATA:
                return False
            etype = type(ev)
            if etype is h11.Data:
                data = event_data(ev)
                taken += len(data)
                if data and chunks is not None:
                    chunks.append(bytes(data))
                if 0 <= limit < taken:
                    return False
                continue
            if etype is h11.EndOfMessage:
                self._finish_cycle()
                return True
            raise BodyError(f"unexpected {etype.__name__} in response body from {self.server}")

    def _reset_error(self) -> OriginResetBeforeResponse:
        why = " (reused keep-alive connection)" if self._reused else ""
        return OriginResetBeforeResponse(
            f"{self.server} closed the connection before responding{why}", reused=self._reused
        )

    def _claim(self) -> None:
        """Marks the connection busy with a request: the first step of sending one."""
        if self._busy or self.closed or self.detached:
            raise RuntimeError(f"{self!r} is not free for a request")
        self._busy = True
        self._reused = self.requests_completed > 0

    def _request_bytes(self, head: RequestHead, body_length: int | None) -> bytes:
        """The request head's bytes, and its end too when there is no body (the whole request
        in one write: one send() system call, one TCP segment); the receive side now expects
        the response head."""
        host = head.authority or self._host
        self._rx_mark = self._proto.bytes_received
        self._in_head_phase = True
        self._early_head = None
        try:
            if body_length != 0:
                return self._encode(_request_event(head, host, body_length))
            fast = self._fast
            sent = None if fast is None else fast.send_bodiless(head.method, head.target, _request_items(head, host, 0))
            if sent is not None:
                return sent
            return self._encode(_request_event(head, host, 0)) + self._encode(_EOM)
        except h11.LocalProtocolError as e:
            raise HTTPError(400, f"request cannot be forwarded: {e}") from None

    async def _send(
        self, head: RequestHead, body: Body, body_length: int | None, stall_timeout: float
    ) -> None:
        data = self._request_bytes(head, body_length)
        if body_length == 0:
            if not self._proto.write_soon(data):
                raise self._reset_error()
            return
        if not self._proto.write(data):
            raise self._reset_error()
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
            self._proto.write(self._encode(data_event(chunk)))
        if body_length is not None and sent != body_length:
            raise BodyError(f"request body ended after {sent} of {body_length} bytes")
        end = self._encode(_EOM)
        if end:  # b"" after a Content-Length body: nothing to write
            self._proto.write(end)

    async def _wait_writable(self, stall_timeout: float) -> bool:
        """Wait until the transport takes more; False if the origin refused the body or went away.

        An origin may answer with an error before reading the whole body (413, 401, ...) and stop
        reading; watching for that keeps us from sending into a socket nobody drains
        (RFC 9112 section 9.5). An early non-error response is kept and the body still sent.
        """
        deadline: float | None = None
        timed_out = False
        while True:
            if self._early_head is None and self._proto.readable and self._check_early_response():
                return False
            if self._proto.lost:
                return False
            if not self._proto.write_paused:
                return True
            if timed_out:
                raise OriginTimeout(
                    f"{self.server} stopped reading the request body for {stall_timeout:g}s"
                )
            if deadline is None:
                deadline = self._loop.time() + stall_timeout
            timed_out = not await self._wait(deadline, writable=True)

    def _check_early_response(self) -> bool:
        """Parse what arrived while sending; True if sending the body should stop: an error
        response or one closing the connection has arrived, or the origin hung up."""
        while True:
            ev = self._pump_nowait()
            if ev is _NEED_DATA:
                return self._proto.eof
            if isinstance(ev, h11.InformationalResponse) and ev.status_code != 101:
                continue
            if isinstance(ev, h11.Response | h11.InformationalResponse):
                self._early_head = ev
                closing = any(v.lower() == b"close" for v in header_list(ev.headers, b"connection"))
                return ev.status_code >= 400 or closing
            raise OriginProtocolError(f"unexpected {type(ev).__name__} from {self.server}")

    def _pump_nowait(self) -> Any:
        """Next codec event using only bytes already received; NEED_DATA if more are needed."""
        while True:
            ev = self._next_event()
            if ev is not _NEED_DATA:
                return ev
            chunk = self._proto.take()
            if chunk is None or (not chunk and self._eof_fed):
                return _NEED_DATA
            if not chunk:
                if self._in_head_phase and self._proto.bytes_received == self._rx_mark:
                    raise self._reset_error()
                self._eof_fed = True
            self._feed(chunk)

    async def _receive_head(self, timeout: float) -> ResponseHead:
        # One deadline for the whole head, as an asyncio.timeout scope around this loop would
        # give; the clock is read only if we have to wait at all.
        deadline: float | None = None
        timed_out = False
        while True:
            head = self.head_nowait()
            if head is not None:
                return head
            if timed_out:
                raise OriginTimeout(first_byte_timeout_message(self.server, timeout))
            if deadline is None:
                deadline = self._loop.time() + timeout
            timed_out = not await self._wait(deadline)

    async def _receive_body(self, timeout: float) -> bytes | None:
        """Next body chunk, or None at the end of the message."""
        timed_out = False
        while True:
            ev = self._pump_nowait()
            if ev is _NEED_DATA:
                if timed_out:
                    raise BodyError(
                        f"{self.server} stalled for more than {timeout:g}s within the response body"
                    )
                # A fresh allowance per wait: this bounds a stall, not the whole body.
                timed_out = not await self._wait(self._loop.time() + timeout)
                continue
            etype = type(ev)
            if etype is h11.Data:
                data = event_data(ev)
                if data:
                    return bytes(data)
                continue
            if etype is h11.EndOfMessage:
                self._finish_cycle()
                return None
            raise BodyError(f"unexpected {etype.__name__} in response body from {self.server}")

    def _finish_cycle(self) -> None:
        self._busy = False
        self.requests_completed += 1
        codec = self._codec
        if codec.our_state is h11.DONE and codec.their_state is h11.DONE and not self.closed:
            codec.start_next_cycle()

    def _detach_leftover(self) -> bytes:
        self.detached = True
        self._busy = False
        self._proto.on_event = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._codec.trailing_data[0]

    @property
    def switched(self) -> bool:
        return self._codec.their_state is h11.SWITCHED_PROTOCOL


def first_byte_timeout_message(server: str, timeout: float) -> str:
    return f"{server} sent no response head within {timeout:g}s"


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
        complete: bool = False,
    ) -> None:
        """`complete`: the body has already been read to its end (`body_nowait`)."""
        self.head = head
        self.server = conn.server
        self.length = _response_length(method, head)
        """Body size when known from the head (so a response is also a `Body`), else None."""
        self._conn = conn
        self._read_timeout = read_timeout
        self._on_done = on_done
        self._complete = complete
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
                self._complete = self._conn.body_nowait(limit=RELEASE_DISCARD_LIMIT)
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
