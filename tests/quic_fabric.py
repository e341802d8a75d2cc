"""Test fabric: an anycast fleet of PoPs in one process, with real aioquic HTTP/3 clients.

`Fabric` simulates anycast on one machine. Its UDP socket F (127.0.0.1:port) is the only server
address a client knows. Every PoP's QUIC dispatcher is started without a client-facing socket
of its own: it sends through F's transport (so replies come from F, the "anycast address"), and
it receives client datagrams only when the fabric hands them to it, to whichever PoP is
*current* (`route_to`, switchable at any time: the BGP flap). The backhaul between PoPs is
real: UDP sockets on 127.0.0.1, authenticated frames.

Each PoP is a full `Pop` (pipeline, cache, demo origin), built from a configuration with
`[quic_lb] pop_index`, `[backhaul]` peers and one shared fleet key file. The flow table is
`SharedFlows`: one dict all PoPs read and write, i.e. a perfectly replicated flow table (the
gossip replication itself is tested elsewhere).

`FabricClient` is tests/h3_client.py's client with what these tests observe: handshakes and
0-RTT acceptance, session tickets, rebinding to a new local port, and stateless reset
detection. aioquic 1.7.2 clients do not detect stateless resets (an unknown-CID short packet
is dropped and the client waits for its idle timeout), so `ResetDetectingConnection` does what
RFC 9000 section 10.3.1 asks of an endpoint: a datagram whose last 16 bytes equal the reset
token of a connection ID the client uses from the peer ends the connection at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from aioquic.h3.connection import H3_ALPN
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import END_STATES, NetworkAddress
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import SessionTicket
from h3_client import H3Client

from edgeproxy.config import config_from_dict
from edgeproxy.demo import DemoOrigin
from edgeproxy.pop import Pop
from edgeproxy.quic.dispatcher import EdgeQuicConnection, QuicDispatcher
from edgeproxy.quic.fleet import FleetKeys
from edgeproxy.quic.identity import node_name

# --------------------------------------------------------------------------------------------
# Flow table
# --------------------------------------------------------------------------------------------


class SharedFlows:
    """A flow table every PoP sees at once: key -> (owner name, expiry)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[str, float]] = {}

    def view(self, name: str) -> FlowView:
        return FlowView(self, name)


@dataclass
class FlowView:
    """One PoP's handle on `SharedFlows` (the dispatcher's `FlowLookup`)."""

    shared: SharedFlows
    node: str

    def lookup(self, key: bytes, now: float) -> str | None:
        entry = self.shared.entries.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def publish(self, key: bytes, now: float, ttl: float) -> None:
        self.shared.entries[key] = (self.node, now + ttl)

    def delete(self, key: bytes, now: float) -> None:
        entry = self.shared.entries.get(key)
        if entry is not None and entry[0] == self.node:
            del self.shared.entries[key]


# --------------------------------------------------------------------------------------------
# The fabric
# --------------------------------------------------------------------------------------------


@dataclass
class FabricPop:
    name: str
    index: int
    pop: Pop
    dispatcher: QuicDispatcher
    origin: DemoOrigin
    crashed: bool = False

    def routes(self) -> dict[str, float]:
        """`edgeproxy_quic_datagrams_total` by route."""
        metric = self.pop.metrics.get("edgeproxy_quic_datagrams_total")
        assert metric is not None
        return {key[0]: value for key, value in metric.values.items()}  # type: ignore[attr-defined]

    def frames(self) -> dict[tuple[str, str], float]:
        metric = self.pop.metrics.get("edgeproxy_backhaul_frames_total")
        assert metric is not None
        return dict(metric.values)  # type: ignore[attr-defined]


