"""Fleet-wide TLS session tickets and the HTTP rules for 0-RTT early data.

Tickets. aioquic's server mints a ticket as 64 random bytes (the ticket *id*) inside TLS, hands
the `SessionTicket` (with the resumption secret) to ``session_ticket_handler`` and, on a later
ClientHello, looks the id up *synchronously* with ``session_ticket_fetcher(id)``. A client moved
by BGP resumes at another PoP, so `FleetTicketStore` keeps an in-memory map
``id -> fleet.seal_ticket(serialize_session_ticket(ticket))`` on every node:

* `add` (the handler) seals the ticket under the primary fleet key, stores it, and hands the
  sealed blob to the replicator (`backhaul.Backhaul.broadcast_ticket`: one ``0xE2`` frame to
  every other node);
* `receive_replica` opens a replica (AES-GCM under the fleet's ticket key authenticates it, so
  no further MAC is needed) and stores it under the id found inside;
* `fetch` (the fetcher) opens the stored blob, checks that it is the ticket asked for and still
  within the fleet lifetime, and returns it. With ``single_use`` a ticket resumes at most once
  per node (`fleet.ReplayFilter`): a second ClientHello with it gets a full handshake.

Entries expire with the ticket lifetime (24 h, what aioquic advertises) and at most
``max_tickets`` are kept (the oldest go first). The blob stays sealed at rest, so the resumption
secrets of the whole fleet are not sitting in the clear in every process's memory.

0-RTT. aioquic accepts early data whenever it finds the ticket (there is no switch), so a
captured first flight can be replayed once at every PoP that has the ticket (``single_use`` is
per node and nothing propagates "used"). The defence is RFC 8470 at the HTTP layer:
`EdgeQuicConnection` records which streams had STREAM frames in 0-RTT packets, and
`EarlyDataH3ServerProtocol` answers such requests with **425 Too Early** unless they are safe
(GET, HEAD, OPTIONS) and complete in their header section (no body); the client retries them
after the handshake, where they cannot be replayed. Early requests that are served carry
``Early-Data: 1`` to the origin (RFC 8470 section 5.1), so it can refuse with 425 too.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aioquic.h3.connection import ErrorCode, stream_is_request_response
from aioquic.h3.events import HeadersReceived
from aioquic.tls import SessionTicket

from ..http.h3server import H3ServerProtocol
from ..metrics import Registry
from .fleet import (
    CLOCK_SKEW,
    TICKET_LIFETIME,
    FleetKeys,
    ReplayFilter,
    ReplayVerdict,
    TicketFormatError,
    deserialize_session_ticket,
    serialize_session_ticket,
)

__all__ = [
    "SAFE_EARLY_METHODS",
    "EarlyDataH3ServerProtocol",
    "FleetTicketStore",
]

log = logging.getLogger(__name__)

# RFC 9110 safe methods a client may send in 0-RTT here (TRACE is not served at all).
SAFE_EARLY_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS"))


class FleetTicketStore:
    """The ticket replica of one node; `add` and `fetch` are aioquic's ticket callbacks."""

    def __init__(
        self,
        keys: FleetKeys,
        *,
        max_tickets: int = 100_000,
        single_use: bool = True,
        metrics: Registry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.max_tickets = max_tickets
        self._clock = clock
        # id -> (sealed ticket, expiry in unix seconds); insertion order ~ expiry order.
        self._tickets: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._used = ReplayFilter(TICKET_LIFETIME, max_tickets) if single_use else None
        self._replicate: Callable[[bytes], Any] | None = None
        registry = metrics or Registry()
        self._events = registry.counter(
            "edgeproxy_quic_tickets_total",
            "Session ticket store events (issued, replicated, resumed, ...)",
            ["event"],
        )

    def __len__(self) -> int:
        return len(self._tickets)

    def __contains__(self, ticket_id: object) -> bool:
        return ticket_id in self._tickets

    def set_replicator(self, replicate: Callable[[bytes], Any]) -> None:
        """`replicate(sealed)` is called for every ticket this node issues."""
        self._replicate = replicate

    # -- aioquic callbacks -----------------------------------------------------------------------

    def add(self, ticket: SessionTicket) -> None:
        """aioquic's ``session_ticket_handler``: store and replicate a ticket just issued."""
        now = self._clock()
        try:
            sealed = self.keys.seal_ticket(serialize_session_ticket(ticket), now)
        except ValueError:
            log.exception("cannot seal a session ticket")
            self._events.inc("dropped_unsealable")
            return
        self._store(ticket.ticket, sealed, ticket, now)
        self._events.inc("issued")
        if self._replicate is not None:
            try:
                self._replicate(sealed)
            except Exception:
                log.exception("cannot replicate a session ticket")

    def fetch(self, ticket_id: bytes) -> SessionTicket | None:
        """aioquic's ``session_ticket_fetcher``: the ticket for a resumption attempt, or None
        (full handshake). Called synchronously inside TLS."""
        now = self._clock()
        entry = self._tickets.get(ticket_id)
        if entry is None:
            self._events.inc("miss")
            return None
        sealed, expires = entry
        if expires <= now:
            del self._tickets[ticket_id]
            self._events.inc("expired")
            return None
        ticket = self._open(sealed, now)
        if ticket is None or ticket.ticket != ticket_id:
            self._events.inc("invalid")
            return None
        if self._used is not None and self._used.check_and_add(ticket_id, now) != (
            ReplayVerdict.FRESH
        ):
            self._events.inc("reused")
            return None
        self._events.inc("resumed")
        # aioquic checks not_valid_before against this node's clock: allow the issuer's clock
        # to be ahead by the fleet's tolerated skew. The value is not used for anything else
        # on the server side.
        return dataclasses.replace(
            ticket,
            not_valid_before=ticket.not_valid_before - datetime.timedelta(seconds=CLOCK_SKEW),
        )

    # -- replication -----------------------------------------------------------------------------

    def receive_replica(self, sealed: bytes) -> str:
        """Store a ticket another node issued; the result label for the backhaul's metric."""
        now = self._clock()
        ticket = self._open(sealed, now)
        if ticket is None:
            self._events.inc("replica_rejected")
            return "dropped_bad_ticket"
        self._store(ticket.ticket, bytes(sealed), ticket, now)
        self._events.inc("replica_stored")
        return "received"

    # -- internals -------------------------------------------------------------------------------

    def _open(self, sealed: bytes, now: float) -> SessionTicket | None:
        plaintext = self.keys.open_ticket(sealed, now)
        if plaintext is None:
            return None
        try:
            return deserialize_session_ticket(plaintext)
        except TicketFormatError:
            return None

    def _store(self, ticket_id: bytes, sealed: bytes, ticket: SessionTicket, now: float) -> None:
        expires = min(ticket.not_valid_after.timestamp(), now + TICKET_LIFETIME)
        if expires <= now:
            return
        tickets = self._tickets
        tickets[ticket_id] = (sealed, expires)
        tickets.move_to_end(ticket_id)
        # Drop expired entries from the old end, then the oldest beyond the bound.
        while tickets:
            oldest = next(iter(tickets.values()))
            if oldest[1] > now and len(tickets) <= self.max_tickets:
                break
            tickets.popitem(last=False)


class EarlyDataH3ServerProtocol(H3ServerProtocol):
    """`H3ServerProtocol` with RFC 8470: unsafe or body-carrying requests received in 0-RTT
    get 425 Too Early; safe ones are served with ``Early-Data: 1`` added for the origin."""

    def _new_request(self, event: HeadersReceived) -> None:
        stream_id = event.stream_id
        if stream_is_request_response(stream_id) and self.quic_edge.started_in_early_data(
            stream_id
        ):
            method = next((v for k, v in event.headers if k == b":method"), b"")
            if method not in SAFE_EARLY_METHODS or not event.stream_ended:
                self._reject(
                    stream_id,
                    425,
                    "request sent in 0-RTT early data may be replayed: retry it",
                    None,
                    None,
                    ErrorCode.H3_NO_ERROR,
                    event.headers,
                )
                return
            event.headers = [*event.headers, (b"early-data", b"1")]
        super()._new_request(event)
