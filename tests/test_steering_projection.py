"""Pure parts of TCP steering: flow-table changes -> nft map batches, the publisher, config."""

from __future__ import annotations

import asyncio

import pytest

from edgeproxy.config import ConfigError, config_from_dict
from edgeproxy.steering.nft import ruleset, steered_counter, table_name
from edgeproxy.steering.projection import Projection, decode_tcp_key, owner_pop, render
from edgeproxy.steering.publisher import FlowPublisher
from edgeproxy.steering.routing import mac_for, peer_routes
from edgeproxy.steering.service import inject
from gossip.flowtable import FlowTable, quic_initial_key, tcp_key

ANY = "203.0.113.1"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def setup(node: str = "p2") -> tuple[FlowTable, Projection, Clock]:
    clock = Clock()
    table = FlowTable(node)
    proj = Projection(node, {"p1": 0x101, "p3": 0x103}, clock=clock)
    table.listeners.append(proj.listener)
    return table, proj, clock


def remote(table: FlowTable, owner: str, port: int, now: float, **kw: object) -> bytes:
    item = {"src": "10.0.0.1", "sport": port, "dst": ANY, "dport": 80, "owner": owner, **kw}
    inject(table, [item], now)
    return tcp_key("10.0.0.1", port, ANY, 80)


def test_decode_key() -> None:
    assert decode_tcp_key(tcp_key("10.0.0.1", 4000, ANY, 80)) == ("10.0.0.1", 4000, ANY, 80)
    assert decode_tcp_key(tcp_key("::ffff:10.0.0.1", 4000, "::ffff:" + ANY, 80)) == ("10.0.0.1", 4000, ANY, 80)
    assert decode_tcp_key(tcp_key("2001:db8::1", 4000, "2001:db8::2", 80)) is None
    assert decode_tcp_key(quic_initial_key("10.0.0.1", 4000, b"12345678")) is None
    assert owner_pop("p1/0/3") == "p1" and owner_pop("p1") == "p1"


def test_remote_flows_are_projected_own_and_unknown_are_not() -> None:
    table, proj, clock = setup()
    k1 = remote(table, "p1", 1, clock.t)
    k3 = remote(table, "p3/0/1", 3, clock.t)
    remote(table, "p9", 9, clock.t)  # no mark for p9
    table.publish(tcp_key("10.0.0.1", 2, ANY, 80), clock.t, 30)  # our own
    assert set(proj.pending) == {k1, k3}
    assert proj.counters["unknown_owner"] == 1
    batch = proj.take(100)
    assert [m for _, _, m in batch.adds] == [0x101, 0x103] and not batch.deletes
    text = render(batch, "inet", "edgeproxy_p2")
    assert "add element inet edgeproxy_p2 flows4 { 10.0.0.1 . 1 . 203.0.113.1 . 80 : 0x101, " in text
    proj.commit(batch)
    assert proj.installed == {k1: 0x101, k3: 0x103} and not proj.pending


def test_changes_coalesce_and_owner_change_is_delete_then_add() -> None:
    table, proj, clock = setup()
    k = remote(table, "p1", 1, clock.t)
    proj.commit(proj.take(100))
    remote(table, "p3", 1, clock.t)  # p3 took the flow over
    remote(table, "p3", 1, clock.t, ttl=50)  # refreshed before the next batch: still one change
    batch = proj.take(100)
    assert len(batch.since) == 1 and batch.deletes == [(k, ("10.0.0.1", 1, ANY, 80))]
    assert batch.adds == [(k, ("10.0.0.1", 1, ANY, 80), 0x103)]
    text = render(batch, "inet", "t")
    assert text.index("delete element") < text.index("add element")
    proj.commit(batch)
    # the owner lets go (tombstone): the element goes
    inject(table, [{"src": "10.0.0.1", "sport": 1, "dst": ANY, "dport": 80, "owner": "p3", "deleted": True}], clock.t)
    batch = proj.take(100)
    assert batch.deletes and not batch.adds
    proj.commit(batch)
    assert proj.installed == {}


def test_add_then_remove_before_flush_costs_nothing() -> None:
    table, proj, clock = setup()
    remote(table, "p1", 1, clock.t)
    inject(table, [{"src": "10.0.0.1", "sport": 1, "dst": ANY, "dport": 80, "owner": "p1", "deleted": True}], clock.t)
    batch = proj.take(100)
    assert len(batch) == 0 and not proj.pending


def test_change_during_flight_is_not_lost() -> None:
    table, proj, clock = setup()
    remote(table, "p1", 1, clock.t)
    batch = proj.take(100)  # in flight
    inject(table, [{"src": "10.0.0.1", "sport": 1, "dst": ANY, "dport": 80, "owner": "p1", "deleted": True}], clock.t)
    assert proj.pending  # relative to what the kernel will hold, not to `installed`
    proj.commit(batch)
    second = proj.take(100)
    assert second.deletes and not second.adds


