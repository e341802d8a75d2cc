"""Prometheus metrics of the fleet layers: gossip membership, the flow table and its replication,
and TCP steering.

These components keep their own counters (plain dicts, sans-IO cores), so their metrics are not
updated on the hot path: a collector registered with the PoP's `Registry` copies them into
gauges and counters when `/metrics` is scraped. Counters mirror the components' own monotonic
counts (`Counter.set_total`); every name a component counts becomes one label value, so a new
drop reason shows up without a change here.
"""

from __future__ import annotations

from collections import Counter as CountDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gossip.flowtable import FlowTable

from .metrics import Registry

if TYPE_CHECKING:
    from .membership import FleetGossip
    from .steering.service import Steering

GOSSIP_STATES = ("alive", "suspect", "dead", "left")


#: Returns the worker's (gossip, flow table, steering) as they are now, each possibly None.
Sources = Callable[[], "tuple[FleetGossip | None, FlowTable | Any, Steering | None]"]


class FleetMetrics:
    """Registers the fleet metrics on `registry`; `collect` (called by `Registry.render`)
    reads whichever of gossip, flow table and steering `sources()` returns at that moment."""

    def __init__(self, registry: Registry, sources: Sources) -> None:
        self.sources = sources
        r = registry
        self._members = r.gauge("edgeproxy_gossip_members", "Gossip members (one per PoP worker) by state, as this worker sees them.", ["state"])
        self._pops = r.gauge("edgeproxy_fleet_pops", "PoPs by liveness from gossip (a PoP is alive while any of its workers is).", ["state"])
        self._gossip_events = r.counter("edgeproxy_gossip_events_total", "Gossip agent counters: traffic and drops by reason (decrypt_failed, bad_crc, ...).", ["event"])
        self._flow_records = r.gauge("edgeproxy_flow_records", "Flow-table records (live entries and tombstones) by owner.", ["owner"])
        self._flow_events = r.counter("edgeproxy_flow_events_total", "Flow-table and replication counters: published, expired, merged, packets, drops by reason.", ["event"])
        self._steer_entries = r.gauge("edgeproxy_steering_entries", "TCP steering map elements installed in the kernel, and changes pending.", ["state"])
        self._steer_active = r.gauge("edgeproxy_steering_active", "1 if TCP steering is installed and running, else 0.")
        self._steer_events = r.counter("edgeproxy_steering_events_total", "TCP steering counters: batches, elements, errors, resyncs, projection events.", ["event"])
        self._steer_lag = r.gauge("edgeproxy_steering_sync_lag_seconds", "Flow-table change to kernel map, over recent batches.", ["quantile"])
        r.add_collector(self.collect)

    def collect(self) -> None:
        gossip, flows, steering = self.sources()
        if gossip is not None:
            self._collect_gossip(gossip)
        if isinstance(flows, FlowTable):  # tests may plug in another lookup
            self._collect_flows(flows)
        if steering is not None:
            self._collect_steering(steering)

    def _collect_gossip(self, gossip: FleetGossip) -> None:
        agent = gossip.agent
        states: CountDict[str] = CountDict()
        for m in agent.members():
            states[m.state.name.lower()] += 1
        for state in GOSSIP_STATES:
            self._members.set(state, value=states.get(state, 0))
        pops: dict[str, bool] = {gossip.membership.name: True}  # this worker's own PoP
        for info in gossip.membership.members().values():
            pops[info["pop"]] = pops.get(info["pop"], False) or bool(info["alive"])
        self._pops.set("alive", value=sum(pops.values()))
        self._pops.set("dead", value=len(pops) - sum(pops.values()))
        for name, value in agent.counters.items():
            self._gossip_events.set_total(name, value=value)

    def _collect_flows(self, flows: FlowTable) -> None:
        own = flows.count_owned(flows.node)
        self._flow_records.set("local", value=own)
        self._flow_records.set("remote", value=len(flows) - own)
        for name, value in flows.counters.items():
            self._flow_events.set_total(name, value=value)

    def _collect_steering(self, steering: Steering) -> None:
        self._steer_active.set(value=1 if steering.active else 0)
        self._steer_entries.set("installed", value=len(steering.projection.installed))
        self._steer_entries.set("pending", value=len(steering.projection.pending))
        for name in ("batches", "elements", "errors", "resyncs"):
            self._steer_events.set_total(name, value=steering.stats[name])
        for name, value in steering.projection.counters.items():
            self._steer_events.set_total(f"projection.{name}", value=value)
        lag = steering.lag_summary()
        self._steer_lag.set("0.5", value=lag["p50_ms"] / 1000)
        self._steer_lag.set("0.99", value=lag["p99_ms"] / 1000)
