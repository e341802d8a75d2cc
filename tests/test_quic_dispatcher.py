"""The QUIC dispatcher: pure routing decisions, and the socket shell with real datagrams."""

from __future__ import annotations

import asyncio
import os
import socket

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from h3_client import connect_h3, server_configuration_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.config import LimitsSection
from edgeproxy.http.errors import error_response
from edgeproxy.http.messages import Body, RequestHead, ResponseHead, ResponseSink
from edgeproxy.metrics import Registry
from edgeproxy.quic.dispatcher import (
    Accept,
    Deliver,
    Drop,
    QuicDispatcher,
    Router,
    VersionNegotiation,
    start_quic_server,
)
from edgeproxy.quic.packet import QUIC_V1, parse_version_negotiation

ADDR = ("192.0.2.1", 4433)


def long_packet(
    version: int, dcid: bytes, scid: bytes, *, first: int = 0xC0, size: int = 1200
) -> bytes:
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    head += bytes([len(scid)]) + scid
    if version == QUIC_V1 and (first & 0x30) == 0:
        head += b"\x00"  # empty Initial token
    return head + b"\x00" * max(0, size - len(head))


def initial(size: int = 1200, dcid: bytes = b"D" * 8) -> bytes:
    return long_packet(QUIC_V1, dcid, b"S" * 8, size=size)


def short_packet(dcid: bytes, first: int = 0x40) -> bytes:
    return bytes([first]) + dcid + os.urandom(30)


# --------------------------------------------------------------------------------------------
# Router (pure)
# --------------------------------------------------------------------------------------------


def test_unknown_version_gets_version_negotiation() -> None:
    router: Router[str] = Router()
    action = router.route(long_packet(0x0A0A0A0A, b"dcid1234", b"scid"), ADDR, 0.0)
    assert isinstance(action, VersionNegotiation)
    assert action.route == "version_negotiation"
    # the reply swaps the client's CIDs and lists v1 only
    assert parse_version_negotiation(action.packet) == (b"scid", b"dcid1234", [QUIC_V1])


def test_unknown_version_in_a_small_datagram_is_not_answered() -> None:
    router: Router[str] = Router()
    action = router.route(long_packet(0x0A0A0A0A, b"d" * 8, b"s", size=1199), ADDR, 0.0)
    assert action == Drop("unsupported_version")


def test_version_negotiation_is_never_answered() -> None:
    router: Router[str] = Router()
    vn = long_packet(0, b"d" * 8, b"s" * 8, size=1300)
    assert router.route(vn, ADDR, 0.0) == Drop("version_negotiation_packet")


def test_short_header_with_unknown_cid_is_dropped_and_counted_by_reason() -> None:
    router: Router[str] = Router()
    action = router.route(short_packet(b"12345678"), ADDR, 0.0)
    assert action == Drop("unknown_cid")
    assert action.route == "dropped_unknown_cid"


def test_short_header_with_known_cid_is_delivered() -> None:
    router: Router[str] = Router()
    router.register(b"12345678", "conn-a")
    assert router.route(short_packet(b"12345678"), ADDR, 0.0) == Deliver("conn-a")
    assert router.route(short_packet(b"12345678"), ADDR, 0.0).route == "local"


def test_initial_rules() -> None:
    router: Router[str] = Router(max_connections=1)
    assert router.route(initial(1199), ADDR, 0.0) == Drop("initial_too_small")
    assert router.route(initial(1200, dcid=b"short"), ADDR, 0.0) == Drop("initial_dcid_too_short")
    action = router.route(initial(1200), ADDR, 0.0)
    assert action == Accept(original_dcid=b"D" * 8, scid=b"S" * 8, version=QUIC_V1, token=b"")
    assert action.route == "new"
    # once registered, the client's next Initials (same DCID) go to the connection
    router.register(b"D" * 8, "conn-a")
    assert router.route(initial(1200), ADDR, 0.0) == Deliver("conn-a")
    # a second connection is over max_connections
    assert router.route(initial(1200, dcid=b"E" * 8), ADDR, 0.0) == Drop("max_connections")


def test_non_initial_long_header_needs_a_known_cid() -> None:
    router: Router[str] = Router()
    handshake = long_packet(QUIC_V1, b"H" * 8, b"S" * 8, first=0xE0)
    assert router.route(handshake, ADDR, 0.0) == Drop("unknown_cid")
    router.register(b"H" * 8, "conn-h")
    assert router.route(handshake, ADDR, 0.0) == Deliver("conn-h")


