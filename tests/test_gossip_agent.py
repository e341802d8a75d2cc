"""The asyncio gossip agent (:mod:`gossip.agent`) and its CLI on loopback, with fast timings.

Several :class:`GossipAgent` run in one event loop on 127.0.0.1 (port 0, so runs never collide):
they join, detect a hard-stopped member, see a graceful leave as ``left``, ignore (and count)
packets sealed with a foreign key, retry a join until the seed appears, and the CLI prints one
JSON line per membership change.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gossip import wire
from gossip.agent import GossipAgent, event_record, parse_hostport
from gossip.keyring import Keyring
from gossip.swim import Config, MemberEvent, State

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def fast_config(**overrides: object) -> Config:
    """LAN semantics at 5x speed: detection within ~1-2 s instead of 5-10 s."""
    base: dict[str, object] = {
        "probe_interval": 0.2,
        "probe_timeout": 0.1,
        "gossip_interval": 0.05,
        "suspicion_mult": 4,
        "push_pull_interval": 5.0,
        "tcp_timeout": 2.0,
        "broadcast_timeout": 1.0,
        "leave_propagate_delay": 0.2,
        "reconnect_interval": 0.0,
    }
    base.update(overrides)
    return Config(**base)  # type: ignore[arg-type]


async def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``pred`` every 20 ms; return the elapsed time, fail after ``timeout``."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def state_of(agent: GossipAgent, name: str) -> State | None:
    m = agent.member(name)
    return m.state if m is not None else None


class Cluster:
    def __init__(self) -> None:
        self.agents: list[GossipAgent] = []
        self.events: dict[str, list[MemberEvent]] = {}

    async def add(self, name: str, keyring: Keyring | None = None, **cfg: object) -> GossipAgent:
        events: list[MemberEvent] = []
        self.events[name] = events
        agent = GossipAgent(
            name,
            ("127.0.0.1", 0),
            tags={"role": "pop", "name": name},
            keyring=keyring,
            config=fast_config(**cfg),
            on_event=events.append,
        )
        self.agents.append(agent)
        await agent.start()
        return agent

    def seen(self, observer: str, kind: str, node: str) -> bool:
        return any(e.kind == kind and e.member.name == node for e in self.events[observer])

    async def close(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents))


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


async def form(cluster: Cluster, n: int, keyring: Keyring | None = None) -> list[GossipAgent]:
    agents = [await cluster.add(f"n{i}", keyring) for i in range(n)]
    for a in agents[1:]:
        assert await a.join([agents[0].address]) == 1
    names = {a.name for a in agents}
    await wait_until(
        lambda: all({m.name for m in a.alive_members()} == names for a in agents),
        5.0,
        "full membership",
    )
    return agents


async def test_join_members_tags_and_events(cluster: Cluster) -> None:
    agents = await form(cluster, 4)
    for a in agents:
        assert a.running
        assert a.bound[1] == a.address[1] != 0
        for m in a.members():
            assert m.state == State.ALIVE
            assert m.tags == {"role": "pop", "name": m.name}
    # Every agent saw a join event for every other member.
    for a in agents:
        for b in agents:
            if a is not b:
                assert cluster.seen(a.name, "join", b.name)
    await asyncio.sleep(0.6)  # a few probe rounds
    c = agents[0].counters
    assert c["udp_in"] > 0 and c["udp_out"] > 0 and c["stream_in"] >= 3
    assert c.get("decrypt_failed", 0) == 0
    # The async iterator sees later events (a tag update here).
    it = agents[0].events()
    agents[1].update_tags({"role": "pop", "name": "n1", "v": "2"})
    ev = await asyncio.wait_for(anext(it), 5.0)
    assert (ev.kind, ev.member.name, ev.member.tags["v"]) == ("update", "n1", "2")
    assert agents[0].member("n1").tags["v"] == "2"  # type: ignore[union-attr]
    rec = event_record(ev, agents[0].wall_time(ev.time))
    assert rec["event"] == "update" and rec["status"] == "alive"
    assert abs(rec["time"] - time.time()) < 5
    await it.aclose()  # type: ignore[attr-defined]


async def test_hard_stop_is_detected_as_failed(cluster: Cluster) -> None:
    agents = await form(cluster, 4)
    victim = agents[3]
    await victim.stop()
    assert not victim.running
    elapsed = await wait_until(
        lambda: all(state_of(a, victim.name) == State.DEAD for a in agents[:3]),
        10.0,
        "failure detection",
    )
    print(f"hard stop detected by all 3 in {elapsed:.2f} s")
    for a in agents[:3]:
        assert cluster.seen(a.name, "failed", victim.name)
        assert not cluster.seen(a.name, "leave", victim.name)
    # Stop is idempotent; the iterator of a stopped agent ends at once.
    await victim.stop()
    assert [e async for e in victim.events()] == []


async def test_graceful_leave_shows_left(cluster: Cluster) -> None:
    agents = await form(cluster, 3)
    leaver = agents[2]
    it = agents[0].events()
    t0 = time.monotonic()
    assert await leaver.leave() is True
    print(f"leave completed in {time.monotonic() - t0:.2f} s")
    assert not leaver.running
    await wait_until(
        lambda: all(state_of(a, leaver.name) == State.LEFT for a in agents[:2]),
        5.0,
        "left",
    )
    ev = await asyncio.wait_for(anext(it), 1.0)
    assert (ev.kind, ev.member.name, ev.member.state) == ("leave", leaver.name, State.LEFT)
    for a in agents[:2]:
        assert not cluster.seen(a.name, "failed", leaver.name)
    await it.aclose()  # type: ignore[attr-defined]


async def test_wrong_key_is_counted_and_ignored(cluster: Cluster) -> None:
    ring = Keyring(KEY)
    a, _b = await form(cluster, 2, ring)
    intruder = await cluster.add("intruder", Keyring(OTHER_KEY))
    # A join over TCP under the wrong key fails on both sides.
    assert await intruder.join([a.address], timeout=3.0) == 0
    assert a.counters.get("decrypt_failed", 0) >= 1
    # UDP gossip under the wrong key: an alive claiming a new member, and a dead about b.
    bogus = [
        wire.encode(wire.Alive(1, "ghost", wire.ip_to_addr("127.0.0.1"), 9, b"", wire.DEFAULT_VSN)),
        wire.encode(wire.Dead(99, "n1", "intruder")),
    ]

    def dropped() -> int:
        c = a.counters
        return sum(c.get(k, 0) for k in ("decrypt_failed", "bad_encryption_version"))

    before = dropped()
    wrong_key_before = a.counters.get("decrypt_failed", 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for msg in bogus:
            for _ in range(5):
                pkt = wire.encode_packet(msg, keyring=Keyring(OTHER_KEY))
                sock.sendto(pkt, a.address)
        # And the same in plaintext, which an encrypting member must refuse as well.
        for msg in bogus:
            sock.sendto(wire.encode_packet(msg), a.address)
    finally:
        sock.close()
    await wait_until(lambda: dropped() >= before + 12, 3.0, "drops")
    assert a.counters["decrypt_failed"] >= wrong_key_before + 10
    await asyncio.sleep(0.5)
    assert {m.name for m in a.members()} == {"n0", "n1"}
    assert state_of(a, "n1") == State.ALIVE
    assert {m.name for m in intruder.members()} == {"intruder"}
    assert not any(e.member.name in ("ghost", "intruder") for e in cluster.events["n0"])


async def test_retry_join_until_the_seed_appears(cluster: Cluster) -> None:
    # Reserve a port for the seed, start the joiner first.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    joiner = await cluster.add("joiner")
    task = asyncio.create_task(joiner.retry_join([f"127.0.0.1:{port}"], interval=0.3))
    try:
        await asyncio.sleep(0.8)
        assert not task.done()
        seed = GossipAgent("seed", ("127.0.0.1", port), config=fast_config())
        cluster.agents.append(seed)
        await seed.start()
        assert await asyncio.wait_for(task, 5.0) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert joiner.counters["join_retry"] >= 1
    await wait_until(lambda: state_of(seed, "joiner") == State.ALIVE, 3.0, "seed sees joiner")


async def test_max_inbound_streams_and_garbage(cluster: Cluster) -> None:
    a = await cluster.add("a")
    a.max_inbound_streams = 2
    conns = []
    try:
        for _ in range(3):
            _, w = await asyncio.open_connection(*a.address)
            conns.append(w)
        await wait_until(lambda: a.counters.get("stream_in_rejected", 0) == 1, 3.0, "reject")
        for w in conns:
            w.close()
        await wait_until(lambda: a.counters.get("stream_in_eof", 0) == 2, 3.0, "slots freed")
        # A garbage stream gets an error reply (or a close), never a crash.
        r, w = await asyncio.open_connection(*a.address)
        conns.append(w)
        w.write(b"\x06\xc1garbage")
        await w.drain()
        reply = await asyncio.wait_for(r.read(), 3.0)
        msg_type, body = wire.decode_stream(reply)
        assert msg_type == wire.MessageType.ERR and isinstance(body, wire.ErrResp)
    finally:
        for w in conns:
            w.close()
    assert a.running
    assert a.counters["stream_in"] >= 3


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_hostport("[::1]:7000") == ("::1", 7000)
    assert parse_hostport("example.org") == ("example.org", 7946)


async def spawn_cli(seed: GossipAgent, keyfile: Path, *extra: str) -> asyncio.subprocess.Process:
    """``python -m gossip agent --name cli`` on a free port, joining ``seed``, keyed by ``keyfile``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [
        sys.executable, "-m", "gossip", "agent", "--name", "cli", "--bind", f"127.0.0.1:{port}",
        "--join", "{}:{}".format(*seed.address), "--keyring", str(keyfile), *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(ROOT)
    )


