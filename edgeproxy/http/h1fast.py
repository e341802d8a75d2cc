"""Server side of an HTTP/1.1 connection, interchangeable with ``h11.Connection(h11.SERVER)``, with
request heads tokenised in C (plain ones) or by httptools (llhttp), responses serialised by hand.

Why: h11 is the project's HTTP/1.1 state machine, but its pure-Python parsing and event plumbing
cap one core at a few thousand requests per second. `FastServerConnection` offers the part of the
``h11.Connection`` API that ``edgeproxy.http.h1server`` uses, returns real h11 event objects and
raises ``h11.RemoteProtocolError`` with the same ``error_status_hint``; so switching backends is
only the constructor line. ``tests/test_h1_differential.py`` runs both on a corpus and on
generated inputs and requires identical events, states, errors and bytes.

How it stays in agreement with h11 0.16:

* The receive buffer and its message boundaries follow h11: a head ends at the first
  ``\\n\\r?\\n``; nothing is parsed until ``next_event()``; a complete message leaves the bytes
  after it buffered (``PAUSED``) until ``start_next_cycle()``; the 431 ("Receive buffer too long")
  is raised on exactly the same condition, i.e. only while an event is still incomplete.
* Only a complete head is ever fed to llhttp, one fresh parser per head. That is what keeps a
  pipelined request or the bytes after an Upgrade unparsed: httptools gives no way to pause
  llhttp at the end of a message.
* Most heads are plain: every field line is ``name: value`` with a token name, a value of
  visible ASCII or obs-text and a CRLF ending. Their fields are tokenised in one C call
  (`_fields.c`, `plain_fields`: h11's field grammar narrowed, so it reads them exactly as h11
  does); the checks below still apply. Other heads go to llhttp (and all of them when the C
  extension is not built).
* A head takes the llhttp path only if llhttp (strict mode) accepts it *and* it passes explicit
  checks for every point where llhttp is more lenient than h11: a leading empty line (llhttp
  skips it, h11 rejects it: the boundary search above does too), the request line (llhttp takes
  repeated spaces and knows nothing of h11's grammar, which is applied here), whitespace after a
  value (llhttp keeps it; stripped here), Content-Length (llhttp takes 21+ digits),
  Transfer-Encoding (llhttp takes ``gzip, chunked``; h11 wants one ``chunked``, any case),
  Host (exactly one for HTTP/1.1, at most one otherwise) and one field per line. What llhttp
  must refuse for this to hold (bare CR or LF, folded lines, whitespace before the colon, bytes
  outside h11's grammar in names and values) is probed once at import: if the installed llhttp
  is more lenient, the llhttp path is switched off rather than trusted. Every head the fast path
  does not take, malformed or merely unusual (methods llhttp does not know,
  ``Content-Length: 5, 5``, obs-fold, bare LF, control bytes h11 tolerates, ...), is parsed by
  h11 itself, so the verdict, the Request and the error are h11's by construction; those heads
  cost what they cost before.
* Bodies are read here, following h11's grammar (Content-Length; chunked with any ``;...``
  extension, up to 20 hex digits of size, trailers validated like h11's). llhttp is not used
  for bodies: it cannot stop at a message boundary, and its chunk grammar differs from h11's.
* The state machine reproduces h11's (client and server states, keep-alive, switch proposals,
  the state-triggered transitions, ERROR handling), and responses are written byte for byte as
  h11 writes them, including the Transfer-Encoding / Content-Length / Connection: close
  rewriting h11 does for HEAD, 204, 304, HTTP/1.0 clients and Connection: close.

Known differences from h11 (none changes a verdict, a status or a byte on the wire):

* ``Data.data`` from ``next_event()`` is ``bytes`` (h11 hands out ``bytearray``).
* ``str()`` of an error raised by this module's body readers shows ``bytes`` reprs where h11
  shows ``bytearray`` ones. Errors about heads are h11's own exceptions.
* Where h11 0.16 itself fails with ``AttributeError`` while formatting a state-machine error (a
  request arriving after the server already sent an unsolicited response; a second 101), this
  module raises the ProtocolError h11 meant to raise.
* Server role only; ``send_with_data_passthrough`` and the client-side API are not provided.
* The fast path builds ``h11.Request`` and its ``Headers`` without re-running h11's validators
  (this module has already checked everything they check), which relies on h11 0.16 internals;
  pyproject pins ``h11>=0.16,<0.17`` and the differential tests pin the behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import h11
import httptools
from h11._headers import Headers  # private: see "Known differences" above
from h11._util import Sentinel

_c_plain_fields: Callable[[bytes], tuple[list[tuple[bytes, bytes, bytes]], list[int]] | None] | None
try:
    from ._fields import plain_fields as _c_plain_fields
except ImportError:  # built without C extensions (EDGEPROXY_PURE_PYTHON=1)
    _c_plain_fields = None

__all__ = ["FastServerConnection"]

_State = type[Sentinel]

_IDLE = h11.IDLE
_SEND_RESPONSE = h11.SEND_RESPONSE
_SEND_BODY = h11.SEND_BODY
_DONE = h11.DONE
_MUST_CLOSE = h11.MUST_CLOSE
_CLOSED = h11.CLOSED
_MIGHT_SWITCH = h11.MIGHT_SWITCH_PROTOCOL
_SWITCHED = h11.SWITCHED_PROTOCOL
_ERROR = h11.ERROR
_NEED_DATA = h11.NEED_DATA
_PAUSED = h11.PAUSED

_Request = h11.Request
_Response = h11.Response
_Informational = h11.InformationalResponse
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_ConnectionClosed = h11.ConnectionClosed
_LocalError = h11.LocalProtocolError
_RemoteError = h11.RemoteProtocolError

_setattr = object.__setattr__

# h11's grammar (RFC 7230 as h11 0.16 reads it), written out for the places this module checks
# itself. Same rules, so the differential tests can compare verdicts exactly.
_HEAD_END = re.compile(rb"\n\r?\n")
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
_HEADER_FIELD = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*"
)
_OBS_FOLD = re.compile(rb"[ \t]+")
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Bytes h11 accepts in a field value once the surrounding whitespace is stripped, if they are
# all llhttp lets through (h11 accepts more: it also takes most control bytes).
_VALUE_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Header names the fast path has to look at; everything else is only lowercased.
_FRAMING_NAMES = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade")
)
_MAX_CONTENT_LENGTH_DIGITS = 20  # h11's CONTENT_LENGTH_MAX_DIGITS

# Server-side event-triggered transitions (h11._state.EVENT_TRIGGERED_TRANSITIONS[SERVER],
# without the switch variants, which send() handles itself).
_SERVER_TRANSITIONS: dict[_State, dict[type, _State]] = {
    _IDLE: {_ConnectionClosed: _CLOSED, _Response: _SEND_BODY},
    _SEND_RESPONSE: {_Informational: _SEND_RESPONSE, _Response: _SEND_BODY},
    _SEND_BODY: {_Data: _SEND_BODY, _EndOfMessage: _DONE},
    _DONE: {_ConnectionClosed: _CLOSED},
    _MUST_CLOSE: {_ConnectionClosed: _CLOSED},
    _CLOSED: {_ConnectionClosed: _CLOSED},
}

# Response body writers (h11's "content-length", "chunked" and "http/1.0" framings).
_W_LENGTH = 0
_W_CHUNKED = 1
_W_HTTP10 = 2

_EMPTY_EOM = _EndOfMessage()


def data_event(data: bytes) -> h11.Data:
    """``h11.Data(data=data)`` without running its interpreted constructor (events are frozen
    value objects: this sets the same three slots)."""
    event = object.__new__(_Data)
    _setattr(event, "data", data)
    _setattr(event, "chunk_start", False)
    _setattr(event, "chunk_end", False)
    return event


def prevalidated_headers(items: list[tuple[bytes, bytes, bytes]]) -> Headers:
    """h11's Headers over already normalised `items` (raw name, lowercase name, value), without
    running its interpreted constructor (it only stores the list)."""
    headers = object.__new__(Headers)
    _setattr(headers, "_full_items", items)
    return headers


def prevalidated_response(
    items: list[tuple[bytes, bytes, bytes]], status: int, reason: bytes, version: bytes = b"1.1"
) -> h11.Response | h11.InformationalResponse:
    """An h11 (Informational)Response whose fields were already checked and normalised the way
    h11's constructor would (`items`: raw name, lowercase name, value), built without running
    that constructor (interpreted Python, and the larger part of building one)."""
    cls: type[h11.Response] | type[h11.InformationalResponse] = (
        _Informational if status < 200 else _Response
    )
    event = object.__new__(cls)
    _setattr(event, "headers", prevalidated_headers(items))
    _setattr(event, "http_version", version)
    _setattr(event, "reason", reason)
    _setattr(event, "status_code", status)
    return event


def _comma_values(value: bytes) -> list[bytes]:
    """h11's get_comma_header for one field value: lowercased, split on commas, stripped."""
    return [v for v in (p.strip() for p in value.lower().split(b",")) if v]


