"""The backhaul: the UDP channel between the nodes (PoPs, and worker processes of one host) over
which misrouted QUIC datagrams reach the node that owns their connection, and session tickets
reach every node.

When BGP moves a client, its datagrams land at a PoP (B) without the connection. B's router
names the owner (A) from the QUIC-LB connection ID and B sends A one authenticated frame per
datagram (`forward.encode_forward`: client address, the anycast address the client used, the
datagram, sender, sequence number, timestamp, fleet key id, HMAC). A verifies it
(`forward.decode_forward` with a per-sender `ReplayWindows`), then injects the datagram into its
dispatcher as if it had arrived from the client's own address, and the connection replies
straight to the client from the anycast socket. B never answers the client itself (except with
a stateless reset when the owner is known dead, which is the router's decision). Workers of one
host that share the client-facing port with SO_REUSEPORT use the same path: each worker has its
own backhaul port (``listen port + worker index``) and its own server ID.

One socket carries two frame kinds, told apart by the first byte:

* ``0xE1`` forwarded datagram (`edgeproxy.quic.forward`);
* ``0xE2`` session ticket replica: ``0xE2 || sealed ticket`` (`tickets.FleetTicketStore`).
  The sealed ticket is AES-GCM under the fleet's ticket key, which authenticates it; replaying
  a replica only re-adds a ticket that is still valid. Replication is best effort (one
  datagram per ticket per node, not retransmitted): a node that missed a ticket does a full
  handshake for it.

Every frame is counted in ``edgeproxy_backhaul_frames_total{kind, result}`` (results ``sent``,
``send_failed``, ``received``, ``dropped_<reason>`` with the reasons of `forward.ForwardErrorReason`
plus ``no_listener``, ``unknown_kind`` and the ticket store's); the time from a forward frame's
timestamp (the sender's clock, in ms) to its injection is observed in
``edgeproxy_quic_forward_latency_seconds``.

`StaticMembership` is the membership the router consults until gossip drives it: the peers of
the configuration, every one alive until `mark_dead` (an operator or a failure detector whose
signal an attacker cannot forge: a dead verdict makes this PoP reset the peer's connections).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..metrics import Registry
from .dispatcher import NodeId, bind_udp_socket
from .fleet import FleetKeys
from .forward import VERSION as FORWARD_FRAME
from .forward import (
    ForwardError,
    ForwardSequencer,
    ReplayWindows,
    decode_forward,
    encode_forward,
)

if TYPE_CHECKING:
    from .dispatcher import QuicDispatcher

__all__ = [
    "TICKET_FRAME",
    "Backhaul",
    "Peer",
    "StaticMembership",
]

log = logging.getLogger(__name__)

TICKET_FRAME = 0xE2
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


# --------------------------------------------------------------------------------------------
# Membership
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """Another PoP host: its pop.id, indexes and the backhaul address of its worker 0."""

    name: str
    pop_index: int
    host_index: int
    address: tuple[str, int]


class StaticMembership:
    """Membership from the configuration: the dispatcher's `Membership`.

    A PoP of the configuration is alive until `mark_dead`; this node's own PoP is always alive;
    PoPs not in the configuration are unknown (None), which never triggers a reset. Worker `w`
    of a host listens on its backhaul port + `w`, for `w` below `workers`.
    """

    def __init__(
        self,
        *,
        node: NodeId,
        name: str,
        listen: tuple[str, int] | None,
        workers: int = 1,
        peers: Iterable[Peer] = (),
    ) -> None:
        self.node = node
        self.name = name
        self.workers = workers
        self._hosts: dict[tuple[int, int], tuple[str, int]] = {}
        self._pops: set[int] = {node[0]}
        self._names: dict[str, int] = {name: node[0]}
        if listen is not None:
            self._hosts[(node[0], node[1])] = listen
        for peer in peers:
            self.add_peer(peer)
        self._dead: set[int] = set()

    def add_peer(self, peer: Peer) -> None:
        self._hosts[(peer.pop_index, peer.host_index)] = peer.address
        self._pops.add(peer.pop_index)
        self._names[peer.name] = peer.pop_index

    def set_listen(self, address: tuple[str, int]) -> None:
        """This host's worker-0 backhaul address, once bound (for its sibling workers)."""
        self._hosts[(self.node[0], self.node[1])] = address

    # -- liveness ------------------------------------------------------------------------------

    def is_alive(self, pop: int) -> bool | None:
        if pop == self.node[0]:
            return True
        if pop in self._dead:
            return False
        return True if pop in self._pops else None

    def mark_dead(self, pop: int) -> None:
        """`pop` is gone: its connections get stateless resets from now on."""
        if pop != self.node[0]:
            self._dead.add(pop)

    def mark_alive(self, pop: int) -> None:
        self._dead.discard(pop)

    # -- addresses -----------------------------------------------------------------------------

    def backhaul_address(self, node: NodeId) -> tuple[str, int] | None:
        pop, host, worker = node
        base = self._hosts.get((pop, host))
        if base is None or not 0 <= worker < self.workers:
            return None
        return base[0], base[1] + worker

    def node_named(self, name: str) -> NodeId | None:
        """Inverse of `identity.node_name`: "pop-id" or "pop-id/host/worker"."""
        pop_id, _, rest = name.partition("/")
        pop = self._names.get(pop_id)
        if pop is None:
            return None
        if not rest:
            return pop, 0, 0
        host, _, worker = rest.partition("/")
        if not host.isdigit() or not worker.isdigit():
            return None
        return pop, int(host), int(worker)

    def nodes(self) -> list[NodeId]:
        """Every other node with a backhaul address (all workers of every host)."""
        out = []
        for pop, host in self._hosts:
            for worker in range(self.workers):
                if (pop, host, worker) != self.node:
                    out.append((pop, host, worker))
        return out