class Fabric(asyncio.DatagramProtocol):
    """The anycast address F and the switch that decides which PoP gets client datagrams."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pops: dict[str, FabricPop] = {}
        self.current = ""
        self.delivered: Counter[str] = Counter()  # client datagrams handed to each PoP
        self.flows = SharedFlows()

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def route_to(self, name: str) -> None:
        """From now on, client datagrams arrive at PoP `name` (a BGP route change)."""
        assert name in self.pops
        self.current = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        target = self.pops.get(self.current)
        if target is None:
            return
        self.delivered[self.current] += 1
        target.dispatcher.datagram_received(data, addr)

    def __getitem__(self, name: str) -> FabricPop:
        return self.pops[name]

    def crash(self, name: str) -> None:
        """PoP `name` dies without a word: its connections fall silent (no CONNECTION_CLOSE,
        no timers), its dispatcher and backhaul stop receiving. `Pop.stop` cleans up later."""
        fp = self.pops[name]
        for protocol in fp.dispatcher.connections:
            protocol._stop_timers()
        fp.dispatcher._transport = None
        backhaul = fp.pop.backhaul
        if backhaul is not None and backhaul._transport is not None:
            backhaul._transport.close()
        fp.crashed = True


def _free_udp_ports(n: int, run: int = 1) -> list[int]:
    """`n` base ports, each the first of `run` consecutive free UDP ports on 127.0.0.1."""
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        while len(bases) < n:
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            first.bind(("127.0.0.1", 0))
            base = first.getsockname()[1]
            block = [first]
            try:
                for offset in range(1, run):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    block.append(s)
                    s.bind(("127.0.0.1", base + offset))
            except OSError:
                for s in block:
                    s.close()
                continue
            held += block
            bases.append(base)
        return bases
    finally:
        for s in held:
            s.close()


def pop_config(
    tmp_path: Path,
    name: str,
    index: int,
    names: list[str],
    ports: list[int],
    origin_port: int,
    key_file: Path,
    overrides: dict[str, Any] | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "pop": {"id": name, "state_dir": str(tmp_path / name)},
        "listen": {"http": [], "https": [], "quic": []},
        "origin_groups": [
            {"name": "demo", "servers": [f"127.0.0.1:{origin_port}"], "health": {"enabled": False}}
        ],
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access_log": ""},
        "fleet": {"key_file": str(key_file)},
        "quic_lb": {"pop_index": index},
        "backhaul": {
            "listen": f"127.0.0.1:{ports[index]}",
            "workers": workers,
            "peers": [
                {"name": other, "pop_index": i, "address": f"127.0.0.1:{ports[i]}"}
                for i, other in enumerate(names)
                if other != name
            ],
        },
    }
    for key, value in (overrides or {}).items():
        data[key] = {**data.get(key, {}), **value}
    return data


@contextlib.asynccontextmanager
async def anycast_fleet(
    tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c"), *, workers: int = 1, **overrides: Any
) -> AsyncIterator[Fabric]:
    """PoPs `names` (pop_index 0, 1, ...) behind one fabric address; the first is current.

    With `workers` > 1 every PoP runs that many worker `Pop`s, each with its own server ID and
    backhaul port; worker w of PoP "a" is the fabric's "a/w" (worker 0 is just "a"), so the
    fabric can deliver a client's datagrams to any worker, as SO_REUSEPORT hashing would.
    """
    loop = asyncio.get_running_loop()
    fabric = Fabric()
    await loop.create_datagram_endpoint(lambda: fabric, local_addr=("127.0.0.1", 0))
    assert fabric.transport is not None
    key_file = tmp_path / "fleet-keys.toml"
    FleetKeys.generate(key_file, now=time.time())
    origin = DemoOrigin()
    origin_port = await origin.listen("127.0.0.1", 0)
    ports = _free_udp_ports(len(names), workers)
    try:
        for index, name in enumerate(names):
            data = pop_config(
                tmp_path, name, index, list(names), ports, origin_port, key_file, overrides, workers
            )
            for worker in range(workers):
                pop = Pop(config_from_dict(data), worker=worker)
                node = name if worker == 0 else f"{name}/{worker}"
                pop.flows = fabric.flows.view(node_name(name, 0, worker))
                await pop.start()
                dispatcher = await pop.start_quic("127.0.0.1", 0, transport=fabric.transport)
                fabric.pops[node] = FabricPop(node, index, pop, dispatcher, origin)
        fabric.route_to(names[0])
        yield fabric
    finally:
        for fp in fabric.pops.values():
            await fp.pop.stop(grace=0.5)
        await origin.close()
        fabric.transport.close()


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class ResetDetectingConnection(EdgeQuicConnection):
    """A client connection that recognises stateless resets (RFC 9000 section 10.3.1)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stateless_reset: bytes | None = None

    def _reset_tokens(self) -> list[bytes]:
        cids = [self._peer_cid, *self._peer_cid_available]
        return [c.stateless_reset_token for c in cids if c.stateless_reset_token]

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        # A reset looks like a short header packet of at least 21 bytes ending in a token.
        if (
            len(data) >= 21
            and not data[0] & 0x80
            and self._state not in END_STATES
            and any(hmac.compare_digest(data[-16:], t) for t in self._reset_tokens())
        ):
            self.stateless_reset = bytes(data)
            self._close_event = events.ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase="stateless reset"
            )
            self._close_end()
            return
        super().receive_datagram(data, addr, now)


