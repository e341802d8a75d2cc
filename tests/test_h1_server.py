"""HTTP/1.1 front end against real sockets: proxying, keep-alive, limits, errors, smuggling cases."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pop_helpers import RawClient, get, running_pop

from edgeproxy.http.h1server import DRAIN_LIMIT


async def test_get_is_proxied_with_forwarding_headers(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r = await get(p.http, "/headers", headers={"X-Forwarded-For": "198.51.100.7", "Connection": "keep-alive, x-drop", "X-Drop": "1"})
        assert r.status == 200
        seen = dict(json.loads(r.body))
        assert seen["host"] == "example.test"
        assert seen["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["forwarded"] == 'for=127.0.0.1;proto=http;host="example.test";by="test-pop"'
        assert seen["via"] == "1.1 test-pop"
        assert "x-drop" not in seen and "connection" not in seen
        assert seen["x-request-id"] == r.header("x-request-id")
        assert r.header("x-edge-pop") == "test-pop"
        assert r.header("via") == "1.1 test-pop"


async def test_keep_alive_and_pipelining(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        for _ in range(3):
            assert (await c.request("GET", "/time")).status == 200
        # Two pipelined requests in one write.
        await c.send(b"GET /time HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        r1, r2 = await c.response(), await c.response()
        assert (r1.status, r2.status) == (200, 200)
        assert r2.body == b"ok\n"
        c.close()
        assert p.origin.connections == 1  # the origin connection was pooled too


async def test_cache_hit_visible_in_header_and_metrics(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r1 = await get(p.http, "/cached/a")
        r2 = await get(p.http, "/cached/a")
        assert r1.header("x-cache") == "MISS"
        assert r2.header("x-cache") == "HIT"
        assert r2.body == r1.body
        assert r2.header("age") is not None
        assert p.origin.hits == 1
        metrics = (await get(p.admin, "/metrics")).body.decode()
        assert 'edgeproxy_cache_requests_total{result="hit"} 1' in metrics
        assert 'edgeproxy_requests_total{protocol="http",status="200"} 2' in metrics


async def test_head_is_answered_from_a_cached_get(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        await get(p.http, "/cached/h")
        c = await RawClient.connect(p.http)
        r = await c.request("HEAD", "/cached/h")
        assert r.status == 200 and r.header("x-cache") == "HIT"
        assert int(r.header("content-length") or 0) > 0
        assert (await c.request("GET", "/time")).status == 200  # no body bytes were sent for HEAD
        c.close()
        assert p.origin.hits == 2


async def test_alt_svc_advertises_h3(tmp_path: Path) -> None:
    async with running_pop(tmp_path, quic=True) as p:
        assert p.quic is not None
        r = await get(p.http, "/time")
        assert r.header("alt-svc") == f'h3=":{p.quic[1]}"; ma=86400'


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ],
)
async def test_malformed_requests_get_clear_errors_and_close(tmp_path: Path, raw: bytes, status: int) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(raw)
        r = await c.response()
        assert r.status == status
        assert r.header("connection") == "close"
        assert b"request-id:" in r.body
        assert await c.closed()
        assert p.origin.hits == 0  # nothing malformed reached the origin


async def test_431_for_large_headers(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"limits": {"max_header_bytes": 2048}}) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
        r = await c.response()
        assert r.status == 431
        assert await c.closed()


async def test_408_for_slow_headers_and_silent_close_when_idle(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"limits": {"header_timeout": 0.3, "idle_timeout": 0.5}}) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        r = await c.response()
        assert r.status == 408
        assert await c.closed()
        idle = await RawClient.connect(p.http)
        assert (await idle.request("GET", "/time")).status == 200
        assert await idle.closed(timeout=2.0)  # closed after idle_timeout, without a 408


async def test_413_by_content_length_and_by_chunked_size(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"limits": {"max_body_bytes": 1000}}) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n")
        assert (await c.response()).status == 413
        c2 = await RawClient.connect(p.http)
        chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
        await c2.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n")
        r = await c2.response()
        assert r.status == 413
        assert await c2.closed()


async def test_chunked_upload_streams_to_origin(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        chunks = b"".join(b"%x\r\n%s\r\n" % (1000, bytes([65 + i]) * 1000) for i in range(20))
        await c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        r = await c.response()
        assert r.status == 200
        assert r.body == b"".join(bytes([65 + i]) * 1000 for i in range(20))
        assert (await c.request("GET", "/time")).status == 200  # connection still usable
        c.close()


async def test_expect_100_continue(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await c.response()
        assert interim.status == 100
        await c.send(b"hello")
        r = await c.response()
        assert (r.status, r.body) == (200, b"hello")
        c.close()


# -- request smuggling (the Pingora CVE cases) ----------------------------------------------


async def test_cache_hit_with_body_does_not_smuggle(tmp_path: Path) -> None:
    """CVE-2025-4366: the body of a request answered from cache must not be parsed as a request."""
    async with running_pop(tmp_path) as p:
        await get(p.http, "/cached/s", host="a")
        before = len(p.origin.recent)
        smuggled = b"GET /time?smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        c = await RawClient.connect(p.http)
        await c.send(b"GET /cached/s HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        r = await c.response()
        assert r.header("x-cache") == "HIT"
        r2 = await c.request("GET", "/healthz")  # the connection continues with the next real request
        assert r2.body == b"ok\n"
        c.close()
        targets = [t for _, t, _ in list(p.origin.recent)[before:]]
        assert targets == [b"/healthz"], targets


async def test_cache_hit_with_large_unread_body_closes(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        await get(p.http, "/cached/big", host="a")
        c = await RawClient.connect(p.http)
        await c.send(b"GET /cached/big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (DRAIN_LIMIT * 4) + b"x" * 1000)
        r = await c.response()
        assert r.header("x-cache") == "HIT"
        assert await c.closed()


async def test_upgrade_without_101_keeps_http_framing(tmp_path: Path) -> None:
    """CVE-2026-2833: bytes after an Upgrade request are not tunnelled unless the origin sent 101."""
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(
            b"GET /time HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: Upgrade\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        r1, r2 = await c.response(), await c.response()
        assert r1.status == 200 and r2.body == b"ok\n"
        c.close()
        targets = [t for _, t, _ in p.origin.recent]
        assert targets == [b"/time", b"/healthz"]
        upgrade_seen = dict(p.origin.recent[0][2]).get(b"upgrade")
        assert upgrade_seen == b"foo"


async def test_upgrade_tunnel_after_101(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"GET /upgrade-echo HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        r = await c.response()
        assert r.status == 101
        assert r.header("upgrade") == "echo"
        await c.send(b"ping through the tunnel")
        async with asyncio.timeout(3):
            got = b""
            while len(got) < 23:
                got += await c.reader.read(100)
        assert got == b"ping through the tunnel"
        c.close()


async def test_http10_request_body_without_length_is_not_read(tmp_path: Path) -> None:
    """Requests are never close-delimited: an HTTP/1.0 body without Content-Length is no body."""
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"POST /echo HTTP/1.0\r\nHost: a\r\n\r\nGET /time?smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.body == b""
        assert await c.closed()  # HTTP/1.0: no keep-alive
        assert [t for _, t, _ in p.origin.recent] == [b"/echo"]


async def test_http10_response_is_close_delimited(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"GET /stream?mb=1 HTTP/1.0\r\nHost: a\r\n\r\n")
        r = await c.response(timeout=10)
        assert r.status == 200 and len(r.body) == 1024**2
        assert r.header("transfer-encoding") is None


async def test_absolute_form_target_uses_its_authority(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        c = await RawClient.connect(p.http)
        await c.send(b"GET http://other.test/headers HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
        r = await c.response()
        assert dict(json.loads(r.body))["host"] == "other.test"
        c.close()


# -- origin failures --------------------------------------------------------------------


async def test_502_when_no_origin_can_be_reached(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"origin_groups": [{"servers": ["127.0.0.1:9"], "retries": 1}]}) as p:
        r = await get(p.http, "/x")
        assert r.status == 502
        assert b"127.0.0.1:9" in r.body
        assert r.header("x-request-id") is not None


async def test_504_on_origin_timeout(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"origin_groups": [{"first_byte_timeout": 0.3, "retries": 0}]}) as p:
        r = await get(p.http, "/slow?ms=2000")
        assert r.status == 504


async def test_404_for_unrouted_host(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"origin_groups": [{"hosts": ["only.test"]}]}) as p:
        r = await get(p.http, "/time", host="else.test")
        assert r.status == 404


async def test_access_log_has_pop_and_request_id(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r = await get(p.http, "/cached/log")
        p.pop.access_log.flush()
        lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
        rec = next(x for x in lines if x["request_id"] == r.header("x-request-id"))
        assert rec["pop"] == "test-pop"
        assert rec["status"] == 200 and rec["path"] == "/cached/log" and rec["cache"] == "MISS"
        assert rec["protocol"] == "http"
