"""One PoP worker process: wires listeners, the pipeline, origin groups, TLS and the admin endpoint
from a `Config`, and shuts them down in order (stop accepting, finish requests, close origins).

QUIC in an anycast fleet: the worker's QUIC-LB identity (`quic.identity`), the static membership
and backhaul socket (`quic.backhaul`), the flow table (`gossip.flowtable`, local until gossip
replicates it) and the fleet ticket store (`quic.tickets`) are set up on first use and shared by
every QUIC listener of the worker.

With ``[gossip] enabled`` the worker also runs a gossip member and the flow channel
(`edgeproxy.membership`): the membership becomes a `GossipMembership` (failed/left PoPs are
dead, joining members' backhaul addresses are learnt from their tags) and the flow table
replicates to the other members, so QUIC Initial and TCP steering publications reach every PoP.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from gossip.keyring import Keyring

from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config, parse_hostport
from .drain import Drain
from .fleetmetrics import FleetMetrics
from .http.h1server import H1Server
from .http.semantics import alt_svc_value
from .membership import FleetGossip, GossipMembership, flow_keyring
from .metrics import Registry
from .origin.group import OriginGroup
from .pipeline import Pipeline
from .quic.backhaul import Backhaul, Peer, StaticMembership
from .quic.dispatcher import FleetRouting, FlowLookup, QuicDispatcher, start_quic_server
from .quic.fleet import FleetKeyError, FleetKeys
from .quic.identity import ServerIdentity, build_identity, load_fleet_keys, node_name
from .quic.tickets import FleetTicketStore
from .steering.service import Steering
from .tlsutil import CertStore, ensure_self_signed

#: Flow-table records purged per loop turn at most (about 1 us each).
_EXPIRE_BATCH = 2000

log = logging.getLogger("edgeproxy.pop")


class Pop:
    def __init__(self, config: Config, *, worker: int = 0) -> None:
        self.config = config
        self.worker = worker
        self.metrics = Registry()
        FleetMetrics(self.metrics, lambda: (self.gossip, self.flows, self.steering))
        self.started_at = time.time()
        self.draining = False
        self.access_log = AccessLog(config.log.access_log, config.pop.id)
        self.groups = {
            g.name: OriginGroup(g, self.metrics, parser=config.http1.parser)
            for g in config.origin_groups
        }
        self.pipeline = Pipeline(config, self.metrics, self.groups, access_log=self.access_log)
        self.h1 = H1Server(self.pipeline, config.limits, self.metrics, scheme="http", parser=config.http1.parser)
        self.h1s = H1Server(self.pipeline, config.limits, self.metrics, scheme="https", parser=config.http1.parser)
        self.quic: list[QuicDispatcher] = []
        # Fleet QUIC state, created by _ensure_fleet; `flows` may be set before start().
        self.identity: ServerIdentity | None = None
        self.membership: StaticMembership | None = None
        self.flows: FlowLookup | None = None
        self.backhaul: Backhaul | None = None
        self.tickets: FleetTicketStore | None = None
        self.gossip: FleetGossip | None = None
        self._gossip_keyring: Keyring | None = None
        self._fleet_keys: FleetKeys | None = None
        self._fleet: FleetRouting | None = None
        # TCP steering (config [steering]); created in start() when enabled.
        self.steering: Steering | None = None
        self.admin = AdminServer(self.metrics, purge=self.pipeline.purge, status=self.status)
        self.admin.steering = self.steering_status
        # Graceful drain (admin POST /drain); created in start() (it needs the running loop).
        self.drain: Drain | None = None
        self.certs: CertStore | None = None
        self._quic_config: QuicConfiguration | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.addresses: dict[str, list[tuple[str, int]]] = {"http": [], "https": [], "quic": [], "admin": []}
        self.m_info = self.metrics.gauge("edgeproxy_info", "PoP identity (value 1).", ["pop"])
        self.m_info.set(config.pop.id, value=1)

    def _cert_pairs(self) -> list[tuple[Path, Path, list[str]]]:
        cfg = self.config
        if cfg.tls.certificates:
            return [(cfg.path(c.cert), cfg.path(c.key), c.names) for c in cfg.tls.certificates]
        cert, key = ensure_self_signed(cfg.path(cfg.pop.state_dir))
        return [(cert, key, [])]

    def _build_quic_config(self) -> QuicConfiguration:
        assert self.certs is not None
        qc = QuicConfiguration(
            is_client=False,
            alpn_protocols=H3_ALPN,
            idle_timeout=self.config.limits.idle_timeout,
            max_datagram_frame_size=None,
        )
        qc.load_cert_chain(str(self.certs.default.cert), str(self.certs.default.key))
        return qc

    def quic_configuration(self) -> QuicConfiguration:
        """Per new QUIC connection: the configuration built from the current certificate."""
        if self._quic_config is None:
            self._quic_config = self._build_quic_config()
        return self._quic_config

    def reload_certificates(self) -> None:
        if self.certs is not None and self.certs.reload():
            self._quic_config = None

    def reload(self) -> None:
        """SIGHUP: changed certificates, the fleet key file and the gossip keyring file
        (`gossip.keyring`), so keys rotate without a restart. A file that does not load changes
        nothing (logged)."""
        self.reload_certificates()
        self.reload_fleet_keys()
        keyring, path = self._gossip_keyring, self.config.gossip.keyring
        if keyring is not None and path:
            try:
                if keyring.reload_file(self.config.path(path)):
                    log.warning("gossip keyring reloaded: %d key(s)", len(keyring.keys))
            except (OSError, ValueError) as exc:
                log.error("gossip keyring %s not reloaded, keeping %d key(s): %s", path, len(keyring.keys), exc)

    def reload_fleet_keys(self) -> bool:
        """Re-read the fleet key file into the running worker: QUIC-LB configurations, reset
        tokens, Retry/NEW_TOKEN tokens, tickets, backhaul frames and the flow channel's keyring
        follow it. False (and nothing changed) if the file does not load or cannot be followed."""
        keys = self._fleet_keys
        if keys is None:
            return False
        try:
            new = load_fleet_keys(self.config)
        except (FleetKeyError, OSError, ValueError) as exc:
            log.error("fleet keys not reloaded, keeping key ids %s (primary %d): %s",
                      sorted(keys.keys), keys.primary.key_id, exc)
            return False
        if new.same_keys(keys):
            return False
        keys.replace(new)
        if self.identity is not None:
            self.identity.sync_keys()
        if self.gossip is not None:
            self.gossip.replicator.keyring.set_keys(flow_keyring(keys).keys)
        log.warning("fleet keys reloaded: key ids %s, primary %d", sorted(keys.keys), keys.primary.key_id)
        return True

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tls.reload_interval)
            self.reload_certificates()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.access_log.flush()

    async def start(self) -> None:
        cfg = self.config
        for group in self.groups.values():
            await group.start()
        if cfg.steering.enabled:
            await self._start_steering()
        if cfg.listen.https or cfg.listen.quic:
            self.certs = CertStore(self._cert_pairs())
        shared = cfg.backhaul.workers > 1  # sibling worker processes listen on the same ports
        for addr in cfg.listen.http:
            host, port = parse_hostport(addr)
            server = await self.h1.listen(host, port, backlog=cfg.listen.backlog, reuse_port=shared)
            self.addresses["http"].append(server.sockets[0].getsockname()[:2])
        for addr in cfg.listen.https:
            assert self.certs is not None
            host, port = parse_hostport(addr)
            server = await self.h1s.listen(host, port, ssl_context=self.certs.server_context(), backlog=cfg.listen.backlog, reuse_port=shared)
            self.addresses["https"].append(server.sockets[0].getsockname()[:2])
        for addr in cfg.listen.quic:
            host, port = parse_hostport(addr)
            await self.start_quic(host, port)
        if cfg.backhaul.listen or cfg.gossip.enabled:
            await self._ensure_fleet()
        if cfg.gossip.enabled:
            await self._start_gossip()
        if self.quic:  # advertise the port actually bound (the config may say 0)
            self.pipeline.alt_svc = alt_svc_value(self.addresses["quic"][0][1])
        self.drain = self.admin.drain = Drain(self._set_draining, self.client_connections)
        host, port = parse_hostport(cfg.admin.listen, default_host="127.0.0.1")
        server = await self.admin.listen(host, port + self.worker if port else 0)  # worker i: port + i
        self.addresses["admin"].append(server.sockets[0].getsockname()[:2])
        loop = asyncio.get_running_loop()
        if self.certs is not None:
            self._tasks.append(loop.create_task(self._reload_loop()))
        self._tasks.append(loop.create_task(self._flush_loop()))

    # -- QUIC in the fleet --------------------------------------------------------------------------

    async def _ensure_fleet(self) -> FleetRouting:
        """Fleet keys, QUIC-LB identity, membership, backhaul, flow table and ticket store."""
        if self._fleet is not None:
            return self._fleet
        cfg = self.config
        keys = load_fleet_keys(cfg)
        q, b = cfg.quic_lb, cfg.backhaul
        identity = build_identity(q, keys, self.worker)
        peers = [Peer(p.name, p.pop_index, p.host_index, parse_hostport(p.address)) for p in b.peers]
        membership: StaticMembership
        if cfg.gossip.enabled:
            membership = GossipMembership(node=identity.node, name=cfg.pop.id, listen=None, workers=max(1, b.workers), peers=peers)
        else:
            membership = StaticMembership(node=identity.node, name=cfg.pop.id, listen=None, workers=max(1, b.workers), peers=peers)
        self._fleet_keys = keys
        if b.listen:
            host, port = parse_hostport(b.listen)
            self.backhaul = Backhaul(keys=keys, sender=identity.sender, membership=membership, metrics=self.metrics, max_skew=b.max_skew)
            bound = await self.backhaul.start(host, port + self.worker if port else 0)
            # Worker 0's address, from which sibling workers' ports follow; a wildcard address
            # is reached through loopback.
            sibling_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            membership.set_listen((sibling_host, bound[1] - self.worker))
            self.addresses.setdefault("backhaul", []).append(bound)
        if cfg.tickets.enabled:
            self.tickets = FleetTicketStore(keys, max_tickets=cfg.tickets.max_tickets, single_use=cfg.tickets.single_use, metrics=self.metrics)
            if self.backhaul is not None:
                self.tickets.set_replicator(self.backhaul.broadcast_ticket)
                self.backhaul.set_ticket_receiver(self.tickets.receive_replica)
        name = node_name(cfg.pop.id, q.host_index, self.worker)
        if self.flows is None:
            from gossip.flowtable import FlowTable

            self.flows = FlowTable(name, initial_version=time.time_ns() // 1000)
            self._tasks.append(asyncio.get_running_loop().create_task(self._flow_expiry_loop()))
        self.identity = identity
        self.membership = membership
        self._fleet = FleetRouting(
            identity=identity if q.enabled else None,
            membership=membership,
            flows=self.flows,
            flow_name=name,
            flow_ttl=b.flow_ttl,
            backhaul=self.backhaul,
            session_ticket_fetcher=self.tickets.fetch if self.tickets is not None else None,
            session_ticket_handler=self.tickets.add if self.tickets is not None else None,
            tokens=keys,
            retry_above=q.retry_above,
            retry_token_lifetime=q.retry_token_lifetime,
        )
        return self._fleet

    async def _start_gossip(self) -> None:
        """The worker's gossip member and flow channel (config [gossip])."""
        from gossip.flowtable import FlowTable

        cfg = self.config
        assert self.identity is not None and self.membership is not None and self._fleet_keys is not None
        if not isinstance(self.membership, GossipMembership) or not isinstance(self.flows, FlowTable):
            log.warning("gossip: the membership or flow table was replaced; gossip off")
            return
        g = cfg.gossip
        keyring = Keyring.from_file(cfg.path(g.keyring)) if g.keyring else None
        self._gossip_keyring = keyring
        if keyring is None:
            log.warning("gossip: no keyring: membership gossip is plaintext and unauthenticated "
                        "(anyone reaching %s can declare a PoP dead)", g.bind)
        backhaul = self.addresses.get("backhaul", [None])[0]
        self.gossip = FleetGossip(
            g, name=self.flows.node, pop=cfg.pop.id, node=self.identity.node, worker=self.worker,
            membership=self.membership, flows=self.flows, fleet_keys=self._fleet_keys,
            backhaul=backhaul, keyring=keyring,
        )
        await self.gossip.start()
        self.addresses["gossip"] = [self.gossip.address]
        if self.gossip.channel is not None:
            self.addresses["flow"] = [self.gossip.channel.address]

    async def _flow_expiry_loop(self) -> None:
        """Purges expired flows when no flow channel does (gossip off): a bounded batch per loop
        turn, so a burst of flows ending together never stalls the worker."""
        from gossip.flowtable import FlowTable

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            flows = self.flows
            if self.gossip is not None and self.gossip.channel is not None:
                continue  # the channel purges every 50 ms
            if isinstance(flows, FlowTable):
                while flows.expire(loop.time(), limit=_EXPIRE_BATCH) >= _EXPIRE_BATCH:
                    await asyncio.sleep(0)
            else:
                expire = getattr(flows, "expire", None)
                if expire is not None:
                    expire(loop.time())

    async def start_quic(self, host: str, port: int, *, transport: asyncio.DatagramTransport | None = None) -> QuicDispatcher:
        """An HTTP/3 listener on (host, port), or on an injected client-facing `transport` (the
        test fabric's simulated anycast socket)."""
        cfg = self.config
        if self.certs is None:
            self.certs = CertStore(self._cert_pairs())
        fleet = await self._ensure_fleet()
        dispatcher = await start_quic_server(
            host, port, self.quic_configuration, self.pipeline, cfg.limits, self.metrics,
            reuse_port=cfg.backhaul.workers > 1, fleet=fleet, transport=transport,
        )
        if self.backhaul is not None:
            self.backhaul.add_dispatcher(dispatcher)
        self.quic.append(dispatcher)
        self.addresses["quic"].append(dispatcher.local_address)
        return dispatcher

    # -- TCP steering -------------------------------------------------------------------------

    async def _start_steering(self) -> None:
        """Publishes accepted TCP connections to the flow table and projects other PoPs' flows
        into the kernel; without CAP_NET_ADMIN it warns and the PoP runs without TCP survival."""
        from gossip.flowtable import FlowTable

        from .steering.service import inject

        cfg = self.config
        if self.flows is None:
            self.flows = FlowTable(node_name(cfg.pop.id, cfg.quic_lb.host_index, self.worker),
                                   initial_version=time.time_ns() // 1000)
        if not isinstance(self.flows, FlowTable):
            log.warning("steering: the flow table is not a gossip.flowtable.FlowTable; steering off")
            return
        table = self.flows
        self.steering = Steering(cfg.steering, cfg.pop.id, table, state_dir=cfg.path(cfg.pop.state_dir))
        await self.steering.start()
        self.h1.connection_observer = self.steering.publisher
        self.h1s.connection_observer = self.steering.publisher
        if cfg.steering.inject:
            loop = asyncio.get_running_loop()
            self.admin.steering_inject = lambda items: inject(table, list(items), loop.time())

    # -- drain ----------------------------------------------------------------------------------

    def _set_draining(self, flag: bool) -> None:
        self.draining = flag
        self.h1.draining = self.h1s.draining = flag

    def client_connections(self) -> int:
        """Open client connections: HTTP/1.1 (TCP and TLS) and QUIC (forwarded ones included)."""
        return len(self.h1.connections) + len(self.h1s.connections) + sum(len(q.connections) for q in self.quic)

    def steering_status(self, query: dict[str, list[str]]) -> dict[str, Any]:
        if self.steering is None:
            return {"enabled": False}
        return self.steering.status(query)

    def status(self) -> dict[str, Any]:
        groups = {name: g.status() for name, g in self.groups.items()}
        out: dict[str, Any] = {
            "status": "draining" if self.draining else "ok",
            "pop": self.config.pop.id,
            "uptime_s": round(time.time() - self.started_at, 3),
            "origin_groups": groups,
        }
        if self.gossip is not None:
            out["gossip"] = self.gossip.status()
        return out

    async def stop(self, grace: float = 10.0, *, leave: bool = True) -> None:
        """Graceful: stop accepting, let requests in flight finish (up to `grace`), leave the
        gossip cluster (`leave=False`: stop answering gossip, as a crash would), then close."""
        self.draining = True
        if self.drain is not None:
            await self.drain.close()
        await asyncio.gather(self.h1.close(grace), self.h1s.close(grace), *(q.close() for q in self.quic))
        if self.gossip is not None:
            await self.gossip.stop(leave=leave)
        if self.steering is not None:
            await self.steering.stop()
        if self.backhaul is not None:
            await self.backhaul.close()
        await self.pipeline.close()
        for group in self.groups.values():
            await group.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.close()
        self.access_log.close()

    async def run_until_signalled(self, duration: float | None = None) -> None:
        """Serves until SIGINT/SIGTERM (or `duration` seconds); SIGHUP reloads certificates and
        the gossip keyring."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        waiters = [loop.create_task(stop.wait())]
        if self.drain is not None:  # a finished drain (admin POST /drain) stops the worker too
            waiters.append(loop.create_task(self.drain.finished.wait()))
        try:
            await asyncio.wait(waiters, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
