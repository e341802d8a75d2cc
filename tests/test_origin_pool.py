"""Origin client connections and the per-server pool, against real sockets on 127.0.0.1.

Every test runs once with each HTTP/1.1 codec of the origin client (llhttp and h11).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import pytest
from origin_helpers import (
    OriginServer,
    Request,
    StreamBody,
    eventually,
    response,
    unused_port,
)

from edgeproxy.http.messages import Body, BodyError, EmptyBody, RequestHead, ResponseHead
from edgeproxy.origin import client
from edgeproxy.origin.client import (
    RECV_HIGH_WATER,
    OriginConnectError,
    OriginConnection,
    OriginPoolExhausted,
    OriginProtocolError,
    OriginResetBeforeResponse,
    OriginResponse,
    OriginTimeout,
)
from edgeproxy.origin.pool import OriginPool


@pytest.fixture(autouse=True, params=["httptools", "h11"])
def origin_codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The codec every connection the pool opens uses."""
    monkeypatch.setattr(client, "DEFAULT_CODEC", request.param)
    codec: str = request.param
    return codec


@pytest.fixture
async def srv() -> AsyncIterator[OriginServer]:
    server = await OriginServer().start()
    yield server
    await server.close()


def make_pool(server: OriginServer, **kw: float) -> OriginPool:
    opts: dict[str, float] = {
        "max_connections": 4,
        "max_idle": 4,
        "idle_timeout": 5.0,
        "connect_timeout": 1.0,
    }
    opts.update(kw)
    return OriginPool(
        ("127.0.0.1", server.port),
        max_connections=int(opts["max_connections"]),
        max_idle=int(opts["max_idle"]),
        idle_timeout=opts["idle_timeout"],
        connect_timeout=opts["connect_timeout"],
    )


async def send(
    pool: OriginPool,
    target: bytes,
    *,
    method: bytes = b"GET",
    body: Body | None = None,
    body_length: int | None = 0,
    headers: list[tuple[bytes, bytes]] | None = None,
    first_byte_timeout: float = 2.0,
    read_timeout: float = 2.0,
    fresh: bool = False,
) -> OriginResponse:
    conn = await pool.acquire(fresh=fresh)
    head = RequestHead(method, target, headers or [], authority=b"origin.test")
    return await conn.request(
        head,
        body or EmptyBody(),
        body_length,
        first_byte_timeout=first_byte_timeout,
        read_timeout=read_timeout,
        on_done=pool.release,
    )


async def read_all(resp: OriginResponse) -> bytes:
    out = bytearray()
    while chunk := await resp.read():
        out += chunk
    return bytes(out)


async def get(pool: OriginPool, target: bytes, **kw: object) -> tuple[ResponseHead, bytes]:
    resp = await send(pool, target, **kw)  # type: ignore[arg-type]
    try:
        return resp.head, await read_all(resp)
    finally:
        resp.release()


# -- keep-alive and response framing --------------------------------------------------------------


