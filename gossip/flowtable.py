"""The replicated flow-ownership table: which PoP owns a QUIC handshake or a TCP flow.

PoPs share an anycast address. When a client's route moves, its packets land at another PoP,
which must forward them to the PoP that holds the connection state. This module is the table the
QUIC dispatcher and TCP steering consult (:class:`FlowTable`) and the pure replication protocol
that keeps every PoP's copy current (:class:`FlowReplicator`). No sockets, no clocks: ``now`` is
passed in, and the asyncio shell moves the bytes.

Ownership
    A :class:`FlowEntry` is a last-writer-wins register ranked by ``(epoch, owner, version)``.
    ``publish`` claims a key with ``epoch = highest epoch known for the key + 1``, so ownership
    moves by a higher epoch; two PoPs that claim the same key concurrently with the same epoch
    are ordered by owner name, so every table converges on the same winner. Each PoP is the
    single writer of its own entries: only the owner refreshes or deletes (a tombstone, kept for
    ``tombstone_grace`` seconds so a late copy of the live entry cannot resurrect it).

Replication (Scuttlebutt)
    Every local write bumps this PoP's version counter; an entry's ``origin_version`` is its
    place in its owner's stream (the origin of an entry *is* its owner: the wire format carries
    the owner once per group, so a packet cannot even express "X owns K" inside Y's stream).
    Each table keeps, per origin, a watermark ``W``: every write of that origin with a version
    ``<= W`` is reflected here (possibly by a newer write of the same key). Entry packets carry
    groups ``(origin, lo, hi, entries)`` meaning "these are all of origin's current entries with
    versions in ``(lo, hi]``"; a receiver whose ``W >= lo`` advances ``W`` to ``hi``, otherwise
    (a packet was lost) it merges the entries but leaves ``W`` alone and anti-entropy fills the
    gap. Pending local writes are pushed at once to every peer in scope
    (:meth:`FlowReplicator.deltas_for_peers`); a periodic digest ``{origin: W}`` sent to one
    random peer is answered with what the sender lacks, up to ``max_bytes_per_round`` per reply,
    the rest following in later rounds. An entry for a key we do not hold whose version is
    ``<= W`` is stale (we saw it and it has since expired or been superseded) and is dropped,
    which stops lagging peers from resurrecting old flows.

Expiry travels as a remaining TTL in milliseconds, not an absolute time, so PoP clocks need not
agree; a relayed copy is at most one transit delay longer-lived than the original.

Restarts
    A table starts empty. Its version counter starts at ``initial_version``; the shell should
    pass a wall-clock value such as ``time.time_ns() // 1000`` so a restarted PoP's writes rank
    above its previous incarnation's. If it does not, the first digest or entry that shows the
    fleet knows more of this PoP's stream than the PoP itself makes it jump its counter past
    that and re-announce its entries (counter ``own_version_adopted``). Entries written by the
    previous incarnation and never seen again by the new one expire by TTL.

Bounds
    ``max_entries`` caps stored records (live entries and tombstones). A local ``publish`` into a
    full table evicts a remote record (tombstones first, then the oldest write of the remote
    origin that holds the most records) and raises :class:`FlowTableFull` only when every record is this PoP's own: the
    flows a PoP owns are the ones it must announce, whereas a missing remote entry only means a
    misrouted packet is handled locally. A *new* remote key arriving at a full table is refused
    (``rejected.full``) rather than evicting another PoP's entry, so one chatty origin cannot
    push the others out; it comes back with its owner's next refresh. Expired records are
    purged by :meth:`FlowTable.expire` (and lazily when room is needed); packets are at most
    ``mtu`` bytes sealed; one digest reply is at most ``max_bytes_per_round`` (rounded down to
    whole packets) and each peer's digests are answered at most once per
    ``digest_min_interval``, so neither a flood nor a replayed digest multiplies traffic; one
    delta flush is at most ``max_delta_packets`` packets (the rest stays pending). A record
    costs about 400 bytes of Python heap (100k records: ~40 MB). Ranges received beyond a gap
    are remembered (32 per origin) so a reordered burst still advances the watermark.

Security
    Every packet is sealed with the fleet :class:`~gossip.keyring.Keyring` (AES-GCM) with the
    associated data ``label + sender name``, so a packet re-sent under another sender's name, or
    one meant for another channel, does not open. Packets from unknown or out-of-scope senders
    are dropped before decryption; undecryptable or malformed packets are counted by reason
    (``drop.<reason>``) and nothing in them is merged. Every fleet key holder is trusted: the
    shared key authenticates membership of the fleet, not an individual PoP.

Wire format (msgpack, inside the sealed envelope ``[1][nonce 12][ciphertext][tag 16]``)::

    [1, 1, [flags, {origin: watermark, ...}]]                   digest
        flags bit 0: a receiver behind us on some origin also answers with its own digest
                     (with bit 0 clear: one push-pull exchange, no ping-pong)
        flags bit 1: partial (origins left out mean "no opinion", not "nothing")
    [1, 2, [[origin, lo, hi, [[key, epoch, version, ttl_ms, deleted], ...]], ...]]   entries

Names are msgpack str, keys bin, integers unsigned. Decoding raises only
:class:`~gossip.wire.WireError` with a reason from :data:`gossip.wire.REASONS`.
"""

from __future__ import annotations

import heapq
import ipaddress
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgpack

from gossip.keyring import Keyring
from gossip.wire import WireError

__all__ = [
    "DEFAULT_LABEL",
    "DEFAULT_MTU",
    "KIND_DIGEST",
    "KIND_ENTRIES",
    "MAX_KEY_LEN",
    "MAX_NAME_LEN",
    "MAX_TTL",
    "PROTOCOL_VERSION",
    "Digest",
    "EntryGroup",
    "FlowEntry",
    "FlowKey",
    "FlowReplicator",
    "FlowTable",
    "FlowTableFull",
    "Listener",
    "decode_message",
    "quic_initial_key",
    "tcp_key",
]

