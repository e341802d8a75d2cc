"""edgeproxy's QUIC datagram dispatcher: one client-facing UDP socket in front of many aioquic
connections, and one PoP's share of the fleet-wide routing of QUIC by connection ID.

Split in two, following the house rule of sans-IO cores:

* `Router` is pure. Given a datagram, the client address, the time and whether the datagram
  arrived over the backhaul, it decides what to do with it: deliver to a known connection,
  accept a new one, forward it to the PoP (or worker) that owns it, answer with a stateless
  reset or Version Negotiation, or drop it with a named reason. It reads its connection table,
  the QUIC-LB identity (`RoutingIdentity`), fleet membership (`Membership`) and the replicated
  flow table (`FlowLookup`) but never touches a socket and never writes shared state.
* `QuicDispatcher` is the asyncio shell. It executes the actions, creates `EdgeQuicConnection`s
  itself (not aioquic's `QuicServer`) and keeps the router's table in step with the connection
  IDs aioquic issues and retires. Its client-facing transport is injected: in production its
  own UDP socket bound to the anycast address (`start_quic_server`), in tests a shared "fabric"
  socket that simulates anycast. `datagram_received(data, addr)` is the socket's entry point,
  `forwarded_received(...)` the backhaul's: a forwarded datagram is processed as if it had come
  from the client's own address, so the connection answers the client directly from the
  anycast socket and sees no address change.

Routing rules (first match wins; see the reference notes, sections 1.3 and 2):

1. Known DCID -> the local connection.
2. Initial or 0-RTT whose DCID is not known here (client-chosen, or a server-chosen one of a
   connection whose Initial went elsewhere): a DCID that decodes to another live node is
   forwarded to it; else the flow table entry of ``quic_initial_key(client, dcid)`` names the
   PoP that accepted the handshake; else an Initial is accepted here (and the shell publishes
   the flow key) and a 0-RTT packet is dropped. A forwarded Initial is always accepted by the
   node it was forwarded to: it never travels twice.
3. Any other packet is routed by its DCID, a CID some node of the fleet issued:
   our own server ID but no connection -> drop (``unknown_local_cid``; kept simple: no reset
   even though the connection is surely gone, which spares a restarted node from resetting
   CIDs of its previous incarnation that a sibling may be handling); another node's ->
   forward if the owner is alive, a stateless reset (short headers only, smaller than the
   trigger, so never an amplifier) if membership says it is dead (a signal an attacker cannot
   influence, RFC 9000 section 21.11), drop ``unknown_server`` if its liveness is unknown; an
   unroutable DCID -> the flow table's DCID entry, else drop ``unroutable_cid``.
4. A datagram that arrived over the backhaul is never forwarded again
   (``dropped_forward_loop``), whatever the tables say.

Address validation (RFC 9000 section 8.1): an Initial that will be accepted is first checked
for a token. A Retry token (sealed with the fleet key, so minted by any PoP) that opens for the
client's address and the Initial's DCID validates the address, and the connection is created
with the token's original DCID and Retry SCID (aioquic then sends the matching transport
parameters); so does a NEW_TOKEN token that opens for the client's IP, the first time this PoP
sees it (`Router.reused_tokens` counts the others). Every connection is given one such token
in a NEW_TOKEN frame sent with HANDSHAKE_DONE, so a client that comes back skips the Retry. An
invalid token only means "not validated", never a drop. While `retry_above` or more handshakes are in progress on
this node, an unvalidated Initial gets a `Retry` (route ``retry``), which creates no state: a
flood of spoofed Initials cannot cost handshakes. The Retry's SCID is a CID of this node.

Without a `RoutingIdentity` (plain single-node mode) only rule 1 and the Initial rules apply,
with random CIDs of a fixed length, as aioquic's own server does.

Every datagram is counted once in `edgeproxy_quic_datagrams_total{route}` with route one of
`local`, `new`, `forwarded_out`, `forwarded_in` (delivered to or accepted by a connection after
crossing the backhaul), `reset`, `version_negotiation` or `dropped_<reason>`.

`EdgeQuicConnection` subclasses aioquic's `QuicConnection` (pinned to aioquic 1.7.2, whose
private attributes it touches) to issue QUIC-LB connection IDs with fleet reset tokens, to
bound concurrent request streams, to grant stream flow control credit only as the application
consumes data and to remember which streams began in 0-RTT; see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from aioquic import tls
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    Limit,
    NetworkAddress,
    QuicConnection,
    QuicConnectionId,
    QuicReceiveContext,
    QuicTokenHandler,
    stream_is_unidirectional,
)
from aioquic.quic.packet import QuicFrameType, QuicProtocolVersion, encode_quic_retry
from aioquic.quic.packet_builder import QuicPacketBuilder, QuicPacketBuilderStop
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import SessionTicketFetcher, SessionTicketHandler

from gossip.flowtable import quic_initial_key

from ..metrics import Registry
from .fleet import (
    CLOCK_SKEW,
    MIN_SECRET_LENGTH,
    MIN_STATELESS_RESET,
    NEW_TOKEN_LIFETIME,
    RETRY_TOKEN_LIFETIME,
    FleetKey,
    FleetKeys,
    NewTokenContents,
    ReplayFilter,
    ReplayVerdict,
    RetryTokenContents,
    TokenKind,
    token_kind,
)
from .packet import (
    MIN_INITIAL_DATAGRAM_SIZE,
    QUIC_V1,
    LongHeader,
    LongPacketType,
    Malformed,
    build_version_negotiation,
    parse_header,
)

if TYPE_CHECKING:
    from ..config import LimitsSection
    from ..http.handler import RequestHandler

log = logging.getLogger(__name__)

H = TypeVar("H")

DEFAULT_CID_LENGTH = 8
# Per-stream receive window: how many request-body bytes a client may have in flight or buffered
# ahead of the application. Bounds memory at max_streams * window per connection while allowing
# window/RTT of upload throughput per stream (256 KiB at 20 ms is ~100 Mbit/s).
DEFAULT_STREAM_RECEIVE_WINDOW = 256 * 1024
# RFC 9000 section 7.2: a client's first Destination Connection ID is at least 8 bytes.
MIN_CLIENT_DCID_LENGTH = 8
# Seconds a published handshake flow entry lives: long enough for the handshake (after it the
# client uses server-chosen, routable CIDs), refreshed for unroutable CID entries.
DEFAULT_FLOW_TTL = 30.0
# Handshakes in progress on this worker at or above which an Initial without a valid address
# validation token is answered with a Retry instead of creating a connection.
DEFAULT_RETRY_ABOVE = 1000


# --------------------------------------------------------------------------------------------
# Pure core: what the router reads, its actions, the router
# --------------------------------------------------------------------------------------------

# A node of the fleet: (pop index, host index, worker index), the fields of a QUIC-LB server ID
# (see `lb.ServerIdLayout`). Each node has its own backhaul address.
NodeId = tuple[int, int, int]


class RoutingIdentity(Protocol):
    """What the router needs of this node's QUIC-LB identity (`identity.ServerIdentity`)."""

    @property
    def node(self) -> NodeId: ...

    @property
    def cid_length(self) -> int:
        """Length of the CIDs this node issues (and of short-header DCIDs it cannot decode)."""
        ...

    def cid_length_for(self, first_octet: int) -> int | None:
        """Length of a CID starting with `first_octet` under a live QUIC-LB config, else None."""
        ...

    def owner_of(self, cid: bytes) -> NodeId | None:
        """The node that issued `cid`, None if the CID is unroutable (or decodes to garbage)."""
        ...


