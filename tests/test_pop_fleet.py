"""Three PoPs in one process with `[gossip]` on: membership, backhaul addresses learnt from
tags, flow-table replication, failure detection (hard stop) and graceful leave.

Timings use memberlist's LAN profile (probe 1 s, suspicion min 4 s with 3 members): a hard-stopped
PoP is expected to be declared dead in about 5-7 s; the assertions allow much more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from edgeproxy.config import ConfigError, config_from_dict
from edgeproxy.membership import GossipMembership, flow_keyring, member_tags
from edgeproxy.pop import Pop
from edgeproxy.quic.fleet import FleetKeys
from gossip import wire
from gossip.flowtable import FlowTable, quic_initial_key
from gossip.swim import Member, MemberEvent, State

NAMES = ("pop-a", "pop-b", "pop-c")


def _config(tmp_path: Path, name: str, index: int, key_file: Path, keyring: Path, join: list[str], **gossip: Any) -> Any:
    return config_from_dict({
        "pop": {"id": name, "state_dir": str(tmp_path / name)},
        "listen": {"http": ["127.0.0.1:0"], "https": [], "quic": []},
        "origin_groups": [{"name": "o", "servers": ["127.0.0.1:9"], "health": {"enabled": False}}],
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access_log": ""},
        "fleet": {"key_file": str(key_file)},
        "quic_lb": {"pop_index": index},
        "backhaul": {"listen": "127.0.0.1:0", "workers": 1},
        "gossip": {"enabled": True, "bind": "127.0.0.1:0", "keyring": str(keyring), "join": join, **gossip},
    })


async def _wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until `pred()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, **gossip: Any) -> AsyncIterator[dict[str, Pop]]:
    key_file = tmp_path / "fleet-keys.toml"
    FleetKeys.generate(key_file, now=time.time())
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps([base64.b64encode(os.urandom(32)).decode()]))
    pops: dict[str, Pop] = {}
    try:
        seed: list[str] = []
        for i, name in enumerate(NAMES):
            pop = Pop(_config(tmp_path, name, i + 1, key_file, keyring, seed, **gossip))
            pops[name] = pop
            await pop.start()
            if not seed:
                host, port = pop.addresses["gossip"][0]
                seed = [f"{host}:{port}"]
        yield pops
    finally:
        for pop in pops.values():
            with contextlib.suppress(Exception):
                await pop.stop(grace=0.1, leave=False)


def _metrics(pop: Pop) -> dict[str, float]:
    """The PoP's /metrics as {series: value} (what a scrape renders)."""
    out = {}
    for line in pop.metrics.render().splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def _alive_peers(pop: Pop) -> set[str]:
    assert pop.gossip is not None
    return {m.name for m in pop.gossip.agent.members() if m.state == State.ALIVE} - {pop.config.pop.id}