def test_fixed_bit_and_garbage() -> None:
    router: Router[str] = Router()
    router.register(b"12345678", "conn-a")
    assert router.route(short_packet(b"12345678", first=0x00), ADDR, 0.0) == Drop("fixed_bit")
    assert router.route(b"", ADDR, 0.0) == Drop("empty")
    assert router.route(b"\xc0\x00\x00", ADDR, 0.0) == Drop("truncated")
    assert router.route(b"\x40\x01", ADDR, 0.0) == Drop("truncated")
    too_long = long_packet(QUIC_V1, b"x" * 21, b"s")
    assert router.route(too_long, ADDR, 0.0) == Drop("cid_too_long")


def test_table_register_unregister_forget() -> None:
    router: Router[str] = Router()
    assert router.register(b"a" * 8, "c1")
    assert router.register(b"b" * 8, "c1")
    assert not router.register(b"a" * 8, "c2")  # owned by c1
    assert router.lookup(b"a" * 8) == "c1"
    router.unregister(b"a" * 8, "c2")  # not the owner: no effect
    assert router.lookup(b"a" * 8) == "c1"
    router.unregister(b"a" * 8, "c1")
    assert router.lookup(b"a" * 8) is None
    router.register(b"c" * 8, "c2")
    assert router.connection_count == 2
    router.forget("c1")
    assert router.lookup(b"b" * 8) is None and router.lookup(b"c" * 8) == "c2"
    assert router.connection_count == 1


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=1400))
def test_router_fuzz(data: bytes) -> None:
    router: Router[str] = Router()
    router.register(b"12345678", "conn")
    action = router.route(data, ADDR, 0.0)
    assert isinstance(action, Deliver | Accept | VersionNegotiation | Drop)
    if isinstance(action, VersionNegotiation | Accept):
        assert len(data) >= 1200 and data[0] & 0x80
    assert action.route


# --------------------------------------------------------------------------------------------
# Shell, with real UDP datagrams on 127.0.0.1
# --------------------------------------------------------------------------------------------


class _Handler:
    pop_id = "test"

    def __init__(self) -> None:
        self.n = 0

    def new_request_id(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def reject(
        self,
        protocol: str,
        status: int,
        detail: str,
        head: RequestHead | None,
        client_addr: tuple[str, int],
        request_id: str,
    ) -> tuple[ResponseHead, bytes]:
        return error_response(status, detail, pop_id=self.pop_id, request_id=request_id)

    async def handle(self, head: RequestHead, body: Body, sink: ResponseSink) -> None:
        await sink.start(ResponseHead(200, [(b"content-length", b"2")]))
        await sink.write(b"ok")
        await sink.end()


def datagram_counts(metrics: Registry) -> dict[str, float]:
    metric = metrics.get("edgeproxy_quic_datagrams_total")
    assert metric is not None
    return {key[0]: value for key, value in metric.values.items()}  # type: ignore[attr-defined]


async def _server(
    metrics: Registry, limits: LimitsSection | None = None, factory_calls: list[int] | None = None
) -> QuicDispatcher:
    base = server_configuration_factory()

    def factory() -> QuicConfiguration:
        if factory_calls is not None:
            factory_calls.append(1)
        return base()

    return await start_quic_server(
        "127.0.0.1", 0, factory, _Handler(), limits or LimitsSection(), metrics
    )


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)


async def test_socket_answers_version_negotiation_and_counts_drops() -> None:
    metrics = Registry()
    server = await _server(metrics)
    loop = asyncio.get_running_loop()
    transport, collector = await loop.create_datagram_endpoint(
        _Collector, remote_addr=server.local_address
    )
    try:
        transport.sendto(long_packet(0x1A2A3A4A, b"client-dcid", b"client-scid"))
        reply = await asyncio.wait_for(collector.received.get(), 2)
        assert parse_version_negotiation(reply) == (b"client-scid", b"client-dcid", [QUIC_V1])
        # (asyncio's sendto() silently skips empty datagrams; the router test covers those)
        for junk in (b"\x00" * 50, short_packet(b"unknown!"), initial(600), b"\xc0\x00"):
            transport.sendto(junk)
        for _ in range(100):
            counts = datagram_counts(metrics)
            if sum(counts.values()) >= 5:
                break
            await asyncio.sleep(0.01)
        assert counts == {
            "version_negotiation": 1,
            "dropped_truncated": 1,
            "dropped_fixed_bit": 1,  # 0x00...: a short header without the QUIC bit
            "dropped_unknown_cid": 1,
            "dropped_initial_too_small": 1,
        }
        assert collector.received.empty()  # nothing but the VN was answered
        assert server.router.connection_count == 0
    finally:
        transport.close()
        await server.close()