def _h11_parse_head(head: bytes) -> h11.Request:
    """The arbiter for every head the fast path does not take: h11 itself, on the same bytes."""
    probe = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    probe.receive_data(head)
    event = probe.next_event()  # raises h11's RemoteProtocolError for a bad head
    if type(event) is not _Request:  # cannot happen: the head is complete and has no leading CRLF
        raise _RemoteError("malformed request head")
    return event


# What a Request means for the connection: (chunked, content_length, close, expect_continue,
# upgrade), as h11's _body_framing, _keep_alive, has_expect_100_continue and get_comma_header
# read it.
_Effects = tuple[bool, bytes | None, bool, bool, bool]


def _effects_of(req: h11.Request) -> _Effects:
    """The effects of a Request h11 parsed (the rare path)."""
    content_length = None
    chunked = False
    close = req.http_version < b"1.1"
    expect_continue = False
    upgrade = False
    for name, value in req.headers:
        if name == b"content-length":
            content_length = value  # h11 has already merged repeats into one value
        elif name == b"transfer-encoding":
            chunked = True  # h11 has already refused anything but one "chunked"
        elif name == b"connection":
            close = close or b"close" in _comma_values(value)
        elif name == b"expect":
            expect_continue = expect_continue or b"100-continue" in _comma_values(value)
        elif name == b"upgrade":
            upgrade = upgrade or bool(_comma_values(value))
    return chunked, content_length, close, expect_continue and req.http_version >= b"1.1", upgrade