async def test_cli_prints_json_lines(cluster: Cluster, tmp_path: Path) -> None:
    keyfile = tmp_path / "keyring.json"
    keyfile.write_text(json.dumps(Keyring(KEY).to_base64()))
    seed = await cluster.add("seed", Keyring(KEY))
    proc = await spawn_cli(seed, keyfile, "--tag", "role=cli", "--tag", "zone=a=b")
    lines: list[dict[str, object]] = []

    async def read_until(pred: Callable[[dict[str, object]], bool], timeout: float) -> None:
        assert proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                assert raw, "CLI exited early"
                lines.append(json.loads(raw))
                if pred(lines[-1]):
                    return

    try:
        await read_until(lambda r: r["node"] == "seed" and r["event"] == "join", 15.0)
        assert lines[0]["node"] == "cli" and lines[0]["event"] == "join"
        assert lines[0]["tags"] == {"role": "cli", "zone": "a=b"}
        seen = lines[-1]
        assert set(seen) >= {"event", "node", "address", "status", "time"}
        assert seen["address"] == "{}:{}".format(*seed.address)
        assert seen["status"] == "alive"
        await wait_until(lambda: state_of(seed, "cli") == State.ALIVE, 5.0, "seed sees cli")
        assert seed.member("cli").tags == {"role": "cli", "zone": "a=b"}  # type: ignore[union-attr]
        # A second member that leaves gracefully: one "leave" line with status "left".
        other = await cluster.add("other", Keyring(KEY))
        assert await other.join([seed.address]) == 1
        await read_until(lambda r: r["node"] == "other" and r["event"] == "join", 10.0)
        await other.leave()
        await read_until(lambda r: r["node"] == "other" and r["event"] == "leave", 10.0)
        assert lines[-1]["status"] == "left"
        # SIGTERM: graceful leave, exit 0, the seed sees "left".
        proc.send_signal(signal.SIGTERM)
        await read_until(lambda r: r["node"] == "cli" and r["event"] == "leave", 15.0)
        assert lines[-1]["status"] == "left"
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        await wait_until(lambda: state_of(seed, "cli") == State.LEFT, 5.0, "seed sees cli left")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_sighup_reloads_the_keyring_file(cluster: Cluster, tmp_path: Path) -> None:
    """Rotation without a restart: the CLI member cannot talk to a seed under another key until
    its keyring file holds that key and SIGHUP reloads it; a broken file changes nothing."""
    keyfile = tmp_path / "keyring.json"
    keyfile.write_text(json.dumps(Keyring(KEY).to_base64()))
    seed = await cluster.add("seed", Keyring(OTHER_KEY))
    proc = await spawn_cli(seed, keyfile, "--retry-interval", "200ms", "--profile", "local")
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(15):
            first = json.loads(await proc.stdout.readline())
        assert first["node"] == "cli" and first["event"] == "join"
        await asyncio.sleep(1.0)  # several join attempts under the wrong key
        assert seed.member("cli") is None and seed.counters.get("decrypt_failed", 0) > 0
        keyfile.write_text("[not json")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert seed.member("cli") is None
        # The new key second (accepted, not used), then first (used): the join goes through.
        keyfile.write_text(json.dumps(Keyring(KEY, [OTHER_KEY]).to_base64()))
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        keyfile.write_text(json.dumps(Keyring(OTHER_KEY, [KEY]).to_base64()))
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:
                line = json.loads(await proc.stdout.readline())
                if line["node"] == "seed" and line["event"] == "join":
                    break
        await wait_until(lambda: state_of(seed, "cli") == State.ALIVE, 5.0, "seed sees cli")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        err = (await proc.stderr.read()).decode()
        assert "not reloaded, keeping 1 key(s)" in err and "reloaded: 2 key(s)" in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_flow_channel_follows_membership(cluster: Cluster) -> None:
    """FlowChannel (the flow table's UDP shell) on top of agents: peers come from membership,
    deltas go out at once, a member that fails is dropped from the peers."""
    from gossip.flowchannel import FLOW_PORT_TAG, FlowChannel
    from gossip.flowtable import FlowReplicator, FlowTable

    ring = Keyring(KEY)
    channels: list[FlowChannel] = []
    try:
        agents = []
        for i in range(3):
            name = f"f{i}"
            table = FlowTable(name)
            channel = FlowChannel(FlowReplicator(table, ring), ("127.0.0.1", 0))
            await channel.start()
            channels.append(channel)
            cluster.events[name] = []
            agent = GossipAgent(
                name,
                ("127.0.0.1", 0),
                tags={FLOW_PORT_TAG: str(channel.address[1]), "region": "eu"},
                keyring=ring,
                config=fast_config(),
            )
            cluster.agents.append(agent)
            await agent.start()
            channel.attach(agent)
            agents.append(agent)
        for a in agents[1:]:
            assert await a.join([agents[0].address]) == 1
        await wait_until(
            lambda: all(len(c.replicator.peers_in_scope()) == 2 for c in channels), 5.0, "peers"
        )
        now = time.monotonic()
        keys = [b"flow-%d" % i for i in range(500)]
        t0 = time.monotonic()
        for k in keys:
            channels[0].table.publish(k, now, 30.0)
        await wait_until(
            lambda: all(c.table.lookup(keys[-1], time.monotonic()) == "f0" for c in channels[1:]),
            2.0,
            "replication",
        )
        print(f"500 flows visible at 2 peers after {1000 * (time.monotonic() - t0):.1f} ms")
        for c in channels[1:]:
            assert all(c.table.lookup(k, time.monotonic()) == "f0" for k in keys)
        assert channels[0].backlog == 0
        await channels[0].drained()
        # A datagram from an unknown address is dropped before decryption.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(b"\x01" * 64, channels[1].address)
        finally:
            sock.close()
        await wait_until(
            lambda: channels[1].counters["channel.unknown_addr"] == 1, 2.0, "unknown addr"
        )
        # A failed member leaves the peer set.
        await agents[2].stop()
        await channels[2].stop()
        await wait_until(
            lambda: channels[0].replicator.peers_in_scope() == ["f1"], 10.0, "f2 dropped"
        )
        channels[0].table.delete(keys[0], time.monotonic())
        await wait_until(
            lambda: channels[1].table.lookup(keys[0], time.monotonic()) is None, 2.0, "delete"
        )
    finally:
        for c in channels:
            await c.stop()