async def test_three_pops_gossip_flows_and_failure(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with fleet(tmp_path) as pops:
        a, b, c = (pops[n] for n in NAMES)
        t = await _wait_for(lambda: all(len(_alive_peers(p)) == 2 for p in pops.values()), 10.0)
        print(f"\nall members alive everywhere after {t:.2f}s")
        # Membership drives the dispatcher's view: every PoP alive, backhaul addresses and
        # names learnt from tags (no [backhaul] peers were configured).
        for p in pops.values():
            assert p.membership is not None
            for j, other in enumerate(pops.values()):
                assert p.membership.is_alive(j + 1) is True
                assert p.membership.node_named(other.config.pop.id) == (j + 1, 0, 0)
                if other is not p:
                    assert p.membership.backhaul_address((j + 1, 0, 0)) == other.addresses["backhaul"][0]
        # A flow published at A (as a QUIC Initial or TCP steering publication would) appears at
        # B and C.
        assert isinstance(a.flows, FlowTable)
        key = quic_initial_key("198.51.100.7", 4433, b"\x01" * 8)
        a.flows.publish(key, loop.time(), 30.0)
        t = await _wait_for(lambda: all(p.flows is not None and p.flows.lookup(key, loop.time()) == "pop-a" for p in (b, c)), 5.0)
        print(f"flow replicated to both peers after {t * 1000:.1f}ms")
        # /metrics shows the fleet layers.
        m = _metrics(a)
        assert m['edgeproxy_gossip_members{state="alive"}'] == 3 and m['edgeproxy_fleet_pops{state="alive"}'] == 3
        assert m['edgeproxy_flow_records{owner="local"}'] == 1 and m['edgeproxy_flow_events_total{event="published"}'] == 1
        m = _metrics(b)
        assert m['edgeproxy_flow_records{owner="remote"}'] == 1 and m['edgeproxy_flow_events_total{event="entries_merged"}'] >= 1
        assert m['edgeproxy_gossip_events_total{event="udp_in"}'] > 0
        # Hard stop of C (no leave): A and B declare PoP 3 dead (the dispatcher then resets its CIDs).
        t0 = time.monotonic()
        await c.stop(grace=0.1, leave=False)
        assert a.membership is not None and b.membership is not None
        t = await _wait_for(lambda: a.membership.is_alive(3) is False and b.membership.is_alive(3) is False, 30.0, 0.1)  # type: ignore[union-attr]
        print(f"hard-stopped pop-c declared dead after {time.monotonic() - t0:.2f}s")
        m = _metrics(a)
        assert m['edgeproxy_fleet_pops{state="dead"}'] == 1 and m['edgeproxy_fleet_pops{state="alive"}'] == 2
        assert a.membership.is_alive(2) is True
        # Flows still replicate between the survivors.
        key2 = quic_initial_key("198.51.100.8", 4433, b"\x02" * 8)
        b.flows.publish(key2, loop.time(), 30.0)  # type: ignore[union-attr]
        await _wait_for(lambda: a.flows is not None and a.flows.lookup(key2, loop.time()) == "pop-b", 5.0)
        # Graceful stop of B (leave): A marks it dead promptly.
        t0 = time.monotonic()
        stopping = asyncio.ensure_future(b.stop(grace=0.1, leave=True))
        t = await _wait_for(lambda: a.membership.is_alive(2) is False, 10.0, 0.05)  # type: ignore[union-attr]
        print(f"gracefully stopped pop-b marked left/dead after {t:.2f}s (stop took {time.monotonic() - t0:.2f}s so far)")
        assert t < 5.0
        await stopping
        b_member = a.gossip.agent.member("pop-b")  # type: ignore[union-attr]
        assert b_member is not None and b_member.state == State.LEFT


def _member(name: str, node: tuple[int, int, int], state: State, backhaul: tuple[str, int] | None = ("10.0.0.9", 4434)) -> Member:
    pop_id = name.split("/")[0]
    tags = member_tags(pop=pop_id, pop_index=node[0], host_index=node[1], worker=node[2], backhaul=backhaul, flow=("10.0.0.9", 7947), region="eu")
    return Member(name, "10.0.0.9", 7946, wire.encode_serf_tags(tags), 1, state, 0.0, b"")


def test_gossip_membership_aggregates_workers_per_pop() -> None:
    changes: list[tuple[int, bool]] = []
    m = GossipMembership(node=(1, 0, 0), name="pop-a", listen=("127.0.0.1", 4434), workers=2,
                         on_change=lambda pop, alive: changes.append((pop, alive)))
    assert m.is_alive(2) is None
    m.on_event(MemberEvent("join", _member("pop-b", (2, 0, 0), State.ALIVE, ("10.0.0.2", 5000)), 0.0))
    m.on_event(MemberEvent("join", _member("pop-b/0/1", (2, 0, 1), State.ALIVE, ("10.0.0.2", 5001)), 0.0))
    assert m.is_alive(2) is True
    assert m.backhaul_address((2, 0, 1)) == ("10.0.0.2", 5001)
    assert m.node_named("pop-b/0/1") == (2, 0, 1)
    assert (2, 0, 0) in m.nodes() and (2, 0, 1) in m.nodes()
    # One worker failing does not kill the PoP; suspicion is not a verdict.
    m.on_event(MemberEvent("failed", _member("pop-b", (2, 0, 0), State.DEAD), 1.0))
    m.on_event(MemberEvent("suspect", _member("pop-b/0/1", (2, 0, 1), State.SUSPECT), 1.0))
    assert m.is_alive(2) is True
    m.on_event(MemberEvent("leave", _member("pop-b/0/1", (2, 0, 1), State.LEFT), 2.0))
    assert m.is_alive(2) is False
    # Reaping keeps the verdict; a rejoin revives the PoP.
    m.on_event(MemberEvent("reap", _member("pop-b", (2, 0, 0), State.DEAD), 3.0))
    assert m.is_alive(2) is False
    m.on_event(MemberEvent("join", _member("pop-b", (2, 0, 0), State.ALIVE), 4.0))
    assert m.is_alive(2) is True
    assert changes == [(2, True), (2, False), (2, True)]
    # Our own PoP is never declared dead; non-edgeproxy members are ignored.
    m.on_event(MemberEvent("failed", _member("pop-a/0/1", (1, 0, 1), State.DEAD), 5.0))
    assert m.is_alive(1) is True
    m.on_event(MemberEvent("join", Member("serf", "10.0.0.1", 7946, wire.encode_serf_tags({"role": "x"}), 1, State.ALIVE, 0.0, b""), 6.0))
    assert m.is_alive(0) is None


@pytest.mark.parametrize(
    ("gossip", "key"),
    [
        ({"enabled": True, "bind": "0.0.0.0:7946"}, "gossip.advertise"),
        ({"advertise": "example.com"}, "gossip.advertise"),
        ({"flow_scope": "world"}, "gossip.flow_scope"),
        ({"profile": "fast"}, "gossip.profile"),
        ({"join": ["nope"]}, "gossip.join[0]"),
        ({"enabled": True, "bind": "127.0.0.1:0", "keyring": "/nonexistent"}, "gossip.keyring"),
    ],
)
def test_gossip_config_errors(gossip: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"origin_groups": [{"servers": ["127.0.0.1:9"]}], "gossip": gossip})
    assert info.value.key == key