def test_expiry_and_batch_limit_and_resync() -> None:
    table, proj, clock = setup()
    for port in range(10):
        remote(table, "p1", port, clock.t, ttl=5)
    first = proj.take(4)
    assert len(first) == 4 and len(proj.pending) == 6
    proj.failed()  # the kernel refused: rebuild
    batch = proj.resync(table.entries())
    assert batch.resync and len(batch.adds) == 10 and not proj.pending
    assert render(batch, "inet", "t").startswith("flush map inet t flows4\n")
    proj.commit(batch)
    clock.t += 10
    table.expire(clock.t)
    batch = proj.take(100)
    assert len(batch.deletes) == 10
    proj.commit(batch)
    assert proj.installed == {}


def test_render_splits_long_batches_into_lines() -> None:
    table, proj, clock = setup()
    for port in range(4500):
        remote(table, "p1", port, clock.t)
    text = render(proj.take(10_000), "inet", "t")
    assert text.count("\n") == 3


def test_ruleset_and_names() -> None:
    assert table_name("pop-1.x") == "edgeproxy_pop_1_x"
    text = ruleset("edgeproxy_p2", size=100, exclude_ifaces=["bh0", ""])
    assert 'iifname != { "bh0" }' in text and "map @flows4 counter" in text and "size 100" in text
    assert steered_counter("... counter packets 12 bytes 3400\n") == (12, 3400)
    routes = peer_routes("p2", {"p1": "10.0.0.1", "p2": "10.0.0.2", "p3": "10.0.0.3"}, 0x100, 500)
    assert [(r.pop, r.mark, r.table) for r in routes] == [("p1", 0x101, 501), ("p3", 0x103, 503)]
    assert mac_for("10.201.0.1") == "02:45:0a:c9:00:01"


async def test_publisher_min_age_refresh_linger() -> None:
    table = FlowTable("p1")
    loop = asyncio.get_running_loop()
    pub = FlowPublisher(table, min_age=0.05, linger=0.1, ttl=0.3)
    pub.start()
    local, peer, short = (ANY, 80), ("10.0.0.1", 5000), ("10.0.0.1", 5001)
    key = tcp_key("10.0.0.1", 5000, ANY, 80)
    pub.opened(local, peer)
    pub.opened(local, short)
    pub.closed(local, short)  # gone before min_age: never published
    assert table.lookup(key, loop.time()) is None
    await asyncio.sleep(0.08)
    assert table.lookup(key, loop.time()) == "p1"
    assert table.lookup(tcp_key("10.0.0.1", 5001, ANY, 80), loop.time()) is None
    await asyncio.sleep(0.4)  # longer than ttl: refreshed meanwhile
    assert table.lookup(key, loop.time()) == "p1"
    pub.closed(local, peer)
    assert table.lookup(key, loop.time()) == "p1"  # lingering (TIME_WAIT)
    await asyncio.sleep(0.15)
    entry = table.get(key)
    assert entry is not None and entry.deleted
    assert pub.stats()["counters"] == {"opened": 2, "closed": 2, "published": 1, "deleted": 1}
    pub.opened(local, ("10.0.0.2", 1))
    pub.opened(local, ("not an address", 1))
    await asyncio.sleep(0.08)
    await pub.close()  # retires what is still ours
    own = table.get(tcp_key("10.0.0.2", 1, ANY, 80))
    assert own is not None and own.deleted


def test_config_section() -> None:
    base = {"origin_groups": [{"servers": ["10.0.0.9:80"]}]}
    cfg = config_from_dict(base | {"steering": {"enabled": True, "backhaul_device": "bh0", "mode": "vxlan",
                                                 "peers": {"p1": "10.0.0.1", "p2": "10.0.0.2"}}})
    assert cfg.steering.peers == {"p1": "10.0.0.1", "p2": "10.0.0.2"} and not cfg.steering.inject
    for bad, key in [
        ({"enabled": True}, "steering.backhaul_device"),
        ({"mode": "gre"}, "steering.mode"),
        ({"peers": {"p1": "nope"}}, "steering.peers.p1"),
        ({"peers": {"p1": 5}}, "steering.peers.p1"),
        ({"table": 252, "peers": {"a": "10.0.0.1"}}, "steering.table"),
        ({"rule_pref": 0}, "steering.rule_pref"),
        ({"linger": -1}, "steering.linger"),
    ]:
        with pytest.raises(ConfigError) as e:
            config_from_dict(base | {"steering": bad})
        assert e.value.key == key
