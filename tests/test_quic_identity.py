"""This node's QUIC identity: QUIC-LB CIDs naming the node, fleet reset tokens, the fleet key
file, and a guard on the aioquic internals `EdgeQuicConnection` relies on."""

from __future__ import annotations

import hashlib
import inspect
import os
import stat
from pathlib import Path

import aioquic
import pytest
from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.connection import QuicConnection, QuicConnectionId, QuicReceiveContext
from h3_client import connect_h3, server_configuration_factory

from edgeproxy.config import LimitsSection, QuicLBSection, config_from_dict
from edgeproxy.metrics import Registry
from edgeproxy.quic.dispatcher import EdgeQuicConnection, FleetRouting, start_quic_server
from edgeproxy.quic.fleet import FleetKey, FleetKeyError, FleetKeys
from edgeproxy.quic.identity import (
    DEFAULT_KEY_FILE,
    ServerIdentity,
    build_identity,
    lb_config_id,
    load_fleet_keys,
    node_name,
    quic_lb_key,
)
from edgeproxy.quic.lb import UNROUTABLE_CONFIG_ID, LBConfig, QuicLBCodec, ServerIdLayout

KEYS = FleetKeys([FleetKey(3, b"s" * 32, 0)], 3)

# --------------------------------------------------------------------------------------------
# Guard: the aioquic internals edgeproxy overrides or relies on
# --------------------------------------------------------------------------------------------

# sha256(inspect.getsource(...))[:16] in aioquic 1.7.2. When this test fails after an aioquic
# upgrade, re-read each method against its use in edgeproxy/quic/dispatcher.py (CID rewrite in
# EdgeQuicConnection.__init__, _replenish_connection_ids, _handle_stream_frame, the NEW_TOKEN
# frame in _write_handshake_done_frame) and
# edgeproxy/quic/tickets.py (ticket callbacks, 0-RTT acceptance), then update the hashes.
PINNED_SOURCES = {
    # builds _host_cids[0] / host_cid / _local_initial_source_connection_id from os.urandom,
    # binds the frame handlers (so the _handle_stream_frame override is used)
    "QuicConnection.__init__": "81aea715e34447e1",
    "QuicConnection._replenish_connection_ids": "73b127efb89c53a3",
    "QuicConnection._handle_stream_frame": "8c79348a854e307d",
    # sends each QuicConnectionId's cid and stateless_reset_token as is
    "QuicConnection._write_new_connection_id_frame": "8e58e506ea36e1d1",
    # NEW_TOKEN rides with HANDSHAKE_DONE: written inside the application packet, and
    # re-queued (so the override runs again) when the packet carrying it is lost
    "QuicConnection._write_handshake_done_frame": "026757fd99458b35",
    "QuicConnection._write_application": "c37bf64378f72b2f",
    "QuicConnection._on_handshake_done_delivery": "e27dd96ad43da7aa",
    # reads _host_cids[0].stateless_reset_token and _local_initial_source_connection_id
    "QuicConnection._serialize_transport_parameters": "be651f3ddfcd3f39",
    # parses short headers with configuration.connection_id_length; ZERO_RTT receive context
    "QuicConnection.receive_datagram": "3c7f29826050cbfe",
    # session_ticket_fetcher lookup and unconditional 0-RTT acceptance
    "tls.Context._server_handle_hello": "ce53cc7baafe259b",
    # random 64-byte ticket ids handed to session_ticket_handler
    "tls.Context._server_handle_finished": "6333c1d300ad9c6a",
    # the dispatcher's transport injection and CID issued/retired/terminated hooks
    "QuicConnectionProtocol.__init__": "d18a3e316e9b4223",
    "QuicConnectionProtocol.datagram_received": "525c2fd4dddfbcbd",
    "QuicConnectionProtocol.transmit": "31b06ca7f4e21d2e",
    "QuicConnectionProtocol._process_events": "b597fcfc85d5cfd8",
}


def _resolve(name: str) -> object:
    owner, attr = name.rsplit(".", 1)
    scope = {
        "QuicConnection": QuicConnection,
        "QuicConnectionProtocol": QuicConnectionProtocol,
        "tls.Context": tls.Context,
    }[owner]
    return getattr(scope, attr)


async def test_aioquic_internals_are_the_pinned_ones() -> None:
    assert aioquic.__version__ == "1.7.2"
    changed = [
        name
        for name, digest in PINNED_SOURCES.items()
        if hashlib.sha256(inspect.getsource(_resolve(name)).encode()).hexdigest()[:16] != digest  # type: ignore[arg-type]
    ]
    assert not changed, f"aioquic internals changed: {changed}"
    # attributes and fields used by name
    connection = QuicConnection(
        configuration=server_configuration_factory()(), original_destination_connection_id=b"o" * 8
    )
    for attr in (
        "_host_cids",
        "host_cid",
        "_host_cid_seq",
        "_local_initial_source_connection_id",
        "_remote_active_connection_id_limit",
        "_peer_cid",
        "_peer_cid_available",
        "_configuration",
        "_streams",
    ):
        assert hasattr(connection, attr), attr
    assert isinstance(connection._host_cids[0], QuicConnectionId)
    fields = set(QuicConnectionId.__dataclass_fields__)
    assert {"cid", "sequence_number", "stateless_reset_token", "was_sent"} <= fields
    assert "epoch" in QuicReceiveContext.__dataclass_fields__
    protocol = QuicConnectionProtocol(connection)
    for attr in (
        "_connection_id_issued_handler",
        "_connection_id_retired_handler",
        "_connection_terminated_handler",
        "_transport",
    ):
        assert hasattr(protocol, attr), attr