def _decode_trailer_lines(lines: list[bytearray]) -> list[tuple[bytes, bytes]]:
    """Trailer fields as h11 reads them: obs-fold joined with one space, each field validated."""
    unfolded: list[bytearray] = []
    for line in lines:
        match = _OBS_FOLD.match(line)
        if match:
            if not unfolded:
                raise _LocalError("continuation line at start of headers")
            unfolded[-1] = unfolded[-1] + b" " + line[match.end() :]
        else:
            unfolded.append(line)
    fields = []
    for line in unfolded:
        m = _HEADER_FIELD.fullmatch(line)
        if m is None:
            raise _LocalError(f"illegal header line: {line!r}")
        fields.append((bytes(m[1]), bytes(m[2])))
    return fields


def _write_fields(out: list[bytes], items: list[tuple[bytes, bytes, bytes]]) -> None:
    """Appends header lines as h11 writes them: Host fields first, then the rest in order."""
    host_at = len(out)
    for raw, name, value in items:
        if name == b"host":
            out[host_at:host_at] = (raw, b": ", value, b"\r\n")
            host_at += 4
        else:
            out += (raw, b": ", value, b"\r\n")
    out.append(b"\r\n")


class _HeaderSink:
    """llhttp callback target: the head's fields in wire order, as h11 stores them (raw name,
    lowercased name, value without surrounding whitespace), plus where the fields that need a
    closer look are. Doing this in the callback saves a second pass over the fields."""

    __slots__ = ("items", "special")

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes, bytes]] = []
        self.special: list[int] = []

    def on_header(self, raw: bytes, value: bytes) -> None:
        name = raw.lower()
        if name in _FRAMING_NAMES:
            self.special.append(len(self.items))
        # llhttp drops the whitespace before a value but keeps the whitespace after it.
        self.items.append((raw, name, value.strip(b" \t")))


def plain_fields(head: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], list[int]] | None:
    """The fields of a whole head (first line checked by the caller) when every field line is
    plain, tokenised in C (`_fields.c`): (items as h11 keeps them, indexes of the framing
    fields). None when a line is not plain or the extension is not built: llhttp or h11 decide."""
    return None if _c_plain_fields is None else _c_plain_fields(head)


def tokenise_fields(
    head: bytes, sink: _HeaderSink, parser: Callable[[_HeaderSink], Any], llhttp_strict: bool
) -> tuple[list[tuple[bytes, bytes, bytes]], list[int]] | None:
    """The fields of a whole head whose first line the caller has checked, and the indexes of
    the framing ones: plain field lines tokenised in C, others by llhttp (`parser`, httptools'
    request or response parser class, trusted only when its probe passed: `llhttp_strict`).
    None when neither vouches for every line: h11 decides then."""
    plain = plain_fields(head)
    if plain is not None:
        return plain
    if not llhttp_strict:
        return None
    items: list[tuple[bytes, bytes, bytes]] = []
    special: list[int] = []
    sink.items = items
    sink.special = special
    try:
        parser(sink).feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade, CONNECT or a 101: llhttp stops after the head, which is all it was given
    except httptools.HttpParserError:
        return None
    # One field per line: nothing was folded or split differently from h11's reading.
    if len(items) != head.count(b"\n") - 2:
        return None
    return items, special