log = logging.getLogger(__name__)

FlowKey = bytes
#: ``listener(key, old, new)``; ``old`` is None for a new key, ``new`` None for a removed one.
Listener = Callable[[FlowKey, "FlowEntry | None", "FlowEntry | None"], None]

PROTOCOL_VERSION = 1
KIND_DIGEST = 1
KIND_ENTRIES = 2
DEFAULT_MTU = 1400
DEFAULT_LABEL = b"edgeproxy/flowtable/1:"
MAX_KEY_LEN = 64
MAX_NAME_LEN = 128
#: Longest TTL accepted from the wire or the API (a day): flows are refreshed well before.
MAX_TTL = 86400.0
MAX_CID_LEN = 20
_MAX_U63 = (1 << 63) - 1
_MAX_TTL_MS = int(MAX_TTL * 1000)
_DIGEST_REPLY = 1
_DIGEST_PARTIAL = 2
# Worst-case msgpack framing around packed parts (see _Packer).
_PACKET_HEADER = 6  # fixarray(3) + version + kind + array16 header
_GROUP_HEADER = 22  # fixarray(4) + uint64 lo + uint64 hi + array16 header (+ the packed origin)
_MIN_MTU = 512
_MAX_HELD_RANGES = 32
#: Expiry-wheel slots per second (a slot is 10 ms).
_SLOTS_PER_S = 100

_packb = msgpack.Packer(use_bin_type=True).pack


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


# ---------------------------------------------------------------------------------------------
# Keys


def _ip_bytes(ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(ip, (bytes, bytearray)):
        if len(ip) not in (4, 16):
            raise ValueError("a packed address is 4 or 16 bytes")
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(bytes(ip))
    elif isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = ip
    else:
        addr = ipaddress.ip_address(ip)
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; both spellings are one flow.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


def _port(port: int) -> bytes:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad port {port!r}")
    return port.to_bytes(2, "big")


def _family(packed: bytes) -> bytes:
    return b"4" if len(packed) == 4 else b"6"


def quic_initial_key(
    client_ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address,
    client_port: int,
    dcid: bytes,
) -> FlowKey:
    """Key of a QUIC handshake: the client address and the client-chosen Destination CID.

    Layout ``b"Q" family ip port len(dcid) dcid``; the family byte keeps IPv4 and IPv6 keys
    from ever colliding.
    """
    ip = _ip_bytes(client_ip)
    cid = bytes(dcid)
    if len(cid) > MAX_CID_LEN:
        raise ValueError(f"a QUIC connection ID is at most {MAX_CID_LEN} bytes")
    return b"Q" + _family(ip) + ip + _port(client_port) + bytes((len(cid),)) + cid


def tcp_key(
    src_ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address,
    src_port: int,
    dst_ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst_port: int,
) -> FlowKey:
    """Key of a TCP flow: its 4-tuple as seen arriving at the PoP (client first)."""
    src, dst = _ip_bytes(src_ip), _ip_bytes(dst_ip)
    if len(src) != len(dst):
        raise ValueError("source and destination are of different address families")
    return b"T" + _family(src) + src + _port(src_port) + dst + _port(dst_port)


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError("a flow key is bytes")
    raw = bytes(key)
    if not 1 <= len(raw) <= MAX_KEY_LEN:
        raise ValueError(f"a flow key is 1 to {MAX_KEY_LEN} bytes")
    return raw


def _check_ttl(ttl: float) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"bad ttl {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL}] seconds")
    return float(ttl)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= MAX_NAME_LEN:
        raise ValueError(f"a node name is a str of 1 to {MAX_NAME_LEN} UTF-8 bytes")
    return name


# ---------------------------------------------------------------------------------------------
# The table


class FlowEntry(NamedTuple):
    """One flow's ownership record, as written by ``owner`` (its origin stream).

    A named tuple rather than a frozen dataclass: receivers build one per replicated entry, and
    a tuple is about three times cheaper to construct.
    """

    key: FlowKey
    owner: str
    epoch: int
    expires: float
    deleted: bool  # a tombstone: the owner let go; kept ``tombstone_grace`` seconds
    origin_version: int

    @property
    def origin(self) -> str:
        """Only the owner writes an entry, so the origin stream it travels in is the owner's."""
        return self.owner

    def live(self, now: float) -> bool:
        return not self.deleted and self.expires > now

    @property
    def rank(self) -> tuple[int, str, int]:
        """Last-writer-wins order: higher epoch, then owner name (tie-break), then version."""
        return (self.epoch, self.owner, self.origin_version)


class _OriginLog:
    """One origin's stored keys in write order, with their versions: the owner index and the
    source of :meth:`FlowTable.stream`.

    A key is re-inserted at the end on every write, so the dict holds one item per key and never
    needs compacting. Writes that arrive in version order (every own write, and a peer's deltas)
    keep ``versions`` ascending; one that arrives below ``top`` (a gap filled late by
    anti-entropy) is also noted in ``late``. Walking back from the newest end over the in-order
    items can therefore stop at the first version <= the lower bound, and only ``late`` (small
    unless the links are very lossy) needs a full scan: a catch-up reply for a peer that is a
    few packets behind costs what it sends, not the size of the table.
    """

    __slots__ = ("late", "top", "versions")

    def __init__(self) -> None:
        self.versions: dict[bytes, int] = {}
        self.top = 0
        self.late: dict[bytes, int] = {}

    def put(self, key: bytes, version: int) -> None:
        versions = self.versions
        if versions.pop(key, None) is not None and self.late:
            self.late.pop(key, None)
        versions[key] = version
        if version > self.top:
            self.top = version
        else:
            self.late[key] = version

    def drop(self, key: bytes) -> None:
        if self.versions.pop(key, None) is not None and self.late:
            self.late.pop(key, None)

    def between(self, after: int, upto: int) -> list[tuple[int, bytes]]:
        """``(version, key)`` with ``after < version <= upto``, ascending."""
        late = self.late
        picked: list[tuple[int, bytes]] = []
        for key, version in reversed(self.versions.items()):
            if late and key in late:
                continue
            if version <= after:
                break
            if version <= upto:
                picked.append((version, key))
        if late:
            picked.extend((v, k) for k, v in late.items() if after < v <= upto)
            picked.sort()
        else:
            picked.reverse()
        return picked


