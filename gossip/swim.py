"""A sans-IO SWIM member with HashiCorp memberlist's semantics (and Serf's leave handshake).

:class:`Swim` owns no sockets, threads or clocks. The caller (an asyncio shell, or the
deterministic simulator in ``tests/test_gossip_sim.py``) feeds it

* ``receive_packet(data, from_addr, now)`` for every UDP datagram,
* ``receive_stream(data, from_addr, now)`` for every complete inbound TCP exchange (the return
  value, if any, is written back on the same connection),
* ``stream_response(stream_id, data, now)`` / ``stream_failed(stream_id, now)`` for the outcome of
  a stream it was asked to open,
* ``tick(now)`` at (or after) ``next_deadline()``,
* ``join(addrs, now)``, ``leave(now)``, ``update_meta(meta, now)``,

and drains :meth:`Swim.poll_outputs`: :class:`SendPacket` (send one UDP datagram),
:class:`OpenStream` (connect over TCP, write ``data``, read one exchange back with
:meth:`Swim.stream_decoder`, report it) and :class:`MemberEvent` (membership changes).
``now`` is any monotonic clock in seconds.

Shell contract (asyncio): drain ``poll_outputs()`` after every call; re-arm one timer at
``next_deadline()`` after every call (it may be in the past: tick at once); for inbound TCP,
feed bytes to a ``stream_decoder()`` until it returns, pass the consumed bytes to
``receive_stream`` under a ``tcp_timeout`` deadline, write the reply (if any) and close; cap
concurrent inbound push/pulls (memberlist: 128); for an ``OpenStream`` read the reply the same
way and report ``stream_response`` / ``stream_failed`` (connect error, timeout at ``deadline``).
After ``leave()``, keep serving until ``leave_complete``, then ``shutdown()``.

Every encode and decode goes through :mod:`gossip.wire` (memberlist v0.2.2 / Serf 0.9.4 wire
format, see ``shared/reference/gossip-memberlist-wire.md``); encryption uses an optional
:class:`gossip.keyring.Keyring`. Bad input never raises: each dropped input is counted in
:attr:`Swim.counters` under its ``WireError.reason`` (or a semantic reason such as
``ping_wrong_node``), and nothing from a packet that fails decryption is acted upon.

Semantics follow memberlist ``state.go``, ``suspicion.go``, ``awareness.go``, ``queue.go`` and
``net.go``:

* **Probing.** Every ``probe_interval`` the next member of a shuffled list (self, dead and left
  skipped) is pinged; a suspect target gets ``[ping, suspect]`` so it can refute. Without an ack
  within ``probe_timeout`` the prober asks ``indirect_checks`` random alive members to ping it
  (asking for nacks from PMax >= 4 peers) and, for PMax >= 3 targets, asks the shell for a TCP
  fallback ping. The probe lasts ``probe_interval x (health score + 1)``; then the target is
  suspected.
* **Lifeguard.** The local health score (0..``awareness_max_multiplier`` - 1) drops by one after a
  successful probe, rises by the number of missing nacks (or by one when no nack was expected)
  after a failed probe, and by one per refutation of ourselves. It scales the probe interval.
* **Suspicion.** ``min = suspicion_mult x max(1, log10(n)) x probe_interval``,
  ``max = suspicion_max_timeout_mult x min``; ``k = suspicion_mult - 2`` independent
  confirmations (0 if ``n - 2 < k``) drive the timeout from max (min if k = 0) down to
  ``max(min, max - log(c+1)/log(k+1) x (max - min))``. On expiry the node is declared dead.
* **Incarnations and refutation.** Alive about others needs a higher incarnation; suspect needs
  >= and an alive node; dead needs >= and a node not already dead/left. Accusations about
  ourselves are refuted with an alive at ``max(own + 1, accused + 1)``.
* **Dead vs left.** ``dead{From == Node}`` marks the node ``left``.
* **Dissemination.** Messages piggyback on every ping/ack/nack and go to ``gossip_nodes`` random
  members every ``gossip_interval`` through a :class:`TransmitLimitedQueue`: each message is sent
  ``retransmit_mult x ceil(log10(n + 1))`` times, fewest-transmits then largest-that-fits
  first, and a new message about a node invalidates the queued one.
* **Anti-entropy.** A push/pull with one random alive member every ``push_pull_interval``
  (scaled by ``ceil(log2 n - log2 32) + 1`` above 32 members); remote dead/suspect merge as
  suspect, remote left as ``dead{From=Node}``. ``verifyProtocol`` gates the merge.
* **Reaping.** Dead and left members are forgotten ``gossip_to_the_dead_time`` after their state
  change, when the probe list wraps. A dead member's address can be taken over after
  ``dead_node_reclaim_time`` (0 = never, memberlist's default); a left one's at once.

Serf compatibility (``serf_compat``): Meta may be given as a tag mapping (Serf's
``encodeTags``); Serf's Lamport clocks are witnessed from its push/pull user state and from its
leave/join intents; :meth:`Swim.leave` first gossips Serf's leave intent (``LTime`` beyond every
witnessed status time), waits for it to finish its retransmits (or ``broadcast_timeout``), then
gossips ``dead{From=self}`` in separate packets, and stays responsive for
``leave_propagate_delay``; members that failed are retried like Serf's ``reconnect`` (a join
push/pull every ``reconnect_interval`` with probability failed/alive, for
``reconnect_timeout``), which is what heals partitions after the dead have been reaped. Other Serf
user messages are counted and ignored (leave/join intents about other nodes are relayed once so
Serf peers still hear them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal, TypeAlias

from gossip import wire
from gossip.keyring import Keyring
from gossip.wire import (
    AckResp,
    Alive,
    Dead,
    ErrResp,
    IndirectPing,
    MessageType,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    SerfJoin,
    SerfLeave,
    SerfPushPull,
    StreamDecoder,
    Suspect,
    UserMsg,
    WireError,
)

__all__ = [
    "Addr",
    "Config",
    "Member",
    "MemberEvent",
    "OpenStream",
    "Output",
    "SendPacket",
    "State",
    "Swim",
    "TransmitLimitedQueue",
    "push_pull_scale",
    "remaining_suspicion_time",
    "retransmit_limit",
    "suspicion_timeout",
]

Addr: TypeAlias = tuple[str, int]

#: Bytes a compound adds per part (u16 length) and once (type + count), memberlist's
#: ``compoundOverhead`` and ``compoundHeaderOverhead``.
COMPOUND_OVERHEAD = 2
COMPOUND_HEADER_OVERHEAD = 2
#: ``[12][crc32]``; memberlist leaves it out of its budget, we count it to stay <= 1400 B.
CRC_OVERHEAD = 5
#: ``[8]`` in front of a user broadcast (``userMsgOverhead``).
USER_MSG_OVERHEAD = 1
#: memberlist ``pushPullScaleThreshold``.
PUSH_PULL_SCALE_THRESHOLD = 32


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(slots=True)
class Config:
    """Tunables; the defaults are memberlist's ``DefaultLANConfig`` plus Serf's defaults.

    Times are in seconds.
    """

    #: Time between probes of successive members (scaled by the health multiplier).
    probe_interval: float = 1.0
    #: How long to wait for a direct ack before asking indirect relays and trying TCP.
    probe_timeout: float = 0.5
    #: Number of members asked to relay a failed probe (indirect ping).
    indirect_checks: int = 3
    #: Suspicion timeout multiplier: min = mult x max(1, log10(n)) x probe_interval.
    suspicion_mult: int = 4
    #: The suspicion timer starts at this multiple of the minimum and shrinks with
    #: independent confirmations (Lifeguard).
    suspicion_max_timeout_mult: int = 6
    #: Broadcasts are retransmitted retransmit_mult x ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    #: Time between gossip rounds, and members gossiped to per round.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    #: Dead members still receive gossip, and are kept (then reaped) for this long.
    gossip_to_the_dead_time: float = 30.0
    #: Time between push/pull anti-entropy exchanges (0 disables; scaled above 32 members).
    push_pull_interval: float = 30.0
    #: Deadline of a whole TCP exchange (push/pull, join).
    tcp_timeout: float = 10.0
    #: The health score ranges over 0 .. awareness_max_multiplier - 1.
    awareness_max_multiplier: int = 8
    #: After this long dead, another node may claim a member's name from a new address
    #: (0 = never; memberlist's default). Left members can always be reclaimed.
    dead_node_reclaim_time: float = 0.0
    #: UDP packet budget; every packet we send stays within it (CRC, label, encryption counted).
    udp_buffer_size: int = wire.UDP_BUFFER_SIZE
    #: LZW-compress packets (when smaller) and streams, as memberlist does by default.
    enable_compression: bool = True
    #: Skip the TCP fallback ping.
    disable_tcp_pings: bool = False
    #: Drop packets/streams that are not encrypted with a known key (with a keyring).
    gossip_verify_incoming: bool = True
    #: Encrypt what we send (with a keyring).
    gossip_verify_outgoing: bool = True
    #: AES-GCM framing version for what we send (1 = no padding; Serf sends 1).
    encryption_version: int = 1
    #: memberlist >= 0.3 label; must stay empty toward Serf 0.9.4.
    label: bytes = b""
    #: What we advertise: [PMin, PMax, PCur, DMin, DMax, DCur] (Serf 0.9.4's).
    vsn: bytes = wire.DEFAULT_VSN
    #: Serf layer: valid Serf push/pull user state, Lamport clock witnessing, leave intents,
    #: Serf-style reconnects of failed members.
    serf_compat: bool = True
    #: Serf ``BroadcastTimeout``: bound on waiting for the leave intent / leave dead to go out.
    broadcast_timeout: float = 5.0
    #: Serf ``LeavePropagateDelay``: stay responsive this long after the leave broadcasts.
    leave_propagate_delay: float = 1.0
    #: Serf ``ReconnectInterval`` / ``ReconnectTimeout`` (0 interval disables reconnects).
    reconnect_interval: float = 30.0
    reconnect_timeout: float = 24 * 3600.0
    #: Bound on each broadcast queue (oldest, most-transmitted dropped first; Serf's 4096).
    max_queue_depth: int = 4096

    @classmethod
    def lan(cls, **overrides: object) -> Config:
        """memberlist ``DefaultLANConfig`` (the defaults)."""
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def wan(cls, **overrides: object) -> Config:
        """memberlist ``DefaultWANConfig``."""
        base = cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_time=60.0,
            push_pull_interval=60.0,
            tcp_timeout=30.0,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> Config:
        """memberlist ``DefaultLocalConfig``."""
        base = cls(
            probe_interval=1.0,
            probe_timeout=0.2,
            indirect_checks=1,
            suspicion_mult=3,
            retransmit_mult=2,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
            push_pull_interval=15.0,
            tcp_timeout=1.0,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Formulas (memberlist util.go / suspicion.go)


def suspicion_timeout(suspicion_mult: int, n: int, interval: float) -> float:
    """memberlist ``suspicionTimeout``: ``mult x max(1, log10(max(1, n))) x interval``
    (log scale truncated to milliseconds as Go does)."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return suspicion_mult * math.floor(node_scale * 1000) * interval / 1000


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """memberlist ``retransmitLimit``: ``mult x ceil(log10(n + 1))``."""
    return retransmit_mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval: float, n: int) -> float:
    """memberlist ``pushPullScale``: unchanged up to 32 members, then
    ``x (ceil(log2 n - log2 32) + 1)``."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    return (math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1) * interval


def remaining_suspicion_time(n: int, k: int, elapsed: float, lo: float, hi: float) -> float:
    """memberlist ``remainingSuspicionTime``: the timeout after ``n`` of ``k`` confirmations,
    floored to milliseconds and to ``lo``, minus ``elapsed`` (may be negative)."""
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = hi - frac * (hi - lo)
    timeout = max(lo, math.floor(1000.0 * raw) / 1000.0)
    return timeout - elapsed


# ---------------------------------------------------------------------------------------------
# Public value types


class State(StrEnum):
    """A member's state (memberlist ``NodeStateType``)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_WIRE_STATE = {
    State.ALIVE: NodeState.ALIVE,
    State.SUSPECT: NodeState.SUSPECT,
    State.DEAD: NodeState.DEAD,
    State.LEFT: NodeState.LEFT,
}

