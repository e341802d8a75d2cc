"""Passes answered in callbacks (`Pipeline.forward_now`): bodiless GET/HEAD requests whose
response is not stored, sent over an idle pooled origin connection without a task. Whatever is not
the common case must end exactly as on the general path: failures before the response head are
retried with this attempt counted, late or large bodies are relayed, a client that leaves is
accounted for, and the origin connection is never reused half-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pop_helpers
from origin_helpers import OriginServer, eventually
from pop_helpers import RawClient, deep_merge

from edgeproxy.config import config_from_dict
from edgeproxy.pop import Pop


@contextlib.asynccontextmanager
async def pop_before(origin: OriginServer, tmp_path: Path, overrides: dict[str, Any] | None = None) -> AsyncIterator[Pop]:
    base: dict[str, Any] = {
        "pop": {"id": "direct-pop", "state_dir": str(tmp_path / "state")},
        "listen": {"http": ["127.0.0.1:0"], "https": [], "quic": []},
        "origin_groups": [{"name": "o", "servers": [origin.address], "health": {"enabled": False}}],
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access_log": str(tmp_path / "access.log")},
        "http1": {"parser": pop_helpers.H1_PARSER},
        "cache": {"enabled": False},
    }
    pop = Pop(config_from_dict(deep_merge(base, overrides or {})))
    await pop.start()
    try:
        yield pop
    finally:
        await pop.stop(grace=1.0)


@contextlib.asynccontextmanager
async def origin() -> AsyncIterator[OriginServer]:
    srv = await OriginServer().start()
    try:
        yield srv
    finally:
        await srv.close()


def direct_in_flight(pop: Pop) -> int:
    return sum(1 for c in pop.h1.connections if c.direct is not None)


def access_records(pop: Pop, tmp_path: Path) -> list[dict[str, Any]]:
    pop.access_log.flush()
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


def origin_pool(pop: Pop) -> Any:
    return pop.groups["o"].servers[0].pool


async def test_keep_alive_passes_reuse_the_origin_connection_without_a_task(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        first = await c.request("GET", "/a")
        assert first.status == 200 and first.body == b"hello /a"
        # The pool now has an idle connection: the next pass is answered in callbacks.
        pending = asyncio.ensure_future(c.request("GET", "/delay/0.3"))
        await eventually(lambda: direct_in_flight(pop) == 1)
        assert all(conn.task is None for conn in pop.h1.connections)
        second = await pending
        assert second.status == 200
        head = await c.request("HEAD", "/h")
        assert head.status == 200 and head.body == b""
        assert [r.conn_request_no for r in srv.requests] == [0, 1, 2]
        assert srv.connections == 1
        for r in (first, second, head):
            assert r.header("via") == "1.1 direct-pop"
            assert r.header("x-edge-pop") == "direct-pop"
            assert (r.header("x-request-id") or "").startswith("direct-pop-")
        assert srv.requests[1].header("x-forwarded-for") == "127.0.0.1"
        assert srv.requests[1].header("via") == "1.1 direct-pop"
        c.close()
        records = access_records(pop, tmp_path)
        assert [(r["status"], r["path"], r.get("origin")) for r in records] == [
            (200, "/a", srv.address),
            (200, "/delay/0.3", srv.address),
            (200, "/h", srv.address),
        ]
        metrics = pop.metrics.render()
        assert 'edgeproxy_requests_total{protocol="http",status="200"} 3' in metrics
        assert f'edgeproxy_origin_requests_total{{group="o",server="{srv.address}",outcome="ok"}} 3' in metrics


async def test_stale_keep_alive_reset_is_retried_on_a_fresh_connection(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        srv.drop_reused = True
        c = await RawClient.connect(pop.addresses["http"][0])
        for path in ("/a", "/b", "/c"):
            r = await c.request("GET", path)
            assert r.status == 200 and r.body == b"hello " + path.encode()
        c.close()
        # Each later request went out on the idle connection first, which the origin dropped.
        assert [r.path for r in srv.requests] == ["/a", "/b", "/b", "/c", "/c"]
        # A stale keep-alive connection is not the origin's failure.
        assert pop.groups["o"].status()[0]["available"]


async def test_first_byte_timeout_counts_as_the_first_attempt(tmp_path: Path) -> None:
    overrides = {"origin_groups": [{"first_byte_timeout": 0.2, "retries": 1}]}
    async with origin() as srv, pop_before(srv, tmp_path, overrides) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/a")).status == 200
        r = await c.request("GET", "/delay/1")
        assert r.status == 504
        assert b"no response head within 0.2s" in r.body
        # One attempt in callbacks, one retry: not three.
        assert [q.path for q in srv.requests].count("/delay/1") == 2
        c.close()


async def test_malformed_response_is_a_502_and_not_retried(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/a")).status == 200
        r = await c.request("GET", "/garbage")
        assert r.status == 502
        assert [q.path for q in srv.requests].count("/garbage") == 1
        c.close()


async def test_bodies_not_all_there_or_large_are_relayed(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/a")).status == 200
        r = await c.request("GET", "/trickle/3/0.05")
        assert r.status == 200 and r.body == b"piece0piece1piece2"
        r = await c.request("GET", "/big/300000")
        assert r.status == 200 and len(r.body) == 300000
        r = await c.request("GET", "/chunked")
        assert r.status == 200 and r.body == b"abbccc"
        assert srv.connections == 1  # each was read to its end and the connection kept
        c.close()


async def test_client_gone_before_the_response_drops_the_origin_connection(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/a")).status == 200
        await c.send(b"GET /delay/0.5 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        await eventually(lambda: direct_in_flight(pop) == 1)
        # A reset, not a FIN: a half-closed client would still get its response.
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.writer.transport.abort()
        await eventually(lambda: origin_pool(pop).open_count == 0)
        await eventually(lambda: srv.open_connections == 0)
        records = access_records(pop, tmp_path)
        assert records[-1]["status"] == 499 and records[-1]["path"] == "/delay/0.5"
        assert 'edgeproxy_requests_total{protocol="http",status="499"} 1' in pop.metrics.render()
        # The next client gets a fresh connection and its answer.
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/b")).body == b"hello /b"
        c.close()


async def test_hit_for_pass_keys_take_the_direct_path_with_the_cache_on(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path, {"cache": {"enabled": True}}) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        # Not storable (no freshness information): the first fetch marks the key hit-for-pass.
        first = await c.request("GET", "/delay/0.2")
        assert first.status == 200 and first.header("x-cache") == "MISS"
        pending = asyncio.ensure_future(c.request("GET", "/delay/0.2"))
        await eventually(lambda: direct_in_flight(pop) == 1)
        second = await pending
        assert second.status == 200
        # A request with its own cache directives still takes the general path ...
        pending = asyncio.ensure_future(c.request("GET", "/delay/0.2", headers={"Cache-Control": "no-cache"}))
        await asyncio.sleep(0.1)
        assert direct_in_flight(pop) == 0
        third = await pending
        assert third.status == 200
        # ... and answers a pass with the same fields (no X-Cache on either).
        assert [k for k, _ in second.headers] == [k for k, _ in third.headers]
        assert second.header("x-cache") is None
        c.close()
        metrics = pop.metrics.render()
        assert 'edgeproxy_cache_requests_total{result="miss"} 1' in metrics
        assert 'edgeproxy_cache_requests_total{result="pass"} 2' in metrics
        assert srv.connections == 1


async def test_pipelined_passes_are_answered_in_order(tmp_path: Path) -> None:
    async with origin() as srv, pop_before(srv, tmp_path) as pop:
        c = await RawClient.connect(pop.addresses["http"][0])
        assert (await c.request("GET", "/a")).status == 200
        await c.send(b"".join(b"GET /p%d HTTP/1.1\r\nHost: example.test\r\n\r\n" % i for i in range(4)))
        bodies = [(await c.response()).body for _ in range(4)]
        assert bodies == [b"hello /p%d" % i for i in range(4)]
        assert srv.connections == 1
        c.close()