#: ``tuple.__new__`` builds a FlowEntry without the Python-level ``__new__`` of a named tuple
#: (the receive path makes one per replicated entry).
_new_entry: Callable[[type[FlowEntry], tuple[Any, ...]], FlowEntry] = tuple.__new__


class FlowTableFull(Exception):
    """A local publish found the table full of this PoP's own records."""


#: A decoded entry: (key, epoch, version, ttl seconds, deleted).
WireItem = tuple[bytes, int, int, float, bool]


class FlowTable:
    """One PoP's view of flow ownership; with no replicator it is the local in-memory table.

    Read side (hot path): :meth:`lookup`. Write side (this PoP only): :meth:`publish`,
    :meth:`refresh`, :meth:`delete`; :meth:`expire` from a timer. ``listeners`` are called
    synchronously after every change with ``(key, old, new)``, whether the change is local,
    merged from a peer, or a purge (``new is None``).
    """

    def __init__(
        self,
        node: str,
        *,
        max_entries: int = 100_000,
        tombstone_grace: float = 60.0,
        initial_version: int = 0,
    ) -> None:
        self.node = _check_name(node)
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        if not 0 < tombstone_grace <= MAX_TTL:
            raise ValueError("tombstone_grace must be positive")
        if not 0 <= initial_version < _MAX_U63 // 2:
            raise ValueError("initial_version out of range")
        self.max_entries = max_entries
        self.tombstone_grace = float(tombstone_grace)
        self.listeners: list[Listener] = []
        #: Called with no arguments after every local write (the channel's "flush soon" hook:
        #: cheaper than a listener that would also run for every merged remote entry).
        self.on_local_write: Callable[[], None] | None = None
        self.counters: Counter[str] = Counter()
        self._entries: dict[bytes, FlowEntry] = {}
        # Remote tombstones in write order: evicted first when a local publish needs room. (No
        # such index of remote live records: each origin's log is one, and a third table-sized
        # dict would add its rehash to the two that already stall the loop when they grow.)
        self._remote_tombs: dict[bytes, None] = {}
        # Expiry wheel: slot id (expires in units of _SLOT seconds, truncated) -> keys written
        # with an expiry in that slot, and a heap of the slot ids in use. Items go stale when a
        # key is rewritten with another expiry (it is then in its new slot too) or removed; they
        # are skipped when their slot comes due. Cheaper than a heap of (expires, key): a push is
        # a list append, a purge a list walk.
        self._slots: dict[int, list[bytes]] = {}
        self._slot_ids: list[int] = []
        self._slot_items = 0
        # Per origin (= owner): every stored record of that owner (see _OriginLog; a periodic
        # re-sort of a version-ordered list stalled the loop for 25-120 ms at 150k entries).
        self._log: dict[str, _OriginLog] = {}
        self._watermarks: dict[str, int] = {}
        self._held: dict[str, list[tuple[int, int]]] = {}  # (lo, hi] received beyond a gap
        self._version = initial_version
        # Own writes with versions in (_flushed, _version] have not been pushed yet. It starts
        # at 0, not initial_version: the first push then tells peers "nothing else of mine
        # below this matters", so entries of a previous incarnation are not waited for.
        self._flushed = 0

    # --- read side --------------------------------------------------------------------------

    def lookup(self, key: FlowKey, now: float) -> str | None:
        """The owner of a live flow, or None (unknown, deleted or expired)."""
        e = self._entries.get(key)
        if e is None or e.deleted or e.expires <= now:
            return None
        return e.owner

    def get(self, key: FlowKey) -> FlowEntry | None:
        """The stored record, tombstones and not-yet-purged expired entries included."""
        return self._entries.get(key)

    def count_owned(self, node: str) -> int:
        """Records ``node`` owns (tombstones included), in constant time."""
        olog = self._log.get(node)
        return len(olog.versions) if olog is not None else 0

    def __len__(self) -> int:
        """Stored records (what ``max_entries`` bounds), tombstones included."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def entries(self) -> Iterator[FlowEntry]:
        return iter(list(self._entries.values()))

    def owned_by(self, node: str, now: float | None = None) -> list[FlowEntry]:
        """``node``'s entries, tombstones excluded (and expired ones, when ``now`` is given)."""
        out = []
        olog = self._log.get(node)
        for key in olog.versions if olog is not None else ():
            e = self._entries[key]
            if not e.deleted and (now is None or e.expires > now):
                out.append(e)
        return out

    @property
    def version(self) -> int:
        """This PoP's own version counter (the last version it wrote)."""
        return self._version

    def watermark(self, origin: str) -> int:
        if origin == self.node:
            return self._version
        return self._watermarks.get(origin, 0)

    def watermarks(self) -> dict[str, int]:
        """Per-origin versions known here, own counter included (the digest's content)."""
        out = dict(self._watermarks)
        out[self.node] = self._version
        return out

    @property
    def has_pending(self) -> bool:
        """Local writes not yet handed to :meth:`FlowReplicator.deltas_for_peers`."""
        return self._version > self._flushed

    # --- local writes -----------------------------------------------------------------------

    def publish(self, key: FlowKey, now: float, ttl: float) -> FlowEntry:
        """Claim ``key`` for this PoP with an epoch above every epoch known for it.

        Raises :class:`FlowTableFull` if the key is new and the table holds only this PoP's
        own records (remote ones are evicted to make room).
        """
        key = _check_key(key)
        ttl = _check_ttl(ttl)
        cur = self._entries.get(key)
        if cur is None:
            self._make_room(now)
        epoch = (cur.epoch if cur is not None else 0) + 1
        if epoch > _MAX_U63:
            raise ValueError("epoch overflow")
        self.counters["published"] += 1
        return self._write(key, epoch, now + ttl, False, cur)

    def refresh(self, key: FlowKey, now: float, ttl: float) -> FlowEntry | None:
        """Extend a flow this PoP owns; None (and nothing written) if it is not ours."""
        ttl = _check_ttl(ttl)
        cur = self._entries.get(key)
        if cur is None or cur.owner != self.node or cur.deleted:
            self.counters["refresh_not_owner"] += 1
            return None
        self.counters["refreshed"] += 1
        return self._write(cur.key, cur.epoch, now + ttl, False, cur)

    def delete(self, key: FlowKey, now: float) -> bool:
        """Let go of a flow this PoP owns: a tombstone for ``tombstone_grace`` seconds."""
        cur = self._entries.get(key)
        if cur is None or cur.owner != self.node or cur.deleted:
            self.counters["delete_not_owner"] += 1
            return False
        self.counters["deleted"] += 1
        self._write(cur.key, cur.epoch, now + self.tombstone_grace, True, cur)
        return True

    def expire(self, now: float, limit: int = 0) -> int:
        """Purge expired entries and tombstones past their grace; returns how many.

        With ``limit`` > 0, stops after about that many (a whole slot of the expiry wheel is
        finished), so a timer can spread a large purge over several loop turns.
        """
        expired = purged = 0
        slots = self._slots
        ids = self._slot_ids
        entries = self._entries
        logs = self._log
        remote_tombs = self._remote_tombs
        listeners = self.listeners
        heappop = heapq.heappop
        current = int(now * _SLOTS_PER_S)
        # _remove inlined: a busy PoP expires as many flows as it learns.
        while ids and ids[0] <= current:
            if limit and expired + purged >= limit:
                break
            sid = heappop(ids)
            keys = slots.pop(sid)
            self._slot_items -= len(keys)
            keep: list[bytes] | None = None
            for key in keys:
                e = entries.get(key)
                if e is None:
                    continue  # removed since
                x = e.expires
                if x > now:
                    # Not due yet: still in this slot (the one now is in), or rewritten with a
                    # later expiry and so also in a later slot.
                    if int(x * _SLOTS_PER_S) == sid:
                        if keep is None:
                            keep = [key]
                        else:
                            keep.append(key)
                    continue
                if e.deleted:
                    purged += 1
                else:
                    expired += 1
                del entries[key]
                olog = logs.get(e.owner)
                if olog is not None:
                    olog.drop(key)
                    if not olog.versions:
                        del logs[e.owner]
                if e.deleted:
                    remote_tombs.pop(key, None)
                if listeners:
                    self._notify(key, e, None)
            if keep is not None:
                # The rest of this slot is later than now, and so is every later slot.
                slots[sid] = keep
                heapq.heappush(ids, sid)
                self._slot_items += len(keep)
                break
        if expired:
            self.counters["expired"] += expired
        if purged:
            self.counters["tombstones_purged"] += purged
        if self._slot_items > 2 * len(entries) + 1024:
            self._rebuild_wheel()
        return expired + purged

    def _schedule(self, key: bytes, expires: float) -> None:
        sid = int(expires * _SLOTS_PER_S)
        keys = self._slots.get(sid)
        if keys is None:
            self._slots[sid] = [key]
            heapq.heappush(self._slot_ids, sid)
        else:
            keys.append(key)
        self._slot_items += 1

    def _rebuild_wheel(self) -> None:
        """Drop stale wheel items (keys rewritten many times leave one per old expiry)."""
        self._slots = {}
        self._slot_ids = []
        self._slot_items = 0
        for key, e in self._entries.items():
            self._schedule(key, e.expires)

    # --- replication hooks (used by FlowReplicator) -----------------------------------------

    def stream(self, origin: str, after: int, upto: int, now: float) -> Iterator[FlowEntry]:
        """``origin``'s current, unexpired entries with ``after < version <= upto``, ascending.

        Only valid while the table is not modified (the replicator consumes it synchronously).
        """
        olog = self._log.get(origin)
        if olog is None:
            return
        entries = self._entries
        for version, key in olog.between(after, upto):
            e = entries.get(key)
            if e is None or e.origin_version != version or e.owner != origin:
                continue
            if e.expires <= now:
                continue
            yield e

    def pending(self) -> tuple[int, int]:
        """``(lo, hi)``: the version range of local writes not yet pushed."""
        return self._flushed, self._version

    def mark_flushed(self, upto: int) -> None:
        if self._flushed < upto <= self._version:
            self._flushed = upto

    def adopt_own_version(self, version: int, epochs: Mapping[bytes, int] | None = None) -> None:
        """The fleet knows versions of our stream we never wrote: a previous incarnation did.

        Continue above them and re-announce every entry of ours, else peers would discard our
        writes as stale. ``epochs`` are that incarnation's epochs for keys we hold, so the
        re-announced entry outranks the old one.
        """
        if version <= self._version or version > _MAX_U63 // 2:
            return
        self.counters["own_version_adopted"] += 1
        self._version = version
        epochs = epochs or {}
        olog = self._log.get(self.node)
        for key in list(olog.versions if olog is not None else ()):
            cur = self._entries[key]
            epoch = max(cur.epoch, epochs.get(key, 0))
            self._write(key, epoch, cur.expires, cur.deleted, cur)

    def apply_group(
        self, origin: str, lo: int, hi: int, items: Iterable[WireItem], now: float
    ) -> int:
        """Merge ``origin``'s entries covering versions ``(lo, hi]``; returns how many merged.

        The caller has checked that ``origin`` is a known peer in scope.
        """
        if origin == self.node:
            self._apply_own(hi, list(items), now)
            return 0
        counters = self.counters
        entries = self._entries
        w = self._watermarks.get(origin, 0)
        merged = 0
        received = 0
        # The common case (a key new here, table not full, nobody listening to evictions) is
        # inlined: a receiver merges every entry the fleet publishes, so this loop is the
        # replication's receive cost.
        olog = self._log.get(origin)
        if olog is None:
            olog = self._log[origin] = _OriginLog()
        log = olog.versions
        slots = self._slots
        listeners = self.listeners
        max_entries = self.max_entries
        new_entry = _new_entry
        for key, epoch, version, ttl, deleted in items:
            received += 1
            if ttl <= 0:
                counters["rejected.expired"] += 1
                continue
            cur = entries.get(key)
            if cur is None:
                if version <= w:
                    counters["rejected.stale"] += 1
                    continue
                if len(entries) >= max_entries:
                    self.expire(now)
                    # A purge may have emptied (and dropped) this origin's log.
                    olog = self._log.setdefault(origin, olog)
                    if len(entries) >= max_entries:
                        counters["rejected.full"] += 1
                        continue
                if not deleted:
                    expires = now + ttl
                    new = new_entry(FlowEntry, (key, origin, epoch, expires, False, version))
                    entries[key] = new
                    log[key] = version  # a new key: _OriginLog.put without the pop
                    if version > olog.top:
                        olog.top = version
                    else:
                        olog.late[key] = version
                    sid = int(expires * _SLOTS_PER_S)  # _schedule, inlined
                    slot = slots.get(sid)
                    if slot is None:
                        self._schedule(key, expires)
                    else:
                        slot.append(key)
                        self._slot_items += 1
                    if listeners:
                        self._notify(key, None, new)
                    merged += 1
                    continue
            else:
                rank = (epoch, origin, version)
                cur_rank = cur.rank
                if rank <= cur_rank:
                    counters["rejected.duplicate" if rank == cur_rank else "rejected.older"] += 1
                    continue
                if cur.owner == self.node:
                    counters["ownership_lost"] += 1
            self._store(FlowEntry(key, origin, epoch, now + ttl, deleted, version), cur)
            merged += 1
        if not log and self._log.get(origin) is olog:
            del self._log[origin]
        counters["entries_received"] += received
        counters["entries_merged"] += merged
        self._advance(origin, w, lo, hi)
        return merged

    def _advance(self, origin: str, w: int, lo: int, hi: int) -> None:
        """Move ``origin``'s watermark over ``(lo, hi]`` and any ranges held beyond a gap.

        Ranges that arrive past a gap (a lost or reordered packet) are remembered, a few per
        origin, so that when the gap fills the watermark jumps over all of them instead of
        waiting for anti-entropy to resend what is already merged.
        """
        if hi <= w:
            return
        held = self._held.get(origin)
        if lo > w:
            held = self._held.setdefault(origin, [])
            held.append((lo, hi))
            if len(held) > _MAX_HELD_RANGES:
                held.sort()
                del held[_MAX_HELD_RANGES:]  # keep the ranges nearest the watermark
            return
        w = hi
        while held:
            held.sort()
            lo2, hi2 = held[0]
            if lo2 > w:
                break
            held.pop(0)
            w = max(w, hi2)
        if not held:
            self._held.pop(origin, None)
        self._watermarks[origin] = w

    # --- internals --------------------------------------------------------------------------

    def _apply_own(self, hi: int, items: list[WireItem], now: float) -> None:
        """Entries of our own stream relayed back to us: we are their only writer."""
        top = max([hi, *(item[2] for item in items)])
        if top <= self._version:
            # Echoes of what we wrote: we hold the authoritative copy (or purged it on purpose).
            self.counters["rejected.own_origin"] += len(items)
            return
        foreign = [item for item in items if item[2] > self._version]
        self.counters["rejected.own_origin"] += len(items)
        self.adopt_own_version(top, {item[0]: item[1] for item in foreign})
        for key, epoch, _version, _ttl, deleted in foreign:
            if deleted or key in self._entries or len(self._entries) >= self.max_entries:
                continue
            # A flow a previous incarnation announced and this one never claimed: retract it,
            # so other PoPs stop forwarding its packets here.
            self.counters["retracted"] += 1
            self._write(key, epoch, now + self.tombstone_grace, True, None)

    def _write(
        self,
        key: bytes,
        epoch: int,
        expires: float,
        deleted: bool,
        cur: FlowEntry | None,
    ) -> FlowEntry:
        self._version += 1
        new = FlowEntry(key, self.node, epoch, expires, deleted, self._version)
        self._store(new, cur)
        if self.on_local_write is not None:
            self.on_local_write()
        return new

    def _store(self, new: FlowEntry, cur: FlowEntry | None) -> None:
        key = new.key
        self._entries[key] = new
        owner = new.owner
        if cur is not None and cur.owner != owner:
            self._forget_owned(cur.owner, key)
        olog = self._log.get(owner)
        if olog is None:
            olog = self._log[owner] = _OriginLog()
        olog.put(key, new.origin_version)
        if cur is None or cur.expires != new.expires:
            self._schedule(key, new.expires)
            if self._slot_items > 4 * len(self._entries) + 4096:
                # Refreshes leave superseded items behind; bound them even if expire() is late.
                self._rebuild_wheel()
        if cur is not None and cur.deleted:
            self._remote_tombs.pop(key, None)
        if new.deleted and owner != self.node:
            self._remote_tombs[key] = None
        if self.listeners:
            self._notify(key, cur, new)

    def _remove(self, key: bytes, cur: FlowEntry) -> None:
        del self._entries[key]
        self._forget_owned(cur.owner, key)
        if cur.deleted:
            self._remote_tombs.pop(key, None)
        if self.listeners:
            self._notify(key, cur, None)

    def _forget_owned(self, owner: str, key: bytes) -> None:
        olog = self._log.get(owner)
        if olog is not None:
            olog.drop(key)
            if not olog.versions:
                del self._log[owner]

    def _make_room(self, now: float) -> None:
        if len(self._entries) < self.max_entries:
            return
        self.expire(now)
        while len(self._entries) >= self.max_entries:
            if self._remote_tombs:
                key = next(iter(self._remote_tombs))
            else:
                logs = [o for origin, o in self._log.items() if origin != self.node]
                if not logs:
                    self.counters["publish_refused_full"] += 1
                    raise FlowTableFull(
                        f"flow table full: {len(self._entries)} records, all owned by {self.node}"
                    )
                key = next(iter(max(logs, key=lambda o: len(o.versions)).versions))
            self.counters["evicted"] += 1
            self._remove(key, self._entries[key])

    def _notify(self, key: bytes, old: FlowEntry | None, new: FlowEntry | None) -> None:
        for listener in self.listeners:
            try:
                listener(key, old, new)
            except Exception:
                # A projection bug (nftables, metrics) must not leave the table half-updated.
                self.counters["listener_errors"] += 1
                log.exception("flow table listener failed")