async def test_keepalive_reuses_one_connection(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        for i in range(5):
            head, body = await get(pool, f"/item/{i}".encode())
            assert head.status == 200
            assert body == f"hello /item/{i}".encode()
        assert srv.connections == 1
        assert pool.connects == 1
        assert (pool.idle_count, pool.busy_count, pool.open_count) == (1, 0, 1)
        # Host goes first, from the authority.
        assert srv.requests[0].headers[0] == ("host", "origin.test")
    finally:
        await pool.close()


async def test_head_204_304_have_no_body_and_keep_the_connection(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(pool, b"/x", method=b"HEAD")
        assert resp.length == 0
        assert resp.head.status == 200
        assert dict(resp.head.headers)[b"content-length"] == b"8"  # len(b"hello /x"), as for GET
        assert await read_all(resp) == b""
        resp.release()
        for status in (204, 304):
            head, body = await get(pool, f"/status/{status}".encode())
            assert (head.status, body) == (status, b"")
        head, body = await get(pool, b"/after")
        assert body == b"hello /after"
        assert srv.connections == 1
    finally:
        await pool.close()


async def test_chunked_response(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(pool, b"/chunked")
        assert resp.length is None
        assert await read_all(resp) == b"abbccc"
        resp.release()
        await get(pool, b"/again")
        assert srv.connections == 1
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("path", "expected"), [(b"/http10", b"close-delimited body"), (b"/connclose", b"bye")]
)
async def test_close_delimited_and_connection_close_are_not_reused(
    srv: OriginServer, path: bytes, expected: bytes
) -> None:
    pool = make_pool(srv)
    try:
        head, body = await get(pool, path)
        assert (head.status, body) == (200, expected)
        assert (pool.idle_count, pool.open_count) == (0, 0)
        await get(pool, b"/next")
        assert srv.connections == 2
    finally:
        await pool.close()


async def test_100_continue_is_skipped(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        head, body = await get(pool, b"/continue")
        assert (head.status, body) == (200, b"after continue")
    finally:
        await pool.close()


async def test_release_without_reading_keeps_a_fully_buffered_response(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        # The origin writes head and body in one go, so the body is in hand with the head.
        resp = await send(pool, b"/unread")
        resp.release()
        assert pool.idle_count == 1
        await get(pool, b"/next")
        assert srv.connections == 1
    finally:
        await pool.close()


async def test_upgrade_101_detach_gives_a_raw_tunnel(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(
            pool, b"/upgrade", headers=[(b"connection", b"upgrade"), (b"upgrade", b"echo")]
        )
        assert resp.status == 101
        with pytest.raises(BodyError):
            await resp.read()
        tunnel = resp.detach()
        assert (pool.open_count, pool.busy_count) == (0, 0)  # no longer the pool's
        greeting = b""
        while len(greeting) < len(b"hello-from-origin"):
            greeting += await asyncio.wait_for(tunnel.read(), 2)
        assert greeting == b"hello-from-origin"  # bytes that arrived right behind the head
        await tunnel.write(b"ping")
        echoed = b""
        while len(echoed) < 4:
            echoed += await asyncio.wait_for(tunnel.read(), 2)
        assert echoed == b"ping"
        tunnel.write_eof()
        assert await asyncio.wait_for(tunnel.read(), 2) == b""  # origin hung up after our EOF
        tunnel.close()
        await asyncio.wait_for(tunnel.wait_closed(), 2)
    finally:
        await pool.close()


async def test_detach_refused_for_non_101(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(pool, b"/plain")
        with pytest.raises(RuntimeError):
            resp.detach()
        resp.close()
        assert pool.open_count == 0
    finally:
        await pool.close()


# -- pool bounds and idle handling ----------------------------------------------------------------


async def test_pool_bound_and_fifo_waiters(srv: OriginServer) -> None:
    pool = make_pool(srv, max_connections=2)
    acquired: list[int] = []

    async def worker(i: int) -> None:
        conn = await pool.acquire()
        acquired.append(i)
        head = RequestHead(b"GET", b"/delay/0.05", [], authority=b"o")
        resp = await conn.request(
            head, EmptyBody(), 0, first_byte_timeout=2, read_timeout=2, on_done=pool.release
        )
        await read_all(resp)
        resp.release()

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(6):
                tg.create_task(worker(i))
            await eventually(lambda: pool.waiting == 4)
            assert pool.open_count == 2
        assert acquired == list(range(6))
        assert srv.max_open_connections == 2
        assert pool.connects == 2
        assert len(srv.requests) == 6
    finally:
        await pool.close()


async def test_pool_exhausted_after_connect_timeout_and_cancelled_waiter(srv: OriginServer) -> None:
    pool = make_pool(srv, max_connections=1, connect_timeout=0.15)
    try:
        held = await pool.acquire()
        started = time.monotonic()
        with pytest.raises(OriginPoolExhausted, match="pool exhausted"):
            await pool.acquire()
        assert 0.1 < time.monotonic() - started < 1.0
        assert isinstance(OriginPoolExhausted("x"), OriginConnectError)

        waiter = asyncio.create_task(pool.acquire())
        await eventually(lambda: pool.waiting == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        pool.release(held)  # reusable, nobody waiting: parked
        assert (pool.idle_count, pool.open_count) == (1, 1)
        assert await pool.acquire() is held
        pool.release(held)
    finally:
        await pool.close()


async def test_idle_timeout_closes_and_replaces(srv: OriginServer) -> None:
    pool = make_pool(srv, idle_timeout=0.1)
    try:
        await get(pool, b"/a")
        assert pool.idle_count == 1
        await eventually(lambda: pool.idle_count == 0 and srv.open_connections == 0)
        assert pool.open_count == 0
        await get(pool, b"/b")
        assert srv.connections == 2
    finally:
        await pool.close()


async def test_idle_is_lifo_and_max_idle_keeps_the_newest(srv: OriginServer) -> None:
    pool = make_pool(srv, max_idle=2)
    try:
        resps = [await send(pool, f"/{i}".encode()) for i in range(3)]
        for r in resps:
            await read_all(r)
        conns = [r.connection for r in resps]
        for r in resps:
            r.release()
        assert conns[0].closed  # oldest idle evicted beyond max_idle
        assert (pool.idle_count, pool.open_count) == (2, 2)
        assert await pool.acquire() is conns[2]  # most recently used first
        assert await pool.acquire() is conns[1]
        pool.release(conns[2])
        pool.release(conns[1])
    finally:
        await pool.close()


async def test_idle_connection_closed_by_origin_is_discarded(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        await get(pool, b"/a")
        assert pool.idle_count == 1
        srv.close_connections()
        await eventually(lambda: pool.idle_count == 0)
        assert pool.open_count == 0
        head, _ = await get(pool, b"/b")
        assert head.status == 200
        assert srv.connections == 2
    finally:
        await pool.close()


async def test_unsolicited_bytes_on_idle_connection_discard_it() -> None:
    async def chatty(
        s: OriginServer, req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        w.write(response(200, b"ok"))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # answer to nothing
        await w.drain()
        return True

    server = await OriginServer(chatty).start()
    pool = make_pool(server)
    try:
        await get(pool, b"/a")
        await eventually(lambda: pool.idle_count == 0)
        await get(pool, b"/b")
        assert server.connections == 2
    finally:
        await pool.close()
        await server.close()


async def test_stale_reused_connection_reports_reset(srv: OriginServer) -> None:
    srv.drop_reused = True
    pool = make_pool(srv)
    try:
        await get(pool, b"/first")
        with pytest.raises(OriginResetBeforeResponse) as err:
            await get(pool, b"/second")
        assert err.value.reused
        assert pool.open_count == 0
        _head, body = await get(pool, b"/third", fresh=True)
        assert body == b"hello /third"
    finally:
        await pool.close()


async def test_fresh_acquire_bypasses_idle(srv: OriginServer) -> None:
    pool = make_pool(srv, max_connections=1)
    try:
        await get(pool, b"/a")
        idle_conn = pool._idle[-1]
        conn = await pool.acquire(fresh=True)
        assert conn is not idle_conn and idle_conn.closed
        assert pool.open_count == 1
        pool.release(conn)
    finally:
        await pool.close()


async def test_pool_close_closes_idle_and_busy(srv: OriginServer) -> None:
    pool = OriginPool(
        ("127.0.0.1", srv.port),
        max_connections=3,
        max_idle=3,
        idle_timeout=5,
        connect_timeout=2,
    )
    c1 = await pool.acquire()
    c2 = await pool.acquire()
    assert pool.busy_count == 2 and pool.idle_count == 0
    resp = await c2.request(
        RequestHead(b"GET", b"/a", [], authority=b"o"),
        EmptyBody(),
        0,
        first_byte_timeout=2,
        read_timeout=2,
        on_done=pool.release,
    )
    await read_all(resp)
    resp.release()
    assert pool.busy_count == 1 and pool.idle_count == 1
    await pool.close()
    assert c1.closed and c2.closed
    assert pool.busy_count == 0 and pool.idle_count == 0
    await eventually(lambda: srv.open_connections == 0)
    pool.release(c1)  # late release after close: harmless
    assert pool.open_count == 0
    with pytest.raises(OriginConnectError, match="closed"):
        await pool.acquire()


async def test_pool_close_fails_waiters(srv: OriginServer) -> None:
    pool = make_pool(srv, max_connections=1)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await eventually(lambda: pool.waiting == 1)
    await pool.close()
    with pytest.raises(OriginConnectError, match="closed"):
        await waiter
    assert held.closed


# -- request bodies -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
async def test_streamed_request_body(srv: OriginServer, chunked: bool) -> None:
    pool = make_pool(srv)
    body = StreamBody(chunks=10, size=1000, pause=0.001)
    try:
        _head, data = await get(
            pool, b"/sink", method=b"POST", body=body, body_length=None if chunked else 10000
        )
        assert data == f"10000 {hashlib.sha256(b'y' * 10000).hexdigest()}".encode()
        req = srv.requests[0]
        if chunked:
            assert (
                req.header("transfer-encoding") == "chunked"
                and req.header("content-length") is None
            )
        else:
            assert (
                req.header("content-length") == "10000" and req.header("transfer-encoding") is None
            )
        assert srv.connections == 1
        await get(pool, b"/again")
        assert srv.connections == 1
    finally:
        await pool.close()


async def test_framing_headers_come_from_body_length(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        stale = [(b"content-length", b"999"), (b"transfer-encoding", b"chunked"), (b"x-a", b"1")]
        await get(pool, b"/post", method=b"POST", headers=stale)
        await get(pool, b"/get", headers=stale)
        post, getreq = srv.requests
        assert post.header("content-length") == "0" and post.header("transfer-encoding") is None
        assert getreq.header("content-length") is None and getreq.header("x-a") == "1"
    finally:
        await pool.close()


@pytest.mark.parametrize(("chunks", "declared"), [(2, 3000), (4, 3000)])
async def test_body_not_matching_declared_length_is_a_body_error(
    srv: OriginServer, chunks: int, declared: int
) -> None:
    pool = make_pool(srv)
    try:
        with pytest.raises(BodyError):
            await send(
                pool, b"/sink", method=b"PUT", body=StreamBody(chunks, 1000), body_length=declared
            )
        assert pool.open_count == 0
    finally:
        await pool.close()


async def test_large_upload_is_streamed_with_backpressure(srv: OriginServer) -> None:
    total = 50 * 1024 * 1024
    srv.sink_delay = 0.3  # the origin does not read at first: the client must wait, not buffer
    pool = make_pool(srv)
    conn = await pool.acquire()
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, conn.write_buffer_size)

    body = StreamBody(chunks=total // 65536, on_read=sample)
    head = RequestHead(b"PUT", b"/sink", [], authority=b"o")
    try:
        task = asyncio.create_task(
            conn.request(
                head, body, total, first_byte_timeout=10, read_timeout=5, on_done=pool.release
            )
        )
        await asyncio.sleep(0.2)
        sent_while_origin_idle = body.sent
        resp = await task
        assert (
            await read_all(resp) == f"{total} {hashlib.sha256(b'y' * total).hexdigest()}".encode()
        )
        resp.release()
        # Only socket buffers' worth went out while the origin was not reading.
        assert sent_while_origin_idle < 16 * 1024 * 1024
        assert peak <= 1024 * 1024
    finally:
        await pool.close()


async def test_large_download_is_read_in_bounded_memory(srv: OriginServer) -> None:
    total = 50 * 1024 * 1024
    pool = make_pool(srv)
    try:
        resp = await send(pool, f"/big/{total}".encode())
        assert resp.length == total
        await asyncio.sleep(0.2)  # a slow reader: the origin must be held back, not buffered
        assert srv.sent_bytes < 16 * 1024 * 1024
        peak = 0
        received = 0
        while chunk := await resp.read():
            received += len(chunk)
            peak = max(peak, resp.connection.buffered_bytes)
        assert received == total
        assert peak <= RECV_HIGH_WATER + 256 * 1024
        resp.release()
        assert pool.idle_count == 1
    finally:
        await pool.close()


async def test_early_response_stops_the_upload(srv: OriginServer) -> None:
    pool = make_pool(srv)
    body = StreamBody(chunks=800)  # 50 MiB the origin never reads
    try:
        started = time.monotonic()
        resp = await send(
            pool, b"/early", method=b"POST", body=body, body_length=None, read_timeout=3
        )
        assert resp.status == 413
        assert await read_all(resp) == b"too large"
        resp.release()
        assert time.monotonic() - started < 0.5  # not waiting for a stall timeout or a hang-up
        assert body.sent < 20 * 1024 * 1024
        assert pool.open_count == 0  # request never completed: not reusable
    finally:
        await pool.close()


async def test_early_success_response_still_gets_the_whole_body(srv: OriginServer) -> None:
    pool = make_pool(srv)
    body = StreamBody(chunks=64, pause=0.001)  # 4 MiB
    try:
        resp = await send(pool, b"/ack-first", method=b"POST", body=body, body_length=None)
        assert (resp.status, await read_all(resp)) == (200, b"accepted")
        resp.release()
        await eventually(lambda: len(srv.requests[0].body) == 64 * 65536)
        assert pool.idle_count == 1  # both sides completed the exchange: reusable
        await get(pool, b"/next")
        assert srv.connections == 1
    finally:
        await pool.close()


# -- failures -------------------------------------------------------------------------------------


async def test_first_byte_timeout(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        with pytest.raises(OriginTimeout, match="no response head"):
            await send(pool, b"/delay/1", first_byte_timeout=0.1)
        assert pool.open_count == 0
    finally:
        await pool.close()


async def test_read_timeout_mid_body(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(pool, b"/stall", read_timeout=0.1)
        assert await resp.read() == b"12345"
        with pytest.raises(BodyError, match="stalled"):
            await resp.read()
        assert pool.open_count == 0
        resp.release()  # after an error: no-op
    finally:
        await pool.close()


async def test_origin_closing_mid_body(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        resp = await send(pool, b"/cut")
        with pytest.raises(BodyError):
            await read_all(resp)
        assert pool.open_count == 0
    finally:
        await pool.close()


async def test_close_before_response_on_new_connection(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        with pytest.raises(OriginResetBeforeResponse) as err:
            await send(pool, b"/close")
        assert not err.value.reused
    finally:
        await pool.close()


async def test_malformed_response(srv: OriginServer) -> None:
    pool = make_pool(srv)
    try:
        with pytest.raises(OriginProtocolError):
            await send(pool, b"/garbage")
        assert pool.open_count == 0
    finally:
        await pool.close()


async def test_connect_refused() -> None:
    with pytest.raises(OriginConnectError, match="failed"):
        await OriginConnection.connect("127.0.0.1", unused_port(), timeout=1)
    pool = OriginPool(
        ("127.0.0.1", unused_port()),
        max_connections=1,
        max_idle=1,
        idle_timeout=1,
        connect_timeout=1,
    )
    with pytest.raises(OriginConnectError):
        await pool.acquire()
    assert pool.open_count == 0  # the slot came back
    await pool.close()