async def test_sighup_reload_rotates_the_gossip_keyring(tmp_path: Path) -> None:
    key_file = tmp_path / "fleet-keys.toml"
    FleetKeys.generate(key_file, now=time.time())
    keyring = tmp_path / "keyring.json"
    old, new = os.urandom(32), os.urandom(32)
    keyring.write_text(json.dumps([base64.b64encode(old).decode()]))
    pop = Pop(_config(tmp_path, "pop-a", 1, key_file, keyring, []))
    await pop.start()
    try:
        assert pop.gossip is not None
        ring = pop.gossip.agent.keyring
        assert ring is not None and ring.keys == (old,)
        keyring.write_text("[not json")
        pop.reload()  # what SIGHUP does: a broken file changes nothing
        assert ring.keys == (old,)
        keyring.write_text(json.dumps([base64.b64encode(k).decode() for k in (new, old)]))
        pop.reload()
        assert ring.keys == (new, old) and ring.primary_key == new
    finally:
        await pop.stop(grace=0.1, leave=False)


async def test_sighup_reload_follows_the_fleet_key_file(tmp_path: Path) -> None:
    """`edgeproxy keys add|promote|remove` on the file, then SIGHUP: the running worker issues
    and accepts under the new keys (QUIC-LB configs, flow channel keyring) without a restart."""
    key_file = tmp_path / "fleet-keys.toml"
    FleetKeys.generate(key_file, now=time.time())
    keyring = tmp_path / "keyring.json"
    keyring.write_text(json.dumps([base64.b64encode(os.urandom(32)).decode()]))
    pop = Pop(_config(tmp_path, "pop-a", 1, key_file, keyring, []))
    await pop.start()
    try:
        assert pop.identity is not None and pop.gossip is not None and pop._fleet_keys is not None
        first = pop._fleet_keys.primary.key_id
        flow_ring = pop.gossip.replicator.keyring
        assert pop.reload_fleet_keys() is False  # unchanged file
        keys = FleetKeys.load(key_file)
        new = keys.add_key(now=time.time()).key_id
        keys.save(key_file)
        pop.reload()
        assert sorted(pop._fleet_keys.keys) == sorted([first, new]) and pop._fleet_keys.primary.key_id == first
        assert set(pop.identity.codec.configs) == {first % 7, new % 7} and len(flow_ring.keys) == 2
        keys.set_primary(new)
        keys.remove_key(first)
        keys.save(key_file)
        key_file.chmod(0o644)  # a key file others can read is refused: nothing changes
        assert pop.reload_fleet_keys() is False and pop._fleet_keys.primary.key_id == first
        key_file.chmod(0o600)
        assert pop.reload_fleet_keys() is True
        assert pop._fleet_keys.primary.key_id == new and list(pop._fleet_keys.keys) == [new]
        assert pop.identity.new_cid()[0] >> 5 == new % 7 and set(pop.identity.codec.configs) == {new % 7}
        assert flow_ring.keys == flow_keyring(pop._fleet_keys).keys and len(flow_ring.keys) == 1
    finally:
        await pop.stop(grace=0.1, leave=False)
