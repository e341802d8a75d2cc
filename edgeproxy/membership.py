"""Fleet membership by gossip: the embedded gossip member of a worker (config ``[gossip]``).

Every worker of every PoP is one member of a Serf-compatible SWIM cluster
(:class:`gossip.agent.GossipAgent`), named after its node (``identity.node_name``: the PoP id, or
``pop-id/host/worker``) and tagged with what the other PoPs need (:func:`member_tags`):

========== =============================================================
tag        value
========== =============================================================
role       ``edgeproxy``
pop        the PoP id (``[pop] id``)
pop_index  ``[quic_lb] pop_index``
host_index ``[quic_lb] host_index``
worker     the worker index
backhaul   the worker's backhaul address ``host:port`` (absent: none)
flow       the worker's flow-channel address ``host:port``
flowport   its port alone (what :meth:`gossip.flowchannel.FlowChannel.attach` reads)
region     ``[gossip] region``
========== =============================================================

:class:`GossipMembership` is the QUIC dispatcher's ``Membership``. It starts from the static
configuration (``[backhaul] peers``) and applies membership events:

* a member that joins (or is alive again) makes its PoP alive (``mark_alive``) and teaches its
  node's backhaul address, its PoP id and index (so ``[backhaul] peers`` need not list it);
* when *every* known member of a PoP is failed or left, the PoP is dead (``mark_dead``): the
  dispatcher answers packets of its connections with stateless resets. One worker of a PoP
  failing does not kill the PoP (its siblings still serve; its own connections are gone anyway
  and packets for them are forwarded and dropped there);
* suspect members stay alive (SWIM's suspicion is not a verdict).

Who can declare a PoP dead is whoever can speak gossip: with a keyring only holders of the key;
with an empty keyring gossip is plaintext and **unauthenticated**, so anyone who can reach the
gossip port can make the fleet reset a PoP's connections. Run with a keyring.

The flow channel (:class:`gossip.flowchannel.FlowChannel`) carries the flow table's replication
to every alive or suspect member (their ``flow`` tag), scoped by ``[gossip] flow_scope``. It is
sealed with a key derived from the fleet key (:func:`flow_keyring`), so flow ownership cannot be
forged even when gossip is plaintext.

Ports: worker ``i`` binds the gossip port + 2*i and the flow port + 2*i (flow port 0: its gossip
port + 1), so one host's workers never collide with the defaults 7946 and 7947.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gossip.agent import GossipAgent
from gossip.flowchannel import FlowChannel
from gossip.flowtable import FlowReplicator, FlowTable
from gossip.keyring import Keyring
from gossip.swim import Config as SwimConfig
from gossip.swim import Member, MemberEvent, State

from .config import GossipSection, parse_advertise, parse_hostport
from .quic.backhaul import Peer, StaticMembership
from .quic.dispatcher import NodeId
from .quic.fleet import FleetKeys

__all__ = [
    "FleetGossip",
    "FleetMember",
    "GossipMembership",
    "flow_keyring",
    "member_tags",
]

log = logging.getLogger("edgeproxy.membership")

Addr = tuple[str, int]
ROLE = "edgeproxy"
FLOW_KEY_LABEL = b"edgeproxy flow channel v1"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _fmt(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def member_tags(
    *,
    pop: str,
    pop_index: int,
    host_index: int,
    worker: int,
    backhaul: Addr | None,
    flow: Addr | None,
    region: str,
) -> dict[str, str]:
    tags = {
        "role": ROLE,
        "pop": pop,
        "pop_index": str(pop_index),
        "host_index": str(host_index),
        "worker": str(worker),
        "region": region,
    }
    if backhaul is not None:
        tags["backhaul"] = _fmt(backhaul)
    if flow is not None:
        tags["flow"] = _fmt(flow)
        tags["flowport"] = str(flow[1])
    return tags


@dataclass(frozen=True, slots=True)
class FleetMember:
    """An edgeproxy worker as its gossip tags describe it."""

    name: str
    pop: str
    node: NodeId
    backhaul: Addr | None
    flow: Addr | None
    region: str

    @classmethod
    def from_member(cls, m: Member) -> FleetMember | None:
        """None for members that are not edgeproxy workers (or carry malformed tags)."""
        tags = m.tags
        if tags.get("role") != ROLE:
            return None
        try:
            node = (int(tags["pop_index"]), int(tags["host_index"]), int(tags["worker"]))
            backhaul = parse_hostport(tags["backhaul"]) if tags.get("backhaul") else None
            flow = parse_hostport(tags["flow"]) if tags.get("flow") else None
        except (KeyError, ValueError):
            return None
        pop = tags.get("pop", "")
        if not pop or min(node) < 0:
            return None
        return cls(m.name, pop, node, backhaul, flow, tags.get("region", ""))


class GossipMembership(StaticMembership):
    """`StaticMembership` driven by gossip events (see the module docstring)."""

    def __init__(
        self,
        *,
        node: NodeId,
        name: str,
        listen: Addr | None,
        workers: int = 1,
        peers: Iterable[Peer] = (),
        on_change: Callable[[int, bool], None] | None = None,
    ) -> None:
        super().__init__(node=node, name=name, listen=listen, workers=workers, peers=peers)
        self.on_change = on_change
        self._node_addrs: dict[NodeId, Addr] = {}
        # gossip member name -> (what its tags said, alive?)
        self._members: dict[str, tuple[FleetMember, bool]] = {}
        self._verdicts: dict[int, bool] = {}  # pop -> alive, as last reported to on_change

    # -- events --------------------------------------------------------------------------------

    def apply(self, member: Member) -> None:
        """Take in one member's current state (from any event about it)."""
        fm = FleetMember.from_member(member)
        if fm is None:
            return
        alive = member.state in (State.ALIVE, State.SUSPECT)
        previous = self._members.get(member.name)
        self._members[member.name] = (fm, alive)
        pop = fm.node[0]
        if pop == self.node[0]:
            if fm.node != self.node:
                if alive and fm.backhaul is not None:
                    self._node_addrs[fm.node] = fm.backhaul
                elif not alive:
                    self._node_addrs.pop(fm.node, None)
            return
        self._pops.add(pop)
        self._names[fm.pop] = pop
        if previous is not None and previous[0].node != fm.node:
            self._update_pop(previous[0].node[0])
        if alive and fm.backhaul is not None:
            self._node_addrs[fm.node] = fm.backhaul
        elif not alive:
            self._node_addrs.pop(fm.node, None)  # no tickets to, no forwards toward a dead node
        self._update_pop(pop)

    def forget(self, member: Member) -> None:
        """A reaped member: no longer counts for its PoP's liveness (a PoP whose members were
        all dead stays dead)."""
        entry = self._members.pop(member.name, None)
        if entry is not None:
            self._update_pop(entry[0].node[0])

    def on_event(self, ev: MemberEvent) -> None:
        if ev.kind == "reap":
            self.forget(ev.member)
        else:
            self.apply(ev.member)

    def _update_pop(self, pop: int) -> None:
        if pop == self.node[0]:
            return
        states = [alive for fm, alive in self._members.values() if fm.node[0] == pop]
        if not states:
            return
        alive = any(states)
        if alive:
            self.mark_alive(pop)
        else:
            self.mark_dead(pop)
        if self._verdicts.get(pop) != alive:
            self._verdicts[pop] = alive
            log.info("gossip: PoP %d is %s", pop, "alive" if alive else "dead")
            if self.on_change is not None:
                self.on_change(pop, alive)

    # -- lookups -------------------------------------------------------------------------------

    def backhaul_address(self, node: NodeId) -> tuple[str, int] | None:
        addr = self._node_addrs.get(node)
        if addr is not None:
            return addr
        return super().backhaul_address(node)

    def nodes(self) -> list[NodeId]:
        out = super().nodes()
        seen = set(out)
        for node in self._node_addrs:
            if node != self.node and node not in seen:
                out.append(node)
                seen.add(node)
        return out

    def members(self) -> dict[str, dict[str, Any]]:
        """For status pages: member name -> node, alive."""
        return {n: {"node": list(fm.node), "pop": fm.pop, "alive": alive} for n, (fm, alive) in self._members.items()}