# --------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------

LAYOUT = ServerIdLayout(pop_bits=8, host_bits=4, worker_bits=4)


def make_identity(node: tuple[int, int, int], key: bytes | None = b"q" * 16) -> ServerIdentity:
    codec = QuicLBCodec([LBConfig(0, 2, 5, key=key)])
    return ServerIdentity(codec=codec, layout=LAYOUT, node=node, keys=KEYS)


def test_cids_name_their_node_and_are_unique() -> None:
    a, b = make_identity((4, 1, 2)), make_identity((5, 0, 0))
    cids = {a.new_cid() for _ in range(1000)}
    assert len(cids) == 1000 and all(len(c) == 8 for c in cids)
    # any node decodes any node's CIDs (same fleet key, same config)
    assert {b.owner_of(c) for c in cids} == {(4, 1, 2)}
    assert a.owner_of(b.new_cid()) == (5, 0, 0)
    assert a.cid_length_for(next(iter(cids))[0]) == 8
    # random bytes are either unroutable or some garbage server ID, never an exception
    for _ in range(2000):
        a.owner_of(os.urandom(8))
    assert a.owner_of(b"") is None and a.owner_of(bytes([0xE7]) + b"x" * 7) is None


def test_reset_tokens_are_the_fleets() -> None:
    a, b = make_identity((1, 0, 0)), make_identity((2, 0, 0))
    cid = a.new_cid()
    assert a.reset_token(cid) == b.reset_token(cid) == KEYS.reset_token(cid)
    assert len(a.reset_token(cid)) == 16 and a.reset_token(cid) != a.reset_token(a.new_cid())


def test_plaintext_mode_shows_the_server_id() -> None:
    ident = make_identity((7, 2, 3), key=None)
    cid = ident.new_cid()
    assert cid[1:3] == LAYOUT.pack(7, 2, 3) == ident.server_id
    assert ident.owner_of(cid) == (7, 2, 3)


def test_nonce_exhaustion_falls_back_to_unroutable_cids() -> None:
    codec = QuicLBCodec([LBConfig(0, 2, 5, key=b"q" * 16)], nonce_budget=2)
    ident = ServerIdentity(codec=codec, layout=LAYOUT, node=(1, 0, 0), keys=KEYS)
    routable = [ident.new_cid(), ident.new_cid()]
    assert all(ident.owner_of(c) == (1, 0, 0) for c in routable)
    fallback = ident.new_cid()
    assert len(fallback) == 8 and fallback[0] >> 5 == UNROUTABLE_CONFIG_ID
    assert ident.owner_of(fallback) is None


def test_build_identity_from_config() -> None:
    section = QuicLBSection(pop_index=3, host_index=1)
    ident = build_identity(section, KEYS, worker=2)
    assert ident.node == (3, 1, 2) and ident.cid_length == 8
    assert ident.owner_of(ident.new_cid()) == (3, 1, 2)
    # fleet key 3 issues under QUIC-LB config (config_id 0 + 3) mod 7
    current = ident.codec.current
    assert current is not None and current.config_id == lb_config_id(0, 3) == 3
    assert current.key == quic_lb_key(KEYS.primary, 3) != quic_lb_key(KEYS.primary, 4)
    # the QUIC-LB key is not any other fleet sub-key, nor the secret
    assert quic_lb_key(KEYS.primary, 3) not in KEYS.primary.secret
    assert node_name("ams", 0, 0) == "ams" and node_name("ams", 1, 2) == "ams/1/2"


