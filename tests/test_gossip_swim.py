"""Unit tests of the sans-IO SWIM member (:mod:`gossip.swim`).

Members exchange packets directly through :class:`Net` (synchronous delivery, a fake clock,
per-link blocking), so each memberlist mechanism can be driven step by step.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import wire
from gossip.keyring import Keyring
from gossip.swim import (
    Config,
    MemberEvent,
    OpenStream,
    SendPacket,
    State,
    Swim,
    TransmitLimitedQueue,
    push_pull_scale,
    remaining_suspicion_time,
    retransmit_limit,
    suspicion_timeout,
)
from gossip.wire import (
    DEFAULT_VSN,
    AckResp,
    Alive,
    Dead,
    IndirectPing,
    MessageType,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    SerfLeave,
    SerfPushPull,
    SerfUserEvent,
    Suspect,
    UserMsg,
)

PORT = 7946
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def addr_of(name: str) -> tuple[str, int]:
    return (f"10.0.0.{ord(name[-1]) - ord('a') + 1}", PORT)


def make(name: str, *, seed: int = 0, keyring: Keyring | None = None, **cfg: Any) -> Swim:
    ip, port = addr_of(name)
    config = Config(**cfg)
    return Swim(
        name,
        ip,
        port,
        {"role": name},
        config,
        random.Random(seed or sum(map(ord, name))),
        keyring,
        now=0.0,
    )


class Net:
    """Synchronous packet/stream exchange between members, with a fake clock."""

    def __init__(self, nodes: Iterable[Swim]) -> None:
        self.nodes = {(n.addr, n.port): n for n in nodes}
        self.by_name = {n.name: n for n in self.nodes.values()}
        self.blocked: set[tuple[str, str]] = set()  # UDP (src, dst)
        self.tcp_blocked: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self.events: list[tuple[str, MemberEvent]] = []
        self.sent: list[tuple[str, str, bytes]] = []  # UDP (src, dst, data) delivered or not
        self.streams: list[tuple[str, OpenStream]] = []
        self.now = 0.0

    def add(self, node: Swim) -> None:
        self.nodes[(node.addr, node.port)] = node
        self.by_name[node.name] = node

    def block(self, a: str, b: str, *, both: bool = True) -> None:
        self.blocked.add((a, b))
        if both:
            self.blocked.add((b, a))

    def deliver(self) -> None:
        for _ in range(10_000):
            progress = False
            for node in list(self.nodes.values()):
                for out in node.poll_outputs():
                    progress = True
                    self._route(node, out)
            if not progress:
                return
        raise AssertionError("packets kept flowing")

    def _route(self, src: Swim, out: Any) -> None:
        if isinstance(out, MemberEvent):
            self.events.append((src.name, out))
            return
        dst = self.nodes.get(out.addr)
        if isinstance(out, SendPacket):
            self.sent.append((src.name, dst.name if dst else "?", out.data))
            if dst is None or dst.name in self.down or (src.name, dst.name) in self.blocked:
                return
            dst.receive_packet(out.data, (src.addr, src.port), self.now)
            return
        assert isinstance(out, OpenStream)
        self.streams.append((src.name, out))
        if dst is None or dst.name in self.down or (src.name, dst.name) in self.tcp_blocked:
            src.stream_failed(out.stream_id, self.now)
            return
        reply = dst.receive_stream(out.data, (src.addr, src.port), self.now)
        if reply is None:
            src.stream_failed(out.stream_id, self.now)
        else:
            src.stream_response(out.stream_id, reply, self.now)

    def run_until(self, t_end: float) -> None:
        self.deliver()
        for _ in range(1_000_000):
            live = [n for n in self.nodes.values() if n.name not in self.down]
            t = min(n.next_deadline() for n in live)
            if t > t_end:
                break
            self.now = max(self.now, t)
            for n in live:
                if n.next_deadline() <= self.now:
                    n.tick(self.now)
            self.deliver()
        self.now = t_end

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def kinds(self, observer: str, subject: str) -> list[str]:
        return [e.kind for o, e in self.events if o == observer and e.member.name == subject]


def manual(*nodes: Swim) -> None:
    """Stop the automatic probe schedule so a test can drive probes one at a time."""
    for n in nodes:
        n._next_probe = math.inf
        n._probe = None


def cluster(names: str, **cfg: Any) -> tuple[Net, list[Swim]]:
    nodes = [make(n, **cfg) for n in names]
    net = Net(nodes)
    for n in nodes[1:]:
        n.join([addr_of(names[0])], net.now)
        net.deliver()
    net.run_for(3.0)  # let the alive broadcasts spread
    for n in nodes:
        assert {m.name for m in n.members() if m.state == State.ALIVE} == set(names)
    return net, nodes


def messages(data: bytes, keyring: Keyring | None = None) -> list[tuple[MessageType, Any]]:
    return wire.decode_packet(data, keyring).messages


# ---------------------------------------------------------------------------------------------
# Formulas


def test_memberlist_formulas() -> None:
    assert suspicion_timeout(4, 2, 1.0) == 4.0
    assert suspicion_timeout(4, 10, 1.0) == 4.0
    assert suspicion_timeout(4, 100, 1.0) == 8.0
    assert suspicion_timeout(4, 1000, 1.0) == 12.0
    assert suspicion_timeout(6, 100, 5.0) == 60.0  # WAN
    assert [retransmit_limit(4, n) for n in (1, 2, 9, 10, 99, 100, 1000)] == [
        4,
        4,
        4,
        8,
        8,
        12,
        16,
    ]
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 100) == 90.0
    assert push_pull_scale(30.0, 1000) == 180.0
    # Lifeguard: 0, 1, 2 of k=2 confirmations between min 4 s and max 24 s.
    assert remaining_suspicion_time(0, 2, 0.0, 4.0, 24.0) == 24.0
    assert remaining_suspicion_time(1, 2, 0.0, 4.0, 24.0) == pytest.approx(
        math.floor(1000 * (24 - math.log(2) / math.log(3) * 20)) / 1000
    )
    assert remaining_suspicion_time(2, 2, 0.0, 4.0, 24.0) == 4.0
    assert remaining_suspicion_time(2, 2, 5.0, 4.0, 24.0) == -1.0


def test_config_profiles() -> None:
    lan = Config.lan()
    assert (lan.probe_interval, lan.probe_timeout, lan.indirect_checks) == (1.0, 0.5, 3)
    assert (lan.suspicion_mult, lan.suspicion_max_timeout_mult, lan.retransmit_mult) == (4, 6, 4)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.push_pull_interval) == (0.2, 3, 30.0)
    assert (lan.awareness_max_multiplier, lan.udp_buffer_size, lan.tcp_timeout) == (8, 1400, 10.0)
    wan = Config.wan()
    assert (wan.probe_interval, wan.probe_timeout, wan.suspicion_mult) == (5.0, 3.0, 6)
    local = Config.local(gossip_nodes=5)
    assert (local.probe_timeout, local.indirect_checks, local.gossip_nodes) == (0.2, 1, 5)


# ---------------------------------------------------------------------------------------------
# Broadcast queue


def test_queue_retransmit_limit_and_order() -> None:
    n = [2]
    q = TransmitLimitedQueue(4, lambda: n[0])
    finished: list[str] = []
    q.queue("a", b"x" * 10, lambda: finished.append("a"))
    q.queue("b", b"y" * 30, lambda: finished.append("b"))
    # Same tier: largest first.
    assert q.get_broadcasts(2, 1000) == [b"y" * 30, b"x" * 10]
    q.queue("c", b"z" * 5)
    # Fewest transmits first: the new one leads.
    assert q.get_broadcasts(2, 1000)[0] == b"z" * 5
    # Fewest transmits first, then the largest that fits (the per-message overhead counts).
    assert q.get_broadcasts(2, 13) == [b"z" * 5]
    assert q.get_broadcasts(2, 12) == [b"x" * 10]
    sends = {"a": 3, "b": 2, "c": 2}
    while len(q):
        for m in q.get_broadcasts(2, 1000):
            sends[{10: "a", 30: "b", 5: "c"}[len(m)]] += 1
    assert sends == {"a": 4, "b": 4, "c": 4}  # retransmit_mult x ceil(log10(2 + 1))
    assert sorted(finished) == ["a", "b"]
    # More members, more retransmits.
    n[0] = 10
    q.queue("d", b"d")
    count = 0
    while len(q):
        count += len(q.get_broadcasts(2, 1000))
    assert count == 8


def test_queue_invalidates_by_name_and_prunes() -> None:
    q = TransmitLimitedQueue(4, lambda: 3, max_depth=3)
    dropped: list[int] = []
    q.queue("node1", b"suspect", lambda: dropped.append(1))
    q.queue("node1", b"alive!!")
    assert dropped == [1]
    assert q.get_broadcasts(2, 100) == [b"alive!!"]
    for i in range(5):
        q.queue(f"n{i}", bytes([i]) * 3)
    assert len(q) == 3


# ---------------------------------------------------------------------------------------------
# Join, ping/ack


def test_join_via_push_pull() -> None:
    a, b = make("a"), make("b")
    net = Net([a, b])
    (sid,) = b.join([addr_of("a")], 0.0)
    out = b.poll_outputs()
    assert len(out) == 1 and isinstance(out[0], OpenStream)
    assert out[0].purpose == "join" and out[0].stream_id == sid and out[0].deadline == 10.0
    msg_type, body = wire.decode_stream(out[0].data)
    assert msg_type == MessageType.PUSH_PULL and isinstance(body, PushPull) and body.join
    assert [n.name for n in body.nodes] == ["b"]
    # Serf-compatible user state (type 2 + messagePushPull).
    assert wire.decode_serf_push_pull(body.user_state).ltime == 0
    reply = a.receive_stream(out[0].data, addr_of("b"), 0.0)
    assert reply is not None
    _, rbody = wire.decode_stream(reply)
    assert isinstance(rbody, PushPull) and rbody.join  # the join flag is echoed
    b.stream_response(sid, reply, 0.0)
    net.deliver()
    assert {m.name for m in a.alive_members()} == {"a", "b"}
    assert {m.name for m in b.alive_members()} == {"a", "b"}
    assert net.kinds("a", "b") == ["join"] and net.kinds("b", "a") == ["join"]
    assert b.member("a").tags == {"role": "a"}  # type: ignore[union-attr]
    assert b.member("b") is not None and b.member("b").incarnation == 1  # type: ignore[union-attr]


def test_join_failure_counted() -> None:
    a = make("a")
    net = Net([a])
    a.join([("10.9.9.9", PORT)], 0.0)
    net.deliver()
    assert a.counters["join_failed"] == 1
    assert [m.name for m in a.members()] == ["a"]


def test_ping_ack_and_piggyback() -> None:
    net, (a, b) = cluster("ab")
    manual(a, b)
    net.sent.clear()
    b_node = a._nodes["b"]
    a._probe_node(b_node, net.now)
    probe = a._probe
    assert probe is not None
    net.deliver()
    assert a._probe is None  # acked
    (ping_pkt, ack_pkt) = [d for _, _, d in net.sent]
    (_, ping), *_ = messages(ping_pkt)
    assert isinstance(ping, Ping) and ping.node == "b" and ping.seq_no == probe.seq
    assert ping.source_addr == wire.ip_to_addr("10.0.0.1") and ping.source_port == PORT
    assert ping.source_node == "a"
    (_, ack), *_ = messages(ack_pkt)
    assert isinstance(ack, AckResp) and ack.seq_no == probe.seq and ack.payload is None
    # Peers advertise PMax 5, so our packets carry a CRC.
    assert wire.decode_packet(ack_pkt).crc and wire.decode_packet(ping_pkt).crc
    # A broadcast rides on the next ack.
    b.update_meta({"role": "b2"}, net.now)
    net.sent.clear()
    a._probe_node(b_node, net.now)
    net.deliver()
    assert any(isinstance(m, Alive) for _, m in messages(net.sent[1][2]))
    assert a.member("b").tags == {"role": "b2"}  # type: ignore[union-attr]
    assert net.kinds("a", "b")[-1] == "update"


def test_ack_goes_to_source_addr_and_wrong_node_ignored() -> None:
    b = make("b")
    ping = Ping(7, "b", wire.ip_to_addr("10.0.0.9"), 9999, "x")
    b.receive_packet(wire.encode(ping), ("10.0.0.5", 1234), 0.0)
    (out,) = b.poll_outputs()
    assert isinstance(out, SendPacket) and out.addr == ("10.0.0.9", 9999)
    b.receive_packet(wire.encode(Ping(8, "b")), ("10.0.0.5", 1234), 0.0)
    (out,) = b.poll_outputs()
    assert isinstance(out, SendPacket) and out.addr == ("10.0.0.5", 1234)
    # Unknown destinations get no CRC (we do not know their PMax).
    assert not wire.decode_packet(out.data).crc
    b.receive_packet(wire.encode(Ping(9, "someone-else")), ("10.0.0.5", 1234), 0.0)
    assert b.poll_outputs() == []
    assert b.counters["ping_wrong_node"] == 1


# ---------------------------------------------------------------------------------------------
# Indirect probes, nacks, TCP fallback, Lifeguard


def test_indirect_ping_relays_ack() -> None:
    net, (a, b, c) = cluster("abc", disable_tcp_pings=True)
    manual(a, b, c)
    net.block("a", "c")
    a._probe_node(a._nodes["c"], net.now)
    net.deliver()
    probe = a._probe
    assert probe is not None and not probe.indirect
    net.run_until(net.now + 0.5)
    # After the probe timeout: an indirect ping (asking for a nack) via b, relayed to c.
    ind = [m for s, d, data in net.sent if s == "a" and d == "b" for _, m in messages(data)]
    ind = [m for m in ind if isinstance(m, IndirectPing)]
    assert ind and ind[0].nack and ind[0].node == "c" and ind[0].seq_no == probe.seq
    assert ind[0].target == wire.ip_to_addr("10.0.0.3") and ind[0].port == PORT
    assert a._probe is None  # the relayed ack completed the probe
    assert a.health_score == 0
    assert a.member("c").state == State.ALIVE  # type: ignore[union-attr]


def test_nack_and_lifeguard_score() -> None:
    net, (a, b, c) = cluster("abc", disable_tcp_pings=True)
    manual(a, b, c)
    net.down.add("c")

    def reprobe() -> None:
        a._nodes["c"].state = State.ALIVE
        a._suspicions.clear()
        a._probe_node(a._nodes["c"], net.now)

    def nacks_to_a() -> int:
        return sum(
            1
            for s, d, data in net.sent
            if s == "b" and d == "a"
            for _, m in messages(data)
            if isinstance(m, NackResp)
        )

    # b relays, c is gone: b nacks probe_timeout after the request. With LAN timing
    # (interval = 2 x timeout) that is exactly the prober's deadline, so at score 0 the nack
    # is too late, as in memberlist: the missing nack costs one point.
    a._probe_node(a._nodes["c"], net.now)
    p = a._probe
    assert p is not None and (p.deadline - p.start, p.timeout_at - p.start) == (1.0, 0.5)
    net.run_for(1.0)
    assert nacks_to_a() == 1 and a.health_score == 1
    assert a.member("c").state == State.SUSPECT  # type: ignore[union-attr]
    # At score 1 the probe lasts 2 s (the timeout is not scaled): the nack arrives in time and
    # a is not blamed for c's failure.
    reprobe()
    p = a._probe
    assert p is not None and (p.deadline - p.start, p.timeout_at - p.start) == (2.0, 0.5)
    net.run_for(2.0)
    assert nacks_to_a() == 2 and p.nacks == 1 and p.expected_nacks == 1
    assert a.health_score == 1
    # Without the nack (b cannot reach a) the missing nack raises the score.
    net.block("b", "a", both=False)
    reprobe()
    net.run_for(2.0)
    assert a.health_score == 2
    # Successful probes lower it again.
    net.blocked.clear()
    a._probe_node(a._nodes["b"], net.now)
    net.deliver()
    assert a.health_score == 1
    # The score is capped at awareness_max_multiplier - 1.
    a._apply_health(100)
    assert a.health_score == 7
    a._probe_node(a._nodes["b"], net.now)
    assert a._probe is not None and a._probe.deadline - a._probe.start == 8.0


def test_lifeguard_no_relays_penalises_each_failed_probe() -> None:
    net, (a, b) = cluster("ab")
    manual(a, b)
    net.down.add("b")
    a._probe_node(a._nodes["b"], net.now)
    net.run_for(1.0)
    assert a.health_score == 1  # no nack could be expected: +1
    assert a.counters["ping_failed"] == 1  # the TCP fallback ping was tried too


def test_refutation_raises_score() -> None:
    a = make("a")
    a.receive_packet(wire.encode(Suspect(1, "a", "x")), ("10.0.0.9", PORT), 1.0)
    assert a.incarnation == 2 and a.health_score == 1
    a.receive_packet(wire.encode(Dead(7, "a", "x")), ("10.0.0.9", PORT), 1.0)
    assert a.incarnation == 8 and a.health_score == 2
    assert a.member("a").state == State.ALIVE  # type: ignore[union-attr]


def test_tcp_fallback_ping() -> None:
    net, (a, b) = cluster("ab")
    manual(a, b)
    net.block("a", "b")  # UDP only
    net.streams.clear()
    a._probe_node(a._nodes["b"], net.now)
    net.run_for(1.0)
    pings = [o for s, o in net.streams if o.purpose == "ping"]
    assert len(pings) == 1
    _, body = wire.decode_stream(pings[0].data)
    assert isinstance(body, Ping) and body.node == "b"
    assert a.counters["tcp_fallback_ok"] == 1
    assert a.member("b").state == State.ALIVE  # type: ignore[union-attr]
    assert a.health_score == 0
    # A TCP ping for someone else gets no ack.
    assert (
        b.receive_stream(wire.encode_stream(wire.encode(Ping(1, "zz"))), ("1.1.1.1", 1), 0) is None
    )


# ---------------------------------------------------------------------------------------------
# Suspicion, refutation, dead and left


def test_suspicion_refuted_by_target() -> None:
    net, (a, b, c) = cluster("abc", disable_tcp_pings=True)
    manual(a, b, c)
    net.block("a", "b")
    net.block("c", "b")  # b is unreachable for the probe
    a._probe_node(a._nodes["b"], net.now)
    net.run_for(1.0)
    assert a.member("b").state == State.SUSPECT  # type: ignore[union-attr]
    assert net.kinds("a", "b")[-1] == "suspect"
    net.blocked.clear()
    net.run_for(2.0)  # the suspect reaches b by gossip; b refutes with a higher incarnation
    assert b.incarnation >= 2
    for n in (a, c):
        m = n.member("b")
        assert m is not None and m.state == State.ALIVE and m.incarnation == b.incarnation
    assert net.kinds("a", "b")[-1] == "alive"
    assert b.health_score == 1


def test_buddy_system_sends_suspect_with_ping() -> None:
    net, (a, b) = cluster("ab")
    manual(a, b)
    a._suspect_node(Suspect(1, "b", "x"), net.now)
    net.deliver()
    net.sent.clear()
    a._probe_node(a._nodes["b"], net.now)
    net.deliver()
    kinds = [type(m).__name__ for m in [m for _, m in messages(net.sent[0][2])]]
    assert kinds == ["Ping", "Suspect"]
    assert b.incarnation == 2  # refuted at once


def test_suspicion_timeout_shrinks_with_confirmations() -> None:
    nodes = [make(n) for n in "abcdefghij"]  # n = 10: min 4 s, max 24 s, k = 2
    net = Net(nodes)
    for n in nodes[1:]:
        n.join([addr_of("a")], 0.0)
        net.deliver()
    a = nodes[0]
    assert a.num_nodes() == 10
    now = 100.0
    a.receive_packet(wire.encode(Suspect(1, "j", "b")), addr_of("b"), now)
    s = a._suspicions["j"]
    assert (s.k, s.lo, s.hi, s.deadline) == (2, 4.0, 24.0, now + 24.0)
    a.receive_packet(wire.encode(Suspect(1, "j", "b")), addr_of("b"), now + 1)  # not new
    assert s.n == 0
    a.poll_outputs()
    a.receive_packet(wire.encode(Suspect(1, "j", "c")), addr_of("c"), now + 1)
    assert s.n == 1
    assert s.deadline == pytest.approx(now + remaining_suspicion_time(1, 2, 0, 4.0, 24.0))
    # A new confirmation is re-gossiped.
    assert a.broadcasts.contains("j")
    a.receive_packet(wire.encode(Suspect(1, "j", "d")), addr_of("d"), now + 2)
    assert s.n == 2 and s.deadline == now + 4.0
    a.receive_packet(wire.encode(Suspect(1, "j", "e")), addr_of("e"), now + 2)
    assert s.n == 2  # capped at k
    a.tick(now + 3.9)
    assert a.member("j").state == State.SUSPECT  # type: ignore[union-attr]
    a.tick(now + 4.0)
    assert a.member("j").state == State.DEAD  # type: ignore[union-attr]
    assert a.counters["suspicion_timeouts"] == 1
    # The dead is gossiped with From = a.
    dead = wire.decode_message(a.broadcasts._items["j"].msg)[1]
    assert isinstance(dead, Dead) and dead.from_node == "a" and dead.node == "j"


def test_confirmation_past_deadline_fires_at_once() -> None:
    nodes = [make(n) for n in "abcdefghij"]
    net = Net(nodes)
    for n in nodes[1:]:
        n.join([addr_of("a")], 0.0)
        net.deliver()
    a = nodes[0]
    a.receive_packet(wire.encode(Suspect(1, "j", "b")), addr_of("b"), 10.0)
    a.receive_packet(wire.encode(Suspect(1, "j", "c")), addr_of("c"), 11.0)
    a.receive_packet(wire.encode(Suspect(1, "j", "d")), addr_of("d"), 15.0)  # 5 s > min 4 s
    assert a.member("j").state == State.DEAD  # type: ignore[union-attr]


def test_small_cluster_uses_min_timeout() -> None:
    _, (a, _, _) = cluster("abc")  # n - 2 < k: no confirmations expected
    a.receive_packet(wire.encode(Suspect(1, "c", "b")), addr_of("b"), 50.0)
    s = a._suspicions["c"]
    assert s.k == 0 and s.deadline == 54.0


def test_incarnation_rules() -> None:
    a = make("a")
    alive = Alive(3, "x", wire.ip_to_addr("10.0.0.24"), PORT, b"", DEFAULT_VSN)
    a.receive_packet(wire.encode(alive), ("10.0.0.24", PORT), 0.0)
    assert a.member("x").incarnation == 3  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Suspect(2, "x", "y")), ("10.0.0.9", PORT), 0.0)  # stale
    assert a.member("x").state == State.ALIVE  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Suspect(3, "x", "y")), ("10.0.0.9", PORT), 0.0)
    assert a.member("x").state == State.SUSPECT  # type: ignore[union-attr]
    a.receive_packet(
        wire.encode(Alive(3, "x", alive.addr, PORT, b"", DEFAULT_VSN)), ("10.0.0.9", PORT), 0.0
    )
    assert a.member("x").state == State.SUSPECT  # type: ignore[union-attr]  # needs higher
    a.receive_packet(
        wire.encode(Alive(4, "x", alive.addr, PORT, b"", DEFAULT_VSN)), ("10.0.0.9", PORT), 0.0
    )
    assert a.member("x").state == State.ALIVE  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Dead(3, "x", "y")), ("10.0.0.9", PORT), 0.0)  # stale
    assert a.member("x").state == State.ALIVE  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Dead(4, "x", "y")), ("10.0.0.9", PORT), 0.0)
    assert a.member("x").state == State.DEAD  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Suspect(9, "x", "y")), ("10.0.0.9", PORT), 0.0)  # not alive
    assert a.member("x").state == State.DEAD  # type: ignore[union-attr]
    events = [o.kind for o in a.poll_outputs() if isinstance(o, MemberEvent)]
    assert events == ["join", "suspect", "alive", "failed"]
    # Unknown nodes: suspect and dead are ignored.
    a.receive_packet(wire.encode(Dead(1, "nobody", "y")), ("10.0.0.9", PORT), 0.0)
    assert a.member("nobody") is None
    # Alive with a bad version range is ignored.
    bad = Alive(1, "v", wire.ip_to_addr("10.0.0.25"), PORT, b"", bytes([3, 2, 2, 2, 5, 5]))
    a.receive_packet(wire.encode(bad), ("10.0.0.9", PORT), 0.0)
    assert a.member("v") is None and a.counters["bad_vsn"] == 1


def test_self_alive_with_other_meta_is_refuted() -> None:
    a = make("a")
    me = a.member("a")
    assert me is not None
    same = Alive(1, "a", wire.ip_to_addr(me.addr), PORT, me.meta, DEFAULT_VSN)
    a.receive_packet(wire.encode(same), ("10.0.0.9", PORT), 0.0)
    assert a.incarnation == 1
    other = Alive(1, "a", wire.ip_to_addr(me.addr), PORT, b"\xff\x80", DEFAULT_VSN)
    a.receive_packet(wire.encode(other), ("10.0.0.9", PORT), 0.0)
    assert a.incarnation == 2
    a.receive_packet(wire.encode(replace_inc(other, 5)), ("10.0.0.9", PORT), 0.0)
    assert a.incarnation == 6
    assert a.member("a").meta == me.meta  # type: ignore[union-attr]


def replace_inc(a: Alive, inc: int) -> Alive:
    return Alive(inc, a.node, a.addr, a.port, a.meta, a.vsn)


def test_address_conflict_and_reclaim() -> None:
    a = make("a", dead_node_reclaim_time=10.0)
    x1 = Alive(1, "x", wire.ip_to_addr("10.0.0.24"), PORT, b"", DEFAULT_VSN)
    a.receive_packet(wire.encode(x1), ("10.0.0.24", PORT), 0.0)
    x2 = Alive(2, "x", wire.ip_to_addr("10.0.0.99"), PORT, b"", DEFAULT_VSN)
    a.receive_packet(wire.encode(x2), ("10.0.0.99", PORT), 1.0)
    assert a.member("x").addr == "10.0.0.24" and a.counters["addr_conflict"] == 1  # type: ignore[union-attr]
    a.receive_packet(wire.encode(Dead(1, "x", "a")), ("10.0.0.9", PORT), 2.0)
    a.receive_packet(wire.encode(x2), ("10.0.0.99", PORT), 5.0)  # dead, but too recently
    assert a.counters["addr_conflict"] == 2
    a.receive_packet(wire.encode(x2), ("10.0.0.99", PORT), 13.0)
    m = a.member("x")
    assert m is not None and m.addr == "10.0.0.99" and m.state == State.ALIVE
    # A left member's name is free at once.
    a.receive_packet(wire.encode(Dead(2, "x", "x")), ("10.0.0.9", PORT), 14.0)
    assert a.member("x").state == State.LEFT  # type: ignore[union-attr]
    x3 = Alive(1, "x", wire.ip_to_addr("10.0.0.77"), PORT, b"", DEFAULT_VSN)
    a.receive_packet(wire.encode(x3), ("10.0.0.77", PORT), 14.5)
    assert a.member("x").addr == "10.0.0.77"  # type: ignore[union-attr]


def test_dead_propagates_and_is_reaped() -> None:
    net, (a, b, _) = cluster("abc", disable_tcp_pings=True)
    net.down.add("c")
    t_kill = net.now
    net.run_for(15.0)
    for n in (a, b):
        assert n.member("c").state == State.DEAD  # type: ignore[union-attr]
        assert "failed" in net.kinds(n.name, "c")
    # Gossip to the dead for 30 s, then reaped when the probe list wraps.
    net.run_until(t_kill + 60.0)
    for n in (a, b):
        assert n.member("c") is None and n.num_nodes() == 2
        assert net.kinds(n.name, "c")[-1] == "reap"


def test_graceful_leave_serf_intent_then_dead() -> None:
    net, (a, b, c) = cluster("abc")
    # A Serf peer's push/pull state tells us Serf's clocks; our intent must beat StatusLTimes.
    serf_state = wire.encode_serf_message(SerfPushPull(ltime=20, status_ltimes={"b": 41, "a": 3}))
    pp = PushPull(False, [], serf_state)
    b.receive_stream(wire.encode_stream(wire.encode_push_pull(pp)), addr_of("a"), net.now)
    net.deliver()
    net.sent.clear()
    b.leave(net.now)
    assert b.leaving and not b.leave_complete
    t0 = net.now
    while not b.leave_complete:
        net.run_for(0.1)
        assert net.now - t0 < 12.0
    from_b = [data for s, _, data in net.sent if s == "b"]
    intent_pkts, dead_pkts = [], []
    for i, data in enumerate(from_b):
        for _, m in messages(data):
            if isinstance(m, UserMsg):
                _, body = wire.decode_serf_message(m.payload)
                assert isinstance(body, SerfLeave) and body.node == "b"
                assert body.ltime > 41
                intent_pkts.append(i)
            if isinstance(m, Dead) and m.node == "b":
                assert m.from_node == "b"
                dead_pkts.append(i)
    assert intent_pkts and dead_pkts
    assert not set(intent_pkts) & set(dead_pkts)  # never in the same packet
    assert max(intent_pkts) < min(dead_pkts)  # the intent goes out first
    for n in (a, c):
        assert n.member("b").state == State.LEFT  # type: ignore[union-attr]
        assert net.kinds(n.name, "b")[-1] == "leave"
        assert "failed" not in net.kinds(n.name, "b")
    # After leaving, alive about ourselves is ignored.
    b.receive_packet(wire.encode(Suspect(9, "b", "a")), addr_of("a"), net.now)
    assert b.member("b").state == State.LEFT  # type: ignore[union-attr]


def test_leave_alone_completes() -> None:
    a = make("a")
    a.leave(0.0)
    a.tick(0.0)
    assert not a.leave_complete
    a.tick(1.0)
    assert a.leave_complete
    assert a.member("a").state == State.LEFT  # type: ignore[union-attr]


def test_left_propagates_via_push_pull_as_left() -> None:
    a = make("a")
    b_left = PushNodeState("b", wire.ip_to_addr("10.0.0.2"), PORT, b"", 1, NodeState.ALIVE)
    pp = PushPull(False, [b_left], b"")
    a.receive_stream(wire.encode_stream(wire.encode_push_pull(pp)), addr_of("b"), 0.0)
    b_left.state = NodeState.LEFT
    a.receive_stream(wire.encode_stream(wire.encode_push_pull(pp)), addr_of("b"), 1.0)
    assert a.member("b").state == State.LEFT  # type: ignore[union-attr]


def test_push_pull_merge_rules() -> None:
    a = make("a")
    ip = wire.ip_to_addr
    nodes = [
        PushNodeState("x", ip("10.0.0.24"), PORT, b"", 1, NodeState.ALIVE),
        PushNodeState("y", ip("10.0.0.25"), 0, b"", 1, NodeState.ALIVE),  # port 0: ours
        PushNodeState("a", ip("10.0.0.1"), PORT, b"", 5, NodeState.DEAD),  # about us
    ]
    a.receive_stream(
        wire.encode_stream(wire.encode_push_pull(PushPull(False, nodes))), addr_of("x"), 0.0
    )
    assert a.member("y").port == PORT  # type: ignore[union-attr]
    assert a.incarnation == 6  # dead about us -> suspect -> refuted
    nodes = [
        PushNodeState("x", ip("10.0.0.24"), PORT, b"", 1, NodeState.DEAD),
        PushNodeState("y", ip("10.0.0.25"), PORT, b"", 1, NodeState.SUSPECT),
    ]
    a.receive_stream(
        wire.encode_stream(wire.encode_push_pull(PushPull(False, nodes))), addr_of("x"), 1.0
    )
    # Remote dead and suspect both merge as suspect, never straight to dead.
    assert a.member("x").state == State.SUSPECT  # type: ignore[union-attr]
    assert a.member("y").state == State.SUSPECT  # type: ignore[union-attr]


def test_incompatible_protocol_rejects_merge() -> None:
    a = make("a")
    old = PushNodeState(
        "x", wire.ip_to_addr("10.0.0.24"), PORT, b"", 1, NodeState.ALIVE, bytes([1, 1, 1, 1, 1, 1])
    )
    a.receive_stream(
        wire.encode_stream(wire.encode_push_pull(PushPull(False, [old]))), addr_of("x"), 0.0
    )
    assert a.member("x") is None and a.counters["incompatible_protocol"] == 1


def test_update_meta_gossips_tags() -> None:
    net, (a, b, c) = cluster("abc")
    a.update_meta({"role": "edge", "dc": "fra"}, net.now)
    net.run_for(2.0)
    for n in (b, c):
        m = n.member("a")
        assert m is not None and m.tags == {"role": "edge", "dc": "fra"} and m.incarnation == 2
        assert net.kinds(n.name, "a")[-1] == "update"
    with pytest.raises(ValueError):
        a.update_meta(b"x" * 600, net.now)


def test_gossip_respects_packet_budget_with_encryption() -> None:
    ring = Keyring(KEY)
    a = make("a", keyring=ring)
    b = make("b", keyring=ring)
    net = Net([a, b])
    b.join([addr_of("a")], 0.0)
    net.deliver()
    noise = random.Random(5)
    for i in range(60):  # plenty of alive broadcasts queued
        big_meta = b"\xff" + noise.randbytes(400)  # incompressible
        alive = Alive(
            1, f"n{i:02d}", wire.ip_to_addr(f"10.1.0.{i + 1}"), PORT, big_meta, DEFAULT_VSN
        )
        a.receive_packet(ring.encrypt(wire.encode(alive)), addr_of("b"), 0.1)
    net.sent.clear()
    net.run_for(1.0)
    sizes = [len(d) for s, _, d in net.sent if s == "a"]
    assert sizes and max(sizes) <= 1400
    assert max(sizes) > 1000  # packets are filled up
    # Some reached b (gossip targets are random among 61 members) through encrypted packets.
    assert sum(1 for m in b.members() if m.name.startswith("n")) >= 1
    assert b.counters == {} or set(b.counters) <= {"unknown_ack", "unknown_nack"}


def test_retransmits_observed_between_two_members() -> None:
    net, (a, _) = cluster("ab")
    a.update_meta({"role": "a2"}, net.now)
    net.sent.clear()
    net.run_for(10.0)
    count = 0
    for s, _, data in net.sent:
        if s == "a":
            count += sum(1 for _, m in messages(data) if isinstance(m, Alive) and m.node == "a")
    assert count == retransmit_limit(4, 2) == 4  # as observed with Serf (limit 4)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_garbage_is_counted_not_raised() -> None:
    a = make("a")
    cases = {
        b"": "empty",
        b"\xff\x00": "unknown_type",
        b"\x00\xc1": "bad_msgpack",
        b"\x0c\x00\x00\x00\x00\x04": "bad_crc",
        b"\x06\x80": "unexpected_type",  # pushPull over UDP
        b"\x07": "truncated",
    }
    for data, reason in cases.items():
        a.receive_packet(data, ("10.0.0.9", 1), 0.0)
        assert a.counters.get(reason, 0) >= 1, (data, reason, a.counters)
    assert [o for o in a.poll_outputs() if not isinstance(o, MemberEvent)] == []
    # A compound with one bad part: the good part still counts.
    alive = Alive(1, "x", wire.ip_to_addr("10.0.0.24"), PORT, b"", DEFAULT_VSN)
    a.receive_packet(wire.make_compound([b"\x00\xc1", wire.encode(alive)]), ("10.0.0.9", 1), 0.0)
    assert a.member("x") is not None and a.counters["bad_msgpack"] == 2
    # Streams.
    assert a.receive_stream(b"\x06\x81", ("10.0.0.9", 1), 0.0) is not None  # errResp
    assert a.stream_response(99, b"\x00", 0.0) is None
    assert a.counters["late_stream"] == 1


def test_wrong_key_and_plaintext_are_dropped() -> None:
    a = make("a", keyring=Keyring(KEY))
    alive = Alive(1, "x", wire.ip_to_addr("10.0.0.24"), PORT, b"", DEFAULT_VSN)
    wrong = Keyring(OTHER_KEY).encrypt(wire.encode(alive))
    a.receive_packet(wrong, ("10.0.0.24", PORT), 0.0)
    assert a.counters["decrypt_failed"] == 1 and a.member("x") is None
    a.receive_packet(wire.encode(alive), ("10.0.0.24", PORT), 0.0)  # plaintext
    assert a.member("x") is None and sum(a.counters.values()) == 2
    # Streams: plaintext gets an encrypted errResp, as memberlist does.
    pp = wire.encode_push_pull(PushPull(True, []))
    reply = a.receive_stream(wire.encode_stream(pp), ("10.0.0.24", PORT), 0.0)
    assert reply is not None and a.counters["not_encrypted"] == 1
    _, err = wire.decode_stream(reply, Keyring(KEY))
    assert isinstance(err, wire.ErrResp) and "not encrypted" in err.error
    reply = a.receive_stream(
        wire.encode_stream(pp, keyring=Keyring(OTHER_KEY)), ("10.0.0.24", PORT), 0.0
    )
    assert reply is not None and a.counters["decrypt_failed"] == 2
    # The right key works.
    a.receive_packet(Keyring(KEY).encrypt(wire.encode(alive)), ("10.0.0.24", PORT), 0.0)
    assert a.member("x") is not None


def test_encrypted_cluster_and_foreign_key_member() -> None:
    ring = Keyring(KEY)
    net, (a, _, _) = cluster("abc", keyring=ring)
    for _, _, data in net.sent:
        with pytest.raises(wire.WireError):
            wire.decode_packet(data)  # nothing in the clear
    intruder = make("d", keyring=Keyring(OTHER_KEY))
    net.add(intruder)
    intruder.join([addr_of("a")], net.now)
    net.run_for(3.0)
    assert a.member("d") is None and intruder.num_nodes() == 1
    assert a.counters["decrypt_failed"] >= 1


def test_serf_user_messages_ignored() -> None:
    a = make("a")
    ev = wire.encode_serf_message(SerfUserEvent(3, "deploy", b"x"))
    a.receive_packet(wire.encode(UserMsg(ev)), ("10.0.0.9", 1), 0.0)
    a.receive_packet(wire.encode(UserMsg(b"\x04garbage")), ("10.0.0.9", 1), 0.0)
    a.receive_packet(wire.encode(UserMsg(b"\x80ours")), ("10.0.0.9", 1), 0.0)
    a.receive_packet(wire.encode(UserMsg(b"\x00\xc1")), ("10.0.0.9", 1), 0.0)
    assert a.counters["serf_msg_ignored"] == 2
    assert a.counters["user_unknown"] == 1
    assert a.counters["bad_msgpack"] == 1
    # A leave intent about another node: clock witnessed, relayed once.
    intent = wire.encode_serf_message(SerfLeave(17, "serf9"))
    a.receive_packet(wire.encode(UserMsg(intent)), ("10.0.0.9", 1), 0.0)
    a.receive_packet(wire.encode(UserMsg(intent)), ("10.0.0.9", 1), 0.0)
    assert a.serf_clock.time() == 18 and len(a.user_broadcasts) == 1
    # A stale leave intent about ourselves is answered with a join intent.
    a.receive_packet(
        wire.encode(UserMsg(wire.encode_serf_message(SerfLeave(30, "a")))), ("10.0.0.9", 1), 0.0
    )
    msg = a.user_broadcasts._items[("serf-intent", "a")].msg
    kind, body = wire.decode_serf_message(msg)
    assert kind == wire.SerfMessageType.JOIN and body.ltime == 31  # type: ignore[union-attr]
    assert a.member("a").state == State.ALIVE  # type: ignore[union-attr]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_packets_never_raise(data: bytes) -> None:
    a = make("a")
    a.receive_packet(data, ("10.0.0.9", 1), 0.0)
    a.receive_packet(wire.add_crc(data) if data else data, ("10.0.0.9", 1), 0.0)
    a.receive_stream(data, ("10.0.0.9", 1), 0.0)
    a.tick(1.0)


@FUZZ
@given(
    st.sampled_from([0, 1, 2, 3, 4, 5, 8, 11]),
    st.dictionaries(
        st.sampled_from(
            [
                b"Node",
                b"SeqNo",
                b"Incarnation",
                b"From",
                b"Addr",
                b"Port",
                b"Vsn",
                b"Meta",
                b"Target",
                b"Nack",
                b"SourceAddr",
                b"SourcePort",
            ]
        ),
        st.one_of(st.integers(-5, 2**33), st.binary(max_size=20), st.none(), st.booleans()),
    ),
)
def test_fuzz_structured_messages(type_byte: int, body: dict[bytes, Any]) -> None:
    import msgpack

    a = make("a")
    data = bytes([type_byte]) + msgpack.packb(body, use_bin_type=False)
    a.receive_packet(data, ("10.0.0.9", 1), 0.0)
    a.tick(0.6)
    a.tick(2.0)


# ---------------------------------------------------------------------------------------------
# Serf 0.9.4 captures


VECTOR_DIR = Path(
    os.environ.get("EDGEPROXY_SERF_VECTORS", Path(__file__).parent / "vectors" / "serf-0.9.4")
)
needs_vectors = pytest.mark.skipif(
    not (VECTOR_DIR / "plain.json").exists(), reason="Serf 0.9.4 captures not available"
)


@needs_vectors
@pytest.mark.parametrize("capture", ["plain.json", "aes256.json"])
def test_serf_captures_are_understood(capture: str) -> None:
    d = json.loads((VECTOR_DIR / capture).read_text())
    ring = Keyring.from_base64([d["key_b64"]]) if d.get("key_b64") else None
    py1 = Swim(
        "py1", "127.0.0.1", 7947, {"role": "py", "test": "pop"}, Config(), random.Random(1), ring
    )
    (sid,) = py1.join([("127.0.0.1", 7946)], 0.0)
    py1.poll_outputs()
    py1.stream_response(sid, bytes.fromhex(d["tcp_pushpull_reply"]), 0.0)
    serf1 = py1.member("serf1")
    assert serf1 is not None and serf1.state == State.ALIVE and serf1.tags == {}
    for pkt in d["udp_packets_from_serf"]:
        py1.receive_packet(bytes.fromhex(pkt), ("127.0.0.1", 7946), 1.0)
    wire_errors = {k: v for k, v in py1.counters.items() if k in wire.REASONS}
    assert wire_errors == {}
    assert py1.member("py1").state == State.ALIVE  # type: ignore[union-attr]
