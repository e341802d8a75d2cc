"""The cache in the request path: coalescing, revalidation, stale serving, purge, invalidation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pop_helpers import RawClient, get, running_pop


async def test_100_concurrent_misses_cause_one_origin_request(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        results = await asyncio.gather(*(get(p.http, "/cached/c?ms=300") for _ in range(100)))
        assert all(r.status == 200 for r in results)
        assert len({r.body for r in results}) == 1
        assert p.origin.hits == 1
        statuses = sorted(r.header("x-cache") or "" for r in results)
        assert statuses.count("MISS") == 1 and statuses.count("COALESCED") == 99
        metrics = (await get(p.admin, "/metrics")).body.decode()
        assert 'edgeproxy_cache_requests_total{result="coalesced"} 99' in metrics


async def test_coalesced_waiters_get_the_error_too(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"origin_groups": [{"first_byte_timeout": 0.3, "retries": 0}]}) as p:
        results = await asyncio.gather(*(get(p.http, "/cached/e?ms=1000") for _ in range(10)))
        assert [r.status for r in results] == [504] * 10
        assert p.origin.hits <= 1


async def test_private_responses_are_not_shared(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r1 = await get(p.http, "/private")
        r2 = await get(p.http, "/private")
        assert r1.body != r2.body
        assert p.origin.hits == 2


async def test_no_store_is_not_cached(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        await get(p.http, "/time")
        r = await get(p.http, "/time")
        assert r.header("x-cache") != "HIT"
        assert p.origin.hits == 2


async def test_client_conditional_request_on_a_hit_gets_304(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r1 = await get(p.http, "/cached/etag")
        etag = r1.header("etag")
        assert etag
        r2 = await get(p.http, "/cached/etag", headers={"If-None-Match": etag})
        assert r2.status == 304 and r2.body == b""
        assert r2.header("etag") == etag


async def test_purge_by_url_and_prefix(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        for path in ("/cached/p/1", "/cached/p/2", "/cached/q"):
            await get(p.http, path)
        c = await RawClient.connect(p.admin)
        r = await c.request("POST", "/cache/purge?url=http://example.test/cached/q")
        assert json.loads(r.body)["purged"] == 1
        r = await c.request("POST", "/cache/purge?url=//example.test/cached/p/&prefix=1")
        assert json.loads(r.body)["purged"] == 2
        r = await c.request("GET", "/cache/purge")
        assert r.status == 405
        c.close()
        assert (await get(p.http, "/cached/q")).header("x-cache") == "MISS"
        assert (await get(p.http, "/cached/p/1")).header("x-cache") == "MISS"


async def test_unsafe_method_invalidates(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        await get(p.http, "/cached/inv")
        assert (await get(p.http, "/cached/inv")).header("x-cache") == "HIT"
        c = await RawClient.connect(p.http)
        r = await c.request("POST", "/cached/inv", body=b"x")
        assert r.status == 200
        c.close()
        assert (await get(p.http, "/cached/inv")).header("x-cache") == "MISS"


async def test_admin_healthz_and_404(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        r = await get(p.admin, "/healthz")
        assert r.status == 200
        info = json.loads(r.body)
        assert info["status"] == "ok" and info["pop"] == "test-pop"
        assert (await get(p.admin, "/nope")).status == 404


class FakeClock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_stale_while_revalidate_then_revalidation_with_304(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        clock = FakeClock()
        p.pop.pipeline.clock = p.origin.clock = clock
        first = await get(p.http, "/cached/swr")
        assert first.header("x-cache") == "MISS"
        clock.now += 70  # stale, within stale-while-revalidate=30
        r = await get(p.http, "/cached/swr")
        assert r.header("x-cache") == "STALE" and r.body == first.body
        for _ in range(50):  # the background revalidation (a conditional GET) completes
            if p.origin.hits == 2:
                break
            await asyncio.sleep(0.02)
        assert p.origin.hits == 2
        assert dict(p.origin.recent[-1][2]).get(b"if-none-match") == first.header("etag").encode()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        assert (await get(p.http, "/cached/swr")).header("x-cache") == "HIT"  # freshened by the 304
        clock.now += 200  # beyond stale-while-revalidate: must revalidate before serving
        r = await get(p.http, "/cached/swr")
        assert r.header("x-cache") == "REVALIDATED" and r.body == first.body
        assert p.origin.hits == 3


async def test_stale_if_error_when_origin_is_gone(tmp_path: Path) -> None:
    async with running_pop(tmp_path, {"origin_groups": [{"retries": 0}]}) as p:
        clock = FakeClock()
        p.pop.pipeline.clock = p.origin.clock = clock
        first = await get(p.http, "/cached/sie")
        await p.origin.close()  # its pooled connection closes too, and nothing listens any more
        clock.now += 200
        r = await get(p.http, "/cached/sie")
        assert r.status == 200 and r.header("x-cache") == "STALE" and r.body == first.body


async def test_uncacheable_key_is_passed_without_coalescing(tmp_path: Path) -> None:
    """Hit-for-pass: once a key answered no-store, concurrent requests go to the origin directly
    (one origin request each) instead of waiting on one another."""
    async with running_pop(tmp_path) as p:
        await get(p.http, "/time")  # no-store: remembered as pass
        hits = p.origin.hits
        results = await asyncio.gather(*(get(p.http, "/time") for _ in range(20)))
        assert all(r.status == 200 for r in results)
        assert p.origin.hits - hits == 20
        assert all(r.header("x-cache") is None for r in results)
        metrics = (await get(p.admin, "/metrics")).body.decode()
        assert 'edgeproxy_cache_requests_total{result="pass"} 20' in metrics


async def test_vary_keeps_one_variant_per_normalised_header(tmp_path: Path) -> None:
    async with running_pop(tmp_path) as p:
        en = await get(p.http, "/vary", headers={"Accept-Language": "en"})
        de = await get(p.http, "/vary", headers={"Accept-Language": "de"})
        assert (en.body, de.body) == (b"language: en\n", b"language: de\n")
        assert en.header("x-cache") == de.header("x-cache") == "MISS"
        en2 = await get(p.http, "/vary", headers={"Accept-Language": "EN"})  # normalised: same variant
        de2 = await get(p.http, "/vary", headers={"Accept-Language": "de"})
        assert (en2.header("x-cache"), en2.body) == ("HIT", b"language: en\n")
        assert (de2.header("x-cache"), de2.body) == ("HIT", b"language: de\n")
        none = await get(p.http, "/vary")
        assert none.header("x-cache") == "MISS" and none.body == b"language: none\n"
        assert p.origin.hits == 3
