"""Origin groups: selection, retries, passive and active health, metrics; real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from origin_helpers import (
    FakeClock,
    OriginServer,
    Request,
    StreamBody,
    eventually,
    origin_servers,
    response,
    unused_port,
)

from edgeproxy.config import HealthSection, OriginGroupSection, PassiveSection
from edgeproxy.http.messages import Body, BodyError, BytesBody, EmptyBody, HTTPError, RequestHead
from edgeproxy.metrics import Counter as MCounter
from edgeproxy.metrics import Gauge, Registry
from edgeproxy.origin.client import OriginResponse
from edgeproxy.origin.group import OriginGroup


def section(servers: list[str], **kw: Any) -> OriginGroupSection:
    health = kw.pop("health", HealthSection(enabled=False))
    passive = kw.pop("passive", PassiveSection(consecutive_errors=100, eject_seconds=30))
    opts: dict[str, Any] = {
        "name": "g",
        "servers": servers,
        "policy": "round_robin",
        "max_connections": 4,
        "max_idle": 4,
        "idle_timeout": 5.0,
        "connect_timeout": 0.5,
        "first_byte_timeout": 1.0,
        "read_timeout": 1.0,
        "retries": 2,
    }
    opts.update(kw)
    return OriginGroupSection(health=health, passive=passive, **opts)


@contextlib.asynccontextmanager
async def group_for(
    sec: OriginGroupSection, clock: Callable[[], float] | None = None
) -> AsyncIterator[tuple[OriginGroup, Registry]]:
    reg = Registry()
    group = OriginGroup(sec, reg, clock=clock) if clock else OriginGroup(sec, reg)
    await group.start()
    try:
        yield group, reg
    finally:
        await group.close()


def group_over(
    servers: list[OriginServer], **kw: Any
) -> contextlib.AbstractAsyncContextManager[tuple[OriginGroup, Registry]]:
    return group_for(section([s.address for s in servers], **kw))


def counter(reg: Registry, name: str) -> MCounter:
    m = reg.get(name)
    assert isinstance(m, MCounter)
    return m


def gauge(reg: Registry, name: str) -> Gauge:
    """The gauge as a scrape sees it (collectors run first)."""
    reg.render()
    m = reg.get(name)
    assert isinstance(m, Gauge)
    return m


def req(method: bytes = b"GET", target: bytes = b"/", **kw: Any) -> RequestHead:
    return RequestHead(method, target, kw.pop("headers", []), authority=b"site.test", **kw)


async def fetch_all(
    group: OriginGroup, head: RequestHead, body: Body | None = None, body_length: int | None = 0
) -> tuple[OriginResponse, bytes]:
    resp = await group.fetch(head, body or EmptyBody(), body_length)
    async with resp:
        data = bytearray()
        while chunk := await resp.read():
            data += chunk
    return resp, bytes(data)


async def always_503(
    s: OriginServer, r: Request, rd: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    w.write(response(503, b"down"))
    await w.drain()
    return True


def dead() -> str:
    return f"127.0.0.1:{unused_port()}"


# -- selection ------------------------------------------------------------------------------------


async def test_round_robin_spread_and_keepalive() -> None:
    async with origin_servers(3) as srvs:
        addrs = [s.address for s in srvs]
        async with group_for(section(addrs)) as (group, reg):
            seen: Counter[str] = Counter()
            for _ in range(9):
                resp, body = await fetch_all(group, req(target=b"/rr"))
                assert body == b"hello /rr"
                seen[resp.server] += 1
            assert seen == {a: 3 for a in addrs}
            assert [len(s.requests) for s in srvs] == [3, 3, 3]
            assert [s.connections for s in srvs] == [1, 1, 1]
            assert counter(reg, "edgeproxy_origin_requests_total").get("g", addrs[0], "ok") == 3
            conns = gauge(reg, "edgeproxy_origin_connections")
            assert conns.get("g", addrs[0], "idle") == 1 and conns.get("g", addrs[0], "busy") == 0
            hist = reg.get("edgeproxy_origin_response_seconds")
            assert hist is not None and "edgeproxy_origin_response_seconds_count" in reg.render()


@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_origin_connections_use_the_configured_http1_parser(parser: str) -> None:
    import h11

    from edgeproxy.http.h1fast_client import FastClientConnection

    async with origin_servers(1) as srvs:
        reg = Registry()
        group = OriginGroup(section([srvs[0].address]), reg, parser=parser)
        await group.start()
        try:
            _resp, body = await fetch_all(group, req(target=b"/p"))
            assert body == b"hello /p"
            (conn,) = group.servers[0].pool._idle
            expect = h11.Connection if parser == "h11" else FastClientConnection
            assert type(conn._codec) is expect
        finally:
            await group.close()


async def test_busy_gauge_while_response_is_open() -> None:
    async with origin_servers(1) as (srv,), group_for(section([srv.address])) as (group, reg):
        resp = await group.fetch(req(), EmptyBody(), 0)
        conns = gauge(reg, "edgeproxy_origin_connections")
        assert conns.get("g", srv.address, "busy") == 1
        resp.close()
        conns = gauge(reg, "edgeproxy_origin_connections")
        assert conns.get("g", srv.address, "busy") == 0
        assert conns.get("g", srv.address, "idle") == 0


async def test_failover_policy_sticks_to_first_and_fails_over() -> None:
    async with origin_servers(2) as (a, b):
        async with group_for(section([a.address, b.address], policy="failover")) as (group, _):
            for _ in range(3):
                resp, _body = await fetch_all(group, req())
                assert resp.server == a.address
        down = dead()
        async with group_for(section([down, b.address], policy="failover")) as (group, reg):
            resp, body = await fetch_all(group, req(target=b"/x"))
            assert resp.server == b.address and body == b"hello /x"
            assert (
                counter(reg, "edgeproxy_origin_requests_total").get("g", down, "connect_error") == 1
            )
            assert counter(reg, "edgeproxy_origin_retries_total").get("g") == 1


# -- health ---------------------------------------------------------------------------------------


async def test_passive_ejection_and_expiry() -> None:
    clock = FakeClock()
    bad = await OriginServer(always_503).start()
    try:
        async with origin_servers(1) as (good,):
            sec = section(
                [bad.address, good.address],
                passive=PassiveSection(consecutive_errors=2, eject_seconds=30),
            )
            async with group_for(sec, clock) as (group, reg):
                statuses = [(await fetch_all(group, req()))[0].status for _ in range(4)]
                assert statuses == [503, 200, 503, 200]  # 5xx returned as they are, not retried
                healthy = gauge(reg, "edgeproxy_origin_healthy")
                assert healthy.get("g", bad.address) == 0
                for _ in range(6):
                    resp, _ = await fetch_all(group, req())
                    assert resp.server == good.address
                assert len(bad.requests) == 2
                assert (
                    counter(reg, "edgeproxy_origin_requests_total").get(
                        "g", bad.address, "http_5xx"
                    )
                    == 2
                )

                clock.now += 30  # ejection over: the server is tried again
                servers = {(await fetch_all(group, req()))[0].server for _ in range(2)}
                assert bad.address in servers
                assert len(bad.requests) == 3
                # It failed on probation: ejected again at once.
                for _ in range(4):
                    resp, _ = await fetch_all(group, req())
                    assert resp.server == good.address
                assert group.status()[0]["ejected"] is True
    finally:
        await bad.close()


async def test_active_health_rise_and_fall() -> None:
    health = HealthSection(
        enabled=True, path="/health", host="probe.test", interval=0.05, timeout=0.5, rise=2, fall=2
    )
    async with origin_servers(2) as (a, b), group_over([a, b], health=health) as (group, reg):
        await eventually(lambda: any(r.path == "/health" for r in a.requests))
        probe = next(r for r in a.requests if r.path == "/health")
        assert probe.header("host") == "probe.test" and probe.method == "GET"

        a.health_status = 500
        await eventually(lambda: gauge(reg, "edgeproxy_origin_healthy").get("g", a.address) == 0)
        for _ in range(4):
            resp, _ = await fetch_all(group, req(target=b"/work"))
            assert resp.server == b.address
        assert not any(r.path == "/work" for r in a.requests)

        a.health_status = 200
        await eventually(lambda: gauge(reg, "edgeproxy_origin_healthy").get("g", a.address) == 1)
        seen = {(await fetch_all(group, req(target=b"/work")))[0].server for _ in range(4)}
        assert seen == {a.address, b.address}


async def test_panic_mode_still_serves_when_every_check_fails() -> None:
    health = HealthSection(enabled=True, path="/health", interval=0.05, timeout=0.5, rise=1, fall=1)
    async with origin_servers(2) as (a, b):
        a.health_status = b.health_status = 503
        async with group_for(section([a.address, b.address], health=health)) as (group, reg):
            await eventually(
                lambda: gauge(reg, "edgeproxy_origin_healthy").get("g", a.address) == 0
                and gauge(reg, "edgeproxy_origin_healthy").get("g", b.address) == 0
            )
            seen = set()
            for _ in range(4):
                resp, body = await fetch_all(group, req(target=b"/still"))
                assert body == b"hello /still"
                seen.add(resp.server)
            assert seen == {a.address, b.address}


async def test_close_cancels_health_checks_and_closes_pools() -> None:
    health = HealthSection(enabled=True, path="/health", interval=0.05, timeout=0.5)
    async with origin_servers(1) as (srv,):
        group = OriginGroup(section([srv.address], health=health), Registry())
        await group.start()
        tasks = list(group._tasks)
        assert tasks and not any(t.done() for t in tasks)
        await fetch_all(group, req())
        await group.close()
        assert all(t.done() for t in tasks)
        await eventually(lambda: srv.open_connections == 0)
        with pytest.raises(HTTPError) as err:
            await group.fetch(req(), EmptyBody(), 0)
        assert err.value.status == 502 and "closed" in err.value.detail


# -- retry rules ----------------------------------------------------------------------------------


async def test_idempotent_replayable_requests_are_retried_on_the_next_server() -> None:
    async with origin_servers(1) as (alive,):
        sec = section([dead(), alive.address], policy="failover")
        async with group_for(sec) as (group, reg):
            resp, _ = await fetch_all(group, req(b"GET"))
            assert resp.server == alive.address
            payload = bytes(range(256)) * 1000
            resp, body = await fetch_all(
                group, req(b"PUT", b"/echo"), BytesBody(payload, chunk=10000), len(payload)
            )
            assert resp.server == alive.address and body == payload  # replayed intact
            assert counter(reg, "edgeproxy_origin_retries_total").get("g") == 2


@pytest.mark.parametrize(
    ("method", "make_body", "why"),
    [
        (b"POST", lambda: BytesBody(b"x" * 5000), "is not idempotent"),
        (b"POST", lambda: EmptyBody(), "is not idempotent"),
        (b"PUT", lambda: StreamBody(chunks=3, size=1000, length=3000), "streamed body"),
    ],
)
async def test_no_retry_unless_idempotent_and_replayable(
    method: bytes, make_body: Callable[[], Body], why: str
) -> None:
    async with origin_servers(1) as (alive,):
        down = dead()
        async with group_for(section([down, alive.address], policy="failover")) as (group, reg):
            body = make_body()
            with pytest.raises(HTTPError) as err:
                await group.fetch(req(method, b"/echo"), body, body.length)
            assert err.value.status == 502
            assert down in err.value.detail and why in err.value.detail
            assert alive.requests == []
            assert counter(reg, "edgeproxy_origin_retries_total").get("g") == 0


async def test_502_names_every_server_tried_and_why() -> None:
    downs = [dead(), dead()]
    async with group_for(section(downs, retries=3)) as (group, reg):
        with pytest.raises(HTTPError) as err:
            await group.fetch(req(), EmptyBody(), 0)
    assert err.value.status == 502
    detail = err.value.detail
    assert "4 attempts" in detail
    for d in downs:
        assert detail.count(d) == 2  # untried servers first, then around again
    assert "connect to" in detail and "failed" in detail
    assert counter(reg, "edgeproxy_origin_retries_total").get("g") == 3


async def test_504_when_the_last_failure_is_a_timeout() -> None:
    async with (
        origin_servers(1) as (srv,),
        group_over([srv], first_byte_timeout=0.1, retries=1) as (group, reg),
    ):
        with pytest.raises(HTTPError) as err:
            await group.fetch(req(target=b"/delay/1"), EmptyBody(), 0)
        assert err.value.status == 504
        assert "no response head" in err.value.detail
        assert counter(reg, "edgeproxy_origin_requests_total").get("g", srv.address, "timeout") == 2


async def test_5xx_is_returned_and_not_retried() -> None:
    bad = await OriginServer(always_503).start()
    try:
        async with (
            origin_servers(1) as (good,),
            group_over([bad, good], policy="failover") as (group, _reg),
        ):
            resp, body = await fetch_all(group, req())
            assert (resp.status, body, resp.server) == (503, b"down", bad.address)
            assert good.requests == []
            assert group.servers[0].health.passive_failures == 1
    finally:
        await bad.close()


async def test_malformed_response_is_a_502_without_retry() -> None:
    async with origin_servers(2) as (a, b), group_over([a, b], policy="failover") as (group, reg):
        with pytest.raises(HTTPError) as err:
            await group.fetch(req(target=b"/garbage"), EmptyBody(), 0)
        assert err.value.status == 502
        assert b.requests == []
        assert (
            counter(reg, "edgeproxy_origin_requests_total").get("g", a.address, "protocol_error")
            == 1
        )


async def test_stale_keepalive_is_retried_once_on_a_fresh_connection() -> None:
    async with origin_servers(1) as (srv,):
        srv.drop_reused = True
        # One counted failure would eject the only server: proves stale resets are not counted.
        passive = PassiveSection(consecutive_errors=1, eject_seconds=30)
        async with group_for(section([srv.address], retries=0, passive=passive)) as (group, reg):
            await fetch_all(group, req())  # leaves a pooled connection the origin will drop
            resp, body = await fetch_all(group, req(b"POST", b"/echo"))
            assert resp.status == 200
            payload = b"p" * 100_000
            resp, body = await fetch_all(
                group, req(b"POST", b"/echo"), BytesBody(payload), len(payload)
            )
            assert body == payload
            requests_total = counter(reg, "edgeproxy_origin_requests_total")
            assert requests_total.get("g", srv.address, "reset") == 2
            assert requests_total.get("g", srv.address, "ok") == 3
            assert group.servers[0].health.ejections == 0  # a stale reset is not the origin's fault
            assert gauge(reg, "edgeproxy_origin_healthy").get("g", srv.address) == 1
            assert srv.connections == 3


async def test_stale_keepalive_with_streamed_body_is_not_retried() -> None:
    async with origin_servers(1) as (srv,):
        srv.drop_reused = True
        async with group_for(section([srv.address])) as (group, _):
            await fetch_all(group, req())
            body = StreamBody(chunks=20, size=1000, pause=0.01, length=20_000)
            with pytest.raises(HTTPError) as err:
                await group.fetch(req(b"POST", b"/sink"), body, 20_000)
            assert err.value.status == 502 and "reused" in err.value.detail
            assert body.sent > 0
            assert srv.connections == 1


async def test_client_body_errors_propagate_without_retry_or_blame() -> None:
    class Broken:
        length: int | None = None

        async def read(self) -> bytes:
            raise BodyError("client went away")

    async with origin_servers(2) as (a, b), group_over([a, b], policy="failover") as (group, _):
        with pytest.raises(BodyError):
            await group.fetch(req(b"PUT", b"/sink"), Broken(), None)
        assert b.requests == []
        assert group.servers[0].health.passive_failures == 0
        await eventually(lambda: a.open_connections == 0)


async def test_upgrade_through_the_group() -> None:
    async with origin_servers(1) as (srv,), group_for(section([srv.address])) as (group, reg):
        head = req(target=b"/upgrade", headers=[(b"connection", b"upgrade"), (b"upgrade", b"echo")])
        resp = await group.fetch(head, EmptyBody(), 0)
        assert resp.status == 101 and resp.server == srv.address
        tunnel = resp.detach()
        assert gauge(reg, "edgeproxy_origin_connections").get("g", srv.address, "busy") == 0
        got = b""
        while len(got) < len(b"hello-from-origin"):
            got += await asyncio.wait_for(tunnel.read(), 2)
        assert got == b"hello-from-origin"
        tunnel.close()
        await asyncio.wait_for(tunnel.wait_closed(), 2)
