"""Deterministic network simulation of :class:`gossip.swim.Swim` clusters.

The simulator is pure: one seeded ``random.Random`` drives latency, loss and every member's
RNG; time is simulated (no wall clock). It delivers ``SendPacket`` outputs after a LAN-like
delay unless lost (probability ``loss``), partitioned or addressed to a stopped node; it runs
``OpenStream`` exchanges as TCP would (a lost segment costs a retransmission timeout, an
unreachable peer makes the stream fail at its deadline); it can kill, restart and partition
members.

Run with ``-s`` to see the measured figures (false positives, detection and heal times).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gossip.keyring import Keyring
from gossip.swim import (
    Config,
    MemberEvent,
    OpenStream,
    SendPacket,
    State,
    Swim,
    suspicion_timeout,
)

PORT = 7946


@dataclass(order=True)
class _Ev:
    time: float
    seq: int
    kind: str = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)


@dataclass
class Observed:
    time: float
    observer: str
    event: MemberEvent


class Sim:
    """A set of Swim members on a simulated LAN."""

    def __init__(
        self,
        n: int,
        *,
        loss: float = 0.0,
        seed: int = 1,
        config: Config | None = None,
        latency: tuple[float, float] = (0.0005, 0.003),
        keyring: Keyring | None = None,
    ) -> None:
        self.keyring = keyring
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.config = config if config is not None else Config(enable_compression=False)
        self.now = 0.0
        self._heap: list[_Ev] = []
        self._seq = 0
        self.names = [f"node{i:03d}" for i in range(n)]
        self.addr_of = {
            name: (f"10.0.{i // 250}.{i % 250 + 1}", PORT) for i, name in enumerate(self.names)
        }
        self.name_of = {a: name for name, a in self.addr_of.items()}
        self.nodes: dict[str, Swim] = {}
        self.up: set[str] = set()
        self.group: dict[str, int] = {}
        self.events: list[Observed] = []
        self._scheduled: dict[str, float] = {}
        self._seeds: dict[str, list[tuple[str, int]]] = {}
        self._joins: set[tuple[str, int]] = set()
        self.join_retries = 0
        self.packets = 0
        self.packet_bytes = 0
        self.max_packet = 0
        self.dropped = 0

    # --- control ------------------------------------------------------------------------------

    def start(self, name: str, join: Iterable[str] = ()) -> Swim:
        addr = self.addr_of[name]
        node = Swim(
            name,
            addr[0],
            addr[1],
            {"role": "pop"},
            self.config,
            random.Random(self.rng.getrandbits(64)),
            self.keyring,
            now=self.now,
        )
        self.nodes[name] = node
        self.up.add(name)
        seeds = [self.addr_of[s] for s in join]
        self._seeds[name] = seeds
        if seeds:
            node.join(seeds, self.now)
        self._drain(name)
        return node

    def start_all(self, spacing: float = 0.02) -> None:
        """Member 0 starts; the others start one by one and join member 0."""
        self.start(self.names[0])
        for name in self.names[1:]:
            self.run_for(spacing)
            self.start(name, join=[self.names[0]])

    def kill(self, name: str) -> None:
        self.nodes[name].shutdown()
        self.up.discard(name)

    def restart(self, name: str, join: Iterable[str]) -> Swim:
        self.kill(name)
        return self.start(name, join)

    def partition(self, *groups: Iterable[str]) -> None:
        self.group = {name: gid for gid, g in enumerate(groups) for name in g}

    def heal(self) -> None:
        self.group = {}

    # --- network ------------------------------------------------------------------------------

    def _push(self, t: float, kind: str, *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Ev(t, self._seq, kind, args))

    def _delay(self) -> float:
        lo, hi = self.latency
        return lo + (hi - lo) * self.rng.random()

    def reachable(self, a: str, b: str) -> bool:
        return b in self.up and self.group.get(a, -1) == self.group.get(b, -1)

    def _tcp_delay(self) -> float:
        # SYN, SYN-ACK (1 s initial RTO), request, reply (0.2 s RTO), each retried on loss.
        total = 0.0
        for rto in (1.0, 1.0, 0.2, 0.2):
            total += self._delay()
            while self.rng.random() < self.loss and total < 60:
                total += rto
                rto *= 2
        return total

    def _drain(self, name: str) -> None:
        node = self.nodes[name]
        for out in node.poll_outputs():
            if isinstance(out, SendPacket):
                self.packets += 1
                self.packet_bytes += len(out.data)
                self.max_packet = max(self.max_packet, len(out.data))
                dst = self.name_of.get(out.addr)
                if dst is None or not self.reachable(name, dst) or self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                self._push(self.now + self._delay(), "packet", dst, out.data, self.addr_of[name])
            elif isinstance(out, OpenStream):
                if out.purpose == "join":
                    self._joins.add((name, out.stream_id))
                dst = self.name_of.get(out.addr)
                delay = self._tcp_delay()
                if dst is None or not self.reachable(name, dst) or self.now + delay > out.deadline:
                    self._push(out.deadline, "stream_failed", name, node, out.stream_id)
                else:
                    self._push(self.now + delay / 2, "stream", dst, name, node, out, delay)
            else:
                assert isinstance(out, MemberEvent)
                self.events.append(Observed(self.now, name, out))
        if name in self.up and self.nodes[name] is node:
            t = max(node.next_deadline(), self.now)
            if t < math.inf and self._scheduled.get(name) != t:
                self._scheduled[name] = t
                self._push(t, "tick", name)

    def run_until(self, t_end: float) -> None:
        same_time = 0
        while self._heap and self._heap[0].time <= t_end:
            ev = heapq.heappop(self._heap)
            same_time = same_time + 1 if ev.time == self.now else 0
            assert same_time < 100_000, "simulation is not making progress"
            self.now = ev.time
            if ev.kind == "tick":
                (name,) = ev.args
                if self._scheduled.get(name) != ev.time or name not in self.up:
                    continue
                del self._scheduled[name]
                self.nodes[name].tick(self.now)
                self._drain(name)
            elif ev.kind == "packet":
                dst, data, src_addr = ev.args
                if dst in self.up:
                    self.nodes[dst].receive_packet(data, src_addr, self.now)
                    self._drain(dst)
            elif ev.kind == "stream":
                dst, src, src_node, out, delay = ev.args
                if dst not in self.up or not self.reachable(src, dst):
                    self._push(out.deadline, "stream_failed", src, src_node, out.stream_id)
                    continue
                reply = self.nodes[dst].receive_stream(out.data, self.addr_of[src], self.now)
                self._drain(dst)
                if reply is None:
                    self._push(self.now + delay / 2, "stream_failed", src, src_node, out.stream_id)
                else:
                    self._push(
                        self.now + delay / 2, "stream_reply", src, src_node, out.stream_id, reply
                    )
            elif ev.kind == "stream_reply":
                src, src_node, sid, reply = ev.args
                if src in self.up and self.nodes[src] is src_node:
                    src_node.stream_response(sid, reply, self.now)
                    self._drain(src)
            elif ev.kind == "stream_failed":
                src, src_node, sid = ev.args
                if src in self.up and self.nodes[src] is src_node:
                    src_node.stream_failed(sid, self.now)
                    if (src, sid) in self._joins and src_node.num_nodes() <= 1:
                        # The shell retries a failed join (Serf's retry_join).
                        self.join_retries += 1
                        src_node.join(self._seeds[src], self.now)
                    self._drain(src)
        self.now = t_end

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    # --- observation --------------------------------------------------------------------------

    def view(self, observer: str, subject: str) -> State | None:
        m = self.nodes[observer].member(subject)
        return m.state if m is not None else None

    def converged(self, strict: bool = True) -> bool:
        """Every running member sees exactly the running members as alive (or, unless
        ``strict``, as alive or suspect: a suspect is still a member)."""
        ok = (State.ALIVE,) if strict else (State.ALIVE, State.SUSPECT)
        for name in self.up:
            alive = {m.name for m in self.nodes[name].members() if m.state in ok}
            if alive != self.up:
                return False
        return True

    def run_until_converged(
        self, limit: float, step: float = 0.25, strict: bool = True
    ) -> float | None:
        start = self.now
        while self.now - start < limit:
            if self.converged(strict):
                return self.now - start
            self.run_for(step)
        return self.now - start if self.converged(strict) else None

    def failed_events(self, since: float = 0.0) -> list[Observed]:
        return [o for o in self.events if o.time >= since and o.event.kind == "failed"]

    def false_positives(self, since: float = 0.0, exclude: Iterable[str] = ()) -> int:
        """``failed`` events about members that were running (and reachable) all along."""
        skip = set(exclude)
        return sum(1 for o in self.failed_events(since) if o.event.member.name not in skip)

    def detection(self, victim: str, since: float) -> tuple[float | None, float | None]:
        """(first, last) time after ``since`` at which running members marked ``victim``
        failed; ``last`` is None unless every running member did."""
        firsts: dict[str, float] = {}
        for o in self.events:
            if o.time >= since and o.event.member.name == victim and o.event.kind == "failed":
                firsts.setdefault(o.observer, o.time)
        if not firsts:
            return None, None
        first = min(firsts.values()) - since
        everyone = all(n in firsts or self.view(n, victim) in (None, State.DEAD) for n in self.up)
        last = max(firsts.values()) - since if everyone else None
        return first, last


# ---------------------------------------------------------------------------------------------
# Scenarios

RESULTS: list[str] = []


def _report(line: str) -> None:
    RESULTS.append(line)
    print(line)


SCENARIOS = [
    # (n, loss, TCP fallback ping, warmup, observe after the kill)
    (5, 0.0, True, 8.0, 40.0),
    (5, 0.05, True, 8.0, 40.0),
    (5, 0.20, True, 8.0, 40.0),
    (20, 0.0, True, 10.0, 45.0),
    (20, 0.05, True, 10.0, 45.0),
    (20, 0.20, True, 10.0, 45.0),
    (20, 0.20, False, 10.0, 45.0),  # UDP only: Lifeguard without the TCP safety net
    (100, 0.0, True, 12.0, 30.0),
    (100, 0.05, True, 12.0, 30.0),
    (100, 0.20, True, 12.0, 30.0),
]


@pytest.mark.parametrize(("n", "loss", "tcp", "warmup", "observe"), SCENARIOS)
def test_failure_detection(n: int, loss: float, tcp: bool, warmup: float, observe: float) -> None:
    # Small clusters run the full pipeline (LZW + AES-GCM); 100 members skip the pure-Python
    # LZW to stay fast (it does not change the protocol's behaviour).
    small = n <= 20
    config = Config(enable_compression=small, disable_tcp_pings=not tcp)
    keyring = Keyring(bytes(range(32))) if small else None
    sim = Sim(n, loss=loss, seed=1000 + n + int(loss * 100), config=config, keyring=keyring)
    sim.start_all()
    sim.run_for(warmup)
    joined = sim.run_until_converged(30.0, strict=False)
    assert joined is not None, "the cluster did not converge"
    t_join = sim.now
    fp_before = sim.false_positives()

    victim = sim.names[n // 2]
    t_kill = sim.now
    sim.kill(victim)
    sim.run_for(observe)
    first, last = sim.detection(victim, t_kill)
    fps = sim.false_positives(exclude=[victim])
    healthy_fp_nodes = {o.event.member.name for o in sim.failed_events()} - {victim}
    suspects = sum(
        1 for o in sim.events if o.event.kind == "suspect" and o.event.member.name != victim
    )
    converged = sim.converged(strict=False)
    lo = suspicion_timeout(4, n, 1.0)
    _report(
        f"N={n:3d} loss={loss:4.0%}{'' if tcp else ' udp-only'}: converged at t={t_join:5.1f}s; "
        f"killed member failed first after {first if first is None else round(first, 1)}s, "
        f"by all after {last if last is None else round(last, 1)}s (suspicion min {lo:.0f}s "
        f"max {6 * lo:.0f}s); false positives {fps} about {len(healthy_fp_nodes)} members "
        f"({fp_before} during join), suspicions of healthy members {suspects}; "
        f"final view correct: {converged}; packets {sim.packets} (max {sim.max_packet} B), "
        f"join retries {sim.join_retries}"
    )
    assert sim.max_packet <= 1400
    assert first is not None and last is not None, "the killed member was not detected by all"
    # memberlist LAN timing: the first failed probe within a few probe intervals, then the
    # suspicion timeout (between min and max, shrinking with confirmations), then gossip.
    assert last <= 6 * lo + 10.0
    if loss == 0.0:
        assert fps == 0 and suspects == 0
        assert last <= lo + 6.0  # plenty of independent confirmations on a healthy LAN
    assert converged


def test_partition_heals() -> None:
    n = 20
    sim = Sim(n, seed=7)
    sim.start_all()
    assert sim.run_until_converged(30.0) is not None
    left, right = sim.names[: n // 2], sim.names[n // 2 :]
    t_part = sim.now
    sim.partition(left, right)
    sim.run_for(60.0)  # long enough for both sides to declare the other failed and reap it
    sides_split = all(sim.view(a, b) in (None, State.DEAD) for a in left for b in right)
    fps = sum(
        1
        for o in sim.failed_events(t_part)
        if (o.observer in left) == (o.event.member.name in left)
    )
    sim.heal()
    heal = sim.run_until_converged(120.0)
    _report(
        f"partition N={n} 10|10 for 60 s: sides split: {sides_split}, false positives within a "
        f"side {fps}, healed (all alive everywhere) {heal if heal is None else round(heal, 1)}s "
        "after the partition ended"
    )
    assert sides_split
    assert fps == 0
    assert heal is not None and heal <= 60.0  # Serf-style reconnect every 30 s


def test_short_partition_heals_without_reap() -> None:
    n = 10
    sim = Sim(n, seed=11)
    sim.start_all()
    assert sim.run_until_converged(30.0) is not None
    sim.partition(sim.names[:3], sim.names[3:])
    sim.run_for(20.0)
    sim.heal()
    heal = sim.run_until_converged(90.0)
    _report(
        f"partition N={n} 3|7 for 20 s: healed {heal if heal is None else round(heal, 1)}s "
        "after the partition ended"
    )
    assert heal is not None and heal <= 60.0


def test_restart_rejoins() -> None:
    n = 10
    sim = Sim(n, seed=3)
    sim.start_all()
    assert sim.run_until_converged(30.0) is not None
    victim = sim.names[4]
    # Two meta updates: the others know it at incarnation 3.
    sim.nodes[victim].update_meta({"role": "pop", "v": "2"}, sim.now)
    sim.nodes[victim].update_meta({"role": "pop", "v": "3"}, sim.now)
    sim._drain(victim)
    sim.run_for(3.0)
    assert all(sim.nodes[o].member(victim).incarnation == 3 for o in sim.up)  # type: ignore[union-attr]
    # A quick restart (incarnation 1): the others still think it alive at incarnation 3.
    t0 = sim.now
    sim.restart(victim, join=[sim.names[0]])
    back = sim.run_until_converged(30.0)
    inc = sim.nodes[victim].incarnation
    fps = sim.false_positives(t0)
    # A slow restart: it was declared failed first.
    sim.kill(victim)
    sim.run_for(40.0)
    assert all(sim.view(o, victim) in (None, State.DEAD) for o in sim.up)
    sim.restart(victim, join=[sim.names[1]])
    back2 = sim.run_until_converged(30.0)
    _report(
        f"restart N={n}: quick restart back in {back}s (incarnation {inc}, false positives {fps}); "
        f"after being declared failed, back in {back2}s"
    )
    assert back is not None and back <= 5.0
    assert inc == 4  # it refuted the incarnation the others knew
    assert back2 is not None and back2 <= 5.0


def test_graceful_leave_is_left_everywhere() -> None:
    n = 10
    sim = Sim(n, loss=0.05, seed=5)
    sim.start_all()
    assert sim.run_until_converged(30.0) is not None
    leaver = sim.names[6]
    t0 = sim.now
    sim.nodes[leaver].leave(sim.now)
    sim._drain(leaver)
    while not sim.nodes[leaver].leave_complete:
        sim.run_for(0.1)
        assert sim.now - t0 < 15.0
    took = sim.now - t0
    sim.kill(leaver)
    sim.run_for(5.0)
    views = {sim.view(o, leaver) for o in sim.up}
    failed = [o for o in sim.failed_events(t0) if o.event.member.name == leaver]
    _report(
        f"graceful leave N={n} at 5% loss: complete after {took:.1f}s, views {sorted(map(str, views))}"
    )
    assert views == {State.LEFT}
    assert not failed


def test_simulation_is_deterministic() -> None:
    def run() -> tuple[int, list[tuple[float, str, str, str]]]:
        sim = Sim(8, loss=0.1, seed=42)
        sim.start_all()
        sim.run_for(5.0)
        sim.kill(sim.names[3])
        sim.run_for(20.0)
        return sim.packets, [
            (o.time, o.observer, o.event.kind, o.event.member.name) for o in sim.events
        ]

    assert run() == run()


def test_zz_summary() -> None:
    """Prints every figure measured above (visible with ``-s``)."""
    print("\n" + "\n".join(RESULTS))