# --------------------------------------------------------------------------------------------
# The backhaul socket
# --------------------------------------------------------------------------------------------

TicketReceiver = Callable[[bytes], str]


class Backhaul(asyncio.DatagramProtocol):
    """One node's backhaul socket: sends forward and ticket frames, verifies and dispatches
    received ones. The dispatcher's `ForwardSink`."""

    def __init__(
        self,
        *,
        keys: FleetKeys,
        sender: bytes,
        membership: StaticMembership,
        metrics: Registry,
        max_skew: float = 5.0,
        clock: Callable[[], float] = time.time,
        max_senders: int = 4096,
    ) -> None:
        self.keys = keys
        self.sender = sender
        self.membership = membership
        self.max_skew = max_skew
        self._clock = clock
        self._sequencer = ForwardSequencer()
        self._replay = ReplayWindows(max_senders=max_senders)
        self._dispatchers: list[QuicDispatcher] = []
        self._ticket_receiver: TicketReceiver | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = asyncio.Event()
        self._frames = metrics.counter(
            "edgeproxy_backhaul_frames_total",
            "Backhaul frames by kind (forward, ticket) and result",
            ["kind", "result"],
        )
        self._latency = metrics.histogram(
            "edgeproxy_quic_forward_latency_seconds",
            "Seconds from a forwarded datagram's frame timestamp (sender clock) to its "
            "injection at the owner",
            buckets=LATENCY_BUCKETS,
        )

    # -- wiring ----------------------------------------------------------------------------------

    def add_dispatcher(self, dispatcher: QuicDispatcher) -> None:
        """Deliver forwarded datagrams to `dispatcher` (chosen by the anycast address)."""
        self._dispatchers.append(dispatcher)
        dispatcher.backhaul = self

    def set_ticket_receiver(self, receiver: TicketReceiver) -> None:
        self._ticket_receiver = receiver

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind (host, port) and return the bound address."""
        loop = asyncio.get_running_loop()
        sock = bind_udp_socket(host, port)
        try:
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        return self.local_address

    @property
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("backhaul is not bound")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self._transport is None:
            return
        self._transport.close()
        await self._closed.wait()

    # -- asyncio.DatagramProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closed.set()

    def error_received(self, exc: Exception) -> None:
        log.debug("backhaul socket error: %s", exc)

    # -- sending ---------------------------------------------------------------------------------

    def forward(
        self,
        node: NodeId,
        datagram: bytes,
        client_addr: Any,
        anycast_addr: tuple[str, int],
    ) -> bool:
        address = self.membership.backhaul_address(node)
        if address is None or self._transport is None:
            self._frames.inc("forward", "send_failed")
            return False
        now = self._clock()
        try:
            frame = encode_forward(
                datagram,
                keys=self.keys,
                sender=self.sender,
                seq=self._sequencer.next(now),
                now=now,
                client_addr=client_addr,
                anycast_addr=anycast_addr,
            )
        except ValueError:
            log.debug("cannot encode a forward frame for %s", client_addr, exc_info=True)
            self._frames.inc("forward", "send_failed")
            return False
        self._transport.sendto(frame, address)
        self._frames.inc("forward", "sent")
        return True

    def broadcast_ticket(self, sealed: bytes) -> int:
        """Send a ticket replica to every other node; how many were sent."""
        if self._transport is None:
            return 0
        frame = bytes((TICKET_FRAME,)) + sealed
        sent = 0
        for node in self.membership.nodes():
            address = self.membership.backhaul_address(node)
            if address is not None:
                self._transport.sendto(frame, address)
                sent += 1
        self._frames.inc("ticket", "sent", amount=sent)
        return sent

    # -- receiving -------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            kind = data[0] if data else -1
            if kind == FORWARD_FRAME:
                self._frames.inc("forward", self._receive_forward(data))
            elif kind == TICKET_FRAME and self._ticket_receiver is not None:
                self._frames.inc("ticket", self._ticket_receiver(data[1:]))
            else:
                self._frames.inc("unknown", "dropped_unknown_kind")
        except Exception:
            log.exception("backhaul frame from %s failed", addr)
            self._frames.inc("unknown", "dropped_internal_error")

    def _receive_forward(self, frame: bytes) -> str:
        now = self._clock()
        decoded = decode_forward(frame, self.keys, now, replay=self._replay, max_skew=self.max_skew)
        if isinstance(decoded, ForwardError):
            return f"dropped_{decoded.reason}"
        dispatcher = self._dispatcher_for(decoded.anycast_addr)
        if dispatcher is None:
            return "dropped_no_listener"
        self._latency.observe(max(0.0, now - decoded.timestamp_ms / 1000))
        dispatcher.forwarded_received(decoded.datagram, decoded.client_addr)
        return "received"

    def _dispatcher_for(self, anycast_addr: tuple[str, int]) -> QuicDispatcher | None:
        """The dispatcher serving the address the client sent to: exact match, else the same
        port (a wildcard-bound listener), else the first."""
        candidates = [d for d in self._dispatchers if d.attached]
        if not candidates:
            return None
        by_port = None
        for dispatcher in candidates:
            host, port = dispatcher.local_address
            if port == anycast_addr[1]:
                if host == anycast_addr[0]:
                    return dispatcher
                by_port = by_port or dispatcher
        return by_port or candidates[0]
