"""Client side of an HTTP/1.1 connection, interchangeable with ``h11.Connection(h11.CLIENT)``, with
response heads tokenised in C (plain ones) or by httptools (llhttp), requests serialised by hand.

Why: the origin client (``edgeproxy.origin.client``) forwards every cache miss over a pooled
keep-alive connection, and h11's pure-Python parsing, validation and event plumbing cost more per
request than everything else on that path. `FastClientConnection` is the client-role twin of
``edgeproxy.http.h1fast.FastServerConnection``: it offers the part of the ``h11.Connection`` API the
origin client uses, returns real h11 event objects and raises ``h11.RemoteProtocolError`` /
``h11.LocalProtocolError`` with h11's messages and ``error_status_hint``s, so switching backends is
only the constructor line. ``tests/test_h1_client_differential.py`` runs both on a corpus of
responses and on generated inputs and requires identical events, states, errors and bytes.

How it stays in agreement with h11 0.16 (the design is h1fast's; its grammar helpers are shared):

* The receive buffer and its message boundaries follow h11: a head ends at the first
  ``\\n\\r?\\n``; nothing is parsed until ``next_event()``; a finished response leaves what follows
  it buffered (``PAUSED``) until ``start_next_cycle()``; the bytes after a 101 stay in
  ``trailing_data``; the 431 ("Receive buffer too long") is raised on exactly h11's condition.
* Only a complete head is parsed, so nothing reads into a body or the next response. Plain
  heads have their fields tokenised in C (h1fast's `plain_fields`); others are given to llhttp,
  one fresh parser per head. A head takes the fast path only if the status line matches h11's
  grammar (checked here: llhttp knows nothing of it), the fields are plain or llhttp (strict
  mode) accepts them, and
  the checks h1fast makes where llhttp is more lenient than h11 pass: one field per line, value
  whitespace stripped, Content-Length digits and length, Transfer-Encoding exactly ``chunked``.
  What llhttp must refuse for this to hold is probed at import with the *response* parser (the
  same probe h1fast runs on the request parser); if the installed llhttp is more lenient, every
  head that is not plain goes to h11. Every head the fast path does not take (status codes below
  100, HTTP versions llhttp does not know, obs-fold, bare LF, control bytes h11 tolerates,
  repeated Content-Length, Content-Length with Transfer-Encoding, ...) is parsed by h11's own
  response-head reader, so its verdict, event and error message are h11's by construction.
* Bodies are read here, following h11's readers: Content-Length; chunked (``;`` extensions, up to
  20 hex digits of size, trailers validated like h11's); and, for a response with neither,
  everything up to EOF (HTTP/1.0 style). Framing is decided as h11 decides it: no body for HEAD,
  204, 304 and a 2xx to CONNECT; Transfer-Encoding beats Content-Length.
* The state machine reproduces h11's for the client role: both parties' states, keep-alive
  (``Connection: close`` or HTTP/1.0 on either side), Upgrade and CONNECT switch proposals and
  the 101 / 2xx that accept them, ERROR handling, and the state-triggered transitions.
* Requests are written byte for byte as h11 writes them: request line, Host fields first, the
  other fields in order with their original case; bodies with Content-Length, or chunked with
  trailers. The Request object itself is trusted as h11 trusts it (h11 validated it when it was
  built: the caller decides how, see ``edgeproxy.origin.client``).

Known differences from h11 (none changes a verdict, a state, or a byte on the wire):

* Parsed events hold ``bytes`` where h11's hold ``bytearray`` (``Data.data``, header names and
  values, ``reason``, ``http_version``); events compare equal either way.
* Where h11 0.16 fails with ``AttributeError`` while formatting a state-machine error (sending a
  Request after the server already sent an unsolicited response), this module raises the
  LocalProtocolError h11 meant to raise.
* Client role only; ``send_with_data_passthrough`` and the server-side API are not provided.
* The fast path builds ``h11.Response`` / ``h11.InformationalResponse`` and their ``Headers``
  without re-running h11's validators (everything they check has been checked here), and the
  rare path calls h11's response-head reader directly; both rely on h11 0.16 internals, pinned
  by pyproject (``h11>=0.16,<0.17``) and by the differential tests.
"""