EventKind: TypeAlias = Literal["join", "update", "suspect", "alive", "failed", "leave", "reap"]


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member."""

    name: str
    addr: str
    port: int
    meta: bytes
    incarnation: int
    state: State
    state_change_time: float
    vsn: bytes

    @property
    def tags(self) -> dict[str, str]:
        """Serf tags decoded from ``meta`` (``{}`` if undecodable)."""
        try:
            return wire.decode_serf_tags(self.meta)
        except WireError:
            return {}

    @property
    def address(self) -> Addr:
        return (self.addr, self.port)


@dataclass(frozen=True, slots=True)
class SendPacket:
    """Send ``data`` as one UDP datagram to ``addr``."""

    addr: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Connect over TCP to ``addr`` before ``deadline``, write ``data``, read one exchange back
    (use :meth:`Swim.stream_decoder`) and report it with :meth:`Swim.stream_response`, or
    report :meth:`Swim.stream_failed`. ``purpose`` is ``push_pull``, ``join`` or ``ping``."""

    stream_id: int
    addr: Addr
    data: bytes
    purpose: str
    deadline: float


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A membership change: ``join`` (new, or back from dead/left), ``update`` (meta changed),
    ``suspect``, ``alive`` (a suspect refuted), ``failed`` (dead), ``leave`` (left), ``reap``
    (forgotten). Events about ourselves are not emitted."""

    kind: EventKind
    member: Member
    time: float


Output: TypeAlias = SendPacket | OpenStream | MemberEvent


# ---------------------------------------------------------------------------------------------
# Broadcast queue (memberlist queue.go)


@dataclass(slots=True)
class _Broadcast:
    transmits: int
    msg: bytes
    id: int
    name: Hashable | None
    notify: Callable[[], None] | None

    def key(self) -> tuple[int, int, int]:
        # fewest transmits first, then largest, then newest
        return (self.transmits, -len(self.msg), -self.id)


class TransmitLimitedQueue:
    """memberlist's ``TransmitLimitedQueue``: each message goes out ``retransmit_limit`` times;
    a new message with the same ``name`` invalidates the queued one. ``notify`` is called once a
    message is finished (limit reached, invalidated or pruned)."""

    def __init__(self, retransmit_mult: int, num_nodes: Callable[[], int], max_depth: int = 0):
        self.retransmit_mult = retransmit_mult
        self._num_nodes = num_nodes
        self._max_depth = max_depth
        self._items: dict[Hashable, _Broadcast] = {}
        self._id = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(
        self, name: Hashable | None, msg: bytes, notify: Callable[[], None] | None = None
    ) -> None:
        self._id += 1
        item = _Broadcast(0, bytes(msg), self._id, name, notify)
        key: Hashable = name if name is not None else ("__unique__", self._id)
        old = self._items.pop(key, None)
        if old is not None and old.notify is not None:
            old.notify()
        self._items[key] = item
        if self._max_depth and len(self._items) > self._max_depth:
            self.prune(self._max_depth)

    def remove(self, name: Hashable) -> bool:
        item = self._items.pop(name, None)
        if item is not None and item.notify is not None:
            item.notify()
        return item is not None

    def contains(self, name: Hashable) -> bool:
        return name in self._items

    def transmit_limit(self) -> int:
        return retransmit_limit(self.retransmit_mult, self._num_nodes())

    def get_broadcasts(self, overhead: int, limit: int, max_count: int = 255) -> list[bytes]:
        """Up to ``limit`` bytes (``overhead`` more per message) of messages, fewest transmits
        first and within a tier the largest that still fits (newest on ties)."""
        if not self._items:
            return []
        tlimit = self.transmit_limit()
        used = 0
        out: list[bytes] = []
        for item in sorted(self._items.values(), key=_Broadcast.key):
            if len(out) >= max_count:
                break
            free = limit - used - overhead
            if free <= 0:
                break
            if len(item.msg) > free:
                continue
            used += overhead + len(item.msg)
            out.append(item.msg)
            item.transmits += 1
            if item.transmits >= tlimit:
                key: Hashable = item.name if item.name is not None else ("__unique__", item.id)
                del self._items[key]
                if item.notify is not None:
                    item.notify()
        return out

    def prune(self, max_retain: int) -> None:
        """Keep the ``max_retain`` freshest messages."""
        if len(self._items) <= max_retain:
            return
        ordered = sorted(self._items.items(), key=lambda kv: kv[1].key())
        for key, item in ordered[max_retain:]:
            del self._items[key]
            if item.notify is not None:
                item.notify()


# ---------------------------------------------------------------------------------------------
# Internal state


@dataclass(slots=True)
class _Node:
    name: str
    addr: bytes  # 4 or 16 bytes
    port: int
    meta: bytes
    vsn: bytes
    incarnation: int = 0
    state: State = State.DEAD
    state_change: float = 0.0

    @property
    def pmax(self) -> int:
        return self.vsn[1]

    @property
    def ip(self) -> str:
        return wire.addr_to_ip(self.addr)

    @property
    def address(self) -> Addr:
        return (wire.addr_to_ip(self.addr), self.port)

    def dead_or_left(self) -> bool:
        return self.state in (State.DEAD, State.LEFT)

    def snapshot(self) -> Member:
        return Member(
            name=self.name,
            addr=self.ip,
            port=self.port,
            meta=self.meta,
            incarnation=self.incarnation,
            state=self.state,
            state_change_time=self.state_change,
            vsn=self.vsn,
        )


class _Suspicion:
    """memberlist ``suspicion``: a timer that shrinks with independent confirmations."""

    __slots__ = ("confirmations", "deadline", "hi", "k", "lo", "n", "start", "state_change")

    def __init__(
        self, from_node: str, k: int, lo: float, hi: float, now: float, state_change: float
    ) -> None:
        self.k = k
        self.lo = lo
        self.hi = hi
        self.n = 0
        self.start = now
        self.state_change = state_change
        self.confirmations = {from_node}
        self.deadline = now + (hi if k >= 1 else lo)

    def confirm(self, from_node: str) -> bool:
        if self.n >= self.k or from_node in self.confirmations:
            return False
        self.confirmations.add(from_node)
        self.n += 1
        self.deadline = self.start + remaining_suspicion_time(self.n, self.k, 0.0, self.lo, self.hi)
        return True


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    start: float
    timeout_at: float  # start + probe_timeout: go indirect
    deadline: float  # start + scaled probe interval: decide
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    tcp_stream: int | None = None
    tcp_ok: bool = False


@dataclass(slots=True)
class _Relay:
    orig_seq: int
    reply_addr: Addr
    reply_node: str
    nack: bool
    expires: float  # probe_timeout after the request: nack (if asked) and forget


@dataclass(slots=True)
class _Stream:
    purpose: str
    addr: Addr
    deadline: float
    seq: int = 0
    join: bool = False


@dataclass(slots=True)
class _Failed:
    name: str
    address: Addr
    since: float


@dataclass(slots=True)
class _Leave:
    phase: Literal["intent", "dead", "propagate", "done"]
    started: float
    phase_deadline: float
    intent_done: bool = False
    dead_done: bool = False


# ---------------------------------------------------------------------------------------------
# The member


class Swim:
    """One SWIM member. See the module docstring for the protocol and the I/O contract."""

    def __init__(
        self,
        name: str,
        addr: str,
        port: int,
        meta: bytes | Mapping[str, str] = b"",
        config: Config | None = None,
        rng: random.Random | None = None,
        keyring: Keyring | None = None,
        *,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.config = config if config is not None else Config()
        self.rng = rng if rng is not None else random.Random()
        self.keyring = keyring
        self.counters: dict[str, int] = {}
        #: Serf's member Lamport clock, as witnessed (leave/join intents are stamped from it).
        self.serf_clock = wire.LamportClock()
        cfg = self.config
        if len(cfg.vsn) != 6:
            raise ValueError("vsn must be 6 bytes")

        self._addr_bytes = wire.ip_to_addr(addr)
        self.addr = wire.addr_to_ip(self._addr_bytes)
        self.port = int(port)
        self._outputs: list[Output] = []
        self._nodes: dict[str, _Node] = {}
        self._order: list[_Node] = []  # memberlist's m.nodes (probe order), self included
        self._by_addr: dict[Addr, str] = {}
        self._probe_index = 0
        self._incarnation = 0
        self._seq = 0
        self._stream_seq = 0
        self._health = 0
        self._suspicions: dict[str, _Suspicion] = {}
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._streams: dict[int, _Stream] = {}
        self._failed: dict[str, _Failed] = {}
        self._intent_ltimes: dict[str, int] = {}
        self._leave: _Leave | None = None
        self._shutdown = False
        self.broadcasts = TransmitLimitedQueue(
            cfg.retransmit_mult, self.num_nodes, cfg.max_queue_depth
        )
        #: Serf-level broadcasts (leave/join intents), framed as ``[8]`` user messages.
        self.user_broadcasts = TransmitLimitedQueue(
            cfg.retransmit_mult, self.num_nodes, cfg.max_queue_depth
        )

        # Random stagger, like memberlist's triggerFunc / pushPullTrigger.
        self._next_probe = now + self.rng.random() * cfg.probe_interval
        self._next_gossip = now + self.rng.random() * cfg.gossip_interval
        self._next_push_pull = (
            now + self.rng.random() * cfg.push_pull_interval
            if cfg.push_pull_interval > 0
            else math.inf
        )
        self._next_reconnect = (
            now + cfg.reconnect_interval
            if cfg.serf_compat and cfg.reconnect_interval > 0
            else math.inf
        )

        # setAlive: our own alive at incarnation 1 (bootstrap: no broadcast-refute dance).
        meta_bytes = self._meta_bytes(meta)
        self._incarnation = 1
        self._alive_node(
            Alive(1, name, self._addr_bytes, self.port, meta_bytes, cfg.vsn), now, bootstrap=True
        )

    # --- public API ---------------------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard local health score (0 = healthy); probe interval x (score + 1)."""
        return self._health

    @property
    def leaving(self) -> bool:
        return self._leave is not None

    @property
    def leave_complete(self) -> bool:
        """True once the leave broadcasts went out and the propagate delay passed: the shell
        may now stop answering and call :meth:`shutdown`."""
        return self._leave is not None and self._leave.phase == "done"

    def num_nodes(self) -> int:
        """memberlist ``estNumNodes``: known members, self and unreaped dead included."""
        return len(self._order)

    def members(self) -> list[Member]:
        """Snapshots of every known member (self included), in name order."""
        return [self._nodes[n].snapshot() for n in sorted(self._nodes)]

    def member(self, name: str) -> Member | None:
        node = self._nodes.get(name)
        return node.snapshot() if node is not None else None

    def alive_members(self) -> list[Member]:
        return [m for m in self.members() if m.state in (State.ALIVE, State.SUSPECT)]

    def poll_outputs(self) -> list[Output]:
        out, self._outputs = self._outputs, []
        return out

    def stream_decoder(self) -> StreamDecoder:
        """A decoder configured like this member, to find where an exchange ends."""
        return StreamDecoder(
            self.keyring,
            verify_incoming=self.config.gossip_verify_incoming,
            label=self.config.label,
        )

    def shutdown(self) -> None:
        """Stop reacting to anything (after :attr:`leave_complete`, or to simulate a crash)."""
        self._shutdown = True

    def next_deadline(self) -> float:
        """The earliest time at which :meth:`tick` has something to do."""
        if self._shutdown:
            return math.inf
        t = min(self._next_gossip, self._next_push_pull, self._next_reconnect)
        if self._probe is None:
            t = min(t, self._next_probe)
        else:
            # The next probe waits for this one (a Go ticker keeps one tick buffered).
            t = min(t, self._probe.deadline if self._probe.indirect else self._probe.timeout_at)
        for relay in self._relays.values():
            t = min(t, relay.expires)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        for st in self._streams.values():
            t = min(t, st.deadline)
        if self._leave is not None and self._leave.phase != "done":
            t = min(t, self._leave.phase_deadline)
        return t

    def join(self, addrs: Iterable[Addr], now: float) -> list[int]:
        """memberlist ``Join``: a join push/pull with each address (results arrive through
        :meth:`stream_response`). Returns the stream ids."""
        ids = []
        for a in addrs:
            ids.append(self._start_push_pull((str(a[0]), int(a[1])), now, join=True))
        return ids

    def update_meta(self, meta: bytes | Mapping[str, str], now: float) -> None:
        """memberlist ``UpdateNode``: gossip our new Meta at a new incarnation."""
        if self._shutdown or self._leave is not None:
            return
        me = self._nodes[self.name]
        self._incarnation += 1
        a = Alive(self._incarnation, self.name, me.addr, me.port, self._meta_bytes(meta), me.vsn)
        self._alive_node(a, now, bootstrap=True)

    def leave(self, now: float) -> None:
        """Graceful leave (Serf ``Leave`` + memberlist ``Leave``): leave intent, then
        ``dead{From=self}``, then the propagate delay; see :attr:`leave_complete`."""
        if self._shutdown or self._leave is not None:
            return
        cfg = self.config
        self._leave = _Leave("intent", now, now + cfg.broadcast_timeout)
        if cfg.serf_compat and self._any_alive():
            ltime = self.serf_clock.increment()
            self._intent_ltimes[self.name] = ltime
            leave = self._leave

            def done() -> None:
                leave.intent_done = True

            msg = wire.encode_serf_message(SerfLeave(ltime, self.name, False))
            self.user_broadcasts.queue(("serf-intent", self.name), msg, done)
        else:
            self._leave.intent_done = True
        self._advance_leave(now)

    def receive_packet(self, data: bytes, from_addr: Addr, now: float) -> None:
        """One inbound UDP datagram."""
        if self._shutdown:
            return
        try:
            pkt = wire.decode_packet(
                data,
                self.keyring,
                verify_incoming=self.config.gossip_verify_incoming,
                label=self.config.label,
            )
        except WireError as exc:
            self._count(exc.reason)
            return
        for err in pkt.errors:
            self._count(err.reason)
        if pkt.truncated:
            self._count("truncated", pkt.truncated)
        for msg_type, body in pkt.messages:
            try:
                self._handle_message(msg_type, body, from_addr, now)
            except WireError as exc:  # e.g. an address that cannot be rendered
                self._count(exc.reason)

    def receive_stream(self, data: bytes, from_addr: Addr, now: float) -> bytes | None:
        """One complete inbound TCP exchange; returns the bytes to write back (if any)."""
        if self._shutdown:
            return None
        try:
            _, body = wire.decode_stream(
                data,
                self.keyring,
                verify_incoming=self.config.gossip_verify_incoming,
                label=self.config.label,
            )
        except WireError as exc:
            self._count(exc.reason)
            text = (
                "Encryption is configured but remote state is not encrypted"
                if exc.reason == "not_encrypted"
                else str(exc)
            )
            return self._encode_stream(wire.encode(ErrResp(text)))
        if isinstance(body, PushPull):
            reply = self._encode_stream(self._local_state(body.join))
            self._merge_remote(body, now)
            return reply
        if isinstance(body, Ping):
            if body.node and body.node != self.name:
                self._count("ping_wrong_node")
                return None
            return self._encode_stream(wire.encode(AckResp(body.seq_no, None)))
        if isinstance(body, UserMsg):
            self._handle_user(body.payload, now)
            return None
        self._count("unexpected_stream")
        return None

    def stream_response(self, stream_id: int, data: bytes, now: float) -> None:
        """The reply read back on a stream we asked to open."""
        st = self._streams.pop(stream_id, None)
        if st is None or self._shutdown:
            self._count("late_stream")
            return
        try:
            _, body = wire.decode_stream(
                data,
                self.keyring,
                verify_incoming=self.config.gossip_verify_incoming,
                label=self.config.label,
            )
        except WireError as exc:
            self._count(exc.reason)
            self._stream_failed(st, now)
            return
        if isinstance(body, ErrResp):
            self._count("remote_error")
            self._stream_failed(st, now)
            return
        if st.purpose == "ping":
            if isinstance(body, AckResp) and body.seq_no == st.seq:
                p = self._probe
                if p is not None and p.tcp_stream == stream_id:
                    p.tcp_ok = True
            else:
                self._count("unexpected_stream")
            return
        if not isinstance(body, PushPull):
            self._count("unexpected_stream")
            self._stream_failed(st, now)
            return
        self._merge_remote(body, now)

    def stream_failed(self, stream_id: int, now: float) -> None:
        """A stream we asked to open could not be completed."""
        st = self._streams.pop(stream_id, None)
        if st is not None:
            self._stream_failed(st, now)

    def tick(self, now: float) -> None:
        """Run every timer due at ``now``."""
        if self._shutdown:
            return
        cfg = self.config
        # Relays: nack (if asked) and forget.
        for seq in [s for s, r in self._relays.items() if r.expires <= now]:
            relay = self._relays.pop(seq)
            if relay.nack:
                self._send_msg(
                    relay.reply_addr, wire.encode(NackResp(relay.orig_seq)), relay.reply_node
                )
        # Streams past their deadline.
        for sid in [s for s, st in self._streams.items() if st.deadline <= now]:
            self._stream_failed(self._streams.pop(sid), now)
        # The probe in flight.
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.timeout_at:
                self._probe_indirect(p, now)
            if p.indirect and now >= p.deadline:
                self._probe_finish(p, now, acked=False)
        # Suspicion timers.
        for name in [n for n, s in self._suspicions.items() if s.deadline <= now]:
            self._suspicion_expired(name, now)
        # Start the next probe (a Go ticker: a late tick fires once, then the grid resumes).
        if now >= self._next_probe and self._probe is None:
            self._next_probe = _advance(self._next_probe, cfg.probe_interval, now)
            self._probe_next(now)
        if now >= self._next_gossip:
            self._next_gossip = _advance(self._next_gossip, cfg.gossip_interval, now)
            self._gossip(now)
        if now >= self._next_push_pull:
            self._next_push_pull = now + push_pull_scale(cfg.push_pull_interval, self.num_nodes())
            self._push_pull(now)
        if now >= self._next_reconnect:
            self._next_reconnect = _advance(self._next_reconnect, cfg.reconnect_interval, now)
            self._reconnect(now)
        if self._leave is not None:
            self._advance_leave(now)

    # --- helpers ------------------------------------------------------------------------------

    def _count(self, reason: str, n: int = 1) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + n

    def _meta_bytes(self, meta: bytes | Mapping[str, str]) -> bytes:
        raw = wire.encode_serf_tags(meta) if isinstance(meta, Mapping) else bytes(meta)
        if len(raw) > wire.META_MAX_SIZE:
            raise ValueError(f"meta exceeds {wire.META_MAX_SIZE} bytes")
        return raw

    def _emit(self, kind: EventKind, node: _Node, now: float) -> None:
        if node.name != self.name:
            self._outputs.append(MemberEvent(kind, node.snapshot(), now))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _any_alive(self) -> bool:
        return any(n.name != self.name and not n.dead_or_left() for n in self._order)

    def _set_addr(self, node: _Node, addr: bytes, port: int) -> None:
        old = (wire.addr_to_ip(node.addr), node.port) if node.addr else None
        if old is not None and self._by_addr.get(old) == node.name:
            del self._by_addr[old]
        node.addr, node.port = addr, port
        self._by_addr[(wire.addr_to_ip(addr), port)] = node.name

    # --- sending ------------------------------------------------------------------------------

    def _packet_budget(self) -> int:
        cfg = self.config
        avail = cfg.udp_buffer_size - COMPOUND_HEADER_OVERHEAD - CRC_OVERHEAD
        if cfg.label:
            avail -= 2 + len(cfg.label)
        if self.keyring is not None and cfg.gossip_verify_outgoing:
            avail -= Keyring.overhead(cfg.encryption_version)
        return avail

    def _wants_crc(self, addr: Addr, node_name: str = "") -> bool:
        node = self._nodes.get(node_name) if node_name else None
        if node is None:
            name = self._by_addr.get(addr)
            node = self._nodes.get(name) if name is not None else None
        return node is not None and node.pmax >= 5

    def _raw_send(self, addr: Addr, msg: bytes, node_name: str = "") -> None:
        cfg = self.config
        keyring = self.keyring if cfg.gossip_verify_outgoing else None
        data = wire.encode_packet(
            msg,
            compress=cfg.enable_compression,
            crc=self._wants_crc(addr, node_name),
            keyring=keyring,
            encryption_version=cfg.encryption_version,
            label=cfg.label,
        )
        self._outputs.append(SendPacket(addr, data))

    def _send_msg(self, addr: Addr, msg: bytes, node_name: str = "") -> None:
        """memberlist ``sendMsg``: piggyback pending broadcasts on ``msg``."""
        avail = self._packet_budget() - COMPOUND_OVERHEAD - len(msg)
        extra = self._get_broadcasts(COMPOUND_OVERHEAD, avail, wire.COMPOUND_MAX_PARTS - 1)
        if extra:
            msg = wire.make_compound([msg, *extra])
        self._raw_send(addr, msg, node_name)

    def _get_broadcasts(self, overhead: int, limit: int, max_count: int) -> list[bytes]:
        """memberlist ``getBroadcasts``: membership messages first, then Serf user messages."""
        if limit <= overhead:
            return []
        out = self.broadcasts.get_broadcasts(overhead, limit, max_count)
        used = sum(len(m) + overhead for m in out)
        avail = limit - used
        if avail > overhead + USER_MSG_OVERHEAD and len(out) < max_count:
            for m in self.user_broadcasts.get_broadcasts(
                overhead + USER_MSG_OVERHEAD, avail, max_count - len(out)
            ):
                out.append(bytes((MessageType.USER,)) + m)
        return out

    def _broadcast(self, node: str, body: Alive | Suspect | Dead) -> None:
        self.broadcasts.queue(node, wire.encode(body))

    def _encode_stream(self, msg: bytes) -> bytes:
        cfg = self.config
        return wire.encode_stream(
            msg,
            compress=cfg.enable_compression,
            keyring=self.keyring if cfg.gossip_verify_outgoing else None,
            encryption_version=cfg.encryption_version,
            label=cfg.label,
        )

    def _open_stream(self, st: _Stream, data: bytes) -> int:
        self._stream_seq += 1
        sid = self._stream_seq
        self._streams[sid] = st
        self._outputs.append(OpenStream(sid, st.addr, data, st.purpose, st.deadline))
        return sid

    # --- node selection -----------------------------------------------------------------------

    def _k_random_nodes(self, k: int, exclude: Callable[[_Node], bool]) -> list[_Node]:
        """memberlist ``kRandomNodes``."""
        nodes = self._order
        n = len(nodes)
        out: list[_Node] = []
        if k <= 0 or n == 0:
            return out
        if n < 3 * k:
            shuffled = list(nodes)
            self.rng.shuffle(shuffled)
            for node in shuffled:
                if len(out) >= k:
                    break
                if not exclude(node):
                    out.append(node)
            return out
        for _ in range(3 * n):
            if len(out) >= k:
                break
            node = nodes[self.rng.randrange(n)]
            if exclude(node) or any(o.name == node.name for o in out):
                continue
            out.append(node)
        return out

    # --- probing ------------------------------------------------------------------------------

    def _probe_next(self, now: float) -> None:
        """memberlist ``probe``: the next probe-able member, reshuffling on wrap."""
        checked = 0
        while checked < len(self._order):
            if self._probe_index >= len(self._order):
                self._reset_nodes(now)
                self._probe_index = 0
                checked += 1
                continue
            node = self._order[self._probe_index]
            self._probe_index += 1
            if node.name == self.name or node.dead_or_left():
                checked += 1
                continue
            self._probe_node(node, now)
            return

    def _reset_nodes(self, now: float) -> None:
        """memberlist ``resetNodes``: reap the long dead, shuffle the rest."""
        ttl = self.config.gossip_to_the_dead_time
        keep: list[_Node] = []
        for node in self._order:
            if node.dead_or_left() and now - node.state_change > ttl and node.name != self.name:
                del self._nodes[node.name]
                addr = (node.ip, node.port)
                if self._by_addr.get(addr) == node.name:
                    del self._by_addr[addr]
                self._suspicions.pop(node.name, None)
                self._emit("reap", node, now)
            else:
                keep.append(node)
        self._order = keep
        self.rng.shuffle(self._order)

    def _scaled_interval(self) -> float:
        return self.config.probe_interval * (self._health + 1)

    def _probe_node(self, node: _Node, now: float) -> None:
        cfg = self.config
        seq = self._next_seq()
        ping = Ping(seq, node.name, self._addr_bytes, self.port, self.name)
        addr = node.address
        self._probe = _Probe(
            node.name, seq, now, now + cfg.probe_timeout, now + self._scaled_interval()
        )
        if node.state == State.ALIVE:
            self._send_msg(addr, wire.encode(ping), node.name)
        else:
            # Buddy system: let a suspect refute as early as possible.
            msgs = [
                wire.encode(ping),
                wire.encode(Suspect(node.incarnation, node.name, self.name)),
            ]
            self._raw_send(addr, wire.make_compound(msgs), node.name)

    def _probe_indirect(self, p: _Probe, now: float) -> None:
        cfg = self.config
        p.indirect = True
        target = self._nodes.get(p.target)
        if target is None:
            return
        peers = self._k_random_nodes(
            cfg.indirect_checks,
            lambda n: n.name in (self.name, p.target) or n.state != State.ALIVE,
        )
        for peer in peers:
            nack = peer.pmax >= 4
            if nack:
                p.expected_nacks += 1
            ind = IndirectPing(
                p.seq, target.addr, target.port, target.name, nack,
                self._addr_bytes, self.port, self.name,
            )  # fmt: skip
            self._send_msg(peer.address, wire.encode(ind), peer.name)
        if not cfg.disable_tcp_pings and target.pmax >= 3:
            ping = Ping(p.seq, target.name, self._addr_bytes, self.port, self.name)
            st = _Stream("ping", target.address, p.deadline, seq=p.seq)
            p.tcp_stream = self._open_stream(st, self._encode_stream(wire.encode(ping)))

    def _probe_finish(self, p: _Probe, now: float, *, acked: bool) -> None:
        self._probe = None
        if p.tcp_stream is not None:
            self._streams.pop(p.tcp_stream, None)
        if acked or p.tcp_ok:
            if not acked:
                self._count("tcp_fallback_ok")
            self._apply_health(-1)
            return
        delta = max(0, p.expected_nacks - p.nacks) if p.expected_nacks > 0 else 1
        self._apply_health(delta)
        node = self._nodes.get(p.target)
        if node is None:
            return
        self._suspect_node(Suspect(node.incarnation, node.name, self.name), now)

    def _apply_health(self, delta: int) -> None:
        top = self.config.awareness_max_multiplier - 1
        self._health = min(top, max(0, self._health + delta))

    # --- gossip, push/pull, reconnect ---------------------------------------------------------

    def _gossip(self, now: float) -> None:
        ttl = self.config.gossip_to_the_dead_time

        def exclude(n: _Node) -> bool:
            if n.name == self.name:
                return True
            if n.state in (State.ALIVE, State.SUSPECT):
                return False
            if n.state == State.DEAD:
                return now - n.state_change > ttl
            return True

        targets = self._k_random_nodes(self.config.gossip_nodes, exclude)
        avail = self._packet_budget()
        for node in targets:
            msgs = self._get_broadcasts(COMPOUND_OVERHEAD, avail, wire.COMPOUND_MAX_PARTS)
            if not msgs:
                return
            msg = msgs[0] if len(msgs) == 1 else wire.make_compound(msgs)
            self._raw_send(node.address, msg, node.name)

    def _push_pull(self, now: float) -> None:
        nodes = self._k_random_nodes(1, lambda n: n.name == self.name or n.state != State.ALIVE)
        if nodes:
            self._start_push_pull(nodes[0].address, now, join=False)

    def _start_push_pull(self, addr: Addr, now: float, *, join: bool) -> int:
        st = _Stream("join" if join else "push_pull", addr, now + self.config.tcp_timeout,
                     join=join)  # fmt: skip
        return self._open_stream(st, self._encode_stream(self._local_state(join)))

    def _reconnect(self, now: float) -> None:
        """Serf ``reconnect``: join a random failed member with probability failed/alive."""
        cfg = self.config
        for name in [n for n, f in self._failed.items() if now - f.since > cfg.reconnect_timeout]:
            del self._failed[name]
        if not self._failed or self._leave is not None:
            return
        num_alive = sum(1 for n in self._order if not n.dead_or_left()) or 1
        if self.rng.random() > len(self._failed) / num_alive:
            return
        failed = list(self._failed.values())
        target = failed[self.rng.randrange(len(failed))]
        self._count("reconnect_attempt")
        self._start_push_pull(target.address, now, join=True)

    def _stream_failed(self, st: _Stream, now: float) -> None:
        self._count(f"{st.purpose}_failed")

    def _local_state(self, join: bool) -> bytes:
        states = [
            PushNodeState(
                n.name, n.addr, n.port, n.meta, n.incarnation, int(_WIRE_STATE[n.state]), n.vsn
            )
            for n in self._order
        ]
        user = b""
        if self.config.serf_compat:
            user = wire.encode_serf_message(SerfPushPull(ltime=self.serf_clock.time()))
        return wire.encode_push_pull(PushPull(join, states, user))

    def _verify_protocol(self, remote: list[PushNodeState]) -> bool:
        """memberlist ``verifyProtocol``."""
        maxpmin = maxdmin = 0
        minpmax = mindmax = 255
        vsns = [r.vsn for r in remote if r.state == NodeState.ALIVE]
        vsns += [n.vsn for n in self._order if n.state == State.ALIVE]
        for v in vsns:
            maxpmin, minpmax = max(maxpmin, v[0]), min(minpmax, v[1])
            maxdmin, mindmax = max(maxdmin, v[3]), min(mindmax, v[4])
        for v in [r.vsn for r in remote] + [n.vsn for n in self._order]:
            if not maxpmin <= v[2] <= minpmax or not maxdmin <= v[5] <= mindmax:
                return False
        return True

    def _merge_remote(self, pp: PushPull, now: float) -> None:
        """memberlist ``mergeRemoteState`` + Serf ``MergeRemoteState`` (clock witnessing)."""
        for r in pp.nodes:
            if r.port == 0:
                r.port = self.port  # memberlist: a missing port means our bind port
        if not self._verify_protocol(pp.nodes):
            self._count("incompatible_protocol")
            return
        for r in pp.nodes:
            if r.state == NodeState.ALIVE:
                a = Alive(r.incarnation, r.name, r.addr, r.port, r.meta, r.vsn)
                self._alive_node(a, now)
            elif r.state == NodeState.LEFT:
                self._dead_node(Dead(r.incarnation, r.name, r.name), now)
            elif r.state in (NodeState.DEAD, NodeState.SUSPECT):
                self._suspect_node(Suspect(r.incarnation, r.name, self.name), now)
            else:
                self._count("unknown_node_state")
        if pp.user_state:
            self._merge_serf_state(pp.user_state)

    def _merge_serf_state(self, user_state: bytes) -> None:
        try:
            spp = wire.decode_serf_push_pull(user_state)
        except WireError as exc:
            self._count(exc.reason)
            return
        if spp.ltime > 0:
            self.serf_clock.witness(spp.ltime - 1)
        for name, ltime in sorted(spp.status_ltimes.items()):
            self.serf_clock.witness(ltime)
            if ltime > self._intent_ltimes.get(name, 0):
                self._intent_ltimes[name] = ltime
        for name in spp.left_members:
            self.serf_clock.witness(spp.status_ltimes.get(name, 0) + 1)

    # --- inbound messages ---------------------------------------------------------------------

    def _handle_message(
        self, msg_type: MessageType, body: wire.Body, from_addr: Addr, now: float
    ) -> None:
        if isinstance(body, Ping):
            self._handle_ping(body, from_addr)
        elif isinstance(body, IndirectPing):
            self._handle_indirect_ping(body, from_addr, now)
        elif isinstance(body, AckResp):
            self._handle_ack(body, now)
        elif isinstance(body, NackResp):
            p = self._probe
            if p is not None and p.seq == body.seq_no and p.indirect:
                p.nacks += 1
            else:
                self._count("unknown_nack")
        elif isinstance(body, Suspect):
            self._suspect_node(body, now)
        elif isinstance(body, Alive):
            self._alive_node(body, now)
        elif isinstance(body, Dead):
            self._dead_node(body, now)
        elif isinstance(body, UserMsg):
            self._handle_user(body.payload, now)
        else:  # pragma: no cover - decode_packet yields only the leaves above
            self._count("unexpected_type")

    def _handle_ping(self, ping: Ping, from_addr: Addr) -> None:
        if ping.node and ping.node != self.name:
            self._count("ping_wrong_node")
            return
        if ping.source_addr and ping.source_port:
            dest = (wire.addr_to_ip(ping.source_addr), ping.source_port)
        else:
            dest = from_addr
        self._send_msg(dest, wire.encode(AckResp(ping.seq_no, None)), ping.source_node)

    def _handle_indirect_ping(self, ind: IndirectPing, from_addr: Addr, now: float) -> None:
        port = ind.port or self.port
        if ind.source_addr and ind.source_port:
            reply = (wire.addr_to_ip(ind.source_addr), ind.source_port)
        else:
            reply = from_addr
        target = (wire.addr_to_ip(ind.target), port)
        seq = self._next_seq()
        self._relays[seq] = _Relay(
            ind.seq_no, reply, ind.source_node, ind.nack, now + self.config.probe_timeout
        )
        ping = Ping(seq, ind.node, self._addr_bytes, self.port, self.name)
        self._send_msg(target, wire.encode(ping), ind.node)

    def _handle_ack(self, ack: AckResp, now: float) -> None:
        relay = self._relays.pop(ack.seq_no, None)
        if relay is not None:
            self._send_msg(relay.reply_addr, wire.encode(AckResp(relay.orig_seq, None)),
                           relay.reply_node)  # fmt: skip
            return
        p = self._probe
        if p is not None and p.seq == ack.seq_no and now <= p.deadline:
            self._probe_finish(p, now, acked=True)
            return
        self._count("unknown_ack")

    def _handle_user(self, payload: bytes, now: float) -> None:
        if not payload:
            self._count("empty_user_msg")
            return
        t = payload[0]
        if t not in (wire.SerfMessageType.LEAVE, wire.SerfMessageType.JOIN):
            self._count("serf_msg_ignored" if t <= max(wire.SerfMessageType) else "user_unknown")
            return
        try:
            _, body = wire.decode_serf_message(payload)
        except WireError as exc:
            self._count(exc.reason)
            return
        assert isinstance(body, SerfLeave | SerfJoin)
        self.serf_clock.witness(body.ltime)
        self._count("serf_intent")
        if body.ltime <= self._intent_ltimes.get(body.node, 0):
            return
        self._intent_ltimes[body.node] = body.ltime
        if body.node == self.name:
            if isinstance(body, SerfLeave) and self._leave is None:
                # Serf refutes a stale leave intent about itself with a join intent.
                ltime = self.serf_clock.time()
                self._intent_ltimes[self.name] = ltime
                msg = wire.encode_serf_message(SerfJoin(ltime, self.name))
                self.user_broadcasts.queue(("serf-intent", self.name), msg)
            return
        if self.config.serf_compat:
            # Relay once (Serf rebroadcasts intents it had not seen).
            self.user_broadcasts.queue(("serf-intent", body.node), bytes(payload))

    # --- state machine (memberlist aliveNode / suspectNode / deadNode) ------------------------

    def _alive_node(self, a: Alive, now: float, *, bootstrap: bool = False) -> None:
        is_local = a.node == self.name
        if is_local and self._leave is not None and not bootstrap:
            return
        pmin, pmax = a.vsn[0], a.vsn[1]
        if pmin == 0 or pmax == 0 or pmin > pmax:
            self._count("bad_vsn")
            return
        node = self._nodes.get(a.node)
        updates_node = False
        if node is None:
            node = _Node(a.node, b"", a.port, a.meta, a.vsn)
            self._nodes[a.node] = node
            self._set_addr(node, a.addr, a.port)
            # Insert at a random offset (keeps the detection bound low on average).
            n = len(self._order)
            self._order.append(node)
            if n:
                off = self.rng.randrange(n)
                self._order[off], self._order[n] = self._order[n], self._order[off]
        elif node.addr != a.addr or node.port != a.port:
            reclaim = (
                self.config.dead_node_reclaim_time > 0
                and now - node.state_change > self.config.dead_node_reclaim_time
            )
            if node.state == State.LEFT or (node.state == State.DEAD and reclaim):
                updates_node = True
            else:
                self._count("addr_conflict")
                return
        if a.incarnation <= node.incarnation and not is_local and not updates_node:
            return
        if a.incarnation < node.incarnation and is_local:
            return
        self._suspicions.pop(a.node, None)
        old_state, old_meta = node.state, node.meta
        if not bootstrap and is_local:
            if a.incarnation == node.incarnation and a.meta == node.meta and a.vsn == node.vsn:
                return
            self._refute(node, a.incarnation)
            return
        self._broadcast(a.node, a)
        node.vsn = a.vsn
        node.incarnation = a.incarnation
        node.meta = a.meta
        if updates_node or node.addr != a.addr or node.port != a.port:
            self._set_addr(node, a.addr, a.port)
        if node.state != State.ALIVE:
            node.state = State.ALIVE
            node.state_change = now
        if is_local:
            return
        self._failed.pop(a.node, None)
        if old_state in (State.DEAD, State.LEFT):
            self._emit("join", node, now)
        elif old_state == State.SUSPECT:
            self._emit("alive", node, now)
        if old_meta != node.meta and old_state not in (State.DEAD, State.LEFT):
            self._emit("update", node, now)

    def _refute(self, me: _Node, accused: int) -> None:
        inc = self._incarnation + 1
        if accused >= inc:
            inc = accused + 1
        self._incarnation = inc
        me.incarnation = inc
        self._apply_health(1)
        self._count("refutations")
        self._broadcast(me.name, Alive(inc, me.name, me.addr, me.port, me.meta, me.vsn))

    def _suspect_node(self, s: Suspect, now: float) -> None:
        node = self._nodes.get(s.node)
        if node is None or s.incarnation < node.incarnation:
            return
        timer = self._suspicions.get(s.node)
        if timer is not None:
            if timer.confirm(s.from_node):
                self._broadcast(s.node, s)
                if timer.deadline <= now:
                    self._suspicion_expired(s.node, now)
            return
        if node.state != State.ALIVE:
            return
        if node.name == self.name:
            self._refute(node, s.incarnation)
            return
        self._broadcast(s.node, s)
        node.incarnation = s.incarnation
        node.state = State.SUSPECT
        node.state_change = now
        cfg = self.config
        k = cfg.suspicion_mult - 2
        n = self.num_nodes()
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(cfg.suspicion_mult, n, cfg.probe_interval)
        hi = cfg.suspicion_max_timeout_mult * lo
        self._suspicions[s.node] = _Suspicion(s.from_node, k, lo, hi, now, now)
        self._emit("suspect", node, now)

    def _suspicion_expired(self, name: str, now: float) -> None:
        timer = self._suspicions.pop(name, None)
        node = self._nodes.get(name)
        if timer is None or node is None:
            return
        if node.state == State.SUSPECT and node.state_change == timer.state_change:
            self._count("suspicion_timeouts")
            self._dead_node(Dead(node.incarnation, name, self.name), now)

    def _dead_node(self, d: Dead, now: float) -> None:
        node = self._nodes.get(d.node)
        if node is None or d.incarnation < node.incarnation:
            return
        self._suspicions.pop(d.node, None)
        if node.dead_or_left():
            return
        if node.name == self.name:
            if self._leave is None:
                self._refute(node, d.incarnation)
                return
            leave = self._leave

            def done() -> None:
                leave.dead_done = True

            self.broadcasts.queue(d.node, wire.encode(d), done)
        else:
            self._broadcast(d.node, d)
        node.incarnation = d.incarnation
        node.state = State.LEFT if d.node == d.from_node else State.DEAD
        node.state_change = now
        if node.name == self.name:
            return
        if node.state == State.DEAD:
            self._failed[node.name] = _Failed(node.name, node.address, now)
            self._emit("failed", node, now)
        else:
            self._failed.pop(node.name, None)
            self._emit("leave", node, now)

    # --- leave --------------------------------------------------------------------------------

    def _advance_leave(self, now: float) -> None:
        lv = self._leave
        assert lv is not None
        cfg = self.config
        if lv.phase == "intent" and (lv.intent_done or now >= lv.phase_deadline):
            # Never let the intent share a packet with the dead that follows it.
            self.user_broadcasts.remove(("serf-intent", self.name))
            lv.phase = "dead"
            lv.phase_deadline = now + cfg.broadcast_timeout
            me = self._nodes[self.name]
            if self._any_alive():
                self._dead_node(Dead(me.incarnation, self.name, self.name), now)
            else:
                lv.dead_done = True
                me.state, me.state_change = State.LEFT, now
        if lv.phase == "dead" and (lv.dead_done or now >= lv.phase_deadline):
            lv.phase = "propagate"
            lv.phase_deadline = now + cfg.leave_propagate_delay
        if lv.phase == "propagate" and now >= lv.phase_deadline:
            lv.phase = "done"
            lv.phase_deadline = math.inf


def _advance(t: float, interval: float, now: float) -> float:
    """Next point of the grid ``t + k x interval`` strictly after ``now``."""
    if interval <= 0:
        return math.inf
    if now < t:
        return t
    return t + (math.floor((now - t) / interval) + 1) * interval