# ---------------------------------------------------------------------------------------------
# Wire format


@dataclass(frozen=True, slots=True)
class Digest:
    want_reply: bool
    partial: bool
    versions: dict[str, int]


@dataclass(frozen=True, slots=True)
class EntryGroup:
    origin: str
    lo: int
    hi: int
    items: list[WireItem]


def _uint(value: Any, what: str, hi: int = _MAX_U63) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise WireError("bad_field", f"{what}: expected an integer in [0, {hi}]")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_LEN:
        raise WireError("bad_field", f"{what}: expected a node name")
    return value


def decode_message(plain: bytes) -> Digest | list[EntryGroup]:
    """Decode a plaintext message; raises only :class:`WireError`."""
    if not plain:
        raise WireError("empty", "empty message")
    try:
        msg = msgpack.unpackb(
            plain,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_NAME_LEN,
            max_bin_len=MAX_KEY_LEN,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, Unicode...)
        raise WireError("bad_msgpack", type(exc).__name__) from None
    if not isinstance(msg, list) or len(msg) != 3:
        raise WireError("bad_field", "expected [version, kind, body]")
    version, kind, body = msg
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise WireError("bad_field", f"protocol version {version!r}")
    if kind == KIND_DIGEST and not isinstance(kind, bool):
        return _decode_digest(body)
    if kind == KIND_ENTRIES and not isinstance(kind, bool):
        return _decode_entries(body)
    raise WireError("unknown_type", f"message kind {kind!r}")


