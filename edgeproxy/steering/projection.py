"""Flow-table changes -> nftables map element adds and deletes, batched (pure: no I/O).

The kernel side (:mod:`edgeproxy.steering.nft`) holds one map per PoP,
``flows4 : ipv4 saddr . tcp sport . ipv4 daddr . tcp dport -> mark``; the mark names the PoP
that owns the flow, and a policy-routing rule per mark (:mod:`edgeproxy.steering.routing`) sends
the segment over the backhaul to that PoP. This module decides what the map should hold:

* a live TCP entry owned by another PoP that has a mark -> ``tuple : mark``;
* anything else (our own flows, tombstones, expired or unknown owners, QUIC keys, IPv6) -> absent.

:class:`Projection` mirrors what it believes the kernel holds (``installed``) and collects the
keys whose desired state differs (``pending``, coalesced: a key that flips several times
between two batches costs one element). :meth:`Projection.take` cuts a batch, :meth:`render`
writes it as nft commands (deletes first, then adds; an owner change is a delete plus an add,
since adding an existing map key with another value fails), and the caller reports the outcome
with :meth:`commit` or, after a kernel error, rebuilds with :meth:`resync`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from gossip.flowtable import FlowEntry, FlowKey

MAP4 = "flows4"
#: Elements per nft command line (one line is one netlink message group; lines in one buffer
#: still form a single transaction).
ELEMENTS_PER_LINE = 2000

Tuple4 = tuple[str, int, str, int]


def decode_tcp_key(key: FlowKey) -> Tuple4 | None:
    """``(src, sport, dst, dport)`` of an IPv4 TCP flow key; None for anything else."""
    if len(key) != 14 or key[:2] != b"T4":
        return None
    src = str(ipaddress.IPv4Address(key[2:6]))
    dst = str(ipaddress.IPv4Address(key[8:12]))
    return src, int.from_bytes(key[6:8], "big"), dst, int.from_bytes(key[12:14], "big")


def owner_pop(owner: str) -> str:
    """The PoP of a flow-table owner name (``pop`` or ``pop/host/worker``)."""
    return owner.split("/", 1)[0]


def element(t: Tuple4) -> str:
    return f"{t[0]} . {t[1]} . {t[2]} . {t[3]}"


@dataclass
class Batch:
    deletes: list[tuple[FlowKey, Tuple4]] = field(default_factory=list)
    adds: list[tuple[FlowKey, Tuple4, int]] = field(default_factory=list)
    since: list[float] = field(default_factory=list)  # when each change reached the table
    resync: bool = False  # a full rebuild: flush the map, then add everything

    def __len__(self) -> int:
        return len(self.deletes) + len(self.adds)


class Projection:
    """What the kernel map should hold, kept in step with a FlowTable through its listener."""

    def __init__(
        self,
        pop: str,
        marks: Mapping[str, int],
        *,
        clock: Callable[[], float],
        now: Callable[[], float] | None = None,
    ) -> None:
        self.pop = pop
        self.marks = dict(marks)  # peer PoP -> mark
        self.clock = clock  # for lag measurement
        self.now = now or clock  # the flow table's clock (liveness)
        self.installed: dict[FlowKey, int] = {}
        # key -> (when the first unsynced change arrived); the desired state is computed at take()
        self.pending: dict[FlowKey, float] = {}
        self._desired: dict[FlowKey, int | None] = {}
        # What the kernel will hold once the batch in flight is applied (the caller takes the
        # next batch only after committing the previous one).
        self._inflight: dict[FlowKey, int | None] = {}
        self._inflight_full = False  # a resync is in flight: keys not in _inflight will be absent
        self.counters: Counter[str] = Counter()
        self.owners: dict[FlowKey, str] = {}  # steered key -> owner PoP (for the admin view)

    # -- input ----------------------------------------------------------------------------

    def desired(self, entry: FlowEntry | None) -> tuple[int | None, str | None]:
        if entry is None or entry.deleted or entry.expires <= self.now():
            return None, None
        pop = owner_pop(entry.owner)
        if pop == self.pop:
            return None, None
        if decode_tcp_key(entry.key) is None:
            if entry.key[:1] == b"T":
                self.counters["skipped_ipv6"] += 1
            return None, None
        mark = self.marks.get(pop)
        if mark is None:
            self.counters["unknown_owner"] += 1
            return None, None
        return mark, pop

    def on_change(self, key: FlowKey, old: FlowEntry | None, new: FlowEntry | None) -> bool:
        """The FlowTable listener; True when the kernel needs an update."""
        mark, pop = self.desired(new)
        if key in self.pending:
            self._desired[key] = mark
            self._note_owner(key, pop)
            return True
        if self._expected(key) == mark:
            return False
        self.pending[key] = self.clock()
        self._desired[key] = mark
        self._note_owner(key, pop)
        return True

    def listener(self, key: FlowKey, old: FlowEntry | None, new: FlowEntry | None) -> None:
        """:meth:`on_change` with the FlowTable listener signature."""
        self.on_change(key, old, new)

    def _expected(self, key: FlowKey) -> int | None:
        if key in self._inflight or self._inflight_full:
            return self._inflight.get(key)
        return self.installed.get(key)

    def _note_owner(self, key: FlowKey, pop: str | None) -> None:
        if pop is None:
            self.owners.pop(key, None)
        else:
            self.owners[key] = pop

    # -- batches --------------------------------------------------------------------------

    def take(self, limit: int) -> Batch:
        """Up to ``limit`` pending keys as a batch (they leave ``pending``)."""
        batch = Batch()
        while self.pending and len(batch.since) < limit:
            key, since = next(iter(self.pending.items()))
            del self.pending[key]
            want = self._desired.pop(key, None)
            have = self.installed.get(key)
            if want == have:
                continue
            t = decode_tcp_key(key)
            assert t is not None  # only TCP IPv4 keys are ever installed or desired
            if have is not None:
                batch.deletes.append((key, t))
            if want is not None:
                batch.adds.append((key, t, want))
            batch.since.append(since)
            self._inflight[key] = want
        return batch

    def commit(self, batch: Batch) -> None:
        """The kernel applied ``batch``."""
        self._inflight.clear()
        self._inflight_full = False
        if batch.resync:
            self.installed = {k: m for k, _, m in batch.adds}
            return
        for key, _ in batch.deletes:
            self.installed.pop(key, None)
        for key, _, mark in batch.adds:
            self.installed[key] = mark

    def failed(self) -> None:
        """The kernel refused the batch in flight: the caller follows up with :meth:`resync`."""
        self._inflight.clear()
        self._inflight_full = False

    def resync(self, entries: Iterable[FlowEntry]) -> Batch:
        """A full rebuild from the table (at start, and after a kernel error): pending is folded in."""
        batch = Batch(resync=True)
        since = min(self.pending.values(), default=self.clock())
        self.pending.clear()
        self._desired.clear()
        self.owners.clear()
        for e in entries:
            mark, pop = self.desired(e)
            if mark is None:
                continue
            t = decode_tcp_key(e.key)
            assert t is not None
            batch.adds.append((e.key, t, mark))
            self.owners[e.key] = pop or ""
        batch.since.append(since)
        self._inflight = {k: m for k, _, m in batch.adds}
        self._inflight_full = True
        return batch


def render(batch: Batch, family: str, table: str, map_name: str = MAP4) -> str:
    """nft commands for a batch; the whole text is one kernel transaction."""
    lines: list[str] = []
    if batch.resync:
        lines.append(f"flush map {family} {table} {map_name}")
    for i in range(0, len(batch.deletes), ELEMENTS_PER_LINE):
        part = batch.deletes[i:i + ELEMENTS_PER_LINE]
        lines.append(f"delete element {family} {table} {map_name} {{ "
                     + ", ".join(element(t) for _, t in part) + " }")
    for i in range(0, len(batch.adds), ELEMENTS_PER_LINE):
        part2 = batch.adds[i:i + ELEMENTS_PER_LINE]
        lines.append(f"add element {family} {table} {map_name} {{ "
                     + ", ".join(f"{element(t)} : {m:#x}" for _, t, m in part2) + " }")
    return "\n".join(lines) + ("\n" if lines else "")