def _llhttp_accepts(head: bytes) -> list[tuple[bytes, bytes]] | None:
    sink = _HeaderSink()
    try:
        httptools.HttpRequestParser(sink).feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return [(raw, value) for raw, _, value in sink.items]


def probe_llhttp(accepts: Callable[[bytes], list[tuple[bytes, bytes]] | None], start_line: bytes) -> bool:
    """Whether an llhttp parser (`accepts`: head -> fields, or None if refused) is as strict as
    the fast paths assume.

    They lean on llhttp (strict mode, the default since llhttp 9) to refuse what they do not check
    themselves: bare CR or LF, folded lines, whitespace before the colon, and field names or values
    with bytes outside h11's grammar (such heads then go to h11, which decides). An httptools built
    with a more lenient llhttp fails these probes, and then every head is parsed by h11: slower,
    never wrong. Used for the request parser here and the response parser in h1fast_client; the
    differential tests assert both probes pass.
    """
    base = start_line + b"\r\nX-Base: a\r\n"
    if accepts(base + b"\r\n") != [(b"X-Base", b"a")]:
        return False
    for bad in (
        start_line + b"\nX-Base: a\n\n",
        base + b"X: b\nY: c\r\n\r\n",
        base + b"X: b\rY: c\r\n\r\n",
        base + b"X: b\r\n c\r\n\r\n",
        base + b"X: b\r\n\tc\r\n\r\n",
        base + b"X : b\r\n\r\n",
        base + b": b\r\n\r\n",
        base + b"X: b\r\n\n",
        base + b"X: b\n\r\n",
    ):
        if accepts(bad) is not None:
            return False
    for byte in (bytes([i]) for i in range(256)):
        if byte not in b"\r\n:":
            fields = accepts(base + b"X" + byte + b"Y: v\r\n\r\n")
            if fields is not None and (
                fields[1:] != [(b"X" + byte + b"Y", b"v")] or byte not in _TCHAR
            ):
                return False
        if byte not in b"\r\n":
            fields = accepts(base + b"X: a" + byte + b"b\r\n\r\n")
            if fields is not None and (
                fields[1:] != [(b"X", b"a" + byte + b"b")] or byte not in _VALUE_BYTES
            ):
                return False
    return True


_LLHTTP_STRICT = probe_llhttp(_llhttp_accepts, b"GET / HTTP/1.1")