def _decode_digest(body: Any) -> Digest:
    if not isinstance(body, list) or len(body) != 2:
        raise WireError("bad_field", "digest: expected [flags, versions]")
    flags = _uint(body[0], "digest flags", 0xFF)
    versions = body[1]
    if not isinstance(versions, dict):
        raise WireError("bad_field", "digest: versions is not a map")
    out = {_name(k, "digest origin"): _uint(v, "digest version") for k, v in versions.items()}
    return Digest(bool(flags & _DIGEST_REPLY), bool(flags & _DIGEST_PARTIAL), out)


def _decode_entries(body: Any) -> list[EntryGroup]:
    if not isinstance(body, list):
        raise WireError("bad_field", "entries: expected a list of groups")
    groups = []
    for group in body:
        if not isinstance(group, list) or len(group) != 4:
            raise WireError("bad_field", "group: expected [origin, lo, hi, entries]")
        origin = _name(group[0], "group origin")
        lo = _uint(group[1], "group lo")
        hi = _uint(group[2], "group hi")
        if lo > hi or not isinstance(group[3], list):
            raise WireError("bad_field", "group: lo > hi or entries not a list")
        items: list[WireItem] = []
        append = items.append
        for item in group[3]:
            # Fast path: one test for a well-formed entry (exact types: bool is not an int
            # here); anything else takes the slow path below, which names the fault.
            if (
                type(item) is list
                and len(item) == 5
                and type(item[0]) is bytes
                and 0 < len(item[0]) <= MAX_KEY_LEN
                and type(item[1]) is int
                and 0 < item[1] <= _MAX_U63
                and type(item[2]) is int
                and lo < item[2] <= hi
                and type(item[3]) is int
                and 0 <= item[3] <= _MAX_TTL_MS
                and type(item[4]) is bool
            ):
                append((item[0], item[1], item[2], item[3] / 1000.0, item[4]))
                continue
            if not isinstance(item, list) or len(item) != 5:
                raise WireError("bad_field", "entry: expected [key, epoch, version, ttl, deleted]")
            key, epoch, version, ttl_ms, deleted = item
            if not isinstance(key, bytes) or not 1 <= len(key) <= MAX_KEY_LEN:
                raise WireError("bad_field", "entry: bad key")
            _uint(epoch, "entry epoch")
            _uint(version, "entry version")
            _uint(ttl_ms, "entry ttl", _MAX_TTL_MS)
            if epoch == 0 or not lo < version <= hi:
                raise WireError("bad_field", "entry: epoch 0 or version outside (lo, hi]")
            if not isinstance(deleted, bool):
                raise WireError("bad_field", "entry: deleted is not a bool")
            items.append((key, epoch, version, ttl_ms / 1000.0, deleted))
        groups.append(EntryGroup(origin, lo, hi, items))
    return groups