class ConnectionIdentity(RoutingIdentity, Protocol):
    """What the shell needs besides: minting CIDs and reset tokens, building resets."""

    def new_cid(self) -> bytes: ...

    def reset_token(self, cid: bytes) -> bytes: ...

    def stateless_reset(self, cid: bytes, trigger_len: int) -> bytes | None:
        """A stateless reset for `cid`, smaller than `trigger_len`; None if it cannot be."""
        ...


class Membership(Protocol):
    """Fleet membership as the router sees it (`backhaul.StaticMembership`, later gossip)."""

    def is_alive(self, pop: int) -> bool | None:
        """True alive, False known dead (by a signal an attacker cannot forge), None unknown."""
        ...

    def backhaul_address(self, node: NodeId) -> tuple[str, int] | None:
        """Where `node` receives backhaul frames; None if it is not known."""
        ...

    def node_named(self, name: str) -> NodeId | None:
        """The node a flow-table owner name stands for."""
        ...


class FlowLookup(Protocol):
    """The replicated flow-ownership table (`gossip.flowtable.FlowTable` fits)."""

    def lookup(self, key: bytes, now: float) -> str | None: ...

    def publish(self, key: bytes, now: float, ttl: float) -> Any: ...

    def delete(self, key: bytes, now: float) -> Any: ...


def initial_flow_key(addr: NetworkAddress, dcid: bytes) -> bytes | None:
    """The flow-table key of a handshake, ``gossip.flowtable.quic_initial_key`` (None if the
    address cannot be one: the key then simply is not used)."""
    try:
        return quic_initial_key(str(addr[0]).split("%", 1)[0], int(addr[1]), dcid)
    except (ValueError, TypeError, IndexError):
        return None


def cid_flow_key(cid: bytes) -> bytes:
    """The flow-table key of an unroutable (0b111) connection ID a node issued: ``"C" || cid``
    (the flow table's own keys start with "Q" and "T")."""
    return b"C" + cid


@dataclass(frozen=True, slots=True)
class Deliver(Generic[H]):
    """Hand the datagram to an existing connection."""

    handle: H
    route = "local"


@dataclass(frozen=True, slots=True)
class Accept:
    """Create a connection for this v1 Initial; `original_dcid` is the client-chosen DCID.

    `flow_key` is the handshake's flow-table key, for the shell to publish (None: no table)."""

    original_dcid: bytes
    scid: bytes
    version: int
    token: bytes
    flow_key: bytes | None = None
    # Set when a Retry token validated the address: the Initial's DCID, which the Retry chose
    # (`original_dcid` is then the client's first DCID, from the token).
    retry_scid: bytes | None = None
    route = "new"