class _H11Cycle:
    """What the server and client roles share: h11's pair of states and its state-triggered
    transitions, the receive buffer, the request/response cycle, Content-Length and chunked
    bodies, and head and trailer lines."""

    __slots__ = (
        "_buf",
        "_c",
        "_chunk_discard",
        "_chunk_left",
        "_closed",
        "_connect_proposed",
        "_content_length",
        "_in_trailer",
        "_keep_alive",
        "_line_scan",
        "_lines_scan",
        "_max",
        "_out_left",
        "_out_mode",
        "_remaining",
        "_request_method",
        "_s",
        "_sink",
        "_upgrade_proposed",
        "client_is_waiting_for_100_continue",
        "their_http_version",
    )

    _buf: bytearray
    _max: int
    _content_length: int
    _out_mode: int
    _out_left: int
    _sink: _HeaderSink
    their_http_version: bytes | None
    client_is_waiting_for_100_continue: bool
    _chunk_discard: bytes
    _chunk_left: int
    _in_trailer: bool
    _c: _State
    _s: _State
    _closed: bool
    _connect_proposed: bool
    _keep_alive: bool
    _line_scan: int
    _lines_scan: int
    _remaining: int
    _request_method: bytes | None
    _upgrade_proposed: bool

    def __init__(self, max_incomplete_event_size: int) -> None:
        self._max = max_incomplete_event_size
        self._buf = bytearray()
        self._closed = False
        # Resume points for the two boundary searches, so a head or a chunk-size line that
        # arrives a byte at a time is scanned once (h11's ReceiveBuffer does the same).
        self._lines_scan = 0
        self._line_scan = 0
        self._c = _IDLE
        self._s = _IDLE
        self._keep_alive = True
        self._upgrade_proposed = False
        self._connect_proposed = False
        self._request_method = None
        self.their_http_version = None
        self.client_is_waiting_for_100_continue = False
        # The peer's body: Content-Length or chunked reader state.
        self._remaining = 0
        self._content_length = 0
        self._chunk_left = 0
        self._chunk_discard = b""
        self._in_trailer = False
        # Our body's writer.
        self._out_mode = _W_LENGTH
        self._out_left = 0
        self._sink = _HeaderSink()

    @property
    def states(self) -> dict[_State, _State]:
        return {h11.CLIENT: self._c, h11.SERVER: self._s}

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return (bytes(self._buf), self._closed)

    def start_next_cycle(self) -> None:
        if self._c is not _DONE or self._s is not _DONE:
            raise _LocalError(f"not in a reusable state. self.states={self.states}")
        self._c = self._s = _IDLE
        self._request_method = None

    def _fire(self) -> None:
        """h11's state-triggered transitions, applied until nothing changes."""
        c, s = self._c, self._s
        while True:
            c0, s0 = c, s
            # A pending switch proposal wins over keep-alive (h11 gives it priority).
            if self._upgrade_proposed or self._connect_proposed:
                if c is _DONE:
                    c = _MIGHT_SWITCH
            elif c is _MIGHT_SWITCH:
                c = _DONE
            if not self._keep_alive:
                if c is _DONE:
                    c = _MUST_CLOSE
                if s is _DONE:
                    s = _MUST_CLOSE
            if c is _MIGHT_SWITCH and s is _SWITCHED:
                c = _SWITCHED
            elif (c is _CLOSED and (s is _DONE or s is _IDLE)) or (c is _ERROR and s is _DONE):
                s = _MUST_CLOSE
            elif (s is _CLOSED and (c is _DONE or c is _IDLE)) or (s is _ERROR and c is _DONE):
                c = _MUST_CLOSE
            if c is c0 and s is s0:
                break
        self._c, self._s = c, s

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._closed:
                raise RuntimeError("received close, then received more data?")
            self._buf += data
        else:
            self._closed = True

    def _read_length(self) -> h11.Data | h11.EndOfMessage | None:
        remaining = self._remaining
        if remaining == 0:
            return _EMPTY_EOM
        buf = self._buf
        if not buf:
            return None
        if len(buf) <= remaining:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:remaining])
            del buf[:remaining]
        self._lines_scan = self._line_scan = 0
        self._remaining = remaining - len(data)
        return data_event(data)

    def _extract_lines(self) -> list[bytearray] | None:
        """Everything up to the first blank line, as lines without their CR/LF (h11's rule).

        bytearray lines, as h11's, so error messages quoting them read the same."""
        buf = self._buf
        first = buf[:2]
        if first[:1] == b"\n" or first == b"\r\n":
            del buf[: 1 if first[:1] == b"\n" else 2]
            self._lines_scan = self._line_scan = 0
            return []
        m = _HEAD_END.search(buf, self._lines_scan)
        if m is None:
            self._lines_scan = max(0, len(buf) - 2)
            return None
        end = m.end()
        block = buf[:end]
        del buf[:end]
        self._lines_scan = self._line_scan = 0
        lines = block.split(b"\n")
        del lines[-2:]
        return [line[:-1] if line[-1:] == b"\r" else line for line in lines]

    def _read_chunked(self) -> h11.Data | h11.EndOfMessage | None:
        buf = self._buf
        if self._in_trailer:
            lines = self._extract_lines()
            if lines is None:
                return None
            if not lines:
                return _EMPTY_EOM
            return _EndOfMessage(headers=_decode_trailer_lines(lines))
        if self._chunk_discard:
            expected = self._chunk_discard
            got = buf[: len(expected)]
            if not got:
                return None
            del buf[: len(got)]
            self._lines_scan = self._line_scan = 0
            if got != expected[: len(got)]:
                raise _LocalError(f"malformed chunk footer: {got!r} (expected {expected!r})")
            self._chunk_discard = expected[len(got) :]
            if self._chunk_discard:
                return None
        if self._chunk_left == 0:
            idx = buf.find(b"\r\n", max(0, self._line_scan - 1))
            if idx == -1:
                self._line_scan = len(buf)
                return None
            # Matched in place: only a bad line is copied (for the error message).
            m = _CHUNK_HEADER.fullmatch(buf, 0, idx + 2)
            if m is None:
                line = buf[: idx + 2]
                del buf[: idx + 2]
                self._lines_scan = self._line_scan = 0
                raise _LocalError(f"illegal chunk header: {line!r}")
            size = int(m[1], 16)
            del buf[: idx + 2]
            self._lines_scan = self._line_scan = 0
            self._chunk_left = size
            if size == 0:
                self._in_trailer = True
                return self._read_chunked()
            chunk_start = True
        else:
            chunk_start = False
        if not buf:
            return None
        left = self._chunk_left
        if len(buf) <= left:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:left])
            del buf[:left]
        self._lines_scan = self._line_scan = 0
        self._chunk_left = left = left - len(data)
        if left == 0:
            self._chunk_discard = b"\r\n"
        return _Data(data=data, chunk_start=chunk_start, chunk_end=left == 0)