class _Packer:
    """Streams groups of entries into plaintext messages of at most ``limit`` bytes.

    Each part is msgpack-encoded once; the framing (array headers) is written by hand around
    the parts, with worst-case sizes budgeted, so no packet is ever encoded twice to measure it.
    """

    def __init__(self, limit: int, max_packets: int) -> None:
        self.limit = limit
        self.max_packets = max_packets
        self.packets: list[bytes] = []
        self.covered: dict[str, int] = {}
        self._segments: list[bytes] = []
        self._size = _PACKET_HEADER

    @property
    def full(self) -> bool:
        return len(self.packets) >= self.max_packets

    def _finish(self) -> None:
        if self._segments:
            head = _array_header(3) + _packb(PROTOCOL_VERSION) + _packb(KIND_ENTRIES)
            self.packets.append(
                head + _array_header(len(self._segments)) + b"".join(self._segments)
            )
        self._segments = []
        self._size = _PACKET_HEADER

    def _close(self, oname: bytes, origin: str, lo: int, hi: int, items: list[bytes]) -> None:
        seg = oname + _packb(lo) + _packb(hi) + _array_header(len(items)) + b"".join(items)
        self._segments.append(_array_header(4) + seg)
        self._size += len(oname) + _GROUP_HEADER + sum(map(len, items))
        self.covered[origin] = hi

    def add_group(
        self, origin: str, lo: int, hi: int, entries: Iterable[FlowEntry], now: float
    ) -> bool:
        """Pack ``origin``'s ``(lo, hi]``; False when the packet budget ran out (truncated)."""
        if self.full:
            return False
        oname = _packb(origin)
        head = len(oname) + _GROUP_HEADER
        items: list[bytes] = []
        size = 0
        last = lo
        for e in entries:
            ttl_ms = min(int((e.expires - now) * 1000), _MAX_TTL_MS)
            if ttl_ms <= 0:
                continue
            item = _packb([e.key, e.epoch, e.origin_version, ttl_ms, e.deleted])
            if self._size + head + size + len(item) > self.limit:
                if items:
                    self._close(oname, origin, lo, last, items)
                    lo, items, size = last, [], 0
                self._finish()
                if self.full:
                    return False
            items.append(item)
            size += len(item)
            last = e.origin_version
        if self._size + head + size > self.limit:
            self._finish()
            if self.full:
                return False
        self._close(oname, origin, lo, hi, items)
        return True

    def done(self) -> list[bytes]:
        self._finish()
        return self.packets


