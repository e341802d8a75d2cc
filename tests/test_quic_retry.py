"""Address validation: Retry and NEW_TOKEN tokens (fleet-sealed, accepted at every PoP) and
Retry above a load threshold, so spoofed Initials cannot cost handshakes."""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from h3_client import connect_h3, server_configuration_factory
from test_quic_dispatcher import ADDR, _Handler, datagram_counts, initial, long_packet
from test_quic_identity import make_identity

from edgeproxy.config import LimitsSection
from edgeproxy.metrics import Registry
from edgeproxy.quic.dispatcher import (
    Accept,
    FleetRouting,
    QuicDispatcher,
    Retry,
    Router,
    start_quic_server,
)
from edgeproxy.quic.fleet import FleetKey, FleetKeys, TokenKind, token_kind
from edgeproxy.quic.packet import QUIC_V1

NOW = 1_700_000_000.0


def fleet_keys() -> FleetKeys:
    return FleetKeys([FleetKey(3, b"k" * 32, int(NOW))], 3)


def initial_with_token(token: bytes, dcid: bytes) -> bytes:
    data = long_packet(QUIC_V1, dcid, b"S" * 8)
    # long_packet ends the header with an empty token (0x00): splice in a real one
    head = 1 + 4 + 1 + len(dcid) + 1 + 8
    assert len(token) < 64
    return (data[:head] + bytes([len(token)]) + token + data[head + 1 :])[:1200]


# --------------------------------------------------------------------------------------------
# Router (pure)
# --------------------------------------------------------------------------------------------


def test_router_retries_unvalidated_initials_above_the_threshold() -> None:
    router: Router[str] = Router(tokens=fleet_keys(), retry_above=1)
    assert isinstance(router.route(initial(), ADDR, 0.0, wall_now=NOW), Accept)
    router.add_connection("c1")  # one handshake in progress: at the threshold
    action = router.route(initial(dcid=b"D" * 9), ADDR, 0.0, wall_now=NOW)
    assert action == Retry(original_dcid=b"D" * 9, scid=b"S" * 8, version=QUIC_V1)
    assert action.route == "retry"
    router.handshake_done("c1")
    assert isinstance(router.route(initial(), ADDR, 0.0, wall_now=NOW), Accept)


def test_router_accepts_valid_tokens_minted_anywhere() -> None:
    minted_elsewhere = fleet_keys()  # another PoP, same fleet key file
    router: Router[str] = Router(tokens=fleet_keys(), retry_above=0)
    odcid, rscid = b"O" * 8, b"R" * 8
    token = minted_elsewhere.make_retry_token(ADDR, odcid, rscid, now=NOW)
    action = router.route(initial_with_token(token, rscid), ADDR, 0.0, wall_now=NOW + 1)
    assert isinstance(action, Accept)
    assert (action.original_dcid, action.retry_scid) == (odcid, rscid)
    # a NEW_TOKEN token for the same IP (any port) validates too, without a Retry
    new_token = minted_elsewhere.make_new_token(ADDR, now=NOW)
    action = router.route(
        initial_with_token(new_token, b"N" * 8), ("192.0.2.1", 9), 0.0, wall_now=NOW + 60
    )
    assert isinstance(action, Accept) and action.retry_scid is None


def test_router_invalid_tokens_mean_unvalidated_never_dropped() -> None:
    keys = fleet_keys()
    odcid, rscid = b"O" * 8, b"R" * 8
    token = keys.make_retry_token(ADDR, odcid, rscid, now=NOW)
    forged = token[:-1] + bytes([token[-1] ^ 1])
    cases = [
        (forged, rscid, ADDR, NOW),  # bad seal
        (token, rscid, ADDR, NOW + 60),  # expired
        (token, b"X" * 8, ADDR, NOW),  # another DCID
        (token, rscid, ("192.0.2.1", 1), NOW),  # another port
        (token, rscid, ("192.0.2.2", 4433), NOW),  # another IP
        (b"\x01garbage", rscid, ADDR, NOW),
        (b"\x09", rscid, ADDR, NOW),
    ]
    busy: Router[str] = Router(tokens=keys, retry_above=0)
    idle: Router[str] = Router(tokens=keys, retry_above=5)
    for tok, dcid, addr, now in cases:
        data = initial_with_token(tok, dcid)
        assert isinstance(busy.route(data, addr, 0.0, wall_now=now), Retry)
        accepted = idle.route(data, addr, 0.0, wall_now=now)
        assert isinstance(accepted, Accept) and accepted.retry_scid is None
        assert accepted.original_dcid == dcid


def test_router_never_retries_without_a_threshold() -> None:
    router: Router[str] = Router(tokens=fleet_keys())
    for i in range(3):
        router.add_connection(str(i))
    assert isinstance(router.route(initial(), ADDR, 0.0, wall_now=NOW), Accept)


# --------------------------------------------------------------------------------------------
# Real handshakes
# --------------------------------------------------------------------------------------------


async def _server(
    metrics: Registry, *, retry_above: int, node: tuple[int, int, int], keys: FleetKeys
) -> QuicDispatcher:
    return await start_quic_server(
        "127.0.0.1",
        0,
        server_configuration_factory(),
        _Handler(),
        LimitsSection(),
        metrics,
        fleet=FleetRouting(identity=make_identity(node), tokens=keys, retry_above=retry_above),
    )