async def test_connection_cids_are_registered_and_cleaned_up() -> None:
    metrics = Registry()
    calls: list[int] = []
    server = await _server(metrics, factory_calls=calls)
    host, port = server.local_address
    async with connect_h3(host, port) as client:
        response = await client.request(b"GET", b"/")
        assert response.status == 200 and response.body == b"ok"
        (protocol,) = server.connections
        cids = server.router.cids_of(protocol)
        # the client's original DCID, the first server CID and the ones issued after it
        assert protocol.quic.host_cid in cids
        assert len(cids) >= 3
        for cid in client._quic._peer_cid_available:
            assert server.router.lookup(cid.cid) is protocol
        assert datagram_counts(metrics)["new"] == 1
    # the client sent CONNECTION_CLOSE: the server drains, terminates and forgets it
    for _ in range(300):
        if not server.connections and server.router.connection_count == 0:
            break
        await asyncio.sleep(0.01)
    assert not server.connections
    assert server.router.connection_count == 0
    assert server.router.lookup(protocol.quic.host_cid) is None
    gauge = metrics.get("edgeproxy_connections_open")
    assert gauge is not None and gauge.get("h3") == 0  # type: ignore[attr-defined]
    # one configuration per connection (reloaded certificates apply to new ones)
    async with connect_h3(host, port) as client:
        assert (await client.request(b"GET", b"/")).status == 200
    assert len(calls) == 2
    await server.close()


async def test_max_connections_drops_new_initials() -> None:
    metrics = Registry()
    server = await _server(metrics, LimitsSection(max_connections=1))
    host, port = server.local_address
    loop = asyncio.get_running_loop()
    async with connect_h3(host, port) as client:
        assert (await client.request(b"GET", b"/")).status == 200
        # a second client's first flight, sent raw
        config = QuicConfiguration(is_client=True, alpn_protocols=list(H3_ALPN))
        other = QuicConnection(configuration=config)
        other.connect((host, port), now=loop.time())
        transport, _ = await loop.create_datagram_endpoint(_Collector, remote_addr=(host, port))
        try:
            for data, _ in other.datagrams_to_send(now=loop.time()):
                transport.sendto(data)
            for _ in range(100):
                if datagram_counts(metrics).get("dropped_max_connections"):
                    break
                await asyncio.sleep(0.01)
            assert datagram_counts(metrics)["dropped_max_connections"] >= 1
            assert len(server.connections) == 1
        finally:
            transport.close()
    await server.close()


async def test_factory_failure_is_a_counted_drop() -> None:
    metrics = Registry()

    def broken() -> QuicConfiguration:
        return QuicConfiguration(is_client=False)  # no certificate: aioquic refuses

    server = await start_quic_server("127.0.0.1", 0, broken, _Handler(), LimitsSection(), metrics)
    try:
        server.datagram_received(initial(1200), ("127.0.0.1", 9))
        assert datagram_counts(metrics) == {"dropped_accept_failed": 1}
        assert server.router.connection_count == 0
    finally:
        await server.close()


async def test_close_is_idempotent_and_drops_late_datagrams() -> None:
    metrics = Registry()
    server = await _server(metrics)
    await server.close()
    await server.close()
    server.datagram_received(initial(1200), ("127.0.0.1", 9))
    assert datagram_counts(metrics) == {"dropped_closing": 1}


async def test_reuse_address_allows_rebinding_the_port() -> None:
    metrics = Registry()
    server = await _server(metrics)
    port = server.local_address[1]
    sock = socket.fromfd(
        server._transport.get_extra_info("socket").fileno(),  # type: ignore[union-attr]
        socket.AF_INET,
        socket.SOCK_DGRAM,
    )
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        sock.close()
    await server.close()
    again = await start_quic_server(
        "127.0.0.1", port, server_configuration_factory(), _Handler(), LimitsSection(), metrics
    )
    assert again.local_address[1] == port
    await again.close()


async def test_retired_cids_leave_the_table() -> None:
    metrics = Registry()
    server = await _server(metrics)
    host, port = server.local_address
    async with connect_h3(host, port) as client:
        assert (await client.request(b"GET", b"/")).status == 200
        (protocol,) = server.connections
        old = client._quic._peer_cid.cid
        assert server.router.lookup(old) is protocol
        # the client switches to another server-issued CID and retires the old one
        client.change_connection_id()
        new = client._quic._peer_cid.cid
        assert new != old
        assert (await client.request(b"GET", b"/")).status == 200
        for _ in range(100):
            if server.router.lookup(old) is None:
                break
            await asyncio.sleep(0.01)
        assert server.router.lookup(old) is None
        assert server.router.lookup(new) is protocol
        # the server replaced it (NEW_CONNECTION_ID) and registered the replacement
        assert len(server.router.cids_of(protocol)) >= 3
    await server.close()