# ---------------------------------------------------------------------------------------------
# Replication


class FlowReplicator:
    """Scuttlebutt replication of one :class:`FlowTable` over its own UDP channel; no I/O.

    The shell:

    * calls :meth:`deltas_for_peers` soon after local writes (``table.has_pending``) and sends
      every packet to every node of :meth:`peers_in_scope`;
    * every gossip interval sends :meth:`digest` to :meth:`pick_gossip_peer`;
    * passes every datagram to :meth:`receive` with the sender's node name and sends the
      replies back to that node;
    * calls ``table.expire(now)`` periodically and :meth:`set_peers` on membership changes.
    """

    def __init__(
        self,
        table: FlowTable,
        keyring: Keyring,
        *,
        region: str = "",
        peers: Mapping[str, str] | None = None,
        scope: Literal["all", "region"] = "all",
        mtu: int = DEFAULT_MTU,
        max_bytes_per_round: int = 16 * 1024,
        max_delta_packets: int = 64,
        digest_min_interval: float = 0.05,
        label: bytes = DEFAULT_LABEL,
        rng: random.Random | None = None,
    ) -> None:
        if scope not in ("all", "region"):
            raise ValueError("scope is 'all' or 'region'")
        if mtu < _MIN_MTU:
            raise ValueError(f"mtu must be at least {_MIN_MTU}")
        if max_bytes_per_round < mtu or max_delta_packets < 1:
            raise ValueError("max_bytes_per_round must hold one packet; max_delta_packets >= 1")
        self.table = table
        self.keyring = keyring
        self.node = table.node
        self.region = region
        self.scope = scope
        self.mtu = mtu
        self.max_bytes_per_round = max_bytes_per_round
        self.max_delta_packets = max_delta_packets
        self.digest_min_interval = digest_min_interval
        self.label = bytes(label)
        self.rng = rng or random.Random()
        # One counters dict for the table and its channel.
        self.counters = table.counters
        self._limit = mtu - Keyring.overhead(1)
        self._peers: dict[str, str] = {}
        self._scoped: list[str] = []
        self._rotation = 0
        self._digest_next = 0
        # Last time each peer's digest was answered: a digest costs up to max_bytes_per_round
        # of reply, so a flood of them (or replays of a captured one) is answered at a bounded
        # rate per peer.
        self._answered: dict[str, float] = {}
        self.set_peers(peers or {})

    # --- membership -------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Replace the peer set: ``{name: region}`` (this node excluded if present)."""
        self._peers = {_check_name(n): r for n, r in peers.items() if n != self.node}
        self._scoped = sorted(n for n in self._peers if self.in_scope(n))
        self._answered = {n: t for n, t in self._answered.items() if n in self._peers}

    def in_scope(self, node: str) -> bool:
        if node == self.node:
            return True
        region = self._peers.get(node)
        if region is None:
            return False
        return self.scope == "all" or region == self.region

    def peers_in_scope(self) -> list[str]:
        return list(self._scoped)

    def pick_gossip_peer(self) -> str | None:
        return self.rng.choice(self._scoped) if self._scoped else None

    # --- sending ----------------------------------------------------------------------------

    def _seal(self, plain: bytes) -> bytes:
        return self.keyring.encrypt(plain, self.label + self.node.encode("utf-8"))

    def deltas_for_peers(self, now: float) -> list[bytes]:
        """Pending local writes as sealed packets, the same for every peer in scope."""
        lo, hi = self.table.pending()
        if hi <= lo:
            return []
        if not self._scoped:
            # Nobody to tell; peers that appear later catch up through digests.
            self.table.mark_flushed(hi)
            return []
        packer = _Packer(self._limit, self.max_delta_packets)
        packer.add_group(self.node, lo, hi, self.table.stream(self.node, lo, hi, now), now)
        packets = [self._seal(p) for p in packer.done()]
        # Truncated flushes leave the rest pending for the next call.
        self.table.mark_flushed(packer.covered.get(self.node, lo))
        fanout = len(self._scoped)
        self.counters["delta_packets"] += len(packets)
        self.counters["packets_out"] += len(packets) * fanout
        self.counters["bytes_out"] += sum(map(len, packets)) * fanout
        return packets

    def digest(self, want_reply: bool = True) -> bytes:
        """Per-origin versions known here, for one peer; partial if they overflow a packet."""
        known = self.table.watermarks()
        origins = [self.node, *(o for o in self._scoped if o in known)]
        # When they do not all fit, the next digest starts where this one stopped.
        start = self._digest_next % len(origins)
        origins = origins[start:] + origins[:start]
        body = b""
        count = 0
        budget = self._limit - _PACKET_HEADER - 2 - 5  # flags, map32 header
        for origin in origins:
            pair = _packb(origin) + _packb(known.get(origin, 0))
            if len(body) + len(pair) > budget:
                break
            body += pair
            count += 1
        self._digest_next = start + count
        flags = (_DIGEST_REPLY if want_reply else 0) | (
            _DIGEST_PARTIAL if count < len(origins) else 0
        )
        map_header = msgpack.Packer().pack_map_header(count)
        plain = (
            _array_header(3)
            + _packb(PROTOCOL_VERSION)
            + _packb(KIND_DIGEST)
            + _array_header(2)
            + _packb(flags)
            + map_header
            + body
        )
        packet = self._seal(plain)
        self.counters["digests_out"] += 1
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(packet)
        return packet

    # --- receiving --------------------------------------------------------------------------

    def _drop(self, reason: str) -> list[bytes]:
        self.counters[f"drop.{reason}"] += 1
        return []

    def receive(self, packet: bytes, from_node: str, now: float) -> list[bytes]:
        """Handle one datagram from ``from_node``; returns packets to send back to it.

        Never raises on bad input: every refusal is a ``drop.<reason>`` counter.
        """
        self.counters["packets_in"] += 1
        try:
            size = len(packet)
        except TypeError:
            return self._drop("bad_field")
        self.counters["bytes_in"] += size
        if size > self.mtu:
            return self._drop("oversized")
        if not isinstance(from_node, str) or from_node == self.node:
            return self._drop("unknown_sender")
        if from_node not in self._peers:
            return self._drop("unknown_sender")
        if not self.in_scope(from_node):
            return self._drop("out_of_scope")
        try:
            plain = self.keyring.decrypt(packet, self.label + from_node.encode("utf-8"))
            msg = decode_message(plain)
        except WireError as exc:
            return self._drop(exc.reason)
        except Exception:  # e.g. unencodable sender names; never crash on input
            return self._drop("bad_field")
        if isinstance(msg, Digest):
            self.counters["digests_in"] += 1
            last = self._answered.get(from_node)
            if last is not None and 0 <= now - last < self.digest_min_interval:
                return self._drop("digest_rate")
            self._answered[from_node] = now
            return self._on_digest(msg, now)
        self.counters["entry_packets_in"] += 1
        self._on_entries(msg, now)
        return []

    def _on_entries(self, groups: list[EntryGroup], now: float) -> None:
        for g in groups:
            if g.origin != self.node and g.origin not in self._peers:
                # Not merged and the watermark stays put: once membership knows the origin,
                # anti-entropy brings its entries.
                self.counters["rejected.unknown_origin"] += len(g.items)
                continue
            if not self.in_scope(g.origin):
                self.counters["rejected.out_of_scope"] += len(g.items)
                continue
            self.table.apply_group(g.origin, g.lo, g.hi, g.items, now)

    def _on_digest(self, digest: Digest, now: float) -> list[bytes]:
        table = self.table
        theirs_of_us = digest.versions.get(self.node, 0)
        if theirs_of_us > table.version:
            table.adopt_own_version(theirs_of_us)
        origins = [self.node, *self._scoped]
        start = self._rotation % len(origins)
        self._rotation += 1
        packer = _Packer(self._limit, max(1, self.max_bytes_per_round // self.mtu))
        truncated = False
        for origin in origins[start:] + origins[:start]:
            ours = table.watermark(origin)
            theirs = digest.versions.get(origin)
            if theirs is None:
                if digest.partial:
                    continue
                theirs = 0
            if ours <= theirs:
                continue
            if not packer.add_group(
                origin, theirs, ours, table.stream(origin, theirs, ours, now), now
            ):
                truncated = True
                break
        if truncated:
            self.counters["catchup_truncated"] += 1
        replies = [self._seal(p) for p in packer.done()]
        self.counters["catchup_packets"] += len(replies)
        self.counters["packets_out"] += len(replies)
        self.counters["bytes_out"] += sum(map(len, replies))
        if digest.want_reply and any(
            v > table.watermark(o)
            for o, v in digest.versions.items()
            if o != self.node and o in self._peers and self.in_scope(o)
        ):
            # We are behind on something: let the sender push it (one exchange, no ping-pong).
            replies.append(self.digest(want_reply=False))
        return replies