from __future__ import annotations

import re
from typing import Any

import h11
import httptools
from h11._readers import maybe_read_from_SEND_RESPONSE_server as _h11_read_response_head
from h11._receivebuffer import ReceiveBuffer

from .h1fast import (  # the shared h11 cycle, short names for h11's states and events, helpers
    _CLOSED,
    _DONE,
    _ERROR,
    _HEAD_END,
    _IDLE,
    _MAX_CONTENT_LENGTH_DIGITS,
    _MUST_CLOSE,
    _NEED_DATA,
    _PAUSED,
    _SEND_BODY,
    _SEND_RESPONSE,
    _SWITCHED,
    _W_CHUNKED,
    _W_LENGTH,
    _comma_values,
    _ConnectionClosed,
    _Data,
    _EndOfMessage,
    _H11Cycle,
    _HeaderSink,
    _LocalError,
    _RemoteError,
    _Request,
    _Response,
    _State,
    _write_fields,
    prevalidated_response,
    probe_llhttp,
    tokenise_fields,
)

__all__ = ["FastClientConnection"]

# h11's status-line grammar (RFC 7230 as h11 0.16 reads it): a 3-digit code, the reason phrase
# optional, and any bytes but NUL and whitespace other than SP / HTAB in it.
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?")

# Client-side event-triggered transitions (h11._state.EVENT_TRIGGERED_TRANSITIONS[CLIENT]).
_CLIENT_TRANSITIONS: dict[_State, dict[type, _State]] = {
    _IDLE: {_Request: _SEND_BODY, _ConnectionClosed: _CLOSED},
    _SEND_BODY: {_Data: _SEND_BODY, _EndOfMessage: _DONE},
    _DONE: {_ConnectionClosed: _CLOSED},
    _MUST_CLOSE: {_ConnectionClosed: _CLOSED},
    _CLOSED: {_ConnectionClosed: _CLOSED},
}

# Request fields that change how h11 frames a request or what it expects next.
_ANNOUNCING_FIELDS = frozenset(
    (b"connection", b"upgrade", b"expect", b"content-length", b"transfer-encoding")
)

# Response body readers (h11's "content-length", "chunked" and "http/1.0" framings).
_R_LENGTH = 0
_R_CHUNKED = 1
_R_EOF = 2

# Request body writers: h1fast's _W_LENGTH and _W_CHUNKED (requests are never close-delimited).


def _h11_parse_head(head: bytes) -> h11.Response | h11.InformationalResponse:
    """The arbiter for every head the fast path does not take: h11's reader, on the same bytes.

    Raises h11's LocalProtocolError for a bad head (next_event turns it into the remote one)."""
    buf = ReceiveBuffer()
    buf += head
    event = _h11_read_response_head(buf)
    if event is None:  # cannot happen: the head is complete and has no leading empty line
        raise _LocalError("malformed response head")
    return event


def _response_effects(
    event: h11.Response | h11.InformationalResponse,
) -> tuple[bool, bytes | None, bool]:
    """(chunked, content_length, close) of a response h11 parsed (the rare path)."""
    chunked = False
    content_length = None
    close = event.http_version < b"1.1"
    for name, value in event.headers:
        if name == b"transfer-encoding":
            chunked = True  # h11 has already refused anything but one "chunked"
        elif name == b"content-length":
            content_length = bytes(value)  # h11 has already merged repeats into one value
        elif name == b"connection":
            close = close or b"close" in _comma_values(value)
    return chunked, content_length, close


