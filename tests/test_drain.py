"""Graceful drain (admin POST /drain) on a real PoP on loopback: /healthz 503, existing connections
served (HTTP/1.1 keep-alive ones get Connection: close), new ones accepted, exit when idle or at
the deadline, DELETE /drain back to service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.h3_client import connect_h3
from tests.pop_helpers import RawClient, Response, get, running_pop


async def admin(addr: tuple[str, int], method: str, path: str) -> Response:
    client = await RawClient.connect(addr)
    try:
        await client.send(f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        return await client.response()
    finally:
        client.close()


async def wait_finished(pop: object, timeout: float) -> bool:
    drain = pop.drain  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(timeout):
            await drain.finished.wait()
    except TimeoutError:
        return False
    return True


async def test_drain_serves_existing_connections_and_exits_when_idle(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as rp:
        ka = await RawClient.connect(rp.http)
        first = await ka.request("GET", "/time")
        assert first.status == 200 and (first.header("connection") or "") != "close"
        r = await admin(rp.admin, "POST", "/drain")
        assert r.status == 202
        assert json.loads(r.body)["draining"] is True
        health = await admin(rp.admin, "GET", "/healthz")
        assert health.status == 503 and json.loads(health.body)["status"] == "draining"
        # a new connection is still accepted and served, and told to close
        fresh = await get(rp.http, "/time")
        assert fresh.status == 200 and fresh.header("connection") == "close"
        assert not rp.pop.drain.finished.is_set()  # the keep-alive connection is still open
        last = await ka.request("GET", "/time")
        assert last.status == 200 and last.header("connection") == "close"
        assert await ka.closed()
        ka.close()
        # idle now: the drain finishes and run_until_signalled returns
        assert await wait_finished(rp.pop, 3.0)
        assert rp.pop.drain.reason == "idle"
        await asyncio.wait_for(rp.pop.run_until_signalled(), 2.0)
        status = await admin(rp.admin, "GET", "/drain")
        assert json.loads(status.body)["finished"] is True
        assert (await admin(rp.admin, "DELETE", "/drain")).status == 409  # too late to cancel


async def test_drain_ends_at_the_deadline(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as rp:
        ka = await RawClient.connect(rp.http)
        assert (await ka.request("GET", "/time")).status == 200
        assert (await admin(rp.admin, "POST", "/drain?deadline=0.5")).status == 202
        await asyncio.sleep(0.2)
        assert not rp.pop.drain.finished.is_set()
        assert await wait_finished(rp.pop, 3.0)
        assert rp.pop.drain.reason == "deadline"
        ka.close()


async def test_bad_deadline_and_methods(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as rp:
        assert (await admin(rp.admin, "POST", "/drain?deadline=abc")).status == 400
        assert (await admin(rp.admin, "POST", "/drain?deadline=-1")).status == 400
        assert (await admin(rp.admin, "PUT", "/drain")).status == 405
        r = await admin(rp.admin, "GET", "/drain")
        assert r.status == 200 and json.loads(r.body)["draining"] is False
        assert not rp.pop.draining


async def test_cancel_returns_to_service(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as rp:
        ka = await RawClient.connect(rp.http)
        assert (await ka.request("GET", "/time")).status == 200
        assert (await admin(rp.admin, "POST", "/drain?deadline=1")).status == 202
        assert (await admin(rp.admin, "GET", "/healthz")).status == 503
        r = await admin(rp.admin, "DELETE", "/drain")
        assert r.status == 200 and json.loads(r.body)["draining"] is False
        assert (await admin(rp.admin, "GET", "/healthz")).status == 200
        again = await ka.request("GET", "/time")
        assert again.status == 200 and again.header("connection") != "close"
        # POST ?cancel=1 works as well; the cancelled drain's deadline does not stop the PoP
        assert (await admin(rp.admin, "POST", "/drain")).status == 202
        assert (await admin(rp.admin, "POST", "/drain?cancel=1")).status == 200
        await asyncio.sleep(1.3)
        assert not rp.pop.drain.finished.is_set()
        assert (await ka.request("GET", "/time")).status == 200
        ka.close()


async def test_quic_connection_keeps_being_served_while_draining(tmp_path: Path) -> None:
    async with running_pop(tmp_path, quic=True) as rp:
        assert rp.quic is not None
        async with connect_h3(*rp.quic) as client:
            r = await client.request(b"GET", b"/time")
            assert r.status == 200
            assert (await admin(rp.admin, "POST", "/drain?deadline=5")).status == 202
            for _ in range(3):
                assert (await client.request(b"GET", b"/time")).status == 200
                await asyncio.sleep(0.1)
            assert not rp.pop.drain.finished.is_set()
        # the client closed: idle, the drain finishes well before its deadline
        assert await wait_finished(rp.pop, 4.0)
        assert rp.pop.drain.reason == "idle"
