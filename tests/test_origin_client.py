"""OriginConnection's request path on its own: codecs, the header-injection guard, one write per
bodiless request, the per-connection timer, and waits only when bytes are missing.

Every test runs once with each codec (llhttp and h11), against real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from origin_helpers import OriginServer, StreamBody

from edgeproxy.http.messages import Body, BodyError, EmptyBody, HTTPError, RequestHead
from edgeproxy.origin import client
from edgeproxy.origin.client import (
    OriginConnection,
    OriginResponse,
    OriginTimeout,
    codec_factory,
)
from edgeproxy.tick import TickFlusher


@pytest.fixture(params=["httptools", "h11"])
def codec(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def srv() -> AsyncIterator[OriginServer]:
    server = await OriginServer().start()
    yield server
    await server.close()


@pytest.fixture
async def conn(srv: OriginServer, codec: str) -> AsyncIterator[OriginConnection]:
    c = await OriginConnection.connect("127.0.0.1", srv.port, timeout=1, codec=codec)
    yield c
    c.close()


class _Done:
    """An on_done callback that remembers its calls."""

    def __init__(self) -> None:
        self.calls: list[OriginConnection] = []

    def __call__(self, conn: OriginConnection) -> None:
        self.calls.append(conn)


async def _request(
    conn: OriginConnection,
    target: bytes = b"/x",
    *,
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: Body | None = None,
    body_length: int | None = 0,
    first_byte_timeout: float = 2.0,
    read_timeout: float = 2.0,
    authority: bytes = b"origin.test",
    on_done: _Done | None = None,
) -> OriginResponse:
    head = RequestHead(method, target, headers or [], authority=authority)
    return await conn.request(
        head,
        body or EmptyBody(),
        body_length,
        first_byte_timeout=first_byte_timeout,
        read_timeout=read_timeout,
        on_done=on_done,
    )


async def _get(conn: OriginConnection, target: bytes = b"/x", **kw: Any) -> tuple[int, bytes]:
    resp = await _request(conn, target, **kw)
    body = bytearray()
    while chunk := await resp.read():
        body += chunk
    resp.release()
    return resp.status, bytes(body)


class _RecordingTransport:
    """The connection's transport, recording every write (the compiled connection classes take
    no instance attributes in place of their methods, so the spy sits below them)."""

    def __init__(self, real: asyncio.Transport, writes: list[bytes]) -> None:
        self._real = real
        self._writes = writes

    def write(self, data: Any) -> None:
        self._writes.append(bytes(data))
        self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _spy_writes(conn: OriginConnection) -> list[bytes]:
    """Records every transport write the connection makes."""
    writes: list[bytes] = []
    proto = conn._proto
    assert proto.transport is not None
    proto.transport = _RecordingTransport(proto.transport, writes)  # type: ignore[assignment]
    return writes


# -- codecs --------------------------------------------------------------------------------------


async def test_codec_names(srv: OriginServer) -> None:
    assert type(codec_factory("h11")(1024)).__name__ == "Connection"
    assert type(codec_factory("httptools")(1024)).__name__ == "FastClientConnection"
    with pytest.raises(ValueError, match=r"unknown HTTP/1\.1 parser"):
        codec_factory("llhttp2")
    with pytest.raises(ValueError, match=r"unknown HTTP/1\.1 parser"):
        await OriginConnection.connect("127.0.0.1", srv.port, timeout=1, codec="nope")
    assert srv.connections == 0  # refused before connecting


async def test_default_codec_is_llhttp(srv: OriginServer) -> None:
    assert client.DEFAULT_CODEC == "httptools"
    c = await OriginConnection.connect("127.0.0.1", srv.port, timeout=1)
    try:
        assert type(c._codec).__name__ == "FastClientConnection"
    finally:
        c.close()


async def test_response_head_holds_bytes(conn: OriginConnection) -> None:
    resp = await _request(conn, b"/chunked")
    assert resp.head.reason == b"OK"
    assert resp.head.headers == [(b"transfer-encoding", b"chunked")]
    assert all(type(k) is bytes and type(v) is bytes for k, v in resp.head.headers)
    assert type(resp.head.reason) is bytes
    resp.close()


# -- the request on the wire -----------------------------------------------------------------


async def test_bodiless_request_is_one_write(conn: OriginConnection, srv: OriginServer) -> None:
    writes = _spy_writes(conn)
    status, _ = await _get(conn, b"/a?b=1", headers=[(b"user-agent", b"t"), (b"x-A", b"1")])
    assert status == 200
    assert writes == [
        b"GET /a?b=1 HTTP/1.1\r\nhost: origin.test\r\nuser-agent: t\r\nx-A: 1\r\n\r\n"
    ]
    # A body-carrying method says so even when empty (RFC 9110 section 8.6), still one write.
    writes.clear()
    assert (await _get(conn, b"/echo", method=b"POST"))[0] == 200
    assert writes == [b"POST /echo HTTP/1.1\r\nhost: origin.test\r\ncontent-length: 0\r\n\r\n"]
    assert srv.connections == 1


async def test_with_a_flusher_bodiless_requests_leave_at_the_end_of_the_tick(srv: OriginServer, codec: str) -> None:
    """Two connections (of one pool, sharing its flusher) start requests in one tick: nothing is
    written until the tick ends, then each request leaves in one write and is answered."""
    flusher = TickFlusher()
    conns = [await OriginConnection.connect("127.0.0.1", srv.port, timeout=1, codec=codec, flusher=flusher) for _ in range(2)]
    try:
        writes = [_spy_writes(c) for c in conns]
        tasks = [asyncio.ensure_future(_get(c, b"/t%d" % i)) for i, c in enumerate(conns)]
        await asyncio.sleep(0)  # both tasks run up to their wait for the response head
        assert writes == [[], []]
        assert all(c._proto._outbox for c in conns)  # queued for the end of the tick
        await asyncio.sleep(0)
        assert [len(w) for w in writes] == [1, 1]
        assert writes[0] == [b"GET /t0 HTTP/1.1\r\nhost: origin.test\r\n\r\n"]
        assert await asyncio.gather(*tasks) == [(200, b"hello /t0"), (200, b"hello /t1")]
    finally:
        for c in conns:
            c.close()


async def test_request_with_body_writes_head_then_chunks(conn: OriginConnection) -> None:
    writes = _spy_writes(conn)
    body = StreamBody(chunks=2, size=3, fill=b"z")
    status, echoed = await _get(conn, b"/echo", method=b"PUT", body=body, body_length=6)
    assert (status, echoed) == (200, b"zzzzzz")
    assert writes == [
        b"PUT /echo HTTP/1.1\r\nhost: origin.test\r\ncontent-length: 6\r\n\r\n",
        b"zzz",
        b"zzz",
    ]  # the empty end of a Content-Length body is not written at all
    writes.clear()
    body = StreamBody(chunks=1, size=2, fill=b"q")
    status, echoed = await _get(conn, b"/echo", method=b"PUT", body=body, body_length=None)
    assert (status, echoed) == (200, b"qq")
    assert writes[1:] == [b"2\r\nqq\r\n", b"0\r\n\r\n"]


async def test_host_defaults_to_the_server_address(
    conn: OriginConnection, srv: OriginServer
) -> None:
    await _get(conn, authority=b"")
    assert srv.requests[0].header("host") == f"127.0.0.1:{srv.port}"


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ((b"x-a", b"a\r\nInjected: 1"), "value"),
        ((b"x-a", b"a\nb"), "value"),
        ((b"x-a", b"a\rb"), "value"),
        ((b"x-a", b"a\x00b"), "value"),
        ((b"bad name", b"v"), "name"),
        ((b"x-a:b", b"v"), "name"),
        ((b"", b"v"), "name"),
        ((b"x\r\ny", b"v"), "name"),
    ],
)
async def test_header_injection_is_refused(
    conn: OriginConnection, srv: OriginServer, field: tuple[bytes, bytes], what: str
) -> None:
    done = _Done()
    with pytest.raises(HTTPError, match=f"cannot be forwarded: illegal header {what}") as err:
        await _request(conn, headers=[(b"accept", b"*/*"), field], on_done=done)
    assert err.value.status == 400
    assert done.calls == [conn]
    assert conn.closed
    await asyncio.sleep(0.05)
    assert srv.requests == []  # nothing reached the origin


@pytest.mark.parametrize(
    "kw",
    [
        {"target": b"/a b"},
        {"target": b"/a\r\nX: y"},
        {"target": b""},
        {"method": b"GE T"},
        {"method": b"GET\r\n"},
        {"authority": b"a\r\nX-Injected: 1"},
    ],
)
async def test_bad_request_line_or_host_is_refused(
    conn: OriginConnection, srv: OriginServer, kw: dict[str, bytes]
) -> None:
    kw = dict(kw)  # the parameter is shared between the codec runs
    target = kw.pop("target", b"/x")
    with pytest.raises(HTTPError, match="cannot be forwarded") as err:
        await _request(conn, target, **kw)
    assert err.value.status == 400
    assert conn.closed
    await asyncio.sleep(0.05)
    assert srv.requests == []


async def test_framing_and_host_fields_from_the_client_are_replaced(
    conn: OriginConnection,
) -> None:
    writes = _spy_writes(conn)
    headers = [
        (b"Host", b"evil"),
        (b"Content-Length", b"99"),
        (b"transfer-encoding", b"chunked"),
        (b"expect", b"100-continue"),
        (b"x-keep", b"1"),
    ]
    await _get(conn, headers=headers)
    assert writes == [b"GET /x HTTP/1.1\r\nhost: origin.test\r\nx-keep: 1\r\n\r\n"]


# -- waits and the timer -----------------------------------------------------------------------


async def test_no_wait_for_bytes_already_buffered(conn: OriginConnection) -> None:
    """Only the response head is waited for: the small body arrives with it."""
    before = conn.socket_waits
    for i in range(3):
        assert await _get(conn, b"/item/%d" % i) == (200, b"hello /item/%d" % i)
    assert conn.socket_waits - before == 3


async def test_one_timer_serves_many_requests(conn: OriginConnection) -> None:
    await _get(conn)
    timer = conn._timer
    assert timer is not None
    for _ in range(5):
        await _get(conn)
    assert conn._timer is timer  # later deadlines: the armed timer is kept, not rescheduled


async def test_timer_moves_to_an_earlier_deadline(conn: OriginConnection) -> None:
    await _get(conn, first_byte_timeout=30)  # the timer is now set 30 s ahead
    started = time.monotonic()
    with pytest.raises(OriginTimeout, match=r"no response head within 0\.2s"):
        await _request(conn, b"/delay/2", first_byte_timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    assert conn.closed
    assert conn._timer is None


async def test_timer_firing_early_rearms_for_the_current_deadline(
    conn: OriginConnection,
) -> None:
    await _get(conn, first_byte_timeout=0.1)  # the timer is now set 0.1 s ahead
    started = time.monotonic()
    # It fires during this request's wait, which may last 2 s: it must not time it out.
    assert await _get(conn, b"/delay/0.3", first_byte_timeout=2) == (200, b"delayed")
    assert time.monotonic() - started >= 0.25


async def test_read_timeout_bounds_each_stall_not_the_body(conn: OriginConnection) -> None:
    # Five pieces 0.07 s apart: 0.35 s in all, never more than 0.07 s of silence.
    status, body = await _get(conn, b"/trickle/5/0.07", read_timeout=0.25)
    assert (status, body) == (200, b"".join(b"piece%d" % i for i in range(5)))
    resp = await _request(conn, b"/trickle/2/1", read_timeout=0.1)
    with pytest.raises(BodyError, match=r"stalled for more than 0\.1s"):
        await resp.read()
    assert conn.closed


async def test_upload_stall_timeout(conn: OriginConnection, srv: OriginServer) -> None:
    srv.sink_delay = 5  # the origin reads nothing: the socket buffers fill, then writing stalls
    body = StreamBody(chunks=1600)  # 100 MiB
    started = time.monotonic()
    with pytest.raises(OriginTimeout, match=r"stopped reading the request body for 0\.3s"):
        await _request(
            conn, b"/sink", method=b"PUT", body=body, body_length=1600 * 65536, read_timeout=0.3
        )
    assert time.monotonic() - started < 3
    assert conn.closed
    assert body.sent < 100 * 1024 * 1024


async def test_external_cancellation_leaves_no_deadline(conn: OriginConnection) -> None:
    task = asyncio.create_task(_request(conn, b"/delay/1", first_byte_timeout=0.2))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn._deadline is None
    assert conn.closed