def test_key_rotation_without_restart_keeps_every_cid_routable() -> None:
    """Two PoPs with their own copies of the key file go through add / promote / remove at
    different moments (`FleetKeys.replace` + `sync_keys`, what SIGHUP does): at every step each
    routes the other's CIDs and computes the reset token the client was given."""
    one, two = FleetKey(1, b"1" * 32, 0), FleetKey(2, b"2" * 32, 0)
    section = QuicLBSection(pop_index=1)
    a = build_identity(section, FleetKeys([one], 1))
    b = build_identity(QuicLBSection(pop_index=2), FleetKeys([one], 1))

    def reload(ident: ServerIdentity, keys: list[FleetKey], primary: int) -> None:
        ident.keys.replace(FleetKeys(keys, primary))
        ident.sync_keys()

    def routable(cid: bytes, owner: ServerIdentity, other: ServerIdentity) -> bool:
        return other.owner_of(cid) == owner.node and other.reset_token(cid) == owner.reset_token(cid)

    old_cid = a.new_cid()
    reload(a, [one, two], 1)  # step 1 at A only: A still issues under key 1
    assert routable(a.new_cid(), a, b) and routable(b.new_cid(), b, a)
    reload(b, [one, two], 1)
    reload(a, [one, two], 2)  # step 2 at A first: A issues under key 2, B already decodes it
    new_cid = a.new_cid()
    assert new_cid[0] >> 5 == 2 and old_cid[0] >> 5 == 1
    assert routable(new_cid, a, b) and routable(old_cid, a, b) and routable(b.new_cid(), b, a)
    token_before = a.reset_token(new_cid)
    reload(b, [one, two], 2)
    assert routable(new_cid, a, b) and a.reset_token(new_cid) == token_before
    for ident in (a, b):  # step 3: CIDs issued under key 1 stop routing
        reload(ident, [two], 2)
    assert b.owner_of(old_cid) is None and routable(new_cid, a, b)
    # keys whose ids are equal mod 7 cannot be live together (one codepoint each)
    with pytest.raises(FleetKeyError, match="key ids 2 and 9 are equal mod 7"):
        FleetKeys([two, FleetKey(9, b"9" * 32, 0)], 2)
    with pytest.raises(FleetKeyError, match="key ids 2 and 9 are equal mod 7"):
        FleetKeys([two], 2).add_key(9, now=0)
    assert FleetKeys([two], 2).add_key(now=0).key_id == 3
    assert FleetKeys([FleetKey(k, b"k" * 32, 0) for k in (1, 7)], 1).add_key(now=0).key_id == 9  # 8 = 1 mod 7


def test_fleet_key_file_is_created_once_in_the_state_dir(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {"pop": {"state_dir": str(tmp_path)}, "origin_groups": [{"servers": ["127.0.0.1:1"]}]}
    )
    keys = load_fleet_keys(cfg)
    path = tmp_path / DEFAULT_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_fleet_keys(cfg)
    assert again.primary.secret == keys.primary.secret
    # a configured file must exist
    missing = config_from_dict(
        {
            "fleet": {"key_file": str(tmp_path / "nope.toml")},
            "origin_groups": [{"servers": ["a:1"]}],
        }
    )
    with pytest.raises(ValueError, match=r"nope\.toml"):
        load_fleet_keys(missing)


# --------------------------------------------------------------------------------------------
# A real handshake: every CID the client gets names this node and carries the fleet token
# --------------------------------------------------------------------------------------------


async def test_every_issued_cid_is_quic_lb_with_the_fleet_reset_token() -> None:
    ident = make_identity((9, 3, 1))
    server = await start_quic_server(
        "127.0.0.1",
        0,
        server_configuration_factory(),
        _Handler(),
        LimitsSection(),
        Registry(),
        fleet=FleetRouting(identity=ident),
    )
    try:
        host, port = server.local_address
        async with connect_h3(host, port) as client:
            response = await client.request(b"GET", b"/")
            assert response.status == 200
            quic = client._quic
            (protocol,) = server.connections
            server_quic = protocol.quic
            assert isinstance(server_quic, EdgeQuicConnection)
            # the server's first CID (its Initial SCID, transport parameters) ...
            first = quic._remote_initial_source_connection_id
            assert first == server_quic.host_cid == quic._peer_cid.cid
            assert quic._peer_cid.sequence_number == 0
            # ... and those of its NEW_CONNECTION_ID frames (up to the client's limit of 8)
            issued = [c for c in quic._peer_cid_available]
            assert len(issued) == 7
            for peer_cid in [quic._peer_cid, *issued]:
                assert ident.owner_of(peer_cid.cid) == (9, 3, 1)
                assert len(peer_cid.cid) == 8
                assert peer_cid.stateless_reset_token == KEYS.reset_token(peer_cid.cid)
            # the router knows every one of them
            for peer_cid in [quic._peer_cid, *issued]:
                assert server.router.lookup(peer_cid.cid) is protocol
            # switching to the next CID (and its replacement NEW_CONNECTION_ID) keeps the rule
            client.change_connection_id()
            assert (await client.request(b"GET", b"/")).status == 200
            for peer_cid in quic._peer_cid_available:
                assert ident.owner_of(peer_cid.cid) == (9, 3, 1)
                assert peer_cid.stateless_reset_token == KEYS.reset_token(peer_cid.cid)
    finally:
        await server.close()


class _Handler:
    pop_id = "test"

    def new_request_id(self) -> str:
        return "r"

    def reject(self, *args: object) -> object:
        raise AssertionError("no rejections expected")

    async def handle(self, head: object, body: object, sink: object) -> None:
        from edgeproxy.http.messages import ResponseHead

        await sink.start(ResponseHead(200, [(b"content-length", b"2")]))  # type: ignore[attr-defined]
        await sink.write(b"ok")  # type: ignore[attr-defined]
        await sink.end()  # type: ignore[attr-defined]