def _llhttp_accepts(head: bytes) -> list[tuple[bytes, bytes]] | None:
    sink = _HeaderSink()
    try:
        httptools.HttpResponseParser(sink).feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return [(raw, value) for raw, _, value in sink.items]


_LLHTTP_STRICT = probe_llhttp(_llhttp_accepts, b"HTTP/1.1 200 OK")


class FastClientConnection(_H11Cycle):
    """The client role of ``h11.Connection``: same events, states, errors and output bytes."""

    __slots__ = ("_reader",)

    def __init__(self, max_incomplete_event_size: int = 16 * 1024) -> None:
        super().__init__(max_incomplete_event_size)
        self._reader = _R_LENGTH  # how the response body is framed

    # -- state ------------------------------------------------------------------------------

    @property
    def our_state(self) -> _State:
        return self._c

    @property
    def their_state(self) -> _State:
        return self._s

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return False  # only a server's peer (a client) can be waiting

    def send_failed(self) -> None:
        self._c = _ERROR
        self._fire()

    # -- receiving ----------------------------------------------------------------------------

    def next_event(self) -> Any:
        """The next h11 event, ``h11.NEED_DATA`` or ``h11.PAUSED``; h11's rules and errors."""
        s = self._s
        if s is _ERROR:
            raise _RemoteError("Can't receive data when peer state is ERROR")
        buf = self._buf
        try:
            # The hot case first: a body whose bytes are already here.
            if s is _SEND_BODY and buf and self._reader == _R_LENGTH and self._remaining:
                return self._read_length()
            if s is _DONE and buf:
                return _PAUSED
            if s is _SWITCHED:
                return _PAUSED
            event: Any
            if s is _SEND_RESPONSE or s is _IDLE:
                event = self._read_head()
            elif s is _SEND_BODY:
                reader = self._reader
                if reader == _R_LENGTH:
                    event = self._read_length()
                elif reader == _R_CHUNKED:
                    event = self._read_chunked()
                else:
                    event = self._read_until_eof()
            else:  # DONE, MUST_CLOSE, CLOSED: only the end of the stream may come
                if buf:
                    raise _LocalError("Got data when expecting EOF")
                event = None
            if event is None:
                if not buf and self._closed:
                    event = self._eof_in_body() if s is _SEND_BODY else self._connection_closed()
                else:
                    if len(buf) > self._max:
                        raise _RemoteError("Receive buffer too long", error_status_hint=431)
                    if self._closed:
                        raise _RemoteError("peer unexpectedly closed connection")
                    return _NEED_DATA
            if type(event) is _EndOfMessage:
                self._s = _DONE
                self._fire()
            return event
        except BaseException as exc:
            self._s = _ERROR
            self._fire()
            if isinstance(exc, _LocalError):
                raise _RemoteError(str(exc), error_status_hint=exc.error_status_hint) from None
            raise

    def receive_whole(self, data: bytes) -> tuple[h11.Response, bytes] | None:
        """The common case in one call: when `data` is exactly one whole final response to the
        request just sent (bodiless by status or method, or with a Content-Length its body
        fills; keep-alive), returns it and its body, with the states moved on as
        ``receive_data(data)`` and taking Response, Data and EndOfMessage would. Otherwise
        returns None and changes nothing: feed the bytes the ordinary way.

        What it saves is the buffering between events (a copy in and out of the receive buffer
        and three trips through next_event); the head is parsed by the same code."""
        if self._s is not _SEND_RESPONSE or self._c is not _DONE or self._buf or self._closed:
            return None
        if self._upgrade_proposed or self._connect_proposed:
            return None
        m = _HEAD_END.search(data)
        if m is None:
            return None
        end = m.end()
        parsed = self._fast_head(data[:end])
        if parsed is None:
            return None
        event, chunked, content_length, close = parsed
        status = event.status_code
        if status < 200 or chunked or close or type(event) is not _Response:
            return None
        if status == 204 or status == 304 or self._request_method == b"HEAD":
            length = 0
        elif content_length is None:
            return None  # close-delimited
        else:
            length = int(content_length)
        if len(data) - end != length:
            return None  # more to come, or bytes of a next response
        self._head_received(event, status, False, content_length, False)
        self._remaining = 0
        self._s = _DONE
        self._fire()
        return event, data[end:]

    def _connection_closed(self) -> h11.ConnectionClosed:
        s = self._s
        if s is _SEND_RESPONSE:
            raise _LocalError(
                f"can't handle event type ConnectionClosed when role=SERVER and state={s}"
            )
        self._s = _CLOSED
        self._fire()
        return _ConnectionClosed()

    def _eof_in_body(self) -> h11.EndOfMessage:
        """EOF where the body reader has nothing more: the end of a close-delimited body, or an
        error for a framed one."""
        reader = self._reader
        if reader == _R_EOF:
            return _EndOfMessage()
        if reader == _R_CHUNKED:
            raise _RemoteError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)"
            )
        total = self._content_length
        raise _RemoteError(
            "peer closed connection without sending complete message body "
            f"(received {total - self._remaining} bytes, expected {total})"
        )

    def _read_head(self) -> h11.Response | h11.InformationalResponse | None:
        buf = self._buf
        if not buf:
            return None
        first = buf[0]
        if first == 0x0A or (first == 0x0D and buf[1:2] == b"\n"):
            del buf[: 1 if first == 0x0A else 2]
            self._lines_scan = self._line_scan = 0
            raise _LocalError("no response line received")
        m = _HEAD_END.search(buf, self._lines_scan)
        if m is None:
            self._lines_scan = max(0, len(buf) - 2)
            if first < 0x21:
                # h11's early sanity check (its message names a request line in both roles).
                raise _LocalError("illegal request line")
            return None
        end = m.end()
        if end == len(buf):
            head = bytes(buf)
            buf.clear()
        else:
            head = bytes(buf[:end])
            del buf[:end]
        self._lines_scan = self._line_scan = 0
        parsed = self._fast_head(head)
        if parsed is None:
            event = _h11_parse_head(head)
            self._head_received(event, event.status_code, *_response_effects(event))
        else:
            event, chunked, content_length, close = parsed
            self._head_received(event, event.status_code, chunked, content_length, close)
        return event

    def _fast_head(
        self, head: bytes
    ) -> tuple[h11.Response | h11.InformationalResponse, bool, bytes | None, bool] | None:
        """Parses a complete head (plain fields in C, others with llhttp); None when h11 has to
        decide instead."""
        line_end = head.find(b"\r\n")
        sl = _STATUS_LINE.fullmatch(head, 0, line_end)
        if sl is None:
            return None
        version, code, reason = sl.groups()
        status = int(code)
        if status < 100:
            return None  # h11 refuses it when building the event; let it word the error
        fields = tokenise_fields(head, self._sink, httptools.HttpResponseParser, _LLHTTP_STRICT)
        if fields is None:
            return None
        items, special = fields
        content_length: bytes | None = None
        chunked = False
        close = version < b"1.1"
        for i in special:
            raw, name, value = items[i]
            if name == b"content-length":
                # h11 merges repeated or comma-listed equal values; llhttp refuses both, so such
                # heads never get here.
                if (
                    content_length is not None
                    or not value.isdigit()
                    or len(value) > _MAX_CONTENT_LENGTH_DIGITS
                ):
                    return None
                content_length = value
            elif name == b"transfer-encoding":
                value = value.lower()  # h11 keeps the lowercased value
                if chunked or value != b"chunked":
                    return None  # h11: 501 (llhttp takes e.g. "gzip, chunked")
                chunked = True
                items[i] = (raw, name, value)
            elif name == b"connection":
                close = close or (b"close" in value.lower() and b"close" in _comma_values(value))
            # Host, Expect, Upgrade mean nothing in a response.
        # Everything h11's constructor would validate has been checked, so build it directly.
        event = prevalidated_response(items, status, reason or b"", version)
        return event, chunked, content_length, close

    def _head_received(
        self,
        event: h11.Response | h11.InformationalResponse,
        status: int,
        chunked: bool,
        content_length: bytes | None,
        close: bool,
    ) -> None:
        """What h11's _process_event does for a server's (Informational)Response."""
        s = self._s
        new: _State
        if status < 200:
            if status == 101:
                if not self._upgrade_proposed:
                    raise _LocalError(
                        "Received server _SWITCH_UPGRADE event without a pending proposal"
                    )
                new = _SWITCHED
            else:
                new = _SEND_RESPONSE
            if s is not _SEND_RESPONSE:  # IDLE: nothing was asked yet
                raise _LocalError(
                    f"can't handle event type InformationalResponse when role=SERVER and state={s}"
                )
        elif self._connect_proposed and status < 300:
            if s is not _SEND_RESPONSE:  # unreachable: a proposal comes with a request
                raise _LocalError(
                    f"can't handle event type Response when role=SERVER and state={s}"
                )
            new = _SWITCHED  # a 2xx accepts a CONNECT
        else:
            # A Response without a switch ends any proposal; it is valid in IDLE too (h11
            # accepts a response that precedes the request, e.g. a 408 on an idle connection).
            self._upgrade_proposed = self._connect_proposed = False
            new = _SEND_BODY
        self._s = new
        self._fire()
        self.their_http_version = event.http_version
        if status >= 200 and close:
            self._keep_alive = False
            self._fire()
        self.client_is_waiting_for_100_continue = False
        if new is _SEND_BODY:
            # h11's _body_framing for a response to the request as it really was.
            method = self._request_method
            if (
                status == 204
                or status == 304
                or method == b"HEAD"
                or (method == b"CONNECT" and status < 300)
            ):
                self._reader, self._remaining, self._content_length = _R_LENGTH, 0, 0
            elif chunked:
                self._reader = _R_CHUNKED
                self._chunk_left = 0
                self._chunk_discard = b""
                self._in_trailer = False
            elif content_length is not None:
                self._reader = _R_LENGTH
                self._content_length = self._remaining = int(content_length)
            else:
                self._reader = _R_EOF

    def _read_until_eof(self) -> h11.Data | None:
        buf = self._buf
        if not buf:
            return None  # at EOF, next_event turns this into the EndOfMessage
        data = bytes(buf)
        buf.clear()
        self._lines_scan = self._line_scan = 0
        return _Data(data=data)

    # -- sending ------------------------------------------------------------------------------

    def send(self, event: Any) -> bytes | None:
        """Bytes for one client event, exactly as ``h11.Connection.send`` produces them."""
        if self._c is _ERROR:
            raise _LocalError("Can't send data when our state is ERROR")
        try:
            etype = type(event)
            if etype is _Request:
                return self._send_request(event)
            if etype is _Data:
                return self._send_data(event.data)
            if etype is _EndOfMessage:
                return self._send_eom(event)
            if etype is _Response:
                # h11 drops pending switch proposals on any Response before refusing it.
                self._upgrade_proposed = self._connect_proposed = False
            # ConnectionClosed; anything else is refused by the transition table, as in h11.
            self._client_transition(etype)
            return None
        except BaseException:
            self._c = _ERROR
            self._fire()
            raise

    def _client_transition(self, etype: type) -> None:
        c = self._c
        new = _CLIENT_TRANSITIONS.get(c, {}).get(etype)
        if new is None:
            raise _LocalError(
                f"can't handle event type {etype.__name__} when role=CLIENT and state={c}"
            )
        self._c = new
        self._fire()

    def _send_request(self, req: h11.Request) -> bytes:
        method = req.method
        version = req.http_version
        items: list[tuple[bytes, bytes, bytes]] = req.headers._full_items
        upgrade = False
        close = version < b"1.1"
        expect_continue = False
        chunked = False
        content_length: bytes | None = None
        for _raw, name, value in items:
            if name == b"connection":
                close = close or b"close" in _comma_values(value)
            elif name == b"content-length":
                content_length = value  # h11 merged repeats when the Request was built
            elif name == b"transfer-encoding":
                chunked = True  # ... and refused anything but one "chunked"
            elif name == b"upgrade":
                upgrade = upgrade or bool(_comma_values(value))
            elif name == b"expect":
                expect_continue = expect_continue or b"100-continue" in _comma_values(value)
        # h11's order: switch proposals first (each firing the state-triggered transitions),
        # then both parties' transitions.
        if method == b"CONNECT":
            self._connect_proposed = True
            self._fire()
        if upgrade:
            self._upgrade_proposed = True
            self._fire()
        self._client_transition(_Request)
        if self._s is not _IDLE:
            # The server answered before we asked (h11 allows receiving that): h11 fails here
            # formatting its error (AttributeError); this is the error it means to raise.
            raise _LocalError(
                f"can't handle event type Request when role=SERVER and state={self._s}"
            )
        self._s = _SEND_RESPONSE
        self._fire()
        self._request_method = method
        if close:
            self._keep_alive = False
            self._fire()
        if expect_continue and version >= b"1.1":
            self.client_is_waiting_for_100_continue = True
        # h11's _body_framing for a request: Transfer-Encoding beats Content-Length; neither
        # means no body.
        if chunked:
            self._out_mode = _W_CHUNKED
        else:
            self._out_mode = _W_LENGTH
            self._out_left = int(content_length) if content_length is not None else 0
        if version != b"1.1":
            raise _LocalError("I only send HTTP/1.1")
        out = [b"%s %s HTTP/1.1\r\n" % (method, req.target)]
        _write_fields(out, items)
        return b"".join(out)

    def send_bodiless(
        self, method: bytes, target: bytes, items: list[tuple[bytes, bytes, bytes]]
    ) -> bytes | None:
        """``send(Request(...)) + send(EndOfMessage())`` in one call, for the common request:
        no body by h11's framing and nothing proposed or announced (no Connection, Upgrade,
        Expect, Content-Length or Transfer-Encoding field; not CONNECT), sent on an idle
        connection. The same bytes and states; None, with nothing changed, for any other."""
        if self._c is not _IDLE or self._s is not _IDLE or method == b"CONNECT":
            return None
        for _raw, name, _value in items:
            if name in _ANNOUNCING_FIELDS:
                return None
        self._c = _DONE
        self._s = _SEND_RESPONSE
        self._request_method = method
        self._out_mode = _W_LENGTH
        self._out_left = 0
        self._fire()
        out = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        _write_fields(out, items)
        return b"".join(out)

    def _send_data(self, data: bytes) -> bytes:
        if self._c is not _SEND_BODY:
            self._client_transition(_Data)  # raises: Data is only valid in SEND_BODY
        self.client_is_waiting_for_100_continue = False
        if self._out_mode == _W_LENGTH:
            self._out_left -= len(data)
            if self._out_left < 0:
                raise _LocalError("Too much data for declared Content-Length")
            return data if type(data) is bytes else bytes(data)
        if not data:
            return b""
        return b"%x\r\n%b\r\n" % (len(data), data)

    def _send_eom(self, event: h11.EndOfMessage) -> bytes:
        self._client_transition(_EndOfMessage)
        self.client_is_waiting_for_100_continue = False
        trailers = event.headers
        if self._out_mode == _W_LENGTH:
            if self._out_left != 0:
                raise _LocalError("Too little data for declared Content-Length")
            if trailers:
                raise _LocalError("Content-Length and trailers don't mix")
            return b""
        if not trailers:
            return b"0\r\n\r\n"
        out = [b"0\r\n"]
        _write_fields(out, trailers._full_items)
        return b"".join(out)
