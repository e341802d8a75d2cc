"""HTTP/3 front end: one `H3ServerProtocol` per QUIC connection, requests handed to the pipeline.

Built on aioquic's `H3Connection` (framing, QPACK, control streams), pinned to aioquic 1.7.2
because a few private hooks are overridden:

* Malformed requests are stream errors, not connection errors. aioquic raises `MessageError`
  for a malformed header section or a content-length mismatch and closes the whole connection;
  `_EdgeH3Connection` turns that into a per-stream rejection. The edge answers 400 through
  `RequestHandler.reject` and then sends STOP_SENDING(H3_MESSAGE_ERROR) if the client is
  still sending. RFC 9114 section 4.1.2 allows this: a malformed request is a stream error of
  type H3_MESSAGE_ERROR, and the server MAY send a response before closing or resetting the
  stream. If the response has already started, the stream is reset with H3_MESSAGE_ERROR.
* A HEADERS frame is rejected with 431 as soon as its frame header shows it cannot fit
  `max_header_bytes` (QPACK cannot expand a field more than ~4x). This way it is never buffered.
  SETTINGS_MAX_FIELD_SECTION_SIZE advertises the limit.

Request validation follows RFC 9114 section 4.3.1. :method, :scheme and :path are required
(CONNECT is refused with 405, like HTTP/1.1). Only the "https" scheme is accepted. Uppercase or
invalid names and connection-specific fields are rejected. :authority and Host must agree. Split
cookie fields are joined with "; " (RFC 9114 section 4.2.1) because the request may go on over
HTTP/1.1.

Backpressure, both ways:

* Request bodies: `EdgeQuicConnection` advertises MAX_STREAM_DATA as bytes consumed + window.
  Consumed means delivered to H3 minus what `_H3Body` still buffers unread. So a client can be at
  most one window ahead of the handler's `read()` calls.
* Responses: aioquic buffers stream data without limit. `write()` therefore waits while the
  stream has more than `send_buffer` bytes not yet sent, or more than `max_unacked` bytes not yet
  acknowledged. The check runs after every batch of datagrams and timer event, and `write()`
  resumes below half of those. If the client does not drain it within `send_timeout`, the stream
  is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections import deque
from dataclasses import dataclass

from aioquic.h3.connection import (
    H3_ALPN,
    ErrorCode,
    FrameType,
    H3Connection,
    H3Stream,
    HeadersState,
    MessageError,
    ProtocolError,
    Setting,
    stream_is_request_response,
)
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode

from ..config import LimitsSection
from ..metrics import Registry
from ..quic.dispatcher import EdgeConnectionProtocol, EdgeQuicConnection
from .handler import RequestHandler
from .messages import BodyError, Headers, HTTPError, RequestHead, ResponseHead

log = logging.getLogger("edgeproxy.h3")

PROTOCOL = "h3"
READ_CHUNK = 65536
# Response side: unsent bytes a stream may hold before write() waits, and the hard cap on
# unacknowledged ones. In-flight data is otherwise bounded by congestion control. The unsent
# bound keeps a few packets' worth queued so the sender never idles waiting for the handler.
DEFAULT_SEND_BUFFER = 256 * 1024
DEFAULT_MAX_UNACKED = 8 * 1024 * 1024
# QPACK with Huffman coding can encode a byte in up to 30 bits, plus a few bytes per field:
# an encoded header section larger than this many times the limit cannot decode to within it.
QPACK_EXPANSION = 4

CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te")
)
_VALID_NAME = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_VISIBLE = re.compile(rb"^[\x21-\x7e]+$")


# --------------------------------------------------------------------------------------------
# Pure request-head parsing
# --------------------------------------------------------------------------------------------


def field_section_size(headers: Headers) -> int:
    """RFC 9114 section 4.2.2: name + value + 32 per field, as HPACK/QPACK define it."""
    return sum(len(k) + len(v) + 32 for k, v in headers)


def parse_request_head(
    headers: Headers,
    *,
    max_header_bytes: int,
    client_addr: tuple[str, int],
    request_id: str,
) -> tuple[RequestHead, int | None]:
    """Validate a decoded HTTP/3 request header section. Returns the head and Content-Length.

    Raises HTTPError: 431 (too large), 400 (malformed, RFC 9114 section 4.1.2), 405 (CONNECT).
    """
    size = field_section_size(headers)
    if size > max_header_bytes:
        raise HTTPError(
            431, f"request header section of {size} bytes is larger than {max_header_bytes}"
        )

    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for name, value in headers:
        if name.startswith(b":"):
            if regular:
                raise HTTPError(400, f"pseudo-header {name.decode('latin-1')} after regular fields")
            if name not in (b":method", b":scheme", b":authority", b":path", b":protocol"):
                raise HTTPError(400, f"unknown pseudo-header {name.decode('latin-1')}")
            if name in pseudo:
                raise HTTPError(400, f"duplicate pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        if not _VALID_NAME.match(name):
            raise HTTPError(400, f"invalid field name {name!r}")
        if name in CONNECTION_SPECIFIC and not (name == b"te" and value.lower() == b"trailers"):
            raise HTTPError(400, f"connection-specific field {name.decode()}")
        if _BAD_VALUE.search(value):
            raise HTTPError(400, f"invalid value in field {name.decode()}")
        regular.append((name, value))

    method = pseudo.get(b":method")
    if not method:
        raise HTTPError(400, "missing :method")
    if not _VALID_NAME.match(method.lower()):
        raise HTTPError(400, "invalid :method")
    if method == b"CONNECT":
        raise HTTPError(405, "CONNECT is not supported: this is a reverse proxy")
    if b":protocol" in pseudo:
        raise HTTPError(400, ":protocol is only allowed with CONNECT")
    scheme = pseudo.get(b":scheme")
    path = pseudo.get(b":path")
    if scheme is None or path is None:
        raise HTTPError(400, "missing :scheme or :path")
    if scheme != b"https":
        raise HTTPError(400, f"unsupported :scheme {scheme.decode('latin-1')!r}")
    if not _VISIBLE.match(path) or not (
        path.startswith(b"/") or (path == b"*" and method == b"OPTIONS")
    ):
        raise HTTPError(400, "invalid :path")

    hosts = [v for k, v in regular if k == b"host"]
    authority = pseudo.get(b":authority")
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host field")
    if authority is None:
        authority = hosts[0] if hosts else b""
    elif hosts and hosts[0] != authority:
        raise HTTPError(400, "Host does not match :authority")
    if not authority or not _VISIBLE.match(authority) or b"@" in authority:
        raise HTTPError(400, "missing or invalid :authority")

    lengths = {v for k, v in regular if k == b"content-length"}
    content_length: int | None = None
    if lengths:
        if len(lengths) > 1:
            raise HTTPError(400, "conflicting Content-Length fields")
        raw = next(iter(lengths))
        if not raw.isdigit():
            raise HTTPError(400, "invalid Content-Length")
        content_length = int(raw)

    out: Headers = []
    cookies: list[bytes] = []
    cookie_at = -1
    for name, value in regular:
        if name == b"host":
            continue
        if name == b"cookie":
            if cookie_at < 0:
                cookie_at = len(out)
                out.append((b"cookie", b""))
            cookies.append(value)
            continue
        out.append((name, value))
    if cookie_at >= 0:
        out[cookie_at] = (b"cookie", b"; ".join(cookies))

    head = RequestHead(
        method=method,
        target=path,
        headers=out,
        scheme="https",
        authority=authority,
        http_version="3",
        client_addr=client_addr,
        request_id=request_id,
    )
    return head, content_length


def response_fields(head: ResponseHead) -> Headers:
    """HTTP/3 field section for a response head.

    Connection-specific fields are dropped (RFC 9114 section 4.2: they would make the response
    malformed and clients would reject the whole connection). Names are lowercased, and values
    have optional whitespace trimmed. Fields a client would treat as malformed are dropped, not
    sent.
    """
    if not 200 <= head.status <= 999:
        raise ValueError(f"status {head.status} cannot be sent as an HTTP/3 final response")
    fields: Headers = [(b":status", str(head.status).encode())]
    for name, value in head.headers:
        name = name.lower()
        if name in CONNECTION_SPECIFIC or not _VALID_NAME.match(name):
            continue
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            continue
        fields.append((name, value))
    return fields


def h3_configuration(
    base: QuicConfiguration, limits: LimitsSection, stream_receive_window: int
) -> QuicConfiguration:
    """A copy of `base` with what HTTP/3 at the edge needs: ALPN h3, the idle timeout of
    `limits` and the initial per-stream receive window (the transport parameters)."""
    return dataclasses.replace(
        base,
        is_client=False,
        alpn_protocols=list(H3_ALPN),
        idle_timeout=limits.idle_timeout,
        max_stream_data=stream_receive_window,
    )


# --------------------------------------------------------------------------------------------
# aioquic H3Connection with per-stream rejection
# --------------------------------------------------------------------------------------------


@dataclass
class StreamRejected(H3Event):
    """Synthetic event: the request on `stream_id` is malformed or too large (`status`)."""

    stream_id: int
    status: int
    reason: str


@dataclass
class TrailersReceived(H3Event):
    """Synthetic event: a trailer section (told apart from a request's first HEADERS here,
    where the parse state is known, not later when a batch of events is processed)."""

    stream_id: int
    stream_ended: bool


class _EdgeH3Connection(H3Connection):
    """aioquic's H3Connection (1.7.2) turning request message errors into stream rejections.

    Rejected streams get no further events: their remaining frames are discarded.
    """

    def __init__(self, quic: EdgeQuicConnection, *, max_header_bytes: int) -> None:
        # Set before super().__init__, which sends SETTINGS via _get_local_settings().
        self._max_field_section_size = max_header_bytes
        self._max_headers_frame = QPACK_EXPANSION * max_header_bytes + 1024
        self._rejected: set[int] = set()
        self._rejections: list[StreamRejected] = []
        super().__init__(quic)

    def reject_stream(self, stream_id: int) -> None:
        """Discard whatever else arrives on `stream_id` (the application is done with it)."""
        if stream_id not in self._rejected:
            self._rejected.add(stream_id)
            self._cancel_field_sections(stream_id)

    def awaiting_headers(self, stream_id: int) -> bool:
        """A request stream has begun but its HEADERS frame is not complete (or is blocked)."""
        stream = self._stream.get(stream_id)
        return (
            stream is not None
            and stream_is_request_response(stream_id)
            and stream_id not in self._rejected
            and stream.headers_recv_state == HeadersState.INITIAL
        )

    def forget_stream(self, stream_id: int) -> None:
        """Drop H3 parse state of a rejected stream; its frames are never parsed again."""
        stream = self._stream.get(stream_id)
        if stream is not None and not stream.blocked:
            del self._stream[stream_id]

    def _cancel_field_sections(self, stream_id: int) -> None:
        # RFC 9204 section 4.4.2: a decoder that abandons reading a stream tells the peer's
        # encoder (Stream Cancellation), or references to its dynamic table stay outstanding.
        # aioquic does the same when a request stream is reset.
        if self._local_decoder_stream_id is None:
            return
        data = self._decoder.cancel_stream(stream_id)
        self._decoder_bytes_sent += len(data)
        self._quic.send_stream_data(self._local_decoder_stream_id, data)

    def handle_event(self, event: QuicEvent) -> list[H3Event]:
        if isinstance(event, StreamDataReceived | StreamReset):
            stream_id = event.stream_id
            if stream_id in self._rejected:
                if isinstance(event, StreamReset) or event.end_stream:
                    self._rejected.discard(stream_id)
                return []
        events = super().handle_event(event)
        if self._rejections:
            events = [*events, *self._rejections]
            self._rejections = []
        return events

    def _flag(self, stream_id: int, status: int, reason: str) -> None:
        if stream_id not in self._rejected:
            self.reject_stream(stream_id)
            self._rejections.append(
                StreamRejected(stream_id=stream_id, status=status, reason=reason)
            )

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.MAX_FIELD_SECTION_SIZE] = self._max_field_section_size
        return settings

    def _check_request_or_push_frame_type(self, frame_type: int, stream: H3Stream) -> None:
        super()._check_request_or_push_frame_type(frame_type, stream)
        if (
            frame_type == FrameType.HEADERS
            and not self._is_client
            and stream.frame_size is not None
            and stream.frame_size > self._max_headers_frame
        ):
            self._flag(stream.stream_id, 431, "request header section too large")

    def _handle_request_or_push_frame(
        self,
        frame_type: int,
        frame_data: bytes | None,
        stream: H3Stream,
        stream_ended: bool,
    ) -> list[H3Event]:
        if stream.stream_id in self._rejected:
            return []
        trailers = frame_type == FrameType.HEADERS and (
            stream.headers_recv_state != HeadersState.INITIAL
        )
        try:
            events = super()._handle_request_or_push_frame(
                frame_type=frame_type,
                frame_data=frame_data,
                stream=stream,
                stream_ended=stream_ended,
            )
            if trailers and not self._is_client:
                events = [
                    TrailersReceived(stream_id=e.stream_id, stream_ended=e.stream_ended)
                    if isinstance(e, HeadersReceived)
                    else e
                    for e in events
                ]
            return events
        except MessageError as exc:
            if self._is_client or not stream_is_request_response(stream.stream_id):
                raise
            self._flag(stream.stream_id, 400, f"malformed request: {exc.reason_phrase}")
            return []

    def _handle_request_or_push_end(self, stream: H3Stream) -> list[H3Event]:
        if stream.stream_id in self._rejected:
            return []
        try:
            return super()._handle_request_or_push_end(stream)
        except MessageError as exc:
            if self._is_client or not stream_is_request_response(stream.stream_id):
                raise
            self._flag(stream.stream_id, 400, f"malformed request: {exc.reason_phrase}")
            return []


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class H3Metrics:
    """The shared front-end metrics (same names and labels as HTTP/1.1), protocol="h3"."""

    def __init__(self, registry: Registry) -> None:
        self.conn_open = registry.gauge(
            "edgeproxy_connections_open", "Open client connections.", ["protocol"]
        )
        self.conn_total = registry.counter(
            "edgeproxy_connections_total", "Client connections accepted.", ["protocol"]
        )
        self.bytes_total = registry.counter(
            "edgeproxy_bytes_total", "Bytes from and to clients.", ["protocol", "direction"]
        )


# --------------------------------------------------------------------------------------------
# Body, sink, exchange
# --------------------------------------------------------------------------------------------


class _H3Body:
    """A request body fed by the connection and read by the handler.

    Unread bytes are reported to the connection, which withholds stream credit accordingly
    (see module docstring), so the buffer never exceeds the receive window.
    """

    def __init__(
        self, conn: H3ServerProtocol, stream_id: int, timeout: float, length: int | None
    ) -> None:
        self.length = length  # Content-Length, 0 when HEADERS ended the stream, else None
        self._conn = conn
        self._stream_id = stream_id
        self._timeout = timeout
        self._chunks: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.unread = 0
        self.peak_unread = 0
        self.received = 0
        self.eof = False

    @property
    def finished(self) -> bool:
        return self.eof or self.error is not None

    def feed(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self._chunks.append(data)
        self.received += len(data)
        self.unread += len(data)
        self.peak_unread = max(self.peak_unread, self.unread)
        self._conn.quic_edge.set_stream_unread(self._stream_id, self.unread)
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        # A body already read to its end stays complete; anything else must not look complete.
        if self.error is None and not (self.eof and not self._chunks):
            self.error = exc
        self._chunks.clear()
        self.unread = 0
        self._conn.quic_edge.set_stream_unread(self._stream_id, 0)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        while True:
            if self.error is not None:
                raise self.error
            if self._chunks:
                # Coalesce the ~1 KB packet-sized pieces into fewer, larger reads.
                parts = [self._chunks.popleft()]
                size = len(parts[0])
                while self._chunks and size + len(self._chunks[0]) <= READ_CHUNK:
                    part = self._chunks.popleft()
                    parts.append(part)
                    size += len(part)
                self.unread -= size
                if self._conn.quic_edge.set_stream_unread(self._stream_id, self.unread):
                    self._conn.transmit_soon()
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if self.eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._waiter
            except TimeoutError:
                self._conn.body_timed_out(self._stream_id)
                raise HTTPError(
                    408, f"client too slow sending the request body ({self._timeout:g}s)"
                ) from None
            finally:
                self._waiter = None


class _H3Sink:
    """The response of one request stream (implements `ResponseSink`)."""

    def __init__(self, conn: H3ServerProtocol, stream_id: int, head_only: bool) -> None:
        self._conn = conn
        self._stream_id = stream_id
        self._head_only = head_only
        self._started = False
        self.ended = False
        self.dead = False  # reset by either side, or the connection is gone
        self.bytes_out = 0
        self.peak_buffered = 0

    @property
    def started(self) -> bool:
        return self._started

    def _check_alive(self) -> None:
        if self.dead:
            raise BodyError("HTTP/3 stream was reset or the connection closed")

    async def start(self, head: ResponseHead) -> None:
        self._check_alive()
        if self._started:
            raise RuntimeError("response already started")
        fields = response_fields(head)
        self._conn.send_headers(self, fields, end_stream=False)
        self._started = True

    async def write(self, data: bytes) -> None:
        self._check_alive()
        if not self._started:
            raise RuntimeError("write() before start()")
        if self.ended:
            raise RuntimeError("write() after end()")
        if not data or self._head_only:
            return
        # A huge write goes out in send_buffer slices, waiting in between, so aioquic never
        # holds much more than the bound even for one big chunk.
        step = self._conn.send_buffer
        view = memoryview(data)
        for pos in range(0, len(data), step):
            piece = data if len(data) <= step else bytes(view[pos : pos + step])
            self._conn.send_data(self, piece, end_stream=False)
            self.bytes_out += len(piece)
            await self._conn.wait_writable(self)

    async def end(self) -> None:
        if self.ended or self.dead:
            return
        if not self._started:
            raise RuntimeError("end() before start()")
        self._conn.send_data(self, b"", end_stream=True)
        self.ended = True

    def abort(self) -> None:
        if self.ended or self.dead:
            return
        self.dead = True
        self._conn.reset_exchange(self._stream_id, ErrorCode.H3_INTERNAL_ERROR)


@dataclass(eq=False)
class _Exchange:
    stream_id: int
    head: RequestHead
    body: _H3Body
    sink: _H3Sink
    content_length: int | None
    task: asyncio.Task[None] | None = None


# --------------------------------------------------------------------------------------------
# Connection protocol
# --------------------------------------------------------------------------------------------


class H3ServerProtocol(EdgeConnectionProtocol):
    """HTTP/3 over one QUIC connection, driving one handler task per request stream."""

    def __init__(
        self,
        quic: EdgeQuicConnection,
        *,
        handler: RequestHandler,
        limits: LimitsSection,
        metrics: H3Metrics,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        max_unacked: int = DEFAULT_MAX_UNACKED,
    ) -> None:
        super().__init__(quic)
        self.quic_edge = quic
        self.handler = handler
        self.limits = limits
        self.send_buffer = send_buffer
        self.max_unacked = max_unacked
        self._metrics = metrics
        self._h3: _EdgeH3Connection | None = None
        self._exchanges: dict[int, _Exchange] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_waiters: dict[int, asyncio.Future[None]] = {}
        self._terminated = False
        # Request streams with data but no complete HEADERS yet: stream id -> loop time of
        # their first byte (header_timeout, as for HTTP/1.1).
        self._head_pending: dict[int, float] = {}
        self._head_timer: asyncio.TimerHandle | None = None
        self.requests_started = 0
        metrics.conn_total.inc(PROTOCOL)
        metrics.conn_open.inc(PROTOCOL)

    # -- introspection (tests, debugging) --------------------------------------------------------

    @property
    def exchanges(self) -> dict[int, _Exchange]:
        return self._exchanges

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def client_addr(self) -> tuple[str, int]:
        # The active path's address (aioquic validates migrations before switching it).
        paths = self._quic._network_paths
        if paths:
            addr = paths[0].addr
            return str(addr[0]), int(addr[1])
        return "", 0

    # -- QUIC events -----------------------------------------------------------------------------

    def close(self, error_code: int = ErrorCode.H3_NO_ERROR, reason_phrase: str = "") -> None:
        super().close(error_code=error_code, reason_phrase=reason_phrase)

    def transmit(self) -> None:
        super().transmit()
        # Every batch of received datagrams and every timer ends here: ACKs may have freed
        # send buffer space, so writers blocked on it are re-checked.
        if self._drain_waiters:
            self._check_writers()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN and self._h3 is None:
                self._h3 = _EdgeH3Connection(
                    self.quic_edge, max_header_bytes=self.limits.max_header_bytes
                )
            return
        if isinstance(event, HandshakeCompleted):
            if self._h3 is None:
                # Without h3 negotiated there is nothing to speak; TLS normally prevents this.
                self._quic.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION, reason_phrase="no h3")
            return
        if isinstance(event, ConnectionTerminated):
            self._on_terminated()
            return
        if self._h3 is None:
            return
        try:
            if isinstance(event, StreamReset):
                self._on_peer_reset(event.stream_id)
            elif isinstance(event, StopSendingReceived):
                self._on_stop_sending(event.stream_id)
            h3_events = self._h3.handle_event(event)
        except Exception:
            # Whatever a peer sends must not escape into aioquic's event processing (from a timer
            # callback nothing would re-arm the connection's timer): close this connection only.
            log.exception("HTTP/3 layer failed; closing the connection")
            self._quic.close(error_code=ErrorCode.H3_INTERNAL_ERROR, reason_phrase="internal error")
            return
        for h3_event in h3_events:
            try:
                self._on_h3_event(h3_event)
            except Exception:
                # A bug in handling one request must not take the connection down.
                log.exception("HTTP/3 event handling failed")
        if (
            isinstance(event, StreamDataReceived)
            and event.stream_id not in self._head_pending
            and self._h3.awaiting_headers(event.stream_id)
        ):
            self._head_started(event.stream_id)

    def _on_h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            if event.stream_id not in self._exchanges:
                self._new_request(event)
        elif isinstance(event, TrailersReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None and event.stream_ended:
                # Trailers are not forwarded (the pipeline has no use for them) but end the body.
                self._body_ended(exchange)
        elif isinstance(event, DataReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                self._body_data(exchange, event.data, event.stream_ended)
        elif isinstance(event, StreamRejected):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is None:
                code = ErrorCode.H3_MESSAGE_ERROR if event.status == 400 else ErrorCode.H3_NO_ERROR
                self._reject(event.stream_id, event.status, event.reason, None, None, code)
            else:
                self._stream_error(exchange, event.status, event.reason, ErrorCode.H3_MESSAGE_ERROR)

    # -- requests --------------------------------------------------------------------------------

    def _head_started(self, stream_id: int) -> None:
        loop = asyncio.get_running_loop()
        self._head_pending[stream_id] = loop.time()
        if self._head_timer is None:
            self._head_timer = loop.call_later(self.limits.header_timeout, self._head_timeouts)

    def _head_timeouts(self) -> None:
        """408 on every request stream whose HEADERS are still incomplete after header_timeout."""
        self._head_timer = None
        if self._terminated:
            self._head_pending.clear()
            return
        loop = asyncio.get_running_loop()
        timeout = self.limits.header_timeout
        now = loop.time()
        for stream_id, since in list(self._head_pending.items()):
            if now - since >= timeout:
                del self._head_pending[stream_id]
                self._reject(
                    stream_id,
                    408,
                    f"client too slow sending the request headers ({timeout:g}s)",
                    None,
                    None,
                    ErrorCode.H3_REQUEST_INCOMPLETE,
                )
        if self._head_pending:
            first = min(self._head_pending.values())
            self._head_timer = loop.call_later(
                max(0.0, first + timeout - now), self._head_timeouts
            )

    def _new_request(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        self._head_pending.pop(stream_id, None)
        if not stream_is_request_response(stream_id):
            return
        request_id = self.handler.new_request_id()
        try:
            head, content_length = parse_request_head(
                event.headers,
                max_header_bytes=self.limits.max_header_bytes,
                client_addr=self.client_addr,
                request_id=request_id,
            )
        except HTTPError as err:
            code = ErrorCode.H3_MESSAGE_ERROR if err.status == 400 else ErrorCode.H3_NO_ERROR
            self._reject(stream_id, err.status, err.detail, None, request_id, code, event.headers)
            return
        limit = self.limits.max_body_bytes
        if content_length is not None and content_length > limit:
            self._reject(
                stream_id,
                413,
                f"request body of {content_length} bytes is larger than {limit}",
                head,
                request_id,
                ErrorCode.H3_NO_ERROR,
            )
            return
        length = 0 if event.stream_ended else content_length
        body = _H3Body(self, stream_id, self.limits.body_timeout, length)
        sink = _H3Sink(self, stream_id, head_only=head.method == b"HEAD")
        exchange = _Exchange(stream_id, head, body, sink, content_length)
        self._exchanges[stream_id] = exchange
        if event.stream_ended:
            self._body_ended(exchange)
        self.requests_started += 1
        task = self._loop.create_task(self._run(exchange))
        exchange.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _body_data(self, exchange: _Exchange, data: bytes, ended: bool) -> None:
        body = exchange.body
        if body.finished:
            return
        if data:
            self._metrics.bytes_total.inc(PROTOCOL, "in", amount=len(data))
            received = body.received + len(data)
            if exchange.content_length is not None and received > exchange.content_length:
                self._stream_error(
                    exchange,
                    400,
                    "request body longer than Content-Length",
                    ErrorCode.H3_MESSAGE_ERROR,
                )
                return
            limit = self.limits.max_body_bytes
            if received > limit:
                self._stream_error(
                    exchange,
                    413,
                    f"request body larger than {limit} bytes",
                    ErrorCode.H3_EXCESSIVE_LOAD,
                    stop_code=ErrorCode.H3_NO_ERROR,
                )
                return
            body.feed(data)
        if ended:
            self._body_ended(exchange)

    def _body_ended(self, exchange: _Exchange) -> None:
        # aioquic has checked Content-Length against the DATA received when the stream ended.
        exchange.body.feed_eof()
        self.quic_edge.forget_stream(exchange.stream_id)

    def body_timed_out(self, stream_id: int) -> None:
        """The handler gave up waiting for the body: take no more of it."""
        self._discard_input(stream_id, ErrorCode.H3_NO_ERROR)

    def _discard_input(self, stream_id: int, stop_code: int) -> None:
        """Take no more of the request stream: later frames are dropped unparsed, the client is
        asked to stop (STOP_SENDING) and gets no more credit."""
        if self._terminated or self.quic_edge.stream_receive_finished(stream_id):
            return
        if self._h3 is not None:
            self._h3.reject_stream(stream_id)
        self.quic_edge.stop_receiving(stream_id, stop_code)
        self.transmit_soon()

    def _stream_error(
        self,
        exchange: _Exchange,
        status: int,
        detail: str,
        reset_code: int,
        *,
        stop_code: int | None = None,
    ) -> None:
        """The request turned out malformed or too large after the handler got it.

        Before any response, the body fails with HTTPError(status) so that the handler answers
        with that status (or `_run` does, if it does not). After that, the stream is reset.
        """
        stream_id = exchange.stream_id
        self._discard_input(stream_id, reset_code if stop_code is None else stop_code)
        if exchange.sink.started:
            exchange.body.fail(BodyError(detail))
            self.reset_exchange(stream_id, reset_code)
        else:
            exchange.body.fail(HTTPError(status, detail))
        self.transmit_soon()

    async def _run(self, exchange: _Exchange) -> None:
        head, body, sink = exchange.head, exchange.body, exchange.sink
        failure: HTTPError | None = None
        try:
            await self.handler.handle(head, body, sink)
        except HTTPError as err:
            failure = err
        except BodyError:
            pass
        except Exception:
            log.exception("request %s: handler failed", head.request_id)
            failure = HTTPError(500, "internal error")
        finally:
            self._exchanges.pop(exchange.stream_id, None)
            self._drain_waiters.pop(exchange.stream_id, None)
        if self._terminated or sink.dead:
            self._done_with_input(exchange)
            return
        if not sink.started:
            if failure is None:
                failure = body.error if isinstance(body.error, HTTPError) else None
            if failure is None:
                failure = HTTPError(500, "handler produced no response")
            self._reject(
                exchange.stream_id,
                failure.status,
                failure.detail,
                head,
                head.request_id,
                ErrorCode.H3_NO_ERROR,
            )
            return
        if not sink.ended:
            # Never let a response that was cut short look complete.
            self.reset_exchange(exchange.stream_id, ErrorCode.H3_INTERNAL_ERROR)
        self._done_with_input(exchange)

    def _done_with_input(self, exchange: _Exchange) -> None:
        stream_id = exchange.stream_id
        if not exchange.body.eof:
            # The response is complete; RFC 9114 section 4.1: ask the client to stop sending
            # the rest of the request with H3_NO_ERROR.
            self._discard_input(stream_id, ErrorCode.H3_NO_ERROR)
        self.quic_edge.forget_stream(stream_id)

    def _reject(
        self,
        stream_id: int,
        status: int,
        detail: str,
        head: RequestHead | None,
        request_id: str | None,
        stop_code: int,
        raw_headers: Headers | None = None,
    ) -> None:
        """Answer an edge-detected error on a stream and take no more of its input."""
        self._head_pending.pop(stream_id, None)
        if self._h3 is None or self._terminated:
            return
        if request_id is None:
            request_id = self.handler.new_request_id()
        self._discard_input(stream_id, stop_code)
        head_only = head is not None and head.method == b"HEAD"
        if head is None and raw_headers is not None:
            head_only = (b":method", b"HEAD") in raw_headers
        try:
            rhead, payload = self.handler.reject(
                PROTOCOL, status, detail, head, self.client_addr, request_id
            )
            fields = response_fields(rhead)
            self._h3.send_headers(stream_id, fields, end_stream=head_only or not payload)
            if payload and not head_only:
                self._h3.send_data(stream_id, payload, end_stream=True)
                self._metrics.bytes_total.inc(PROTOCOL, "out", amount=len(payload))
        except (ProtocolError, RuntimeError, ValueError) as exc:
            # The stream is already reset by the peer (or gone): nothing to answer on.
            log.debug("cannot answer stream %d with %d: %s", stream_id, status, exc)
        except Exception:
            log.exception("request %s: reject failed", request_id)
            self._reset_quietly(stream_id, ErrorCode.H3_INTERNAL_ERROR)
        self.quic_edge.forget_stream(stream_id)
        self._h3.forget_stream(stream_id)
        self.transmit_soon()

    # -- response sending (used by _H3Sink) ------------------------------------------------------

    def _sendable(self, sink: _H3Sink) -> _EdgeH3Connection:
        if sink.dead or self._terminated or self._h3 is None:
            sink.dead = True
            raise BodyError("HTTP/3 stream was reset or the connection closed")
        return self._h3

    def send_headers(self, sink: _H3Sink, fields: Headers, end_stream: bool) -> None:
        h3 = self._sendable(sink)
        try:
            h3.send_headers(sink._stream_id, fields, end_stream=end_stream)
        except (ProtocolError, RuntimeError, ValueError) as exc:
            sink.dead = True
            raise BodyError(f"cannot send on HTTP/3 stream: {exc}") from None
        self.transmit_soon()

    def send_data(self, sink: _H3Sink, data: bytes, end_stream: bool) -> None:
        h3 = self._sendable(sink)
        try:
            h3.send_data(sink._stream_id, data, end_stream=end_stream)
        except (ProtocolError, RuntimeError, ValueError) as exc:
            sink.dead = True
            raise BodyError(f"cannot send on HTTP/3 stream: {exc}") from None
        if data:
            self._metrics.bytes_total.inc(PROTOCOL, "out", amount=len(data))
        self.transmit_soon()

    def _send_backlog(self, stream_id: int) -> tuple[int, int]:
        """(unsent, unacknowledged) bytes aioquic holds for `stream_id`."""
        stream = self.quic_edge._streams.get(stream_id)
        if stream is None:
            return 0, 0
        sender = stream.sender
        # private to aioquic 1.7.2's QuicStreamSender: buffer bounds in stream offsets
        stop = sender._buffer_stop
        return stop - sender.highest_offset, stop - sender._buffer_start

    def _writable(self, stream_id: int, factor: float) -> bool:
        unsent, unacked = self._send_backlog(stream_id)
        return unsent <= self.send_buffer * factor and unacked <= self.max_unacked * factor

    async def wait_writable(self, sink: _H3Sink) -> None:
        """Return once the stream's backlog is small enough; BodyError if it never gets there."""
        stream_id = sink._stream_id
        _, unacked = self._send_backlog(stream_id)
        sink.peak_buffered = max(sink.peak_buffered, unacked)
        if self._writable(stream_id, 1.0):
            return
        waiter = self._loop.create_future()
        self._drain_waiters[stream_id] = waiter
        try:
            async with asyncio.timeout(self.limits.send_timeout):
                await waiter
        except TimeoutError:
            self.reset_exchange(stream_id, ErrorCode.H3_REQUEST_CANCELLED)
            raise BodyError(
                f"client stopped reading ({self.limits.send_timeout:g}s send_timeout)"
            ) from None
        finally:
            if self._drain_waiters.get(stream_id) is waiter:
                del self._drain_waiters[stream_id]
        self._check_alive(sink)

    def _check_alive(self, sink: _H3Sink) -> None:
        if sink.dead or self._terminated:
            sink.dead = True
            raise BodyError("HTTP/3 stream was reset or the connection closed")

    def _check_writers(self) -> None:
        for stream_id, waiter in list(self._drain_waiters.items()):
            if waiter.done():
                continue
            exchange = self._exchanges.get(stream_id)
            if exchange is None or exchange.sink.dead or self._writable(stream_id, 0.5):
                waiter.set_result(None)

    # -- stream and connection ends --------------------------------------------------------------

    def reset_exchange(self, stream_id: int, error_code: int) -> None:
        """Reset the response (RESET_STREAM) and stop the request (STOP_SENDING)."""
        exchange = self._exchanges.get(stream_id)
        if exchange is not None:
            exchange.sink.dead = True
            exchange.body.fail(BodyError("HTTP/3 stream reset"))
        if not self._terminated:
            self._reset_quietly(stream_id, error_code)
            self._discard_input(stream_id, error_code)
            self.transmit_soon()
        self._wake_writer(stream_id)

    def _reset_quietly(self, stream_id: int, error_code: int) -> None:
        with contextlib.suppress(ValueError):
            self._quic.reset_stream(stream_id, error_code)

    def _wake_writer(self, stream_id: int) -> None:
        waiter = self._drain_waiters.get(stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_peer_reset(self, stream_id: int) -> None:
        """The client abandoned the request body (RESET_STREAM)."""
        self._head_pending.pop(stream_id, None)
        exchange = self._exchanges.get(stream_id)
        if exchange is not None and not exchange.body.eof:
            exchange.body.fail(BodyError("client reset the request stream"))
            self.quic_edge.forget_stream(stream_id)

    def _on_stop_sending(self, stream_id: int) -> None:
        """The client does not want the response: aioquic already reset our side."""
        exchange = self._exchanges.get(stream_id)
        if exchange is not None:
            exchange.sink.dead = True
            self._wake_writer(stream_id)

    def _on_terminated(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._head_pending.clear()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._metrics.conn_open.dec(PROTOCOL)
        for exchange in self._exchanges.values():
            exchange.sink.dead = True
            exchange.body.fail(BodyError("HTTP/3 connection closed"))
        for waiter in self._drain_waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def _cancel_tasks(self) -> None:
        self._on_terminated()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "H3Metrics",
    "H3ServerProtocol",
    "StreamRejected",
    "TrailersReceived",
    "field_section_size",
    "h3_configuration",
    "parse_request_head",
    "response_fields",
]
