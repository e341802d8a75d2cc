"""Tests for edgeproxy.cache.store.MemoryStore: byte budget, LRU order, variants, purges."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.cache.policy import CachedResponse
from edgeproxy.cache.store import MemoryStore


def mk(size: int, vary: bytes | None = None, tag: int = 0) -> CachedResponse:
    """An entry whose `size` is exactly `size` bytes (all body), varied on Accept when given."""
    return CachedResponse(
        status=200,
        headers=[],
        body=b"x" * size,
        request_time=float(tag),
        response_time=float(tag),
        corrected_initial_age=0.0,
        freshness_lifetime=60.0,
        vary_names=(b"accept",) if vary is not None else (),
        vary=((b"accept", vary),) if vary is not None else (),
    )


def test_size_counts_body_and_headers() -> None:
    e = mk(10)
    e.headers = [(b"ab", b"cde")]
    assert e.size == 15


def test_put_get_and_accounting() -> None:
    s = MemoryStore(1000, 1000)
    a = mk(100)
    assert s.put(b"k", a)
    assert s.get(b"k") == [a]
    assert s.get(b"missing") == []
    assert len(s) == 1 and s.bytes_used == 100
    assert b"k" in s and b"missing" not in s


def test_same_vary_replaces_different_vary_adds() -> None:
    s = MemoryStore(1000, 1000)
    gz, br, gz2 = mk(10, b"gzip"), mk(20, b"br"), mk(30, b"gzip", tag=1)
    s.put(b"k", gz)
    s.put(b"k", br)
    assert s.get(b"k") == [gz, br]
    s.put(b"k", gz2)
    assert s.get(b"k") == [br, gz2]
    assert len(s) == 2 and s.bytes_used == 50


def test_oversized_entries_are_refused_without_side_effects() -> None:
    s = MemoryStore(max_bytes=100, max_object_bytes=50)
    keep = mk(40)
    s.put(b"a", keep)
    assert not s.put(b"b", mk(51))
    assert not s.put(b"a", mk(51))
    assert s.peek(b"a") == [keep] and s.bytes_used == 40 and s.evictions == 0
    t = MemoryStore(max_bytes=30, max_object_bytes=50)
    assert not t.put(b"a", mk(31))
    assert t.put(b"a", mk(30))


def test_lru_eviction_respects_gets() -> None:
    s = MemoryStore(300, 300)
    for k in (b"a", b"b", b"c"):
        s.put(k, mk(100))
    s.get(b"a")  # b is now least recently used
    s.put(b"d", mk(100))
    assert s.lru_keys() == [b"c", b"a", b"d"]
    assert s.evictions == 1 and s.bytes_used == 300
    s.put(b"e", mk(250))  # needs three keys gone
    assert s.lru_keys() == [b"e"] and s.evictions == 4


def test_put_refreshes_recency_of_existing_key() -> None:
    s = MemoryStore(300, 300)
    for k in (b"a", b"b", b"c"):
        s.put(k, mk(100))
    s.put(b"a", mk(100))  # replaces a's variant, a becomes most recent
    s.put(b"d", mk(100))
    assert s.lru_keys() == [b"c", b"a", b"d"]


def test_sole_key_sheds_its_oldest_variants() -> None:
    s = MemoryStore(100, 100)
    v1, v2, v3 = mk(40, b"1"), mk(40, b"2"), mk(50, b"3")
    for v in (v1, v2, v3):
        assert s.put(b"k", v)
    assert s.peek(b"k") == [v2, v3]
    assert s.bytes_used == 90 and s.evictions == 1


def test_peek_does_not_touch_recency() -> None:
    s = MemoryStore(200, 200)
    s.put(b"a", mk(100))
    s.put(b"b", mk(100))
    s.peek(b"a")
    s.put(b"c", mk(100))
    assert s.lru_keys() == [b"b", b"c"]


def test_delete_purge_and_counters() -> None:
    s = MemoryStore(1000, 1000)
    s.put(b"k", mk(10, b"1"))
    s.put(b"k", mk(10, b"2"))
    s.put(b"j", mk(10))
    assert s.delete(b"k") == 2
    assert s.delete(b"k") == 0
    assert s.purged == 0
    assert s.purge(b"j") == 1 and s.purged == 1
    assert s.purge(b"j") == 0
    assert len(s) == 0 and s.bytes_used == 0


def test_purge_prefix() -> None:
    s = MemoryStore(1000, 1000)
    for k in (
        b"https://a.com/img/1",
        b"https://a.com/img/2",
        b"https://a.com/css",
        b"https://b.com/img/1",
    ):
        s.put(k, mk(10))
    s.put(b"https://a.com/img/1", mk(10, b"v"))
    assert s.purge_prefix(b"https://a.com/img/") == 3
    assert s.lru_keys() == [b"https://a.com/css", b"https://b.com/img/1"]
    assert s.purged == 3 and s.bytes_used == 20 and len(s) == 2
    assert s.purge_prefix(b"nothing") == 0


def test_negative_limits_rejected() -> None:
    with pytest.raises(ValueError):
        MemoryStore(-1, 10)


# ---------------------------------------------------------------------------------------------
# Property: any sequence of operations keeps the budget and evicts in LRU order.

KEYS = [b"k0", b"k1", b"k2", b"k3", b"k4"]
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from(KEYS),
            st.sampled_from([b"a", b"b", b"c"]),
            st.integers(0, 120),
        ),
        st.tuples(st.just("get"), st.sampled_from(KEYS)),
        st.tuples(st.just("purge"), st.sampled_from(KEYS)),
        st.tuples(st.just("prefix"), st.sampled_from([b"k", b"k1", b"x"])),
    ),
    max_size=60,
)


def snapshot(s: MemoryStore) -> dict[bytes, list[CachedResponse]]:
    return {k: s.peek(k) for k in s.lru_keys()}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(0, 150), ops)
def test_store_budget_and_lru_order(
    max_bytes: int, max_obj: int, seq: list[tuple[Any, ...]]
) -> None:
    s = MemoryStore(max_bytes, max_obj)
    order: list[bytes] = []  # the model's recency order, least recent first
    for tag, op in enumerate(seq):
        before = snapshot(s)
        if op[0] == "put":
            _, key, vary, size = op
            e = mk(size, vary, tag)
            ok = s.put(key, e)
            assert ok == (size <= max_obj and size <= max_bytes)
            if not ok:
                assert snapshot(s) == before
                continue
            assert s.peek(key)[-1] is e
            if key in order:
                order.remove(key)
            after = snapshot(s)
            gone = [k for k in order if k not in after]
            # Evicted keys are exactly the least recently used ones.
            assert gone == order[: len(gone)]
            for k in order[len(gone) :]:
                assert after[k] == before[k]
            expected_own = [v for v in before.get(key, []) if v.vary != e.vary] + [e]
            if after[key] != expected_own:
                # The key's own older variants only go once every other key has, oldest first.
                assert list(after) == [key]
                assert after[key] == expected_own[-len(after[key]) :]
            elif gone:
                # No more evicted than needed: keeping the last one would break the budget.
                assert s.bytes_used + sum(x.size for x in before[gone[-1]]) > max_bytes
            order = [k for k in order if k in after] + [key]
        elif op[0] == "get":
            got = s.get(op[1])
            assert got == before.get(op[1], [])
            if op[1] in order:
                order.remove(op[1])
                order.append(op[1])
        elif op[0] == "purge":
            assert s.purge(op[1]) == len(before.get(op[1], []))
            order = [k for k in order if k != op[1]]
        else:
            n = s.purge_prefix(op[1])
            assert n == sum(len(v) for k, v in before.items() if k.startswith(op[1]))
            order = [k for k in order if not k.startswith(op[1])]
        state = snapshot(s)
        assert s.lru_keys() == order
        assert s.bytes_used == sum(e.size for vs in state.values() for e in vs) <= max_bytes
        assert len(s) == sum(len(vs) for vs in state.values())
        assert all(len({e.vary for e in vs}) == len(vs) for vs in state.values())