@dataclass(frozen=True, slots=True)
class Retry:
    """Answer this v1 Initial with a Retry (its address is not validated and this node is
    busy); `original_dcid` is the Initial's DCID, `scid` the client's SCID."""

    original_dcid: bytes
    scid: bytes
    version: int
    route = "retry"


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the datagram over the backhaul to `node`, which owns its connection."""

    node: NodeId
    route = "forwarded_out"


@dataclass(frozen=True, slots=True)
class Reset:
    """Answer with a stateless reset for `cid` (its owner is known dead), smaller than the
    `trigger_len`-byte datagram."""

    cid: bytes
    trigger_len: int
    route = "reset"


@dataclass(frozen=True, slots=True)
class VersionNegotiation:
    """Send `packet` back to the client address."""

    packet: bytes
    route = "version_negotiation"


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str

    @property
    def route(self) -> str:
        return f"dropped_{self.reason}"


Action = Deliver[H] | Accept | Retry | Forward | Reset | VersionNegotiation | Drop


class Router(Generic[H]):
    """Routing decisions for datagrams reaching this node, and the CID table behind them.

    `H` is whatever the shell uses as a connection handle (hashable). The router keeps both
    directions of the mapping so that a terminated connection is forgotten in O(its CIDs).
    `identity`, `membership` and `flows` are optional: without an identity the router is the
    single-node router (random CIDs of `cid_length`); without membership no datagram is
    forwarded or reset; without flows no table is consulted.
    """

    def __init__(
        self,
        *,
        cid_length: int = DEFAULT_CID_LENGTH,
        max_connections: int = 10000,
        versions: Sequence[int] = (QUIC_V1,),
        identity: RoutingIdentity | None = None,
        membership: Membership | None = None,
        flows: FlowLookup | None = None,
        flow_name: str | None = None,
        tokens: FleetKeys | None = None,
        retry_above: int | None = None,
        retry_token_lifetime: float = RETRY_TOKEN_LIFETIME,
    ) -> None:
        self.identity = identity
        # Address validation: `tokens` opens Retry and NEW_TOKEN tokens; with `retry_above`
        # (None: never) handshakes in progress, unvalidated Initials get a Retry.
        self.tokens = tokens
        self.retry_above = retry_above
        self.retry_token_lifetime = retry_token_lifetime
        # NEW_TOKEN tokens validate an address once (RFC 9000 section 8.1.3): at this PoP; see
        # `fleet` for why fleet-wide single use is best effort.
        self._new_token_ids = ReplayFilter(NEW_TOKEN_LIFETIME + CLOCK_SKEW)
        #: NEW_TOKEN tokens presented again (treated as no token: the client may get a Retry).
        self.reused_tokens = 0
        self._handshaking: set[H] = set()
        self.cid_length = identity.cid_length if identity is not None else cid_length
        self.max_connections = max_connections
        self.versions = tuple(versions)
        self.membership = membership
        self.flows = flows
        # This node's name in the flow table: entries it owns are not forwarded anywhere.
        self.flow_name = flow_name
        self._cids: dict[bytes, H] = {}
        self._by_handle: dict[H, set[bytes]] = {}

    # -- table ---------------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._by_handle)

    def lookup(self, cid: bytes) -> H | None:
        return self._cids.get(cid)

    def cids_of(self, handle: H) -> frozenset[bytes]:
        return frozenset(self._by_handle.get(handle, ()))

    @property
    def handshakes_in_progress(self) -> int:
        return len(self._handshaking)

    def add_connection(self, handle: H) -> None:
        """A new connection, whose handshake is in progress until `handshake_done`."""
        self._by_handle.setdefault(handle, set())
        self._handshaking.add(handle)

    def handshaking(self, handle: H) -> bool:
        return handle in self._handshaking

    def handshake_done(self, handle: H) -> None:
        self._handshaking.discard(handle)

    def register(self, cid: bytes, handle: H) -> bool:
        """Map `cid` to `handle`; False (and no change) if another connection already owns it."""
        owner = self._cids.get(cid)
        if owner is not None and owner is not handle:
            return False
        self._cids[cid] = handle
        self._by_handle.setdefault(handle, set()).add(cid)
        return True

    def unregister(self, cid: bytes, handle: H) -> None:
        """Forget `cid` if `handle` owns it (a retirement must not remove another's mapping)."""
        if self._cids.get(cid) is handle:
            del self._cids[cid]
            cids = self._by_handle.get(handle)
            if cids is not None:
                cids.discard(cid)

    def forget(self, handle: H) -> None:
        """Drop a connection and all its CIDs."""
        self._handshaking.discard(handle)
        for cid in self._by_handle.pop(handle, ()):
            if self._cids.get(cid) is handle:
                del self._cids[cid]

    # -- decisions -----------------------------------------------------------------------------

    def _short_cid_length(self, data: bytes) -> int:
        """A short header does not encode its DCID length: QUIC-LB CIDs self-encode it in
        their first octet (the datagram's second byte)."""
        identity = self.identity
        if identity is None or len(data) < 2:
            return self.cid_length
        length = identity.cid_length_for(data[1])
        return self.cid_length if length is None else length

    def route(
        self,
        data: bytes,
        addr: NetworkAddress,
        now: float,
        *,
        forwarded: bool = False,
        wall_now: float | None = None,
    ) -> Action[H]:
        """Decide what to do with one datagram from `addr` received at `now`.

        `forwarded` says it crossed the backhaul already (then `addr` is the client's address
        as the forwarding node saw it): it is delivered or accepted here, or dropped.
        `wall_now` is the Unix time tokens are checked against (defaults to `now`).
        """
        header = parse_header(data, self._short_cid_length(data))
        if isinstance(header, Malformed):
            return Drop(header.reason)

        if isinstance(header, LongHeader):
            if header.is_version_negotiation:
                # Never answer a Version Negotiation packet: two servers spoofed at each other
                # would otherwise loop forever.
                return Drop("version_negotiation_packet")
            if header.version not in self.versions:
                # RFC 9000 section 6.1: only datagrams a client's first flight could be are
                # answered, which caps the reflection at well under 1x.
                if len(data) < MIN_INITIAL_DATAGRAM_SIZE:
                    return Drop("unsupported_version")
                return VersionNegotiation(
                    build_version_negotiation(
                        dcid=header.scid,
                        scid=header.dcid,
                        versions=self.versions,
                        # the 6 arbitrary bits: echo the client's, no randomness needed
                        unused_bits=data[0],
                    )
                )
            if not header.fixed_bit:
                return Drop("fixed_bit")
            handle = self._cids.get(header.dcid)
            if handle is not None:
                return Deliver(handle)
            if header.packet_type in (LongPacketType.INITIAL, LongPacketType.ZERO_RTT):
                return self._route_client_long(
                    header, data, addr, now, forwarded, now if wall_now is None else wall_now
                )
            return self._route_by_cid(header.dcid, data, now, forwarded, short=False)

        # Short header. Version unknown by construction; every connection we run is v1 without
        # the grease_quic_bit extension, so the fixed bit must be set (RFC 9000 section 17.3).
        if not header.fixed_bit:
            return Drop("fixed_bit")
        handle = self._cids.get(header.dcid)
        if handle is not None:
            return Deliver(handle)
        return self._route_by_cid(header.dcid, data, now, forwarded, short=True)

    def _live_peer(self, node: NodeId) -> bool:
        """`node` is another node that is alive and reachable over the backhaul."""
        membership = self.membership
        if membership is None or self.identity is None or node == self.identity.node:
            return False
        if node[0] != self.identity.node[0] and membership.is_alive(node[0]) is not True:
            return False
        return membership.backhaul_address(node) is not None

    def _flow_owner(self, key: bytes | None, now: float) -> NodeId | None:
        """Another live node that the flow table says owns `key`."""
        if key is None or self.flows is None or self.membership is None:
            return None
        name = self.flows.lookup(key, now)
        if name is None or name == self.flow_name:
            return None
        node = self.membership.node_named(name)
        if node is None or not self._live_peer(node):
            return None
        return node

    def _route_client_long(
        self,
        header: LongHeader,
        data: bytes,
        addr: NetworkAddress,
        now: float,
        forwarded: bool,
        wall_now: float,
    ) -> Action[H]:
        """An Initial or 0-RTT packet with a DCID this node has no connection for."""
        flow_key = initial_flow_key(addr, header.dcid) if self.flows is not None else None
        if not forwarded and self.identity is not None:
            # A server-chosen DCID (the client's Initials after the server's first one), or a
            # client-chosen one that happens to decode to a live node: that node accepts it.
            owner = self.identity.owner_of(header.dcid)
            if owner is not None and self._live_peer(owner):
                return Forward(owner)
            owner = self._flow_owner(flow_key, now)
            if owner is not None:
                return Forward(owner)
        if header.packet_type != LongPacketType.INITIAL:
            return Drop("unknown_cid")
        if len(data) < MIN_INITIAL_DATAGRAM_SIZE:
            return Drop("initial_too_small")
        if len(header.dcid) < MIN_CLIENT_DCID_LENGTH:
            return Drop("initial_dcid_too_short")
        if self.connection_count >= self.max_connections:
            return Drop("max_connections")
        validated, original_dcid, retry_scid = self._validate_token(header, addr, wall_now)
        if (
            not validated
            and self.retry_above is not None
            and self.handshakes_in_progress >= self.retry_above
        ):
            return Retry(original_dcid=header.dcid, scid=header.scid, version=header.version)
        return Accept(
            original_dcid=original_dcid,
            scid=header.scid,
            version=header.version,
            token=header.token,
            flow_key=flow_key,
            retry_scid=retry_scid,
        )

    def _validate_token(
        self, header: LongHeader, addr: NetworkAddress, wall_now: float
    ) -> tuple[bool, bytes, bytes | None]:
        """(address validated, original DCID, Retry SCID) for an Initial's token. An invalid
        token means "not validated" (RFC 9000 section 8.1.3), never a drop."""
        token = header.token
        if not token or self.tokens is None:
            return False, header.dcid, None
        kind = token_kind(token)
        if kind is TokenKind.RETRY:
            opened = self.tokens.open_retry_token(
                token, addr, wall_now, dcid=header.dcid, lifetime=self.retry_token_lifetime
            )
            if isinstance(opened, RetryTokenContents):
                return True, opened.original_dcid, opened.retry_scid
        elif kind is TokenKind.NEW_TOKEN:
            opened_new = self.tokens.open_new_token(token, addr, wall_now)
            if isinstance(opened_new, NewTokenContents):
                if self._new_token_ids.check_and_add(opened_new.token_id, wall_now) is ReplayVerdict.FRESH:
                    return True, header.dcid, None
                self.reused_tokens += 1
        return False, header.dcid, None

    def _route_by_cid(
        self, dcid: bytes, data: bytes, now: float, forwarded: bool, *, short: bool
    ) -> Action[H]:
        """A packet for a connection this node does not have, by the CID's owner."""
        identity = self.identity
        if identity is None:
            # Never answered: a reply to an unknown CID could be a reset oracle.
            return Drop("unknown_cid")
        owner = identity.owner_of(dcid)
        if owner is None:
            if not forwarded:
                node = self._flow_owner(cid_flow_key(dcid), now)
                if node is not None:
                    return Forward(node)
            return Drop("unroutable_cid")
        if owner == identity.node:
            # Ours but unknown: closed, or never issued. Not a reset: see the module docstring.
            return Drop("unknown_local_cid")
        if forwarded:
            return Drop("forward_loop")
        if self._live_peer(owner):
            return Forward(owner)
        membership = self.membership
        if (
            membership is not None
            and owner[0] != identity.node[0]
            and membership.is_alive(owner[0]) is False
        ):
            # The owner PoP is known dead: no endpoint sharing the reset key can still have
            # this connection (RFC 9000 section 21.11), so end it now rather than leaving the
            # client to its idle timeout. Only short headers: a client in the handshake has no
            # reset token yet.
            if not short:
                return Drop("dead_owner")
            if len(data) <= MIN_STATELESS_RESET:
                # A reset must be smaller than its trigger and cannot be under 21 bytes.
                return Drop("reset_too_small")
            return Reset(dcid, len(data))
        return Drop("unknown_server")


# --------------------------------------------------------------------------------------------
# aioquic connection subclass
# --------------------------------------------------------------------------------------------


class EdgeQuicConnection(QuicConnection):
    """aioquic's `QuicConnection` with edge policies. Pinned to aioquic 1.7.2 (private API).

    * `max_streams_bidi`: aioquic hard-codes 128 concurrent bidirectional streams
      (`_local_max_streams_bidi`) and `QuicConfiguration` has no field for it; the limit is
      replaced right after construction, before the transport parameters are serialised (that
      happens when the first datagram is built), so the peer sees it as
      `initial_max_streams_bidi`. aioquic raises it by one each time a stream is discarded.
    * `stream_receive_window`: aioquic grants stream credit (MAX_STREAM_DATA) when data
      *arrives*, doubling the window whenever half of it was received, so an application that
      reads a request body slowly buffers it without bound. For bidirectional streams this
      subclass instead advertises `consumed + window`, where consumed is the bytes aioquic
      delivered minus those the application reported as still unread through
      `set_stream_unread`. Credit is only extended in steps of at least window/2 to avoid a
      MAX_STREAM_DATA frame per read. Unidirectional streams (H3 control and QPACK streams, which
      are consumed as they arrive) keep aioquic's behaviour.

    * `cid_source` / `reset_token_for` (servers): every connection ID this endpoint issues comes
      from `cid_source` (QUIC-LB CIDs naming this node, see `identity.ServerIdentity`) with the
      stateless reset token `reset_token_for(cid)` (fleet-derived, so any PoP can compute it).
      aioquic draws the first CID and token from `os.urandom` in `__init__`; they are replaced
      right after, before anything is sent or registered: `_host_cids[0]`, `host_cid` and
      `_local_initial_source_connection_id` (the transport parameters, serialised with the
      first datagram, carry the new CID and token). `_replenish_connection_ids`, which mints the
      NEW_CONNECTION_ID CIDs, is overridden likewise. `configuration.connection_id_length` must
      equal the length of the CIDs `cid_source` returns: aioquic parses short headers with it.
    * 0-RTT: `started_in_early_data(stream_id)` says whether STREAM frames of a stream arrived
      in 0-RTT packets (recorded by overriding `_handle_stream_frame`), for RFC 8470's 425.

    The aioquic internals relied on are pinned by tests/test_quic_identity.py.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        session_ticket_fetcher: SessionTicketFetcher | None = None,
        session_ticket_handler: SessionTicketHandler | None = None,
        max_streams_bidi: int | None = None,
        stream_receive_window: int | None = None,
        cid_source: Callable[[], bytes] | None = None,
        reset_token_for: Callable[[bytes], bytes] | None = None,
        new_token_for: Callable[[NetworkAddress], bytes] | None = None,
        token_handler: QuicTokenHandler | None = None,
    ) -> None:
        self._cid_source = None if configuration.is_client else cid_source
        self._reset_token_for = reset_token_for
        self._new_token_for = None if configuration.is_client else new_token_for
        self._early_streams: set[int] = set()
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
            session_ticket_fetcher=session_ticket_fetcher,
            session_ticket_handler=session_ticket_handler,
            token_handler=token_handler,
        )
        if self._cid_source is not None:
            cid = self._mint_cid()
            self._host_cids[0] = QuicConnectionId(
                cid=cid,
                sequence_number=0,
                stateless_reset_token=self._token_for(cid),
                was_sent=True,
            )
            self.host_cid = cid
            self._local_initial_source_connection_id = cid
        if max_streams_bidi is not None:
            self._local_max_streams_bidi = Limit(
                frame_type=QuicFrameType.MAX_STREAMS_BIDI,
                name="max_streams_bidi",
                value=max_streams_bidi,
            )
        self._receive_window = stream_receive_window
        self._stream_unread: dict[int, int] = {}
        # Streams whose remaining input the application discards (rejected requests): they get
        # no more credit, so a client ignoring STOP_SENDING cannot keep pushing data.
        self._credit_frozen: set[int] = set()

    # -- connection IDs ----------------------------------------------------------------------------

    def _mint_cid(self) -> bytes:
        assert self._cid_source is not None
        cid = self._cid_source()
        if len(cid) != self._configuration.connection_id_length:
            raise ValueError(
                f"cid_source returned a {len(cid)}-byte CID, the configuration says "
                f"{self._configuration.connection_id_length}"
            )
        return cid

    def _token_for(self, cid: bytes) -> bytes:
        if self._reset_token_for is None:
            return os.urandom(16)
        return self._reset_token_for(cid)

    def _write_handshake_done_frame(self, builder: QuicPacketBuilder) -> None:
        # A NEW_TOKEN frame rides with HANDSHAKE_DONE: sent once the handshake is confirmed,
        # and sent again (a fresh token) whenever that packet is lost, since aioquic then
        # re-queues HANDSHAKE_DONE.
        super()._write_handshake_done_frame(builder=builder)
        if self._new_token_for is None or not self._network_paths:
            return
        try:
            token = self._new_token_for(self._network_paths[0].addr)
        except Exception:
            log.exception("cannot mint a NEW_TOKEN token")
            return
        try:
            buf = builder.start_frame(QuicFrameType.NEW_TOKEN, capacity=1 + 8 + len(token))
        except QuicPacketBuilderStop:
            return  # no room left in this packet: the token is an optimisation, skip it
        buf.push_uint_var(len(token))
        buf.push_bytes(token)
        if self._quic_logger is not None and builder.quic_logger_frames is not None:
            builder.quic_logger_frames.append(self._quic_logger.encode_new_token_frame(token=token))

    def _replenish_connection_ids(self) -> None:
        if self._cid_source is None:
            super()._replenish_connection_ids()
            return
        # As aioquic: keep min(8, peer's active_connection_id_limit) CIDs issued.
        while len(self._host_cids) < min(8, self._remote_active_connection_id_limit):
            try:
                cid = self._mint_cid()
            except Exception:
                # e.g. the QUIC-LB nonce space is exhausted: issue fewer CIDs, keep going.
                log.exception("cannot mint a connection ID")
                return
            self._host_cids.append(
                QuicConnectionId(
                    cid=cid,
                    sequence_number=self._host_cid_seq,
                    stateless_reset_token=self._token_for(cid),
                )
            )
            self._host_cid_seq += 1

    # -- 0-RTT -------------------------------------------------------------------------------------

    def _handle_stream_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        if context.epoch == tls.Epoch.ZERO_RTT:
            start = buf.tell()
            # A malformed frame is left to aioquic's own parsing to report.
            with contextlib.suppress(BufferReadError):
                self._early_streams.add(buf.pull_uint_var())
            buf.seek(start)
        super()._handle_stream_frame(context, frame_type, buf)

    def started_in_early_data(self, stream_id: int) -> bool:
        """True if STREAM frames of `stream_id` arrived in 0-RTT packets (RFC 8470 early data)."""
        return stream_id in self._early_streams

    # -- flow control ------------------------------------------------------------------------------

    @property
    def receive_window(self) -> int | None:
        return self._receive_window

    def set_stream_unread(self, stream_id: int, unread: int) -> bool:
        """Record how many delivered bytes of `stream_id` the application has not consumed yet.

        Returns True when this frees enough credit that a MAX_STREAM_DATA is due, in which case
        the caller should transmit soon.
        """
        window = self._receive_window
        stream = self._streams.get(stream_id)
        if window is None or stream is None or stream.receiver.is_finished:
            # Nothing more will arrive: no credit to compute, nothing to remember.
            self._stream_unread.pop(stream_id, None)
            return False
        if unread > 0:
            self._stream_unread[stream_id] = unread
        else:
            self._stream_unread.pop(stream_id, None)
        if stream_id in self._credit_frozen:
            return False
        return (
            self._credit_target(stream_id, stream, window) - stream.max_stream_data_local
            >= window // 2
        )

    def freeze_stream_credit(self, stream_id: int) -> None:
        """Grant `stream_id` no more receive credit (its input is being discarded)."""
        stream = self._streams.get(stream_id)
        if (
            self._receive_window is not None
            and stream is not None
            and not stream.receiver.is_finished
        ):
            self._credit_frozen.add(stream_id)

    def forget_stream(self, stream_id: int) -> None:
        """The application is done with `stream_id`'s input."""
        self._stream_unread.pop(stream_id, None)
        self._early_streams.discard(stream_id)

    def stream_receive_finished(self, stream_id: int) -> bool:
        """True once the peer's side of the stream ended (FIN or reset) or the stream is gone."""
        stream = self._streams.get(stream_id)
        return stream is None or stream.receiver.is_finished

    def stop_receiving(self, stream_id: int, error_code: int) -> None:
        """STOP_SENDING with `error_code` unless the peer already finished sending."""
        if not self.stream_receive_finished(stream_id):
            self.stop_stream(stream_id, error_code)
        self.freeze_stream_credit(stream_id)

    def stream_send_buffered(self, stream_id: int) -> int:
        """Bytes written to `stream_id` and not yet acknowledged (sent or not): what aioquic holds
        in memory for it. 0 once the stream is gone."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def stream_credit(self, stream_id: int) -> tuple[int, int] | None:
        """(bytes delivered to the application, MAX_STREAM_DATA advertised); for tests/metrics."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        return stream.receiver.starting_offset(), stream.max_stream_data_local

    def _credit_target(self, stream_id: int, stream: QuicStream, window: int) -> int:
        consumed = stream.receiver.starting_offset() - self._stream_unread.get(stream_id, 0)
        return consumed + window

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        window = self._receive_window
        stream_id = stream.stream_id
        if window is None or stream_id is None or stream_is_unidirectional(stream_id):
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
            return
        if stream.receiver.is_finished:
            # All data up to the FIN arrived (or the stream was reset): no credit is needed.
            self._credit_frozen.discard(stream_id)
            self._stream_unread.pop(stream_id, None)
            return
        if stream_id in self._credit_frozen:
            return
        target = self._credit_target(stream_id, stream, window)
        if target - stream.max_stream_data_local >= window // 2:
            stream.max_stream_data_local = target
        # aioquic's writer doubles the window when receiver.highest_offset passes half of it.
        # Hide the received offset for the duration of the call so only the frame writing
        # (and its loss handling) of aioquic is used, not its auto-tuning.
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            stream.receiver.highest_offset = highest


# --------------------------------------------------------------------------------------------
# Connection protocol base
# --------------------------------------------------------------------------------------------


class EdgeConnectionProtocol(QuicConnectionProtocol):
    """A `QuicConnectionProtocol` that a `QuicDispatcher` owns.

    Adds what the dispatcher needs to shut a connection down deterministically: `aclose()` sends
    CONNECTION_CLOSE, stops aioquic's timers (so nothing fires on a closed socket) and waits for
    every task the subclass created. Subclasses override `close()` for their application error
    code and `_cancel_tasks()` for their tasks.
    """

    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self._shut_down = False

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    def transmit_soon(self) -> None:
        if not self._shut_down:
            self._transmit_soon()

    def transmit(self) -> None:
        # After shutdown the socket may be closed; before the first datagram was processed
        # aioquic has no network path and its datagrams_to_send() would raise IndexError.
        if self._shut_down or self._transport is None or not self._quic._network_paths:
            self._transmit_task = None
            return
        super().transmit()

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self._shut_down:
            return
        super().datagram_received(data, addr)

    async def _cancel_tasks(self) -> None:
        """Cancel and await the subclass's tasks; called by `aclose` (must be idempotent)."""

    async def aclose(self) -> None:
        """Close the connection now, stop its timers and await its tasks. Idempotent."""
        if not self._shut_down:
            self.close()
        self._stop_timers()
        await self._cancel_tasks()

    def _stop_timers(self) -> None:
        self._shut_down = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_task is not None:
            self._transmit_task.cancel()
            self._transmit_task = None


ProtocolFactory = Callable[[EdgeQuicConnection], EdgeConnectionProtocol]


# --------------------------------------------------------------------------------------------
# Shell
# --------------------------------------------------------------------------------------------


class ForwardSink(Protocol):
    """The backhaul as the dispatcher uses it (`backhaul.Backhaul`)."""

    def forward(
        self,
        node: NodeId,
        datagram: bytes,
        client_addr: NetworkAddress,
        anycast_addr: tuple[str, int],
    ) -> bool:
        """Send `datagram` to `node`; False if it could not be sent (counted by the caller)."""
        ...


class QuicDispatcher(asyncio.DatagramProtocol):
    """The client-facing socket's protocol: routes datagrams with a `Router`, runs the
    connections, and executes forwards and resets.

    The client-facing transport is either the dispatcher's own socket (it is then the
    protocol of that socket and closes it on `close`) or injected with `attach_transport`
    (shared, not closed). Everything a connection sends goes out through it.
    """

    def __init__(
        self,
        *,
        configuration_factory: Callable[[], QuicConfiguration],
        protocol_factory: ProtocolFactory,
        metrics: Registry,
        max_connections: int = 10000,
        cid_length: int = DEFAULT_CID_LENGTH,
        max_streams_bidi: int = 128,
        stream_receive_window: int | None = DEFAULT_STREAM_RECEIVE_WINDOW,
        session_ticket_fetcher: SessionTicketFetcher | None = None,
        session_ticket_handler: SessionTicketHandler | None = None,
        identity: ConnectionIdentity | None = None,
        membership: Membership | None = None,
        flows: FlowLookup | None = None,
        flow_name: str | None = None,
        flow_ttl: float = DEFAULT_FLOW_TTL,
        backhaul: ForwardSink | None = None,
        tokens: FleetKeys | None = None,
        retry_above: int | None = DEFAULT_RETRY_ABOVE,
        retry_token_lifetime: float = RETRY_TOKEN_LIFETIME,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        if tokens is None:
            # A lone server: Retry tokens only need to open here.
            tokens = FleetKeys([FleetKey(0, os.urandom(MIN_SECRET_LENGTH), int(time.time()))], 0)
        self._configuration_factory = configuration_factory
        self._protocol_factory = protocol_factory
        self._max_streams_bidi = max_streams_bidi
        self._stream_receive_window = stream_receive_window
        self._session_ticket_fetcher = session_ticket_fetcher
        self._session_ticket_handler = session_ticket_handler
        self.identity = identity
        self.flows = flows
        self.flow_ttl = flow_ttl
        self.backhaul = backhaul
        #: NEW_TOKEN tokens handed to clients.
        self.new_tokens_sent = 0
        self.router: Router[EdgeConnectionProtocol] = Router(
            cid_length=cid_length,
            max_connections=max_connections,
            versions=(QUIC_V1,),
            identity=identity,
            membership=membership,
            flows=flows,
            flow_name=flow_name,
            tokens=tokens,
            retry_above=retry_above,
            retry_token_lifetime=retry_token_lifetime,
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._owns_transport = True
        self._ipv6_socket = False
        self._connections: set[EdgeConnectionProtocol] = set()
        # Flow-table keys this node published, per connection: its handshake key, and the
        # keys of unroutable CIDs it issued (with the time of the last publish, for refresh).
        self._handshake_keys: dict[EdgeConnectionProtocol, bytes] = {}
        self._cid_keys: dict[EdgeConnectionProtocol, dict[bytes, float]] = {}
        self._reapers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()
        self._datagrams = metrics.counter(
            "edgeproxy_quic_datagrams_total",
            "QUIC datagrams received, by routing decision",
            ["route"],
        )

    # -- introspection -------------------------------------------------------------------------

    @property
    def connections(self) -> frozenset[EdgeConnectionProtocol]:
        return frozenset(self._connections)

    @property
    def attached(self) -> bool:
        """True while the dispatcher has a client-facing transport and is not closing."""
        return self._transport is not None and not self._closing

    @property
    def local_address(self) -> tuple[str, int]:
        """The client-facing address (the anycast address, or a wildcard it is bound to)."""
        if self._transport is None:
            raise RuntimeError("dispatcher is not bound")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    # -- transport -------------------------------------------------------------------------------

    def attach_transport(self, transport: asyncio.DatagramTransport, *, owned: bool) -> None:
        """Use `transport` to talk to clients; `owned` transports are closed by `close`."""
        self._transport = transport
        self._owns_transport = owned
        sockname = transport.get_extra_info("sockname")
        self._ipv6_socket = isinstance(sockname, tuple) and len(sockname) == 4

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach_transport(cast(asyncio.DatagramTransport, transport), owned=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closed.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable from a vanished client) surface here; they concern one
        # peer, never the socket, so they are only logged.
        log.debug("QUIC socket error: %s", exc)

    # -- entry points ----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """Route one datagram from `addr`, received on the client-facing socket."""
        self._receive(data, addr, False)

    def forwarded_received(self, data: bytes, client_addr: NetworkAddress) -> None:
        """Route one datagram that another node received from `client_addr` and forwarded
        over the backhaul: processed as if it had arrived here, but never forwarded again."""
        self._receive(data, self._socket_address(client_addr), True)

    def _socket_address(self, addr: NetworkAddress) -> NetworkAddress:
        """`addr` in the form this dispatcher's socket reports it: an IPv6 (dual-stack) socket
        says ("::ffff:a.b.c.d", port, 0, 0) for an IPv4 client; the connection must see the
        same address whether a datagram came directly or over the backhaul, or it would
        start a path validation."""
        host, port = str(addr[0]), int(addr[1])
        if self._ipv6_socket:
            if ":" not in host:
                host = "::ffff:" + host
            return (host, port, 0, 0)
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return (host, port)

    def _receive(self, data: bytes, addr: NetworkAddress, forwarded: bool) -> None:
        if self._closing or self._transport is None:
            self._datagrams.inc("dropped_closing")
            return
        try:
            action = self.router.route(
                data, addr, self._loop.time(), forwarded=forwarded, wall_now=time.time()
            )
            route = self._execute(action, data, addr)
        except Exception:
            # A bug must cost one datagram, not the listener.
            log.exception("QUIC dispatcher failed on a datagram from %s", addr)
            route = "dropped_internal_error"
        if forwarded and route in ("local", "new"):
            route = "forwarded_in"
        self._datagrams.inc(route)

    # -- actions ---------------------------------------------------------------------------------

    def _execute(self, action: Action[EdgeConnectionProtocol], data: bytes, addr: Any) -> str:
        assert self._transport is not None
        if isinstance(action, Deliver):
            return self._deliver(action.handle, data, addr, action.route)
        if isinstance(action, Accept):
            protocol = self._accept(action)
            if protocol is None:
                return "dropped_accept_failed"
            return self._deliver(protocol, data, addr, action.route)
        if isinstance(action, Retry):
            return self._retry(action, addr)
        if isinstance(action, Forward):
            backhaul = self.backhaul
            if backhaul is None or not backhaul.forward(
                action.node, data, addr, self.local_address
            ):
                return "dropped_backhaul_unavailable"
            return action.route
        if isinstance(action, Reset):
            assert self.identity is not None
            packet = self.identity.stateless_reset(action.cid, action.trigger_len)
            if packet is None:
                return "dropped_reset_too_small"
            self._transport.sendto(packet, addr)
            return action.route
        if isinstance(action, VersionNegotiation):
            self._transport.sendto(action.packet, addr)
            return action.route
        return action.route

    def _deliver(self, protocol: EdgeConnectionProtocol, data: bytes, addr: Any, route: str) -> str:
        try:
            protocol.datagram_received(data, addr)
        except Exception:
            log.exception("QUIC connection failed on a datagram from %s", addr)
            return "dropped_connection_error"
        if self.router.handshaking(protocol) and protocol.quic._handshake_complete:
            self.router.handshake_done(protocol)
        keys = self._cid_keys.get(protocol)
        if keys is not None:
            self._refresh_cid_keys(keys)
        return route

    def _retry(self, action: Retry, addr: Any) -> str:
        """Send a Retry whose SCID is a fresh CID of this node; no state is kept."""
        assert self._transport is not None and self.router.tokens is not None
        if self.identity is not None:
            retry_scid = self.identity.new_cid()
        else:
            retry_scid = os.urandom(self.router.cid_length)
        token = self.router.tokens.make_retry_token(
            addr, action.original_dcid, retry_scid, now=time.time()
        )
        packet = encode_quic_retry(
            action.version, retry_scid, action.scid, action.original_dcid, token
        )
        self._transport.sendto(packet, addr)
        return action.route

    def _new_token(self, addr: NetworkAddress) -> bytes:
        """A NEW_TOKEN token for a client at `addr` (any PoP of the fleet opens it)."""
        assert self.router.tokens is not None
        self.new_tokens_sent += 1
        return self.router.tokens.make_new_token(addr, now=time.time())

    def _server_configuration(self, base: QuicConfiguration) -> QuicConfiguration:
        # The dispatcher owns what routing depends on: server role, v1 only (the router answers
        # Version Negotiation for everything else; aioquic would otherwise upgrade clients to v2
        # by compatible negotiation) and the CID length the router parses short headers with.
        # A copy, because the factory may hand out a shared object.
        return dataclasses.replace(
            base,
            is_client=False,
            supported_versions=[QuicProtocolVersion.VERSION_1],
            connection_id_length=self.router.cid_length,
        )

    def _accept(self, action: Accept) -> EdgeConnectionProtocol | None:
        assert self._transport is not None
        identity = self.identity
        try:
            configuration = self._server_configuration(self._configuration_factory())
            connection = EdgeQuicConnection(
                configuration=configuration,
                original_destination_connection_id=action.original_dcid,
                retry_source_connection_id=action.retry_scid,
                session_ticket_fetcher=self._session_ticket_fetcher,
                session_ticket_handler=self._session_ticket_handler,
                max_streams_bidi=self._max_streams_bidi,
                stream_receive_window=self._stream_receive_window,
                cid_source=None if identity is None else identity.new_cid,
                reset_token_for=None if identity is None else identity.reset_token,
                new_token_for=self._new_token,
            )
            protocol = self._protocol_factory(connection)
        except Exception:
            # e.g. a certificate reload left the factory without a key: refuse, keep serving.
            log.exception("cannot create QUIC connection")
            return None
        protocol.connection_made(self._transport)
        # The hooks aioquic's own QuicServer uses (private attributes of the 1.7.2 protocol).
        protocol._connection_id_issued_handler = partial(self._cid_issued, protocol)
        protocol._connection_id_retired_handler = partial(self._cid_retired, protocol)
        protocol._connection_terminated_handler = partial(self._terminated, protocol)
        self._connections.add(protocol)
        self.router.add_connection(protocol)
        # The DCID the client's Initials carry: its own choice, or the Retry's SCID.
        self.router.register(action.retry_scid or action.original_dcid, protocol)
        self.router.register(connection.host_cid, protocol)
        if action.flow_key is not None:
            # Other nodes now forward this handshake's Initials (same client, same DCID) here.
            self._publish_handshake(protocol, action.flow_key)
        self._publish_if_unroutable(protocol, connection.host_cid)
        return protocol

    # -- flow table ------------------------------------------------------------------------------

    def _publish(self, key: bytes) -> float | None:
        """Publish `key` as ours; the time, or None if it could not be published."""
        if self.flows is None:
            return None
        now = self._loop.time()
        try:
            self.flows.publish(key, now, self.flow_ttl)
        except Exception:
            # A full table only means misrouted packets of this flow are not forwarded here.
            log.warning("cannot publish a QUIC flow", exc_info=True)
            return None
        return now

    def _publish_handshake(self, protocol: EdgeConnectionProtocol, key: bytes) -> None:
        if self._publish(key) is not None:
            self._handshake_keys[protocol] = key

    def _publish_if_unroutable(self, protocol: EdgeConnectionProtocol, cid: bytes) -> None:
        # A CID without a live QUIC-LB config (0b111: the codec had none, or ran out of
        # nonces) cannot be routed by decoding: other nodes find it in the flow table instead.
        if self.identity is None or self.identity.owner_of(cid) is not None:
            return
        key = cid_flow_key(cid)
        published = self._publish(key)
        if published is not None:
            self._cid_keys.setdefault(protocol, {})[key] = published

    def _refresh_cid_keys(self, keys: dict[bytes, float]) -> None:
        """Re-publish a live connection's unroutable-CID keys before they expire."""
        now = self._loop.time()
        for key, published in list(keys.items()):
            if now - published >= self.flow_ttl / 2 and self._publish(key) is not None:
                keys[key] = now

    def _delete_flow(self, key: bytes) -> None:
        if self.flows is not None:
            with contextlib.suppress(Exception):
                self.flows.delete(key, self._loop.time())

    def _unpublish_all(self, protocol: EdgeConnectionProtocol) -> None:
        key = self._handshake_keys.pop(protocol, None)
        if key is not None:
            self._delete_flow(key)
        for key in self._cid_keys.pop(protocol, {}):
            self._delete_flow(key)

    # -- connection callbacks --------------------------------------------------------------------

    def _cid_issued(self, protocol: EdgeConnectionProtocol, cid: bytes) -> None:
        if protocol not in self._connections:
            return
        if not self.router.register(cid, protocol):
            # Random CIDs colliding (QUIC-LB CIDs cannot): the newer connection cannot use it.
            log.warning("QUIC connection ID collision")
            return
        self._publish_if_unroutable(protocol, cid)

    def _cid_retired(self, protocol: EdgeConnectionProtocol, cid: bytes) -> None:
        self.router.unregister(cid, protocol)
        keys = self._cid_keys.get(protocol)
        if keys is not None and keys.pop(cid_flow_key(cid), None) is not None:
            self._delete_flow(cid_flow_key(cid))

    def _terminated(self, protocol: EdgeConnectionProtocol) -> None:
        self.router.forget(protocol)
        self._unpublish_all(protocol)
        if protocol not in self._connections:
            return
        self._connections.discard(protocol)
        # Called synchronously from inside aioquic's event processing: the protocol's tasks are
        # cancelled and awaited by a reaper task, which close() awaits too.
        task = self._loop.create_task(protocol.aclose())
        self._reapers.add(task)
        task.add_done_callback(self._reaper_done)

    def _reaper_done(self, task: asyncio.Task[None]) -> None:
        self._reapers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("QUIC connection cleanup failed", exc_info=task.exception())

    # -- shutdown --------------------------------------------------------------------------------

    async def close(self) -> None:
        """CONNECTION_CLOSE every connection, await their tasks, close an owned socket.
        Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        protocols = list(self._connections)
        self._connections.clear()
        for protocol in protocols:
            self.router.forget(protocol)
            self._unpublish_all(protocol)
        results = await asyncio.gather(
            *(p.aclose() for p in protocols), *list(self._reapers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("QUIC connection close failed", exc_info=result)
        if self._transport is not None and self._owns_transport:
            self._transport.close()
            # connection_lost runs on the next loop iteration; wait so the socket is really gone
            await self._closed.wait()
        else:
            self._transport = None
            self._closed.set()


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------


def bind_udp_socket(
    host: str, port: int, *, reuse_port: bool = False, buffer_size: int | None = 4 * 1024 * 1024
) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port) with SO_REUSEADDR.

    SO_REUSEPORT is opt-in: several worker processes on one port split datagrams by 4-tuple
    hash, so a connection's datagrams reach other workers whenever the client's address
    changes; each worker's server ID names it, and the router forwards such datagrams to the
    owning worker over its backhaul port (one extra hop, no CID-aware kernel steering).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Dual-stack when bound to "::"; aioquic handles 4-tuple IPv6 addresses.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if buffer_size:
            # Bursts of client datagrams (many handshakes at once) overflow the default buffer;
            # the kernel caps this at net.core.rmem_max, which is fine.
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_size)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class FleetRouting:
    """What makes a dispatcher part of the fleet rather than a lone server (see `Router`).

    `identity` issues QUIC-LB CIDs and reset tokens; `membership` says who is alive and where;
    `flows` is the flow table with this node's owner name `flow_name`; `backhaul` carries
    forwarded datagrams; the ticket callbacks are the fleet ticket store's (`tickets`).
    """

    identity: ConnectionIdentity | None = None
    membership: Membership | None = None
    flows: FlowLookup | None = None
    flow_name: str | None = None
    flow_ttl: float = DEFAULT_FLOW_TTL
    backhaul: ForwardSink | None = None
    session_ticket_fetcher: SessionTicketFetcher | None = None
    session_ticket_handler: SessionTicketHandler | None = None
    # Address validation: the fleet keys that seal Retry/NEW_TOKEN tokens (None: a per-process
    # key), the handshakes in progress from which Initials without a valid token get a Retry
    # (None: never) and the Retry token lifetime in seconds.
    tokens: FleetKeys | None = None
    retry_above: int | None = DEFAULT_RETRY_ABOVE
    retry_token_lifetime: float = RETRY_TOKEN_LIFETIME


def make_h3_dispatcher(
    configuration_factory: Callable[[], QuicConfiguration],
    handler: RequestHandler,
    limits: LimitsSection,
    metrics: Registry,
    *,
    cid_length: int = DEFAULT_CID_LENGTH,
    stream_receive_window: int = DEFAULT_STREAM_RECEIVE_WINDOW,
    fleet: FleetRouting | None = None,
) -> QuicDispatcher:
    """An HTTP/3 `QuicDispatcher`, not yet attached to a transport.

    `configuration_factory` is called for every new connection, so a reloaded certificate is
    used by new connections without a restart; limits override its idle timeout, ALPN and
    stream windows. Requests that arrive as 0-RTT early data follow RFC 8470
    (`tickets.EarlyDataH3ServerProtocol`).
    """
    # Imported here: h3server builds on this module.
    from ..http.h3server import H3Metrics, h3_configuration
    from .tickets import EarlyDataH3ServerProtocol

    h3_metrics = H3Metrics(metrics)
    fleet = fleet or FleetRouting()

    def make_configuration() -> QuicConfiguration:
        return h3_configuration(configuration_factory(), limits, stream_receive_window)

    def make_protocol(connection: EdgeQuicConnection) -> EdgeConnectionProtocol:
        return EarlyDataH3ServerProtocol(
            connection, handler=handler, limits=limits, metrics=h3_metrics
        )

    return QuicDispatcher(
        configuration_factory=make_configuration,
        protocol_factory=make_protocol,
        metrics=metrics,
        max_connections=limits.max_connections,
        cid_length=cid_length,
        max_streams_bidi=limits.max_streams,
        stream_receive_window=stream_receive_window,
        session_ticket_fetcher=fleet.session_ticket_fetcher,
        session_ticket_handler=fleet.session_ticket_handler,
        identity=fleet.identity,
        membership=fleet.membership,
        flows=fleet.flows,
        flow_name=fleet.flow_name,
        flow_ttl=fleet.flow_ttl,
        backhaul=fleet.backhaul,
        tokens=fleet.tokens,
        retry_above=fleet.retry_above,
        retry_token_lifetime=fleet.retry_token_lifetime,
    )


async def start_quic_server(
    host: str,
    port: int,
    configuration_factory: Callable[[], QuicConfiguration],
    handler: RequestHandler,
    limits: LimitsSection,
    metrics: Registry,
    *,
    reuse_port: bool = False,
    cid_length: int = DEFAULT_CID_LENGTH,
    stream_receive_window: int = DEFAULT_STREAM_RECEIVE_WINDOW,
    fleet: FleetRouting | None = None,
    transport: asyncio.DatagramTransport | None = None,
) -> QuicDispatcher:
    """Serve HTTP/3 on UDP (host, port): a `make_h3_dispatcher` dispatcher on its own socket.

    With `transport`, the dispatcher uses that (shared) client-facing transport instead of
    binding one, and receives datagrams only through calls to its `datagram_received` (the
    test fabric's simulated anycast); host and port are then ignored.
    """
    dispatcher = make_h3_dispatcher(
        configuration_factory,
        handler,
        limits,
        metrics,
        cid_length=cid_length,
        stream_receive_window=stream_receive_window,
        fleet=fleet,
    )
    if transport is not None:
        dispatcher.attach_transport(transport, owned=False)
        return dispatcher
    loop = asyncio.get_running_loop()
    sock = bind_udp_socket(host, port, reuse_port=reuse_port)
    try:
        await loop.create_datagram_endpoint(lambda: dispatcher, sock=sock)
    except BaseException:
        sock.close()
        raise
    return dispatcher


__all__ = [
    "Accept",
    "Action",
    "ConnectionIdentity",
    "Deliver",
    "Drop",
    "EdgeConnectionProtocol",
    "EdgeQuicConnection",
    "FleetRouting",
    "FlowLookup",
    "Forward",
    "ForwardSink",
    "Membership",
    "NodeId",
    "QuicDispatcher",
    "Reset",
    "Retry",
    "Router",
    "RoutingIdentity",
    "VersionNegotiation",
    "bind_udp_socket",
    "cid_flow_key",
    "initial_flow_key",
    "make_h3_dispatcher",
    "start_quic_server",
]
