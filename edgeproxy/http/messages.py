"""Protocol-neutral HTTP message types shared by HTTP/1.1, HTTP/3, the pipeline, cache and origins.

Header names are lowercase bytes and values bytes, in wire order, repeated names kept: the form
both h11 and aioquic's H3 layer use, so no adapter has to re-encode on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

Headers = list[tuple[bytes, bytes]]

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def event_data(event: Any) -> bytes | bytearray:
    """`h11.Data.data`. h11 declares bytes but hands out bytearray; compiled modules (setup.py)
    check declared types when they read an attribute, so they read it through here."""
    data: bytes | bytearray = event.data
    return data


def header_get(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of `name` (lowercase), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def header_all(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


def header_list(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Comma-separated list header values (RFC 9110 section 5.6.1), trimmed, empty items dropped."""
    out: list[bytes] = []
    for v in header_all(headers, name):
        for item in v.split(b","):
            item = item.strip()
            if item:
                out.append(item)
    return out


# The message classes spell out __init__ (init=False): the dataclass-generated one would be
# interpreted even where this module is compiled, on every request.


@dataclass(slots=True, init=False)
class RequestHead:
    method: bytes
    target: bytes  # origin-form: path and query, e.g. b"/a?b=1"
    headers: Headers
    scheme: str  # the scheme the client used at the edge: "http" or "https"
    authority: bytes  # Host header (HTTP/1.1) or :authority (HTTP/3)
    http_version: str  # "1.0", "1.1" or "3"
    client_addr: tuple[str, int]
    request_id: str

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        scheme: str = "http",
        authority: bytes = b"",
        http_version: str = "1.1",
        client_addr: tuple[str, int] = ("", 0),
        request_id: str = "",
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.scheme = scheme
        self.authority = authority
        self.http_version = http_version
        self.client_addr = client_addr
        self.request_id = request_id

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


@dataclass(slots=True, init=False)
class ResponseHead:
    status: int
    headers: Headers
    reason: bytes
    # A head reused across requests (a cached entry's rendering) lets front ends keep their
    # protocol-specific form of it here; never set on a head that is built per request.
    memo: dict[str, object] | None = field(compare=False, repr=False)

    def __init__(
        self, status: int, headers: Headers | None = None, reason: bytes = b"", memo: dict[str, object] | None = None
    ) -> None:
        self.status = status
        self.headers = [] if headers is None else headers
        self.reason = reason
        self.memo = memo


@dataclass(slots=True, init=False)
class FreshResponse:
    """A response the cache can give at once: `head` is shared between requests (never mutate
    it), `extra` the per-request fields (Age, X-Request-Id) that go after its fields."""

    head: ResponseHead
    extra: Headers
    body: bytes

    def __init__(self, head: ResponseHead, extra: Headers, body: bytes) -> None:
        self.head = head
        self.extra = extra
        self.body = body


class HTTPError(Exception):
    """A request the edge answers itself with `status` (400, 408, 413, 431, 501, 502, 504, ...).

    `detail` is shown to the client in the body; `close` says the connection cannot be reused.
    """

    def __init__(self, status: int, detail: str, *, close: bool = False) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        self.close = close


class BodyError(Exception):
    """The peer aborted or broke the body stream (client reset, origin disconnect)."""


class Body(Protocol):
    """A streamed message body. `read` returns the next chunk, b"" at the end.

    Reading is the backpressure: a producer only reads from its socket as fast as the consumer calls
    `read`. Raises BodyError when the stream breaks, HTTPError(413) when it exceeds its limit.
    `length` is the body's size when known in advance (Content-Length, or 0 for none), else None.
    """

    length: int | None

    async def read(self) -> bytes: ...


class EmptyBody:
    length: int | None = 0

    async def read(self) -> bytes:
        return b""


class BytesBody:
    """A body held in memory (cache hits, buffered request bodies kept for retries)."""

    def __init__(self, data: bytes, chunk: int = 65536) -> None:
        self._data = memoryview(data)
        self.length: int | None = len(data)
        self._pos = 0
        self._chunk = chunk

    async def read(self) -> bytes:
        if self._pos >= len(self._data):
            return b""
        out = bytes(self._data[self._pos : self._pos + self._chunk])
        self._pos += len(out)
        return out


class ResponseSink(Protocol):
    """Where the pipeline writes a response; implemented by the HTTP/1.1 and HTTP/3 front ends.

    `start` sends the head; `write` sends body bytes and returns once the transport can take more
    (backpressure); `end` finishes the message. `started` tells whether anything reached the client,
    which decides whether an origin failure may still be retried or turned into a 502.
    """

    @property
    def started(self) -> bool: ...

    async def start(self, head: ResponseHead) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...

    def abort(self) -> None:
        """Break the response off mid-body so the client sees it incomplete, never truncated-as-whole."""
