"""The asyncio shell of the flow table's replication channel (:mod:`gossip.flowtable`).

:class:`FlowChannel` owns one UDP socket (its own port, by default the gossip port + 1) and moves
the bytes of a :class:`~gossip.flowtable.FlowReplicator`:

* **Deltas at once.** The table's ``on_local_write`` hook notices local writes and
  schedules one flush for the next loop iteration, so a burst of publishes made in one callback
  goes out as a few full packets, each sent to every peer in scope.
* **Backpressure.** A flush carries at most the replicator's ``max_delta_packets``; what it
  leaves pending goes out on the next loop iteration, after inbound packets and other tasks had
  their turn. While the socket's send buffer is above ``high_water`` bytes (asyncio's
  ``pause_writing``) flushes wait for ``resume_writing``. Publishers that outrun the channel
  can check :attr:`FlowChannel.backlog` or await :meth:`FlowChannel.drained`.
* **Anti-entropy.** Every ``gossip_interval`` (jittered ±20 %) a digest goes to one random peer
  in scope; every datagram is passed to :meth:`FlowReplicator.receive` under the sender's name
  (found from its source address) and the replies go back to it.
* **Expiry.** ``table.expire(now)`` every ``expire_interval`` (50 ms: purging is about 1 us an
  entry, so a once-a-second purge of a busy table would stall the loop; small frequent purges
  of at most ``EXPIRE_BATCH`` records per loop turn keep each stall to a few milliseconds).

Peers are ``{name: ((host, port), region)}`` (:meth:`FlowChannel.set_peers`), or follow a
:class:`~gossip.agent.GossipAgent`'s membership (:meth:`FlowChannel.attach`): every alive or
suspect member is a peer at its gossip address with the port from its ``flowport`` tag, or
its gossip port + ``port_offset``; its region comes from the ``region`` tag. Datagrams from an
address that is not a peer's are dropped before decryption (``channel.unknown_addr``).

``now`` for the table is ``clock()`` (``time.monotonic`` by default): the application's
``publish``/``lookup`` calls must use the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from gossip.agent import GossipAgent
from gossip.flowtable import FlowReplicator
from gossip.swim import Addr, MemberEvent, State

__all__ = ["FLOW_PORT_TAG", "REGION_TAG", "FlowChannel"]

#: Tag a gossip member may carry to announce its flow-channel port.
FLOW_PORT_TAG = "flowport"
#: Tag carrying a member's region (for ``scope="region"`` replication).
REGION_TAG = "region"
#: Receive buffer: absorbs a flush of 64 packets from each of a dozen peers. The send buffer
#: keeps the system default: on loopback a datagram is charged to its sender until read, so a
#: small send buffer bounds the queue (and the latency) a slow receiver builds up.
RECV_BUF = 4 * 1024 * 1024
#: Records purged per loop turn at most (about 1 us each).
EXPIRE_BATCH = 2000


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, channel: FlowChannel) -> None:
        self.channel = channel

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.channel._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.channel._count("channel.udp_error")

    def pause_writing(self) -> None:
        self.channel._pause()

    def resume_writing(self) -> None:
        self.channel._resume()


class FlowChannel:
    """Runs one :class:`FlowReplicator` on a UDP socket bound to ``bind``."""

    def __init__(
        self,
        replicator: FlowReplicator,
        bind: Addr,
        peers: Mapping[str, tuple[Addr, str]] | None = None,
        *,
        gossip_interval: float = 0.5,
        expire_interval: float = 0.05,
        high_water: int = 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicator = replicator
        self.table = replicator.table
        self.bind = (str(bind[0]), int(bind[1]))
        self.gossip_interval = gossip_interval
        self.expire_interval = expire_interval
        self.high_water = high_water
        self.clock = clock
        #: The replicator's counters (one dict for the table, replicator and channel).
        self.counters = replicator.counters
        self._addrs: dict[str, Addr] = {}
        self._names: dict[Addr, str] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._gossip_handle: asyncio.TimerHandle | None = None
        self._expire_handle: asyncio.Handle | None = None
        self._paused = False
        self._drained: asyncio.Event | None = None
        self._agent: GossipAgent | None = None
        self._port_offset = 1
        self._stopped = False
        if self.table.on_local_write is not None:
            raise ValueError("the table already has a channel")
        self.table.on_local_write = self._on_local_write
        if peers:
            self.set_peers(peers)

    # --- peers ------------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, tuple[Addr, str]]) -> None:
        """Replace the peer set: ``{name: ((host, port), region)}`` (self ignored)."""
        me = self.replicator.node
        addrs: dict[str, Addr] = {}
        for name, (addr, _region) in peers.items():
            if name != me:
                addrs[name] = (_canonical_ip(addr[0]), int(addr[1]))
        self._addrs = addrs
        self._names = {a: n for n, a in addrs.items()}
        self.replicator.set_peers({n: r for n, (_a, r) in peers.items() if n != me})

    def attach(self, agent: GossipAgent, port_offset: int = 1) -> None:
        """Follow ``agent``'s membership (see the module docstring)."""
        self._agent = agent
        self._port_offset = port_offset
        agent.add_listener(self._on_member_event)
        self._sync_members()

    def _on_member_event(self, ev: MemberEvent) -> None:
        self._sync_members()

    def _sync_members(self) -> None:
        agent = self._agent
        if agent is None or not agent.running:
            return
        peers: dict[str, tuple[Addr, str]] = {}
        for m in agent.members():
            if m.state not in (State.ALIVE, State.SUSPECT) or m.name == agent.name:
                continue
            tags = m.tags
            try:
                port = int(tags[FLOW_PORT_TAG])
            except (KeyError, ValueError):
                port = m.port + self._port_offset
            if not 0 < port < 65536:
                continue
            peers[m.name] = ((m.addr, port), tags.get(REGION_TAG, ""))
        self.set_peers(peers)

    # --- life cycle -------------------------------------------------------------------------

    @property
    def address(self) -> Addr:
        """The bound ``(host, port)``."""
        if self._transport is None:
            raise RuntimeError("channel not started")
        name = self._transport.get_extra_info("sockname")
        return (str(name[0]), int(name[1]))

    @property
    def backlog(self) -> int:
        """Local writes not yet handed to the socket (versions)."""
        lo, hi = self.table.pending()
        return max(0, hi - lo)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        host, port = self.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUF)
            sock.bind((host, port))
            sock.setblocking(False)
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        transport: Any = self._transport
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=self.high_water)
        self._drained = asyncio.Event()
        self._drained.set()
        self._arm_gossip()
        self._expire_handle = loop.call_later(self.expire_interval, self._expire)
        if self.table.has_pending:
            self._schedule_flush()

    async def stop(self) -> None:
        """Close the socket and cancel the timers (pending deltas are not sent). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.table.on_local_write == self._on_local_write:
            self.table.on_local_write = None
        if self._agent is not None:
            self._agent.remove_listener(self._on_member_event)
        for h in (self._flush_handle, self._gossip_handle, self._expire_handle):
            if h is not None:
                h.cancel()
        self._flush_handle = self._gossip_handle = self._expire_handle = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._drained is not None:
            self._drained.set()

    async def drained(self, max_backlog: int = 0) -> None:
        """Wait until at most ``max_backlog`` local writes are unsent and the socket is not
        paused (backpressure for publishers that outrun the channel)."""
        while not self._stopped and (self.backlog > max_backlog or self._paused):
            assert self._drained is not None
            self._drained.clear()
            await self._drained.wait()

    # --- sending ----------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] += n

    def _on_local_write(self) -> None:
        if self._flush_handle is None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._loop is None or self._stopped or self._flush_handle is not None:
            return
        self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._stopped or self._transport is None:
            return
        if self._paused:
            self._count("channel.flush_paused")
            return  # _resume reschedules
        transport: Any = self._transport
        if transport.get_write_buffer_size() > self.high_water:
            # A loop that does not call pause_writing for datagrams: poll the buffer instead.
            self._count("channel.flush_deferred")
            assert self._loop is not None
            self._flush_handle = self._loop.call_later(0.002, self._flush)
            return
        rep = self.replicator
        packets = rep.deltas_for_peers(self.clock())
        if packets:
            self._count("channel.flushes")
            for peer in rep.peers_in_scope():
                addr = self._addrs.get(peer)
                if addr is None:
                    continue
                for p in packets:
                    self._sendto(p, addr)
        if self.table.has_pending:
            # Truncated at max_delta_packets: the rest after the loop had its turn.
            self._schedule_flush()
        elif self._drained is not None and not self._paused:
            self._drained.set()

    def _sendto(self, data: bytes, addr: Addr) -> None:
        assert self._transport is not None
        try:
            self._transport.sendto(data, addr)
        except OSError as exc:
            self._count(
                "channel.send_buffer_full" if exc.errno == errno.ENOBUFS else "channel.send_error"
            )

    def _pause(self) -> None:
        self._paused = True
        self._count("channel.paused")

    def _resume(self) -> None:
        self._paused = False
        if self.table.has_pending:
            self._schedule_flush()
        elif self._drained is not None:
            self._drained.set()

    def _arm_gossip(self) -> None:
        if self._loop is None or self._stopped or self.gossip_interval <= 0:
            return
        jitter = self.replicator.rng.uniform(0.8, 1.2)
        self._gossip_handle = self._loop.call_later(self.gossip_interval * jitter, self._gossip)

    def _gossip(self) -> None:
        self._gossip_handle = None
        if self._stopped:
            return
        try:
            peer = self.replicator.pick_gossip_peer()
            addr = self._addrs.get(peer) if peer is not None else None
            if addr is not None and not self._paused:
                self._sendto(self.replicator.digest(), addr)
        finally:
            self._arm_gossip()

    def _expire(self) -> None:
        self._expire_handle = None
        if self._stopped or self._loop is None:
            return
        more = False
        try:
            more = self.table.expire(self.clock(), limit=EXPIRE_BATCH) >= EXPIRE_BATCH
        finally:
            # A large purge (a burst of flows ending together) goes on in the next loop turn,
            # after packets and other callbacks had theirs.
            self._expire_handle = (
                self._loop.call_soon(self._expire)
                if more
                else self._loop.call_later(self.expire_interval, self._expire)
            )

    # --- receiving --------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self._stopped:
            return
        name = self._names.get(addr)
        if name is None:
            name = self._names.get((_canonical_ip(addr[0]), addr[1]))
            if name is None:
                self._count("channel.unknown_addr")
                return
        try:
            replies = self.replicator.receive(data, name, self.clock())
        except Exception:  # the core never raises on input; never let a bug kill the loop
            self._count("channel.receive_error")
            return
        for r in replies:
            self._sendto(r, addr)


def _canonical_ip(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
