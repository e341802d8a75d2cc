"""TCP steering for one PoP worker: the flow table projected into the kernel, kept in sync.

:class:`Steering` ties the pieces together: the routing set-up (:mod:`.routing`), the nft table
``edgeproxy_<pop>`` (:mod:`.nft`, rebuilt from the flow table at start and removed at stop), the
projection of flow-table changes into map updates (:mod:`.projection`), one flush task that
sends them to the kernel in batches, and the publisher of this PoP's own connections
(:mod:`.publisher`). No Python runs on the packet path: once an element is in the map, the
kernel marks, routes and forwards the flow's segments by itself.

Without CAP_NET_ADMIN (or without libnftables) :meth:`start` logs a warning and the PoP runs
without TCP survival; :meth:`status` says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip.flowtable import FlowEntry, FlowKey, FlowTable, tcp_key

from .nft import CHAIN, FAMILY, Nft, NftError, ruleset, steered_counter, table_name
from .projection import Projection, decode_tcp_key, render
from .publisher import FlowPublisher
from .routing import Routing, RoutingError, peer_routes

if TYPE_CHECKING:
    from ..config import SteeringSection

log = logging.getLogger("edgeproxy.steering")

CAP_NET_ADMIN = 12


def has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Steering:
    def __init__(
        self,
        cfg: SteeringSection,
        pop: str,
        table: FlowTable,
        *,
        state_dir: Path,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.cfg = cfg
        self.pop = pop
        self.table = table
        self.state_dir = state_dir
        self.table_name = table_name(pop)
        self.routes = peer_routes(pop, cfg.peers, cfg.mark, cfg.table)
        self._clock = clock
        self.projection = Projection(pop, {r.pop: r.mark for r in self.routes}, clock=time.monotonic, now=self.now)
        self.publisher = FlowPublisher(table, min_age=cfg.min_age, linger=cfg.linger, ttl=cfg.ttl, clock=clock)
        self.active = False
        self.reason = "not started"
        self.nft: Nft | None = None
        self.routing: Routing | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._need_resync = False
        self.lags: deque[float] = deque(maxlen=20_000)
        self.stats: dict[str, Any] = {"batches": 0, "elements": 0, "errors": 0, "resyncs": 0, "last_error": "",
                                      "last_error_at": None, "last_batch_elements": 0, "last_batch_ms": 0.0}

    def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> bool:
        """Sets up routing and the nft table; False (and a warning) when it cannot."""
        self.publisher.start()  # own flows are published either way: other PoPs may steer to us
        if not has_net_admin():
            self.reason = "no CAP_NET_ADMIN: TCP connections will NOT survive route changes"
            log.warning("steering: %s (run as root or grant CAP_NET_ADMIN)", self.reason)
            return False
        cfg = self.cfg
        try:
            self.nft = Nft()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.routing = Routing(
                pop=self.pop, routes=self.routes, device=cfg.backhaul_device, mode=cfg.mode, rule_pref=cfg.rule_pref,
                journal=self.state_dir / f"steering-routing-{self.table_name}.json", vxlan_device=cfg.vxlan_device,
                vxlan_id=cfg.vxlan_id, vxlan_port=cfg.vxlan_port, own_address=cfg.peers.get(self.pop, ""),
            )
            self.routing.recover()
            self.nft.try_run(f"delete table {FAMILY} {self.table_name}")  # ours, from a previous run
            self.routing.setup()
            exclude = [cfg.backhaul_device] + ([cfg.vxlan_device] if cfg.mode == "vxlan" else [])
            self.nft.run(ruleset(self.table_name, size=cfg.max_entries, exclude_ifaces=exclude))
        except (NftError, RoutingError, OSError) as e:
            self.reason = f"set-up failed: {e}"
            log.error("steering: %s; running without TCP survival", self.reason)
            await self._teardown_kernel()
            return False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steering-nft")
        self._wake = asyncio.Event()
        self._need_resync = True  # rebuild the map from the table
        self._wake.set()
        self.table.listeners.append(self._on_change)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flush_loop()), loop.create_task(self._expire_loop())]
        self.active = True
        self.reason = ""
        log.info("steering: nft table %s %s, %d peers, %s mode via %s", FAMILY, self.table_name, len(self.routes),
                 cfg.mode, cfg.backhaul_device)
        return True

    async def stop(self) -> None:
        await self.publisher.close()
        if self._on_change in self.table.listeners:
            self.table.listeners.remove(self._on_change)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._teardown_kernel()
        self.active = False
        self.reason = "stopped"

    async def _teardown_kernel(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.nft is not None:
            self.nft.try_run(f"delete table {FAMILY} {self.table_name}")
            self.nft.close()
            self.nft = None
        if self.routing is not None:
            self.routing.teardown()
            self.routing = None

    # -- sync -----------------------------------------------------------------------------

    def _on_change(self, key: FlowKey, old: FlowEntry | None, new: FlowEntry | None) -> None:
        try:
            if self.projection.on_change(key, old, new) and self._wake is not None:
                self._wake.set()
        except Exception:  # never break the flow table's writer
            log.exception("steering: projection failed for a flow-table change")

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            for _ in range(1_000_000):  # bounded: one pass per batch until nothing is pending
                if self._need_resync:
                    batch = self.projection.resync(self.table.entries())
                    self._need_resync = False
                    self.stats["resyncs"] += 1
                elif self.projection.pending:
                    batch = self.projection.take(self.cfg.batch_max)
                    if not batch:
                        continue
                else:
                    break
                text = render(batch, FAMILY, self.table_name)
                t0 = time.monotonic()
                try:
                    assert self.nft is not None
                    await loop.run_in_executor(self._executor, self.nft.run, text)
                except (NftError, RuntimeError) as e:
                    self.projection.failed()
                    self._need_resync = True
                    self.stats["errors"] += 1
                    self.stats["last_error"] = str(e)[:500]
                    self.stats["last_error_at"] = time.time()
                    log.warning("steering: kernel update failed (%s); rebuilding the map", str(e).splitlines()[0])
                    await asyncio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                backoff = 0.05
                done = time.monotonic()
                self.projection.commit(batch)
                self.stats["batches"] += 1
                self.stats["elements"] += len(batch)
                self.stats["last_batch_elements"] = len(batch)
                self.stats["last_batch_ms"] = round((done - t0) * 1000, 3)
                self.lags.extend(done - s for s in batch.since)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.table.expire(self.now())

    # -- admin ----------------------------------------------------------------------------

    def lag_summary(self) -> dict[str, float | int]:
        values = list(self.lags)
        return {"samples": len(values), "p50_ms": round(_percentile(values, 0.5) * 1000, 3),
                "p99_ms": round(_percentile(values, 0.99) * 1000, 3),
                "max_ms": round(max(values, default=0.0) * 1000, 3)}

    def status(self, query: dict[str, list[str]] | None = None) -> dict[str, Any]:
        query = query or {}
        limit = int((query.get("limit") or ["100"])[0])
        cfg = self.cfg
        out: dict[str, Any] = {
            "enabled": True, "active": self.active, "reason": self.reason, "pop": self.pop,
            "nft_table": f"{FAMILY} {self.table_name}", "mode": cfg.mode, "backhaul_device": cfg.backhaul_device,
            "routes": [{"pop": r.pop, "address": r.address, "mark": hex(r.mark), "table": r.table} for r in self.routes],
            "entries": len(self.projection.installed), "pending": len(self.projection.pending),
            "sync_lag": self.lag_summary(), **self.stats, "projection": dict(self.projection.counters),
            "publisher": self.publisher.stats(), "flow_table": len(self.table),
        }
        if self.routing is not None:
            out["routing_changes"] = list(self.routing.applied)
        if self.active and self.nft is not None:
            listing = self.nft.try_run(f"list chain {FAMILY} {self.table_name} {CHAIN}") or ""
            out["steered_packets"], out["steered_bytes"] = steered_counter(listing)
        items = []
        for key, mark in list(self.projection.installed.items())[:max(0, limit)]:
            t = decode_tcp_key(key)
            if t is not None:
                items.append({"src": t[0], "sport": t[1], "dst": t[2], "dport": t[3],
                              "owner": self.projection.owners.get(key, ""), "mark": hex(mark)})
        out["steered"] = items
        if query.get("own"):
            now = self.now()
            own = []
            for e in self.table.owned_by(self.table.node, now)[:max(0, limit)]:
                t = decode_tcp_key(e.key)
                if t is not None:
                    own.append({"src": t[0], "sport": t[1], "dst": t[2], "dport": t[3], "owner": e.owner,
                                "epoch": e.epoch, "ttl": round(e.expires - now, 3)})
            out["own"] = own
        return out


def inject(table: FlowTable, items: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Test and lab aid until flow-table replication lands: merge entries as if replicated from
    their owners (through :meth:`FlowTable.apply_group`, the replication path).

    Each item: ``{"src", "sport", "dst", "dport", "owner", "ttl"?, "epoch"?, "deleted"?}``.
    """
    merged = 0
    by_owner: dict[str, list[tuple[bytes, int, float, bool]]] = {}
    for it in items:
        key = tcp_key(str(it["src"]), int(it["sport"]), str(it["dst"]), int(it["dport"]))
        owner = str(it["owner"])
        if owner == table.node:
            raise ValueError(f"cannot inject an entry owned by this node ({owner})")
        cur = table.get(key)
        epoch = int(it.get("epoch") or ((cur.epoch + (0 if cur.owner == owner else 1)) if cur else 1))
        by_owner.setdefault(owner, []).append((key, epoch, float(it.get("ttl", 30.0)), bool(it.get("deleted", False))))
    for owner, entries in by_owner.items():
        w = table.watermark(owner)
        wire = [(key, epoch, w + i, ttl, deleted) for i, (key, epoch, ttl, deleted) in enumerate(entries, 1)]
        merged += table.apply_group(owner, w, w + len(wire), wire, now)
    return {"merged": merged, "items": len(items)}

