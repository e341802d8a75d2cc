"""QUIC connections surviving anycast route changes: routing decisions, the backhaul, and real
HTTP/3 clients talking to a fleet of PoPs behind one simulated anycast address
(tests/quic_fabric.py)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aioquic.tls import CipherSuite, SessionTicket
from hypothesis import given, settings
from hypothesis import strategies as st
from quic_fabric import Fabric, SharedFlows, anycast_fleet, fabric_client

from edgeproxy.config import ConfigError, config_from_dict
from edgeproxy.metrics import Registry
from edgeproxy.quic.backhaul import TICKET_FRAME, Backhaul, Peer, StaticMembership
from edgeproxy.quic.dispatcher import (
    Accept,
    Deliver,
    Drop,
    Forward,
    NodeId,
    Reset,
    Router,
    initial_flow_key,
)
from edgeproxy.quic.fleet import FleetKey, FleetKeys
from edgeproxy.quic.forward import encode_forward
from edgeproxy.quic.identity import ServerIdentity
from edgeproxy.quic.lb import LBConfig, QuicLBCodec, ServerIdLayout
from edgeproxy.quic.packet import QUIC_V1
from edgeproxy.quic.tickets import FleetTicketStore

CLIENT = ("192.0.2.7", 50000)
LAYOUT = ServerIdLayout(pop_bits=8, host_bits=4, worker_bits=4)
KEYS = FleetKeys([FleetKey(1, b"k" * 32, 0)], 1)


# --------------------------------------------------------------------------------------------
# Router decisions (pure)
# --------------------------------------------------------------------------------------------


def identity(node: NodeId = (0, 0, 0), keys: FleetKeys = KEYS) -> ServerIdentity:
    codec = QuicLBCodec([LBConfig(0, 2, 5, key=b"q" * 16)])
    return ServerIdentity(codec=codec, layout=LAYOUT, node=node, keys=keys)


def membership(node: NodeId = (0, 0, 0), workers: int = 1) -> StaticMembership:
    peers = [
        Peer("b", 1, 0, ("127.0.0.1", 9001)),
        Peer("c", 2, 0, ("127.0.0.1", 9002)),
    ]
    return StaticMembership(
        node=node, name="a", listen=("127.0.0.1", 9000), workers=workers, peers=peers
    )


def router(
    node: NodeId = (0, 0, 0), flows: SharedFlows | None = None, workers: int = 1
) -> tuple[Router[str], StaticMembership]:
    m = membership(node, workers)
    r: Router[str] = Router(
        identity=identity(node),
        membership=m,
        flows=flows.view("a") if flows is not None else None,
        flow_name="a",
    )
    return r, m


def short(cid: bytes, size: int = 60) -> bytes:
    return bytes([0x40]) + cid + os.urandom(size - 1 - len(cid))


def long_packet(dcid: bytes, first: int = 0xC0, size: int = 1200) -> bytes:
    head = bytes([first]) + QUIC_V1.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
    head += bytes([8]) + b"S" * 8
    if first & 0x30 == 0:
        head += b"\x00"  # Initial: empty token
    return head + b"\x00" * (size - len(head))


def cid_of(node: NodeId) -> bytes:
    return identity(node).new_cid()


def test_short_header_of_a_live_peer_is_forwarded_to_the_owner() -> None:
    r, _ = router()
    assert r.route(short(cid_of((1, 0, 0))), CLIENT, 0.0) == Forward((1, 0, 0))
    assert r.route(short(cid_of((2, 0, 0))), CLIENT, 0.0).route == "forwarded_out"
    # a Handshake packet with a server-chosen DCID too
    assert r.route(long_packet(cid_of((1, 0, 0)), first=0xE0), CLIENT, 0.0) == Forward((1, 0, 0))


def test_known_cid_is_delivered_before_any_decoding() -> None:
    r, _ = router()
    cid = cid_of((1, 0, 0))
    r.register(cid, "conn")
    assert r.route(short(cid), CLIENT, 0.0) == Deliver("conn")


def test_reset_only_when_the_owner_is_known_dead() -> None:
    r, m = router()
    cid = cid_of((1, 0, 0))
    m.mark_dead(1)
    action = r.route(short(cid, 60), CLIENT, 0.0)
    assert action == Reset(cid, 60) and action.route == "reset"
    # long headers are not reset (a client in its handshake has no token yet)
    assert r.route(long_packet(cid, first=0xE0), CLIENT, 0.0) == Drop("dead_owner")
    # too small to be answered by a smaller reset
    assert r.route(short(cid, 21), CLIENT, 0.0) == Drop("reset_too_small")
    assert r.route(short(cid, 22), CLIENT, 0.0) == Reset(cid, 22)
    m.mark_alive(1)
    assert r.route(short(cid), CLIENT, 0.0) == Forward((1, 0, 0))
    # unknown PoP (not in the membership): liveness unknown, so never a reset
    stranger = cid_of((9, 0, 0))
    assert r.route(short(stranger), CLIENT, 0.0) == Drop("unknown_server")
    # our own server ID without a connection: dropped, not reset
    assert r.route(short(cid_of((0, 0, 0))), CLIENT, 0.0) == Drop("unknown_local_cid")
    # without membership nothing is forwarded or reset
    bare: Router[str] = Router(identity=identity())
    assert bare.route(short(cid), CLIENT, 0.0) == Drop("unknown_server")


def test_reset_packet_is_smaller_than_its_trigger_and_carries_the_fleet_token() -> None:
    ident = identity()
    cid = cid_of((1, 0, 0))
    for trigger in (22, 43, 44, 60, 1200):
        packet = ident.stateless_reset(cid, trigger)
        assert packet is not None and 21 <= len(packet) < trigger
        assert packet[-16:] == KEYS.reset_token(cid)
        assert packet[0] & 0xC0 == 0x40  # looks like a short header
    assert ident.stateless_reset(cid, 21) is None  # too small to answer


def test_a_forwarded_datagram_is_never_forwarded_again() -> None:
    r, m = router()
    cid = cid_of((1, 0, 0))
    assert r.route(short(cid), CLIENT, 0.0, forwarded=True) == Drop("forward_loop")
    m.mark_dead(1)
    assert r.route(short(cid), CLIENT, 0.0, forwarded=True) == Drop("forward_loop")
    # a forwarded Initial is accepted where it landed, whatever the tables say
    flows = SharedFlows()
    r2, _ = router(flows=flows)
    dcid = os.urandom(8)
    flows.view("b").publish(initial_flow_key(CLIENT, dcid) or b"", 0.0, 30.0)
    assert isinstance(r2.route(long_packet(dcid), CLIENT, 0.0, forwarded=True), Accept)
    assert r2.route(long_packet(dcid), CLIENT, 0.0) == Forward((1, 0, 0))


def test_initial_routing_by_flow_table() -> None:
    flows = SharedFlows()
    r, m = router(flows=flows)
    dcid = bytes([0xE0]) + os.urandom(7)  # 0b111: a client DCID that never decodes
    action = r.route(long_packet(dcid), CLIENT, 0.0)
    assert isinstance(action, Accept)
    assert action.flow_key == initial_flow_key(CLIENT, dcid)
    # the same handshake accepted by B: its next Initials landing here go to B
    flows.view("b").publish(action.flow_key or b"", 0.0, 30.0)
    assert r.route(long_packet(dcid), CLIENT, 1.0) == Forward((1, 0, 0))
    # ... and 0-RTT packets of it too
    assert r.route(long_packet(dcid, first=0xD0), CLIENT, 1.0) == Forward((1, 0, 0))
    # another client port is another flow
    assert isinstance(r.route(long_packet(dcid), (CLIENT[0], 1), 1.0), Accept)
    # an expired entry, or a dead owner, means: accept here
    assert isinstance(r.route(long_packet(dcid), CLIENT, 31.0), Accept)
    m.mark_dead(1)
    assert isinstance(r.route(long_packet(dcid), CLIENT, 1.0), Accept)
    # our own entry: accept (e.g. the connection is gone and the client starts over)
    flows.view("a").publish(action.flow_key or b"", 0.0, 30.0)
    assert isinstance(r.route(long_packet(dcid), CLIENT, 1.0), Accept)
    # 0-RTT without any connection or entry is dropped
    assert r.route(long_packet(os.urandom(8), first=0xD0), CLIENT, 1.0) == Drop("unknown_cid")


def test_initial_with_a_server_chosen_dcid_goes_to_that_server() -> None:
    r, _ = router()
    assert r.route(long_packet(cid_of((2, 0, 0))), CLIENT, 0.0) == Forward((2, 0, 0))


def test_initial_routing_with_the_gossip_flow_table() -> None:
    """The dispatcher's FlowLookup is gossip.flowtable.FlowTable's interface."""
    from gossip.flowtable import FlowTable

    table = FlowTable("a")
    m = membership()
    r: Router[str] = Router(identity=identity(), membership=m, flows=table, flow_name="a")
    dcid = bytes([0xE0]) + os.urandom(7)
    action = r.route(long_packet(dcid), CLIENT, 0.0)
    assert isinstance(action, Accept) and action.flow_key is not None
    table.publish(action.flow_key, 0.0, 30.0)
    assert table.lookup(action.flow_key, 1.0) == "a"
    assert isinstance(r.route(long_packet(dcid), CLIENT, 1.0), Accept)


def test_unroutable_cid_uses_the_flow_table() -> None:
    flows = SharedFlows()
    r, _ = router(flows=flows)
    cid = bytes([0xE7]) + os.urandom(7)  # 0b111, length 7
    assert r.route(short(cid), CLIENT, 0.0) == Drop("unroutable_cid")
    flows.view("c").publish(b"C" + cid, 0.0, 30.0)
    assert r.route(short(cid), CLIENT, 0.0) == Forward((2, 0, 0))
    assert r.route(short(cid), CLIENT, 0.0, forwarded=True) == Drop("unroutable_cid")


def test_other_workers_of_this_host_get_their_datagrams() -> None:
    r, m = router(node=(0, 0, 1), workers=2)
    assert r.route(short(cid_of((0, 0, 0))), CLIENT, 0.0) == Forward((0, 0, 0))
    assert m.backhaul_address((0, 0, 0)) == ("127.0.0.1", 9000)
    assert m.backhaul_address((0, 0, 1)) == ("127.0.0.1", 9001)
    assert m.backhaul_address((1, 0, 1)) == ("127.0.0.1", 9002)
    assert m.backhaul_address((1, 0, 2)) is None  # no such worker
    # a worker index beyond the configured count is nobody
    assert r.route(short(cid_of((0, 0, 5))), CLIENT, 0.0) == Drop("unknown_server")
    assert m.node_named("b") == (1, 0, 0) and m.node_named("b/0/1") == (1, 0, 1)
    assert m.node_named("zz") is None


def test_short_header_cid_length_comes_from_the_cid() -> None:
    """CIDs self-encode their length: a 12-byte CID of another config routes correctly."""
    codec = QuicLBCodec([LBConfig(0, 2, 5, key=b"q" * 16), LBConfig(1, 2, 9, key=b"r" * 16)])
    ident = ServerIdentity(codec=codec, layout=LAYOUT, node=(0, 0, 0), keys=KEYS)
    r: Router[str] = Router(identity=ident, membership=membership())
    codec.set_current(1)
    long_cid = codec.encode(LAYOUT.pack(1, 0, 0))
    assert len(long_cid) == 12
    assert r.route(short(long_cid), CLIENT, 0.0) == Forward((1, 0, 0))


# --------------------------------------------------------------------------------------------
# Backhaul frames: authenticated, fresh, counted
# --------------------------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, object]] = []
        self.attached = True
        self.backhaul: object = None

    @property
    def local_address(self) -> tuple[str, int]:
        return ("203.0.113.1", 443)

    def forwarded_received(self, data: bytes, addr: object) -> None:
        self.got.append((data, addr))


async def test_backhaul_drops_forged_stale_and_replayed_frames() -> None:
    metrics = Registry()
    clock = [1_000_000.0]
    backhaul = Backhaul(
        keys=KEYS,
        sender=b"\x00\x00",
        membership=membership(),
        metrics=metrics,
        clock=lambda: clock[0],
    )
    sink = _Sink()
    backhaul.add_dispatcher(sink)  # type: ignore[arg-type]

    def frame(seq: int, keys: FleetKeys = KEYS, now: float | None = None) -> bytes:
        return encode_forward(
            b"\x40quic",
            keys=keys,
            sender=b"\x01\x00",
            seq=seq,
            now=clock[0] if now is None else now,
            client_addr=CLIENT,
            anycast_addr=("203.0.113.1", 443),
        )

    good = frame(1)
    backhaul.datagram_received(good, ("127.0.0.1", 1))
    assert sink.got == [(b"\x40quic", CLIENT)]
    backhaul.datagram_received(good, ("127.0.0.1", 1))  # replayed
    tampered = bytearray(frame(2))
    tampered[-20] ^= 1
    backhaul.datagram_received(bytes(tampered), ("127.0.0.1", 1))
    outsider = FleetKeys([FleetKey(1, b"x" * 32, 0)], 1)
    backhaul.datagram_received(frame(3, keys=outsider), ("127.0.0.1", 1))
    backhaul.datagram_received(frame(4, now=clock[0] - 60), ("127.0.0.1", 1))  # stale
    backhaul.datagram_received(b"\xe1\x00", ("127.0.0.1", 1))
    backhaul.datagram_received(b"junk", ("127.0.0.1", 1))
    backhaul.datagram_received(bytes([TICKET_FRAME]) + b"not a ticket", ("127.0.0.1", 1))
    assert len(sink.got) == 1  # nothing but the good frame was injected
    frames = metrics.get("edgeproxy_backhaul_frames_total")
    assert frames is not None
    assert dict(frames.values) == {  # type: ignore[attr-defined]
        ("forward", "received"): 1,
        ("forward", "dropped_replayed"): 1,
        ("forward", "dropped_bad_mac"): 2,  # tampered, and the outsider's key (same id)
        ("forward", "dropped_stale"): 1,
        ("forward", "dropped_truncated"): 1,
        ("unknown", "dropped_unknown_kind"): 2,  # junk, and a ticket with no store attached
    }
    latency = metrics.get("edgeproxy_quic_forward_latency_seconds")
    assert latency is not None and latency.count() == 1  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Real HTTP/3 clients across a fleet
# --------------------------------------------------------------------------------------------


async def _get(client, path: bytes = b"/time") -> tuple[int, bytes, bytes]:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(5):
        response = await client.request(b"GET", path)
    return response.status, response.header(b"x-edge-pop") or b"", response.body


def _only_a_has_state(fabric: Fabric) -> None:
    assert len(fabric["a"].dispatcher.connections) == 1
    assert not fabric["b"].dispatcher.connections and not fabric["c"].dispatcher.connections


async def test_connection_survives_route_changes(tmp_path: Path) -> None:
    async with anycast_fleet(tmp_path) as fabric, fabric_client(fabric.address) as client:
        assert (await _get(client))[:2] == (200, b"a")
        # A download in flight while BGP moves the client: its ACKs reach B and are forwarded.
        stream = client.send_request(b"GET", b"/stream?mb=2")
        await asyncio.sleep(0.05)
        fabric.route_to("b")
        async with asyncio.timeout(10):
            download = await stream.response()
        assert download.status == 200 and len(download.body) == 2 * 1024 * 1024
        for pop in ("b", "c", "a", "c", "b"):
            fabric.route_to(pop)
            # several requests at once, then one more
            results = await asyncio.gather(*(_get(client) for _ in range(5)))
            results.append(await _get(client))
            # every response is A's, served from the anycast address
            assert all(status == 200 and served == b"a" for status, served, _ in results)
        assert client.observed.handshakes == 1
        assert client.closed_error is None
        _only_a_has_state(fabric)
        # every datagram B and C forwarded arrived at A (allowing frames still in flight)
        async with asyncio.timeout(2):
            while True:
                a, b, c = fabric["a"].routes(), fabric["b"].routes(), fabric["c"].routes()
                if a["forwarded_in"] == b["forwarded_out"] + c["forwarded_out"]:
                    break
                await asyncio.sleep(0.01)
        assert a["new"] == 1 and a["forwarded_in"] > 0 and a["local"] > 0
        assert b["forwarded_out"] > 0 and c["forwarded_out"] > 0
        assert set(b) == {"forwarded_out"} and set(c) == {"forwarded_out"}
        latency = fabric["a"].pop.metrics.get("edgeproxy_quic_forward_latency_seconds")
        assert latency is not None and latency.count() == a["forwarded_in"]  # type: ignore[attr-defined]


async def test_client_migration_while_rerouted(tmp_path: Path) -> None:
    async with anycast_fleet(tmp_path) as fabric, fabric_client(fabric.address) as client:
        assert (await _get(client))[:2] == (200, b"a")
        (server,) = fabric["a"].dispatcher.connections
        fabric.route_to("b")
        assert (await _get(client))[:2] == (200, b"a")
        # The client moves to a new port and a new server CID while its route is at B: A
        # validates the new path (PATH_CHALLENGE from the anycast address, PATH_RESPONSE via B).
        old_cid = client._quic._peer_cid.cid
        client.change_connection_id()
        new_addr = await client.rebind()
        assert client._quic._peer_cid.cid != old_cid
        for pop in ("b", "c", "a"):
            fabric.route_to(pop)
            for _ in range(3):
                assert (await _get(client))[:2] == (200, b"a")
        # A's connection follows the client to its new address (validated, no new handshake)
        assert server.client_addr == new_addr  # type: ignore[attr-defined]
        assert client.observed.handshakes == 1 and client.closed_error is None
        _only_a_has_state(fabric)


async def test_dead_owner_answers_with_a_stateless_reset(tmp_path: Path) -> None:
    async with anycast_fleet(tmp_path) as fabric, fabric_client(fabric.address) as client:
        assert (await _get(client))[:2] == (200, b"a")
        fabric.crash("a")
        fabric.route_to("b")
        # A is gone but nobody said so: B keeps forwarding (into the void), never resets.
        client.send_request(b"GET", b"/time")
        await asyncio.sleep(0.2)
        assert fabric["b"].routes().get("forwarded_out", 0) >= 1
        assert "reset" not in fabric["b"].routes()
        assert client.observed.reset_at is None
        # Membership declares A dead: the client's next datagram gets a reset.
        fabric["b"].pop.membership.mark_dead(0)  # type: ignore[union-attr]
        sent_at = asyncio.get_running_loop().time()
        client.send_request(b"GET", b"/time")
        async with asyncio.timeout(2):
            await client.terminated.wait()
        assert client.observed.reset_at is not None
        assert client.observed.reset_at - sent_at < 0.1  # one round trip on loopback
        reset = client.reset_quic.stateless_reset
        assert reset is not None and reset[-16:] == client._quic._peer_cid.stateless_reset_token
        assert fabric["b"].routes()["reset"] >= 1
        assert client.observed.handshakes == 1


@pytest.mark.skipif(shutil.which("gtlsclient") is None, reason="gtlsclient (ngtcp2) missing")
async def test_real_client_accepts_the_stateless_reset(tmp_path: Path) -> None:
    """ngtcp2's client (which implements RFC 9000 reset detection) drops the connection on B's
    reset: the request it sends after A died ends it at once, not after its idle timeout."""
    async with anycast_fleet(tmp_path) as fabric:
        host, port = fabric.address
        proc = await asyncio.create_subprocess_exec(
            "gtlsclient",
            "--no-quic-dump",
            "--no-http-dump",
            "--delay-stream=1s",  # the request goes out a second after the handshake
            "--timeout=20s",
            "--exit-on-all-streams-close",
            host,
            str(port),
            f"https://localhost:{port}/time",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(5):
                while not fabric["a"].dispatcher.connections:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # handshake confirmed
            fabric.crash("a")
            fabric["b"].pop.membership.mark_dead(0)  # type: ignore[union-attr]
            fabric.route_to("b")
            started = time.monotonic()
            async with asyncio.timeout(10):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = out.decode(errors="replace")
        assert time.monotonic() - started < 3  # the 1 s delay plus a round trip, not 20 s
        match = re.search(r"rx \d+ SR token=0x([0-9a-f]{32})", text)
        assert match, text[-2000:]
        assert "ERR_DRAINING" in text
        assert fabric["b"].routes()["reset"] >= 1
        # the token is the fleet reset token of a CID that A issued
        dispatcher = fabric["a"].dispatcher
        (connection,) = dispatcher.connections
        keys = fabric["b"].pop.identity.keys  # type: ignore[union-attr]
        tokens = {keys.reset_token(cid).hex() for cid in dispatcher.router.cids_of(connection)}
        assert match.group(1) in tokens


async def test_zero_rtt_resumption_at_another_pop(tmp_path: Path) -> None:
    async with anycast_fleet(tmp_path) as fabric:
        async with fabric_client(fabric.address) as first:
            assert (await _get(first))[:2] == (200, b"a")
            async with asyncio.timeout(5):
                while not first.observed.tickets:
                    await asyncio.sleep(0.01)
        ticket = first.observed.tickets[-1]
        # A replicated the ticket to B and C over the backhaul.
        async with asyncio.timeout(5):
            while ticket.ticket not in fabric["b"].pop.tickets:  # type: ignore[operator]
                await asyncio.sleep(0.01)
        assert ticket.ticket in fabric["c"].pop.tickets  # type: ignore[operator]
        fabric.route_to("b")
        async with fabric_client(fabric.address, session_ticket=ticket, wait=False) as second:
            # sent before the handshake completes: 0-RTT
            safe = second.send_request(b"GET", b"/headers")
            unsafe = second.send_request(b"POST", b"/echo", body=b"not idempotent")
            async with asyncio.timeout(5):
                got = await safe.response()
                refused = await unsafe.response()
            assert second._quic.tls.session_resumed
            assert second.observed.handshakes == 1
            assert second.observed.early_data_accepted is True
            assert second.observed.session_resumed is True
            assert got.status == 200 and got.header(b"x-edge-pop") == b"b"
            origin_saw = dict((k, v) for k, v in json.loads(got.body))
            assert origin_saw.get("early-data") == "1"
            assert refused.status == 425  # RFC 8470: retry after the handshake
            assert [r[0] for r in fabric["b"].origin.recent].count(b"POST") == 0
            # after the handshake the same request is fine
            retried = await second.request(b"POST", b"/echo", body=b"not idempotent")
            assert retried.status == 200 and retried.body == b"not idempotent"
            assert len(fabric["b"].dispatcher.connections) == 1
        # single use: the same ticket again at B gets a full handshake (no 0-RTT)
        async with fabric_client(fabric.address, session_ticket=ticket) as third:
            assert (await _get(third))[:2] == (200, b"b")
            assert third.observed.session_resumed is False
            assert third.observed.early_data_accepted is False


async def test_datagrams_hashed_to_another_worker_reach_their_owner(tmp_path: Path) -> None:
    """SO_REUSEPORT spreads a client's datagrams over a PoP's workers by 4-tuple hash; those
    reaching a worker without the connection take the backhaul to the owning worker."""
    async with (
        anycast_fleet(tmp_path, ("a", "b"), workers=2) as fabric,
        fabric_client(fabric.address) as client,
    ):
        assert (await _get(client))[:2] == (200, b"a")
        assert len(fabric["a"].dispatcher.connections) == 1
        for node in ("a/1", "b/1", "b", "a/1", "a"):
            fabric.route_to(node)
            results = await asyncio.gather(*(_get(client) for _ in range(3)))
            assert all(r[:2] == (200, b"a") for r in results)
        assert client.observed.handshakes == 1 and client.closed_error is None
        assert fabric["a/1"].routes()["forwarded_out"] > 0
        assert fabric["a"].routes()["forwarded_in"] > 0
        for node in ("a/1", "b", "b/1"):
            assert not fabric[node].dispatcher.connections
        # each worker's server ID differs: the owner's CIDs name worker 0 of PoP 0
        ident = fabric["a/1"].pop.identity
        assert ident is not None and ident.node == (0, 0, 1)
        assert ident.owner_of(client._quic._peer_cid.cid) == (0, 0, 0)
        # tickets reach sibling workers too
        ticket_id = client.observed.tickets[-1].ticket
        async with asyncio.timeout(5):
            while ticket_id not in fabric["a/1"].pop.tickets:  # type: ignore[operator]
                await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------
# Ticket store
# --------------------------------------------------------------------------------------------


def _ticket(ticket_id: bytes, lifetime: float = 86400.0) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=1,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(seconds=lifetime),
        not_valid_before=now,
        resumption_secret=b"r" * 32,
        server_name="localhost",
        ticket=ticket_id,
        max_early_data_size=0xFFFFFFFF,
    )


def test_ticket_store_replicates_opens_and_bounds() -> None:
    clock = [time.time()]
    sent: list[bytes] = []
    a = FleetTicketStore(KEYS, max_tickets=3, clock=lambda: clock[0])
    b = FleetTicketStore(KEYS, max_tickets=3, clock=lambda: clock[0])
    a.set_replicator(sent.append)
    a.add(_ticket(b"1" * 64))
    (sealed,) = sent
    assert b"r" * 32 not in sealed  # the resumption secret travels sealed
    assert b.receive_replica(sealed) == "received"
    got = b.fetch(b"1" * 64)
    assert got is not None and got.resumption_secret == b"r" * 32
    assert b.fetch(b"1" * 64) is None  # single use per node
    assert a.fetch(b"1" * 64) is not None  # ... but another node still accepts it once
    assert b.fetch(b"2" * 64) is None
    # forged or foreign replicas are refused
    other = FleetTicketStore(FleetKeys([FleetKey(1, b"x" * 32, 0)], 1))
    assert other.receive_replica(sealed) == "dropped_bad_ticket"
    assert b.receive_replica(sealed[:-1] + bytes([sealed[-1] ^ 1])) == "dropped_bad_ticket"
    # bounded: the oldest go first
    for i in range(5):
        a.add(_ticket(bytes([i]) * 64))
    assert len(a) == 3 and bytes([0]) * 64 not in a and bytes([4]) * 64 in a
    # expired tickets are not served
    a.add(_ticket(b"e" * 64, lifetime=10))
    clock[0] += 11
    assert a.fetch(b"e" * 64) is None


def test_ticket_store_without_single_use_serves_repeatedly() -> None:
    store = FleetTicketStore(KEYS, single_use=False)
    store.add(_ticket(b"t" * 64))
    assert store.fetch(b"t" * 64) is not None and store.fetch(b"t" * 64) is not None


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"quic_lb": {"config_id": 7}}, "quic_lb.config_id"),
        ({"quic_lb": {"nonce_len": 3}}, "quic_lb.nonce_len"),
        ({"quic_lb": {"nonce_len": 18}}, "quic_lb.nonce_len"),
        ({"quic_lb": {"pop_bits": 30, "server_id_len": 2}}, "quic_lb.server_id_len"),
        ({"quic_lb": {"pop_index": 256}}, "quic_lb.pop_index"),
        ({"backhaul": {"listen": "nope"}}, "backhaul.listen"),
        ({"backhaul": {"workers": 17}}, "backhaul.workers"),
        ({"backhaul": {"peers": [{"name": "b", "address": "h:1"}]}}, "backhaul.listen"),
        (
            {"backhaul": {"listen": ":1", "peers": [{"name": "b", "address": "h:1"}]}},
            "backhaul.peers[0].pop_index",  # pop 0 host 0 is this PoP
        ),
        (
            {"backhaul": {"listen": ":1", "peers": [{"name": "", "pop_index": 1}]}},
            "backhaul.peers[0].name",
        ),
        (
            {"backhaul": {"listen": ":1", "peers": [{"name": "b", "pop_index": 1}]}},
            "backhaul.peers[0].address",
        ),
        ({"tickets": {"max_tickets": 0}}, "tickets.max_tickets"),
    ],
)
def test_fleet_options_are_validated(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"origin_groups": [{"servers": ["127.0.0.1:1"]}], **data})
    assert info.value.key == key


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=1300), forwarded=st.booleans())
def test_fleet_router_fuzz(data: bytes, forwarded: bool) -> None:
    flows = SharedFlows()
    r, m = router(flows=flows)
    m.mark_dead(2)
    r.register(b"12345678", "conn")
    action = r.route(data, CLIENT, 0.0, forwarded=forwarded)
    assert action.route
    if forwarded:
        assert not isinstance(action, Forward | Reset)
    if isinstance(action, Reset):
        assert len(data) > 21 and not data[0] & 0x80