@dataclass(eq=False)
class Observations:
    handshakes: int = 0
    early_data_accepted: bool | None = None
    session_resumed: bool | None = None
    tickets: list[SessionTicket] = field(default_factory=list)
    reset_at: float | None = None


class FabricClient(H3Client):
    """An HTTP/3 client recording handshakes, 0-RTT acceptance and tickets."""

    def __init__(self, quic: ResetDetectingConnection, observed: Observations) -> None:
        super().__init__(quic)
        self.reset_quic = quic
        self.observed = observed
        self.terminated = asyncio.Event()

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.observed.handshakes += 1
            self.observed.early_data_accepted = event.early_data_accepted
            self.observed.session_resumed = event.session_resumed
        if isinstance(event, events.ConnectionTerminated):
            if self.reset_quic.stateless_reset is not None and self.observed.reset_at is None:
                self.observed.reset_at = self._loop.time()
            self.terminated.set()
        super().quic_event_received(event)

    async def rebind(self) -> tuple[str, int]:
        """Move to a new local UDP port (the client's own migration); returns the new one."""
        loop = asyncio.get_running_loop()
        old = self._transport
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Relay(self), local_addr=("127.0.0.1", 0)
        )
        self._transport = cast(asyncio.DatagramTransport, transport)
        if old is not None:
            old.close()
        return cast(tuple[str, int], transport.get_extra_info("sockname")[:2])


class _Relay(asyncio.DatagramProtocol):
    def __init__(self, client: FabricClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        self.client.datagram_received(data, addr)


@contextlib.asynccontextmanager
async def fabric_client(
    address: tuple[str, int],
    *,
    session_ticket: SessionTicket | None = None,
    wait: bool = True,
    idle_timeout: float = 30.0,
) -> AsyncIterator[FabricClient]:
    """A client of `address` (the fabric); with `wait=False` the handshake is only started, so
    requests sent at once go out as 0-RTT when `session_ticket` allows."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=list(H3_ALPN),
        server_name="localhost",
        idle_timeout=idle_timeout,
        verify_mode=0,
        session_ticket=session_ticket,
    )
    observed = Observations()
    quic = ResetDetectingConnection(
        configuration=configuration, session_ticket_handler=observed.tickets.append
    )
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: FabricClient(quic, observed), local_addr=("127.0.0.1", 0)
    )
    client = cast(FabricClient, protocol)
    try:
        client.connect(address)
        if wait:
            async with asyncio.timeout(10):
                await client.wait_connected()
        yield client
    finally:
        client.shutdown()
        if client._transport is not None:
            client._transport.close()
        transport.close()