async def test_client_completes_the_handshake_after_one_retry() -> None:
    metrics = Registry()
    server = await _server(metrics, retry_above=0, node=(1, 0, 0), keys=fleet_keys())
    try:
        host, port = server.local_address
        async with connect_h3(host, port) as client:
            assert (await client.request(b"GET", b"/")).status == 200
            (protocol,) = server.connections
            quic = protocol.quic
            # the Retry's SCID is a CID of this node, echoed in the transport parameters
            assert quic._retry_source_connection_id is not None
            assert make_identity((1, 0, 0)).owner_of(quic._retry_source_connection_id) == (1, 0, 0)
            assert not server.router.handshaking(protocol)
        assert datagram_counts(metrics)["retry"] == 1
    finally:
        await server.close()


async def test_new_token_lets_the_next_connection_skip_the_retry_once() -> None:
    metrics = Registry()
    server = await _server(metrics, retry_above=0, node=(1, 0, 0), keys=fleet_keys())
    try:
        host, port = server.local_address
        tokens: list[bytes] = []
        async with connect_h3(host, port, token_handler=tokens.append) as client:
            assert (await client.request(b"GET", b"/")).status == 200
            for _ in range(100):
                if tokens:
                    break
                await asyncio.sleep(0.01)
        assert len(tokens) == 1 and token_kind(tokens[0]) is TokenKind.NEW_TOKEN
        assert datagram_counts(metrics)["retry"] == 1 and server.new_tokens_sent == 1
        # The next connection from this address presents it: validated, no Retry.
        async with connect_h3(host, port, token=tokens[0]) as client:
            assert (await client.request(b"GET", b"/")).status == 200
        assert datagram_counts(metrics)["retry"] == 1
        # The same token again: single use, so it counts as no token and a Retry follows.
        async with connect_h3(host, port, token=tokens[0]) as client:
            assert (await client.request(b"GET", b"/")).status == 200
        assert datagram_counts(metrics)["retry"] == 2 and server.router.reused_tokens == 1
    finally:
        await server.close()


class _Relay(asyncio.DatagramProtocol):
    """The client's path: its first datagram reaches PoP A, everything after reaches PoP B
    (a route change right after the Retry), from one client address."""

    def __init__(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        self.a, self.b = a, b
        self.sent = 0
        self.client: Any = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if addr in (self.a, self.b):
            self.transport.sendto(data, self.client)
            return
        self.client = addr
        self.transport.sendto(data, self.a if self.sent == 0 else self.b)
        self.sent += 1


async def test_retry_token_from_pop_a_is_accepted_at_pop_b() -> None:
    metrics_a, metrics_b = Registry(), Registry()
    a = await _server(metrics_a, retry_above=0, node=(1, 0, 0), keys=fleet_keys())
    b = await _server(metrics_b, retry_above=0, node=(2, 0, 0), keys=fleet_keys())
    loop = asyncio.get_running_loop()
    relay = _Relay(a.local_address, b.local_address)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        async with connect_h3(host, port) as client:
            assert (await client.request(b"GET", b"/")).status == 200
        assert datagram_counts(metrics_a) == {"retry": 1}
        assert "retry" not in datagram_counts(metrics_b)
        assert datagram_counts(metrics_b)["new"] == 1
        assert not a.connections
    finally:
        transport.close()
        await a.close()
        await b.close()


async def _first_flight(server: QuicDispatcher, token: bytes = b"") -> list[bytes]:
    loop = asyncio.get_running_loop()
    config = QuicConfiguration(is_client=True, alpn_protocols=list(H3_ALPN), token=token)
    client = QuicConnection(configuration=config)
    client.connect(server.local_address, now=loop.time())
    return [data for data, _ in client.datagrams_to_send(now=loop.time())]


async def test_forged_and_expired_tokens_get_a_retry_under_load() -> None:
    metrics = Registry()
    keys = fleet_keys()
    server = await _server(metrics, retry_above=0, node=(1, 0, 0), keys=keys)
    try:
        expired = keys.make_retry_token(("127.0.0.1", 1), b"O" * 8, b"R" * 8, now=time.time() - 60)
        forged = os.urandom(60)
        forged = bytes([1]) + forged[1:]
        for token in (expired, forged, keys.make_new_token(("192.0.2.9", 1), now=time.time())):
            for data in await _first_flight(server, token):
                server.datagram_received(data, ("127.0.0.1", random.randrange(20000, 60000)))
        assert datagram_counts(metrics) == {"retry": 3}
        assert not server.connections
        # the same server still accepts a NEW_TOKEN token for the client's IP
        for data in await _first_flight(
            server, keys.make_new_token(("127.0.0.1", 1), now=time.time())
        ):
            server.datagram_received(data, ("127.0.0.1", 40000))
        assert datagram_counts(metrics)["new"] == 1
    finally:
        await server.close()


async def test_spoofed_initials_above_the_threshold_create_no_connections() -> None:
    metrics = Registry()
    server = await _server(metrics, retry_above=3, node=(1, 0, 0), keys=fleet_keys())
    try:
        for i in range(50):
            addr = (f"127.0.{random.randrange(256)}.{random.randrange(1, 255)}", 1024 + i)
            for data in await _first_flight(server):
                server.datagram_received(data, addr)
        counts = datagram_counts(metrics)
        # three handshakes that never complete fill the threshold; the rest cost nothing
        assert counts == {"new": 3, "retry": 47}
        assert server.router.connection_count == 3 == server.router.handshakes_in_progress
        assert len(server.connections) == 3
    finally:
        await server.close()
