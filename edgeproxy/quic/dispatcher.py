"""edgeproxy's QUIC datagram dispatcher: one UDP socket in front of many aioquic connections.

Split in two, following the house rule of sans-IO cores:

* `Router` is pure. Given a datagram, the client address and the time it decides what to do with
  it - deliver to a known connection, accept a new one, answer Version Negotiation or drop it
  with a named reason - using its connection table (connection ID -> handle). It never touches a
  socket, so QUIC-LB decoding, cross-PoP forwarding and stateless resets can later be added as
  more actions without changing the shell.
* `QuicDispatcher` is the asyncio shell. It owns the socket, executes the actions, creates
  `EdgeQuicConnection`s itself (not aioquic's `QuicServer`) and keeps the router's table in step
  with the connection IDs aioquic issues and retires. Its `datagram_received(data, addr)` is also
  the entry point for datagrams forwarded over the backhaul.

Every datagram is counted once in `edgeproxy_quic_datagrams_total{route}` with route one of
`local`, `new`, `version_negotiation` or `dropped_<reason>`.

`EdgeQuicConnection` subclasses aioquic's `QuicConnection` (pinned to aioquic 1.7.2, whose
private attributes it touches) to bound concurrent request streams and to grant stream flow
control credit only as the application consumes data; see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import Limit, NetworkAddress, QuicConnection, stream_is_unidirectional
from aioquic.quic.packet import QuicFrameType, QuicProtocolVersion
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import SessionTicketFetcher, SessionTicketHandler

from ..metrics import Registry
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


# --------------------------------------------------------------------------------------------
# Pure core: actions and router
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver(Generic[H]):
    """Hand the datagram to an existing connection."""

    handle: H
    route = "local"


@dataclass(frozen=True, slots=True)
class Accept:
    """Create a connection for this v1 Initial; `original_dcid` is the client-chosen DCID."""

    original_dcid: bytes
    scid: bytes
    version: int
    token: bytes
    route = "new"


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


Action = Deliver[H] | Accept | VersionNegotiation | Drop


class Router(Generic[H]):
    """Routing decisions for datagrams arriving on the QUIC socket, and the CID table behind them.

    `H` is whatever the shell uses as a connection handle (hashable). The router keeps both
    directions of the mapping so that a terminated connection is forgotten in O(its CIDs).
    """

    def __init__(
        self,
        *,
        cid_length: int = DEFAULT_CID_LENGTH,
        max_connections: int = 10000,
        versions: Sequence[int] = (QUIC_V1,),
    ) -> None:
        self.cid_length = cid_length
        self.max_connections = max_connections
        self.versions = tuple(versions)
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

    def add_connection(self, handle: H) -> None:
        self._by_handle.setdefault(handle, set())

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
        for cid in self._by_handle.pop(handle, ()):
            if self._cids.get(cid) is handle:
                del self._cids[cid]

    # -- decisions -----------------------------------------------------------------------------

    def route(self, data: bytes, addr: NetworkAddress, now: float) -> Action[H]:
        """Decide what to do with one datagram from `addr` received at `now`.

        `addr` and `now` are unused by today's rules; they are part of the signature because the
        cross-PoP rules (4-tuple flow table, per-flow timers) need them.
        """
        header = parse_header(data, self.cid_length)
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
            if header.packet_type != LongPacketType.INITIAL:
                return Drop("unknown_cid")
            if len(data) < MIN_INITIAL_DATAGRAM_SIZE:
                return Drop("initial_too_small")
            if len(header.dcid) < MIN_CLIENT_DCID_LENGTH:
                return Drop("initial_dcid_too_short")
            if self.connection_count >= self.max_connections:
                return Drop("max_connections")
            return Accept(
                original_dcid=header.dcid,
                scid=header.scid,
                version=header.version,
                token=header.token,
            )

        # Short header. Version unknown by construction; every connection we run is v1 without
        # the grease_quic_bit extension, so the fixed bit must be set (RFC 9000 section 17.3).
        if not header.fixed_bit:
            return Drop("fixed_bit")
        handle = self._cids.get(header.dcid)
        if handle is not None:
            return Deliver(handle)
        # Never answered: a reply to an unknown short header could be a reset oracle once CIDs
        # are routed fleet-wide (later: forward to the owning PoP instead).
        return Drop("unknown_cid")


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

    The later QUIC-LB issue adds CID generation here too (see reference notes, section 3).
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
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
            session_ticket_fetcher=session_ticket_fetcher,
            session_ticket_handler=session_ticket_handler,
        )
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


class QuicDispatcher(asyncio.DatagramProtocol):
    """The UDP socket's protocol: routes datagrams with a `Router` and runs the connections."""

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
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._configuration_factory = configuration_factory
        self._protocol_factory = protocol_factory
        self._max_streams_bidi = max_streams_bidi
        self._stream_receive_window = stream_receive_window
        self._session_ticket_fetcher = session_ticket_fetcher
        self._session_ticket_handler = session_ticket_handler
        self.router: Router[EdgeConnectionProtocol] = Router(
            cid_length=cid_length, max_connections=max_connections, versions=(QUIC_V1,)
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._connections: set[EdgeConnectionProtocol] = set()
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
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("dispatcher is not bound")
        sockname = self._transport.get_extra_info("sockname")
        return sockname[0], sockname[1]

    # -- asyncio.DatagramProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._closed.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable from a vanished client) surface here; they concern one
        # peer, never the socket, so they are only logged.
        log.debug("QUIC socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        """Route one datagram from `addr`: from the socket or forwarded over the backhaul."""
        if self._closing or self._transport is None:
            self._datagrams.inc("dropped_closing")
            return
        try:
            action = self.router.route(data, addr, self._loop.time())
            route = self._execute(action, data, addr)
        except Exception:
            # A bug must cost one datagram, not the listener.
            log.exception("QUIC dispatcher failed on a datagram from %s", addr)
            route = "dropped_internal_error"
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
        return route

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
        try:
            configuration = self._server_configuration(self._configuration_factory())
            connection = EdgeQuicConnection(
                configuration=configuration,
                original_destination_connection_id=action.original_dcid,
                session_ticket_fetcher=self._session_ticket_fetcher,
                session_ticket_handler=self._session_ticket_handler,
                max_streams_bidi=self._max_streams_bidi,
                stream_receive_window=self._stream_receive_window,
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
        self.router.register(action.original_dcid, protocol)
        self.router.register(connection.host_cid, protocol)
        return protocol

    def _cid_issued(self, protocol: EdgeConnectionProtocol, cid: bytes) -> None:
        if protocol in self._connections and not self.router.register(cid, protocol):
            # Random 8-byte CIDs colliding: the newer connection simply cannot use this one.
            log.warning("QUIC connection ID collision")

    def _cid_retired(self, protocol: EdgeConnectionProtocol, cid: bytes) -> None:
        self.router.unregister(cid, protocol)

    def _terminated(self, protocol: EdgeConnectionProtocol) -> None:
        self.router.forget(protocol)
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
        """CONNECTION_CLOSE every connection, await their tasks, close the socket. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        protocols = list(self._connections)
        self._connections.clear()
        for protocol in protocols:
            self.router.forget(protocol)
        results = await asyncio.gather(
            *(p.aclose() for p in protocols), *list(self._reapers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("QUIC connection close failed", exc_info=result)
        if self._transport is not None:
            self._transport.close()
            # connection_lost runs on the next loop iteration; wait so the socket is really gone
            await self._closed.wait()
        else:
            self._closed.set()


# --------------------------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------------------------


def bind_udp_socket(
    host: str, port: int, *, reuse_port: bool = False, buffer_size: int | None = 4 * 1024 * 1024
) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port) with SO_REUSEADDR.

    SO_REUSEPORT is opt-in: several processes on one port would split connections by 4-tuple
    hash, which breaks QUIC without CID-aware steering (see reference notes, section 3).
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
) -> QuicDispatcher:
    """Serve HTTP/3 on UDP (host, port): a bound `QuicDispatcher` running `H3ServerProtocol`s.

    `configuration_factory` is called for every new connection, so a reloaded certificate is
    used by new connections without a restart; limits override its idle timeout, ALPN and
    stream windows.
    """
    # Imported here: h3server builds on this module.
    from ..http.h3server import H3Metrics, H3ServerProtocol, h3_configuration

    h3_metrics = H3Metrics(metrics)

    def make_configuration() -> QuicConfiguration:
        return h3_configuration(configuration_factory(), limits, stream_receive_window)

    def make_protocol(connection: EdgeQuicConnection) -> EdgeConnectionProtocol:
        return H3ServerProtocol(connection, handler=handler, limits=limits, metrics=h3_metrics)

    loop = asyncio.get_running_loop()
    sock = bind_udp_socket(host, port, reuse_port=reuse_port)
    dispatcher = QuicDispatcher(
        configuration_factory=make_configuration,
        protocol_factory=make_protocol,
        metrics=metrics,
        max_connections=limits.max_connections,
        cid_length=cid_length,
        max_streams_bidi=limits.max_streams,
        stream_receive_window=stream_receive_window,
    )
    try:
        await loop.create_datagram_endpoint(lambda: dispatcher, sock=sock)
    except BaseException:
        sock.close()
        raise
    return dispatcher


__all__ = [
    "Accept",
    "Action",
    "Deliver",
    "Drop",
    "EdgeConnectionProtocol",
    "EdgeQuicConnection",
    "QuicDispatcher",
    "Router",
    "VersionNegotiation",
    "bind_udp_socket",
    "start_quic_server",
]
