"""One PoP worker process: wires listeners, the pipeline, origin groups, TLS and the admin endpoint
from a `Config`, and shuts them down in order (stop accepting, finish requests, close origins).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config, parse_hostport
from .http.h1server import H1Server
from .http.semantics import alt_svc_value
from .metrics import Registry
from .origin.group import OriginGroup
from .pipeline import Pipeline
from .quic.dispatcher import QuicDispatcher, start_quic_server
from .tlsutil import CertStore, ensure_self_signed

log = logging.getLogger("edgeproxy.pop")


class Pop:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Registry()
        self.started_at = time.time()
        self.draining = False
        self.access_log = AccessLog(config.log.access_log, config.pop.id)
        self.groups = {g.name: OriginGroup(g, self.metrics) for g in config.origin_groups}
        self.pipeline = Pipeline(config, self.metrics, self.groups, access_log=self.access_log)
        self.h1 = H1Server(self.pipeline, config.limits, self.metrics, scheme="http", parser=config.http1.parser)
        self.h1s = H1Server(self.pipeline, config.limits, self.metrics, scheme="https", parser=config.http1.parser)
        self.quic: list[QuicDispatcher] = []
        self.admin = AdminServer(self.metrics, purge=self.pipeline.purge, status=self.status)
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
        if cfg.listen.https or cfg.listen.quic:
            self.certs = CertStore(self._cert_pairs())
        for addr in cfg.listen.http:
            host, port = parse_hostport(addr)
            server = await self.h1.listen(host, port, backlog=cfg.listen.backlog)
            self.addresses["http"].append(server.sockets[0].getsockname()[:2])
        for addr in cfg.listen.https:
            assert self.certs is not None
            host, port = parse_hostport(addr)
            server = await self.h1s.listen(host, port, ssl_context=self.certs.server_context(), backlog=cfg.listen.backlog)
            self.addresses["https"].append(server.sockets[0].getsockname()[:2])
        for addr in cfg.listen.quic:
            host, port = parse_hostport(addr)
            dispatcher = await start_quic_server(host, port, self.quic_configuration, self.pipeline, cfg.limits, self.metrics)
            self.quic.append(dispatcher)
            self.addresses["quic"].append(dispatcher.local_address)
        if self.quic:  # advertise the port actually bound (the config may say 0)
            self.pipeline.alt_svc = alt_svc_value(self.addresses["quic"][0][1])
        host, port = parse_hostport(cfg.admin.listen, default_host="127.0.0.1")
        server = await self.admin.listen(host, port)
        self.addresses["admin"].append(server.sockets[0].getsockname()[:2])
        loop = asyncio.get_running_loop()
        if self.certs is not None:
            self._tasks.append(loop.create_task(self._reload_loop()))
        self._tasks.append(loop.create_task(self._flush_loop()))

    def status(self) -> dict[str, Any]:
        groups = {name: g.status() for name, g in self.groups.items()}
        return {
            "status": "draining" if self.draining else "ok",
            "pop": self.config.pop.id,
            "uptime_s": round(time.time() - self.started_at, 3),
            "origin_groups": groups,
        }

    async def stop(self, grace: float = 10.0) -> None:
        """Graceful: stop accepting, let requests in flight finish (up to `grace`), then close."""
        self.draining = True
        await asyncio.gather(self.h1.close(grace), self.h1s.close(grace), *(q.close() for q in self.quic))
        await self.pipeline.close()
        for group in self.groups.values():
            await group.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.close()
        self.access_log.close()

    async def run_until_signalled(self, duration: float | None = None) -> None:
        """Serves until SIGINT/SIGTERM (or `duration` seconds); SIGHUP reloads certificates."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_certificates)
        try:
            if duration is None:
                await stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), duration)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