class FastServerConnection(_H11Cycle):
    """The server role of ``h11.Connection``: same events, states, errors and output bytes."""

    __slots__ = ("_chunked",)

    def __init__(self, max_incomplete_event_size: int = 16 * 1024) -> None:
        super().__init__(max_incomplete_event_size)
        self._chunked = False  # how the request body is framed

    # -- state ------------------------------------------------------------------------------

    @property
    def our_state(self) -> _State:
        return self._s

    @property
    def their_state(self) -> _State:
        return self._c

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self.client_is_waiting_for_100_continue

    def send_failed(self) -> None:
        self._s = _ERROR
        self._fire()

    # -- receiving ----------------------------------------------------------------------------

    def next_event(self) -> Any:
        """The next h11 event, ``h11.NEED_DATA`` or ``h11.PAUSED``; h11's rules and errors."""
        c = self._c
        if c is _ERROR:
            raise _RemoteError("Can't receive data when peer state is ERROR")
        buf = self._buf
        try:
            if c is _DONE and buf:
                return _PAUSED
            if c is _MIGHT_SWITCH or c is _SWITCHED:
                return _PAUSED
            event: Any
            if c is _IDLE:
                event = self._read_head()
            elif c is _SEND_BODY:
                event = self._read_chunked() if self._chunked else self._read_length()
            else:  # DONE, MUST_CLOSE, CLOSED: only the end of the stream may come
                if buf:
                    raise _LocalError("Got data when expecting EOF")
                event = None
            if event is None:
                if not buf and self._closed:
                    if c is _SEND_BODY:
                        raise self._eof_in_body()
                    event = _ConnectionClosed()
                else:
                    if len(buf) > self._max:
                        raise _RemoteError("Receive buffer too long", error_status_hint=431)
                    if self._closed:
                        raise _RemoteError("peer unexpectedly closed connection")
                    return _NEED_DATA
            etype = type(event)
            if etype is _Data:
                self.client_is_waiting_for_100_continue = False
            elif etype is _EndOfMessage:
                self.client_is_waiting_for_100_continue = False
                self._c = _DONE
                self._fire()
            elif etype is _ConnectionClosed:
                self._c = _CLOSED
                self._fire()
            return event
        except BaseException as exc:
            self._c = _ERROR
            self._fire()
            if isinstance(exc, _LocalError):
                raise _RemoteError(str(exc), error_status_hint=exc.error_status_hint) from None
            raise

    def _eof_in_body(self) -> h11.RemoteProtocolError:
        if self._chunked:
            return _RemoteError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)"
            )
        total = self._content_length
        return _RemoteError(
            "peer closed connection without sending complete message body "
            f"(received {total - self._remaining} bytes, expected {total})"
        )

    def _read_head(self) -> h11.Request | None:
        buf = self._buf
        if not buf:
            return None
        first = buf[0]
        if first == 0x0A or (first == 0x0D and buf[1:2] == b"\n"):
            del buf[: 1 if first == 0x0A else 2]
            self._lines_scan = self._line_scan = 0
            raise _LocalError("no request line received")
        m = _HEAD_END.search(buf, self._lines_scan)
        if m is None:
            self._lines_scan = max(0, len(buf) - 2)
            if first < 0x21:
                # Not even the start of a request line (e.g. a TLS ClientHello): fail now
                # rather than at the timeout, as h11 does.
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
        return self._parse_head(head)

    def _parse_head(self, head: bytes) -> h11.Request:
        """The fast path, or h11 for anything it cannot vouch for; then the Request's effects."""
        parsed = self._fast_head(head)
        if parsed is None:
            req = _h11_parse_head(head)
            effects = _effects_of(req)
        else:
            req, effects = parsed
        if self._s is not _IDLE:
            # We answered before the request came (h11 allows it): the server cannot take the
            # request's IDLE -> SEND_RESPONSE transition, so h11 fails the client.
            raise _LocalError(
                f"can't handle event type Request when role=SERVER and state={self._s}"
            )
        self._request_effects(req.method, req.http_version, *effects)
        self._c = _SEND_BODY
        self._s = _SEND_RESPONSE
        return req

    def _fast_head(self, head: bytes) -> tuple[h11.Request, _Effects] | None:
        """Parses a complete head (plain fields in C, others with llhttp); None when h11 has to
        decide instead."""
        line_end = head.find(b"\r\n")
        rl = _REQUEST_LINE.fullmatch(head, 0, line_end)
        if rl is None:
            return None
        fields = tokenise_fields(head, self._sink, httptools.HttpRequestParser, _LLHTTP_STRICT)
        if fields is None:
            return None
        items, special = fields
        method, target, version = rl.groups()
        hosts = 0
        content_length: bytes | None = None
        chunked = False
        close = version < b"1.1"
        expect_continue = False
        upgrade = False
        for i in special:
            raw, name, value = items[i]
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                # h11 merges repeated or comma-listed equal values; llhttp refuses both, so
                # those heads never get here.
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
                # Cheap test first: browsers send "keep-alive" on every request.
                close = close or (b"close" in value.lower() and b"close" in _comma_values(value))
            elif name == b"expect":
                expect_continue = expect_continue or b"100-continue" in _comma_values(value)
            else:
                upgrade = upgrade or bool(_comma_values(value))
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            return None
        # Everything h11's Request() would validate has been checked, so build it directly.
        req = object.__new__(_Request)
        _setattr(req, "method", method)
        _setattr(req, "target", target)
        _setattr(req, "headers", prevalidated_headers(items))
        _setattr(req, "http_version", version)
        return req, (
            chunked,
            content_length,
            close,
            expect_continue and version >= b"1.1",
            upgrade,
        )

    def _request_effects(
        self,
        method: bytes,
        version: bytes,
        chunked: bool,
        content_length: bytes | None,
        close: bool,
        expect_continue: bool,
        upgrade: bool,
    ) -> None:
        """What h11's _process_event does for a client Request (besides the state changes)."""
        if method == b"CONNECT":
            self._connect_proposed = True
        if upgrade:
            self._upgrade_proposed = True
        self._request_method = method
        self.their_http_version = version
        if close:
            self._keep_alive = False
        if expect_continue:
            self.client_is_waiting_for_100_continue = True
        # h11's _body_framing for a request: Transfer-Encoding beats Content-Length; neither
        # means no body (requests are never close-delimited).
        self._chunked = chunked
        if chunked:
            self._chunk_left = 0
            self._chunk_discard = b""
            self._in_trailer = False
        else:
            self._content_length = self._remaining = (
                int(content_length) if content_length is not None else 0
            )

    # -- sending ------------------------------------------------------------------------------

    def send(self, event: Any) -> bytes | None:
        """Bytes for one server event, exactly as ``h11.Connection.send`` produces them."""
        if self._s is _ERROR:
            raise _LocalError("Can't send data when our state is ERROR")
        try:
            etype = type(event)
            if etype is _Data:
                return self._send_data(event.data)
            if etype is _EndOfMessage:
                return self._send_eom(event)
            if etype is _Response:
                return self._send_response(event)
            if etype is _Informational:
                return self._send_informational(event)
            # ConnectionClosed; anything else is refused by the transition table, as in h11.
            self._server_transition(etype)
            return None
        except BaseException:
            self._s = _ERROR
            self._fire()
            raise

    def _server_transition(self, etype: type) -> None:
        s = self._s
        new = _SERVER_TRANSITIONS.get(s, {}).get(etype)
        if new is None:
            raise _LocalError(
                f"can't handle event type {etype.__name__} when role=SERVER and state={s}"
            )
        self._s = new
        self._fire()

    def send_whole(
        self, status: int, reason: bytes, items: list[tuple[bytes, bytes, bytes]], body: bytes
    ) -> bytes | None:
        """``send(Response(...)) + send(Data(body)) + send(EndOfMessage())`` in one call, for the
        common response: a final status with a body (not 204 or 304, not to HEAD) that one
        Content-Length, equal to len(body), frames; no Connection or Transfer-Encoding field; an
        HTTP/1.1 client and a connection that stays open; nothing proposed. The same bytes and
        states; None, with nothing changed, for any other."""
        if self._s is not _SEND_RESPONSE or self._upgrade_proposed or self._connect_proposed:
            return None
        if not self._keep_alive or status < 200 or status == 204 or status == 304 or status > 999:
            return None
        version = self.their_http_version
        if version is None or version < b"1.1" or self._request_method == b"HEAD":
            return None
        length: bytes | None = None
        for _raw, name, value in items:
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"connection" or name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) != len(body):
            return None
        self._s = _DONE
        self._out_mode = _W_LENGTH
        self._out_left = 0
        self.client_is_waiting_for_100_continue = False
        self._fire()
        out = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
        _write_fields(out, items)
        out.append(body)
        return b"".join(out)

    def _send_data(self, data: bytes) -> bytes:
        if self._s is not _SEND_BODY:
            self._server_transition(_Data)
        mode = self._out_mode
        if mode == _W_LENGTH:
            self._out_left -= len(data)
            if self._out_left < 0:
                raise _LocalError("Too much data for declared Content-Length")
            return data if type(data) is bytes else bytes(data)
        if mode == _W_CHUNKED:
            if not data:
                return b""
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data if type(data) is bytes else bytes(data)

    def _send_eom(self, event: h11.EndOfMessage) -> bytes:
        self._server_transition(_EndOfMessage)
        trailers = event.headers
        mode = self._out_mode
        if mode == _W_LENGTH:
            if self._out_left != 0:
                raise _LocalError("Too little data for declared Content-Length")
            if trailers:
                raise _LocalError("Content-Length and trailers don't mix")
            return b""
        if mode == _W_CHUNKED:
            if not trailers:
                return b"0\r\n\r\n"
            out = [b"0\r\n"]
            _write_fields(out, trailers._full_items)
            return b"".join(out)
        if trailers:
            raise _LocalError("can't send trailers to HTTP/1.0 client")
        return b""

    def _send_informational(self, event: h11.InformationalResponse) -> bytes:
        if event.status_code == 101:
            if not self._upgrade_proposed:
                raise _LocalError(
                    "Received server _SWITCH_UPGRADE event without a pending proposal"
                )
            if self._s is not _SEND_RESPONSE:  # unreachable with a pending proposal
                raise _LocalError(
                    "can't handle event type InformationalResponse when role=SERVER and "
                    f"state={self._s}"
                )
            self._s = _SWITCHED
            self._fire()
        else:
            self._server_transition(_Informational)
        self.client_is_waiting_for_100_continue = False
        return self._head_bytes(event, event.headers._full_items)

    def _send_response(self, event: h11.Response) -> bytes:
        items: list[tuple[bytes, bytes, bytes]] = event.headers._full_items
        status = event.status_code
        method = self._request_method
        # h11 picks the headers as for GET when the request was HEAD (_clean_up_response_...).
        has_te = False
        content_length: bytes | None = None
        connection: list[bytes] = []
        for _raw, name, value in items:
            if name == b"transfer-encoding":
                has_te = True
            elif name == b"content-length":
                if content_length is None:
                    content_length = value
            elif name == b"connection":
                connection += _comma_values(value)
        bodyless = status == 204 or status == 304 or (method == b"CONNECT" and 200 <= status < 300)
        unknown_length = not bodyless and (has_te or content_length is None)
        need_close = False
        if unknown_length:
            items = [
                it for it in items if it[1] != b"content-length" and it[1] != b"transfer-encoding"
            ]
            content_length = None
            version = self.their_http_version
            if version is None or version < b"1.1":
                # h11 never sends chunked to an HTTP/1.0 client (or one it could not parse): the
                # body is delimited by closing the connection.
                has_te = False
                if method != b"HEAD":
                    need_close = True
            else:
                has_te = True
                items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        if not self._keep_alive or need_close:
            values = set(connection)
            values.discard(b"keep-alive")
            values.add(b"close")
            items = [it for it in items if it[1] != b"connection"]
            items += [(b"Connection", b"connection", v) for v in sorted(values)]
            connection = sorted(values)

        # State: a Response without a switch clears the proposals; a 2xx to CONNECT switches.
        if self._connect_proposed and 200 <= status < 300:
            if self._s is not _SEND_RESPONSE:
                raise _LocalError(
                    f"can't handle event type Response when role=SERVER and state={self._s}"
                )
            self._s = _SWITCHED
            self._fire()
        else:
            self._upgrade_proposed = self._connect_proposed = False
            self._server_transition(_Response)
        if b"close" in connection:
            self._keep_alive = False
            self._fire()
        self.client_is_waiting_for_100_continue = False
        if self._s is _SEND_BODY:
            # The writer's framing, for the request as it really was (a HEAD has no body).
            if bodyless or method == b"HEAD":
                self._out_mode, self._out_left = _W_LENGTH, 0
            elif has_te:
                self._out_mode = _W_CHUNKED
            elif content_length is not None:
                self._out_mode, self._out_left = _W_LENGTH, int(content_length)
            else:
                self._out_mode = _W_HTTP10
        return self._head_bytes(event, items)

    @staticmethod
    def _head_bytes(
        event: h11.Response | h11.InformationalResponse, items: list[tuple[bytes, bytes, bytes]]
    ) -> bytes:
        if event.http_version != b"1.1":
            raise _LocalError("I only send HTTP/1.1")
        out = [b"HTTP/1.1 %d %b\r\n" % (event.status_code, event.reason)]
        _write_fields(out, items)
        return b"".join(out)