def flow_keyring(keys: FleetKeys) -> Keyring:
    """The flow channel's AES-256 keyring derived from the fleet keys (primary first, so
    rotating the fleet key rotates it)."""

    def derive(secret: bytes) -> bytes:
        return HKDF(algorithm=SHA256(), length=32, salt=None, info=FLOW_KEY_LABEL).derive(secret)

    primary = keys.primary
    extra = [derive(k.secret) for kid, k in sorted(keys.keys.items()) if kid != primary.key_id]
    return Keyring(derive(primary.secret), extra)


def worker_port(port: int, worker: int) -> int:
    """Worker i's port: port + 2*i (0 stays 0: any port)."""
    return port + 2 * worker if port else 0


class FleetGossip:
    """One worker's gossip member and flow channel, wired to a `GossipMembership`."""

    def __init__(
        self,
        section: GossipSection,
        *,
        name: str,
        pop: str,
        node: NodeId,
        worker: int,
        membership: GossipMembership,
        flows: FlowTable,
        fleet_keys: FleetKeys,
        backhaul: Addr | None,
        keyring: Keyring | None,
        swim_config: SwimConfig | None = None,
        flow_gossip_interval: float = 0.5,
    ) -> None:
        self.section = section
        self.name = name
        self.worker = worker
        self.membership = membership
        self.flows = flows
        bind_host, bind_port = parse_hostport(section.bind)
        self._bind = (bind_host, worker_port(bind_port, worker))
        if section.advertise:
            adv_host, adv_port = parse_advertise(section.advertise)
            self._advertise: Addr | None = (adv_host, worker_port(adv_port, worker))
        else:
            self._advertise = None
        self._adv_host = self._advertise[0] if self._advertise else _WILDCARDS.get(bind_host, bind_host)
        if backhaul is not None and backhaul[0] in _WILDCARDS:
            backhaul = (self._adv_host, backhaul[1])
        self._backhaul = backhaul
        self._pop = pop
        self._node = node
        if swim_config is None:
            swim_config = {"lan": SwimConfig.lan, "wan": SwimConfig.wan, "local": SwimConfig.local}[section.profile]()
        self.agent = GossipAgent(name, self._bind, self._advertise, {}, keyring, swim_config)
        self.replicator = FlowReplicator(
            flows, flow_keyring(fleet_keys), region=section.region,
            scope=cast(Literal["all", "region"], section.flow_scope),
        )
        self.channel: FlowChannel | None = None
        self._flow_gossip_interval = flow_gossip_interval
        self._join_task: asyncio.Task[int] | None = None
        self._stopped = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.agent.tags = self._tags(None)
        await self.agent.start()
        try:
            if self.section.flow_port:
                flow_port = worker_port(self.section.flow_port, self.worker)
            else:  # the gossip port + 1, or any port when the gossip port was any
                flow_port = self.agent.bound[1] + 1 if self._bind[1] else 0
            self.channel = FlowChannel(
                self.replicator, (self._bind[0], flow_port),
                gossip_interval=self._flow_gossip_interval, clock=loop.time,
            )
            await self.channel.start()
            flow = (self._adv_host, self.channel.address[1])
            self.agent.update_tags(self._tags(flow))
        except BaseException:
            await self.stop(leave=False)
            raise
        self.agent.add_listener(self._on_event)
        self._sync()
        if self.section.join:
            self._join_task = loop.create_task(
                self.agent.retry_join(self.section.join, self.section.retry_interval, self.section.retry_max)
            )

    def _tags(self, flow: Addr | None) -> dict[str, str]:
        return member_tags(
            pop=self._pop, pop_index=self._node[0], host_index=self._node[1], worker=self._node[2],
            backhaul=self._backhaul, flow=flow, region=self.section.region,
        )

    @property
    def address(self) -> Addr:
        return self.agent.address

    async def join(self, seeds: Iterable[Addr | str]) -> int:
        return await self.agent.join(list(seeds))

    def _on_event(self, ev: MemberEvent) -> None:
        self.membership.on_event(ev)
        self._sync()

    def _sync(self) -> None:
        """Flow-channel peers: every alive or suspect edgeproxy member, at its `flow` tag."""
        if self.channel is None or not self.agent.running:
            return
        peers: dict[str, tuple[Addr, str]] = {}
        for m in self.agent.members():
            if m.name == self.name or m.state not in (State.ALIVE, State.SUSPECT):
                continue
            fm = FleetMember.from_member(m)
            if fm is None or fm.flow is None:
                continue
            host = fm.flow[0]
            if host in _WILDCARDS:
                host = m.addr
            peers[m.name] = ((host, fm.flow[1]), fm.region)
        self.channel.set_peers(peers)

    async def stop(self, *, leave: bool = True) -> None:
        """Graceful (`leave`: Serf's leave intent, so the others mark this node left at once)
        or hard (the others detect the failure). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._join_task is not None:
            self._join_task.cancel()
            await asyncio.gather(self._join_task, return_exceptions=True)
        self.agent.remove_listener(self._on_event)
        if leave and self.agent.running:
            t0 = time.monotonic()
            ok = await self.agent.leave()
            log.info("%s: left the cluster in %.2fs (%s)", self.name, time.monotonic() - t0, "ok" if ok else "timed out")
        await self.agent.stop()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.stop()

    def status(self) -> dict[str, Any]:
        members = []
        if self.agent.running:
            for m in self.agent.members():
                members.append({"name": m.name, "address": _fmt((m.addr, m.port)), "state": str(m.state), "tags": m.tags})
        return {
            "enabled": True,
            "name": self.name,
            "members": members,
            "dead_pops": sorted(p for p in self.membership._pops if self.membership.is_alive(p) is False),
        }
