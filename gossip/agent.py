"""The asyncio shell around :class:`gossip.swim.Swim`: one gossip member on real sockets.

:class:`GossipAgent` binds a UDP socket and a TCP listener on the same port (as memberlist does),
feeds every datagram and inbound TCP exchange to its :class:`~gossip.swim.Swim`, carries out
what the core asks for (:class:`~gossip.swim.SendPacket` as one datagram,
:class:`~gossip.swim.OpenStream` as one TCP exchange) and keeps exactly one loop timer armed at
:meth:`Swim.next_deadline() <gossip.swim.Swim.next_deadline>`. Membership changes come out as
:class:`~gossip.swim.MemberEvent` through :meth:`GossipAgent.events` (an async iterator) and/or
an ``on_event`` callback.

The clock handed to the core is the event loop's (``loop.time()``); :meth:`GossipAgent.wall_time`
converts an event time to Unix time.

Life cycle::

    agent = GossipAgent("pop-a", ("127.0.0.1", 7946), tags={"role": "pop"}, keyring=ring)
    await agent.start()
    await agent.join([("10.0.0.2", 7946)])       # or agent.retry_join(...) in a task
    async for ev in agent.events(): ...
    await agent.leave()                            # graceful: intent, dead, propagate; then stop
    await agent.stop()                             # hard stop (idempotent)

Inbound TCP follows the contract of :mod:`gossip.swim`: a stream decoder is fed until the
exchange is complete, the whole exchange must arrive within ``tcp_timeout``, the reply (if any)
is written and the connection closed. At most ``max_inbound_streams`` inbound exchanges (128,
memberlist's push/pull cap) are read at once; more are closed at once and counted
(``stream_in_rejected``). An encrypted stream's type is only known once it has been read whole,
so the cap covers every inbound stream, not only push/pulls.

Counters (:attr:`GossipAgent.counters`) merge the core's drop reasons (``decrypt_failed``,
``bad_crc``, ...) with the shell's traffic figures (``udp_in``, ``udp_out``, ``stream_in``,
``stream_out``, ``stream_out_failed``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from gossip.keyring import Keyring
from gossip.swim import Addr, Config, Member, MemberEvent, OpenStream, SendPacket, State, Swim
from gossip.wire import PushPull, WireError

__all__ = ["GossipAgent", "parse_hostport"]

log = logging.getLogger(__name__)

#: memberlist ``udpRecvBufSize``.
UDP_RECV_BUF = 2 * 1024 * 1024
#: Largest datagram read (the Go receiver reads 65536).
UDP_READ_SIZE = 65536
#: memberlist's cap on concurrent inbound push/pulls.
MAX_INBOUND_STREAMS = 128
STREAM_READ_CHUNK = 65536


def parse_hostport(text: str, default_port: int = 7946) -> Addr:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``V6`` → ``(host, port)``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if text.count(":") == 1:
        host, port_s = text.split(":")
        return host, int(port_s)
    return text, default_port


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, agent: GossipAgent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.agent._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable after a peer died) surface here on Linux.
        self.agent._count("udp_error")


class GossipAgent:
    """One gossip member on a UDP socket and a TCP listener sharing ``bind``'s port.

    ``advertise`` is the address other members reach us at (default: the bound address; it must
    be given when binding a wildcard address). ``bind`` may use port 0: the UDP and TCP port then
    come from the system, and :attr:`address` tells which.
    """

    def __init__(
        self,
        name: str,
        bind: Addr = ("127.0.0.1", 7946),
        advertise: Addr | None = None,
        tags: Mapping[str, str] | None = None,
        keyring: Keyring | None = None,
        config: Config | None = None,
        *,
        on_event: Callable[[MemberEvent], None] | None = None,
        rng: random.Random | None = None,
        max_inbound_streams: int = MAX_INBOUND_STREAMS,
    ) -> None:
        self.name = name
        self.bind = (str(bind[0]), int(bind[1]))
        self.advertise = advertise
        self.tags = dict(tags or {})
        self.keyring = keyring
        self.config = config if config is not None else Config()
        self.on_event = on_event
        self.rng = rng
        self.max_inbound_streams = max_inbound_streams
        self._swim: Swim | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.AbstractServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: list[asyncio.Queue[MemberEvent | None]] = []
        self._listeners: list[Callable[[MemberEvent], None]] = []
        self._join_waiters: dict[int, asyncio.Future[bool]] = {}
        self._leave_done: asyncio.Event | None = None
        self._inbound = 0
        self._shell_counters: dict[str, int] = {}
        self._started = False
        self._stopped = False
        self._port = self.bind[1]

    # --- properties -----------------------------------------------------------------------

    @property
    def swim(self) -> Swim:
        if self._swim is None:
            raise RuntimeError("agent not started")
        return self._swim

    @property
    def address(self) -> Addr:
        """The advertised ``(ip, port)``."""
        return (self.swim.addr, self.swim.port)

    @property
    def bound(self) -> Addr:
        """The locally bound ``(host, port)``."""
        return (self.bind[0], self._port)

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    @property
    def counters(self) -> dict[str, int]:
        """The core's drop/event counters merged with the shell's traffic counters."""
        out = dict(self._swim.counters) if self._swim is not None else {}
        out.update(self._shell_counters)
        return out

    def members(self) -> list[Member]:
        """Every known member, self included (name order)."""
        return self.swim.members()

    def member(self, name: str) -> Member | None:
        return self.swim.member(name)

    def alive_members(self) -> list[Member]:
        return self.swim.alive_members()

    def local_member(self) -> Member:
        m = self.swim.member(self.name)
        assert m is not None
        return m

    def wall_time(self, t: float) -> float:
        """Unix time of the loop-clock instant ``t`` (an event's ``time``)."""
        loop = self._loop or asyncio.get_running_loop()
        return time.time() - (loop.time() - t)

    # --- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the sockets and start the member."""
        if self._started:
            raise RuntimeError("agent already started")
        self._started = True
        loop = asyncio.get_running_loop()
        self._loop = loop
        socks = self._bind_sockets()
        udp_sock: socket.socket | None = socks[0]
        tcp_sock: socket.socket | None = socks[1]
        try:
            self._port = socks[1].getsockname()[1]
            adv_host, adv_port = self._advertise_addr()
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), sock=socks[0]
            )
            udp_sock = None
            self._server = await asyncio.start_server(
                self._handle_inbound, sock=socks[1], limit=STREAM_READ_CHUNK
            )
            tcp_sock = None
            self._swim = Swim(
                self.name,
                adv_host,
                adv_port,
                self.tags,
                self.config,
                self.rng,
                self.keyring,
                now=loop.time(),
            )
        except BaseException:
            for s in (udp_sock, tcp_sock):
                if s is not None:
                    s.close()
            self._close_sockets()
            self._stopped = True
            raise
        self._after()

    async def stop(self) -> None:
        """Hard stop: stop answering at once (peers will see us fail), close every socket,
        cancel and await every task. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._swim is not None:
            self._swim.shutdown()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._join_waiters.values():
            if not fut.done():
                fut.set_result(False)
        self._join_waiters.clear()
        if self._leave_done is not None:
            self._leave_done.set()
        server = self._server
        self._close_sockets()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for q in self._subscribers:
            q.put_nowait(None)
        self._subscribers.clear()

    async def leave(self, timeout: float | None = None) -> bool:
        """Graceful leave (Serf's leave intent, then ``dead{From=self}``, then the propagate
        delay), then :meth:`stop`. Returns False if ``timeout`` (default: twice the broadcast
        timeout plus the propagate delay, plus slack) passed first."""
        if not self.running:
            await self.stop()
            return False
        swim = self.swim
        if timeout is None:
            cfg = self.config
            timeout = 2 * cfg.broadcast_timeout + cfg.leave_propagate_delay + 2.0
        self._leave_done = asyncio.Event()
        swim.leave(self._now())
        self._after()
        ok = True
        try:
            await asyncio.wait_for(self._leave_done.wait(), timeout)
        except TimeoutError:
            ok = False
        ok = ok and swim.leave_complete
        await self.stop()
        return ok

    async def join(self, addrs: Iterable[Addr | str], timeout: float | None = None) -> int:
        """memberlist ``Join``: a join push/pull with each address; returns how many answered
        (0 = the join failed). Host names are resolved first."""
        if not self.running:
            raise RuntimeError("agent not running")
        loop = asyncio.get_running_loop()
        resolved: list[Addr] = []
        for a in addrs:
            host, port = parse_hostport(a) if isinstance(a, str) else (str(a[0]), int(a[1]))
            try:
                ipaddress.ip_address(host)
                resolved.append((host, port))
                continue
            except ValueError:
                pass
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                self._count("join_resolve_failed")
                continue
            resolved.append((str(infos[0][4][0]), port))
        if not resolved:
            return 0
        ids = self.swim.join(resolved, self._now())
        futs = []
        for sid in ids:
            fut: asyncio.Future[bool] = loop.create_future()
            self._join_waiters[sid] = fut
            futs.append(fut)
        self._after()
        if timeout is None:
            timeout = self.config.tcp_timeout + 1.0
        done, _ = await asyncio.wait(futs, timeout=timeout)
        for sid in ids:
            self._join_waiters.pop(sid, None)
        return sum(1 for f in futs if f in done and f.result())

    async def retry_join(
        self,
        addrs: Sequence[Addr | str],
        interval: float = 30.0,
        max_attempts: int = 0,
    ) -> int:
        """Serf's ``retry_join``: join until at least one address answers, every ``interval``
        seconds, at most ``max_attempts`` times (0 = forever). Returns the successful join's
        count, or 0 once the attempts are used up or the agent stopped."""
        attempt = 0
        while self.running:
            attempt += 1
            n = await self.join(addrs)
            if n > 0:
                return n
            self._count("join_retry")
            log.info("%s: join %s failed (attempt %d)", self.name, list(addrs), attempt)
            if max_attempts and attempt >= max_attempts:
                return 0
            await asyncio.sleep(interval)
        return 0

    def update_tags(self, tags: Mapping[str, str]) -> None:
        """Gossip new tags (memberlist ``UpdateNode``)."""
        self.tags = dict(tags)
        self.swim.update_meta(self.tags, self._now())
        self._after()

    def add_listener(self, listener: Callable[[MemberEvent], None]) -> None:
        """Call ``listener(event)`` for every membership event (besides ``on_event``)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[MemberEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def events(self, maxsize: int = 0) -> AsyncIterator[MemberEvent]:
        """An async iterator over membership events from now on; it ends when the agent stops.
        With ``maxsize`` > 0, events beyond it are dropped (``events_dropped``)."""
        q: asyncio.Queue[MemberEvent | None] = asyncio.Queue(maxsize)
        if self._stopped:
            q.put_nowait(None)
        else:
            self._subscribers.append(q)
        return self._iterate(q)

    async def _iterate(self, q: asyncio.Queue[MemberEvent | None]) -> AsyncIterator[MemberEvent]:
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    return
                yield ev
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(q)

    # --- sockets --------------------------------------------------------------------------

    def _bind_sockets(self) -> tuple[socket.socket, socket.socket]:
        host, port = self.bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        attempts = 20 if port == 0 else 1
        for i in range(attempts):
            tcp = socket.socket(family, socket.SOCK_STREAM)
            udp: socket.socket | None = None
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, port))
                real_port = tcp.getsockname()[1]
                udp = socket.socket(family, socket.SOCK_DGRAM)
                with contextlib.suppress(OSError):
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECV_BUF)
                udp.bind((host, real_port))
                tcp.listen(128)
                tcp.setblocking(False)
                udp.setblocking(False)
                return udp, tcp
            except OSError as exc:
                tcp.close()
                if udp is not None:
                    udp.close()
                if exc.errno != errno.EADDRINUSE or i == attempts - 1:
                    raise
        raise OSError(errno.EADDRINUSE, "no free port")  # pragma: no cover

    def _advertise_addr(self) -> Addr:
        if self.advertise is not None:
            host, port = str(self.advertise[0]), int(self.advertise[1] or self._port)
        else:
            host, port = self.bind[0], self._port
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"advertise address must be an IP address, not {host!r}") from None
        if ip.is_unspecified:
            raise ValueError("binding a wildcard address needs an advertise address")
        return str(ip), port

    def _close_sockets(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._server is not None:
            self._server.close()
            self._server = None

    # --- the core's outputs -----------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _count(self, key: str, n: int = 1) -> None:
        self._shell_counters[key] = self._shell_counters.get(key, 0) + n

    def _after(self) -> None:
        """Drain the core's outputs and re-arm the timer (after every call into the core)."""
        swim = self._swim
        if swim is None or self._stopped:
            return
        for out in swim.poll_outputs():
            if isinstance(out, SendPacket):
                self._send(out)
            elif isinstance(out, OpenStream):
                self._spawn(self._outbound(out))
            else:
                self._dispatch_event(out)
        if self._leave_done is not None and swim.leave_complete:
            self._leave_done.set()
        deadline = swim.next_deadline()
        if deadline != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = deadline
            if deadline < math.inf:
                assert self._loop is not None
                self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._stopped or self._swim is None:
            return
        self._swim.tick(self._now())
        self._after()

    def _send(self, out: SendPacket) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(out.data, out.addr)
        except OSError:
            self._count("udp_send_error")
            return
        self._count("udp_out")
        self._count("udp_out_bytes", len(out.data))

    def _dispatch_event(self, ev: MemberEvent) -> None:
        self._count(f"event_{ev.kind}")
        for q in self._subscribers:
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self._count("events_dropped")
        callbacks = [self.on_event] if self.on_event is not None else []
        for cb in [*callbacks, *self._listeners]:
            try:
                cb(ev)
            except Exception:
                log.exception("%s: event callback failed", self.name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- inbound ----------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self._stopped or self._swim is None:
            return
        self._count("udp_in")
        self._count("udp_in_bytes", len(data))
        self._swim.receive_packet(data, addr, self._now())
        self._after()

    async def _handle_inbound(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._stopped:
                return
            if self._inbound >= self.max_inbound_streams:
                self._count("stream_in_rejected")
                return
            self._inbound += 1
            try:
                await self._serve_stream(reader, writer)
            finally:
                self._inbound -= 1
        except (OSError, asyncio.IncompleteReadError):
            self._count("stream_in_error")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        swim = self.swim
        peer = writer.get_extra_info("peername")
        from_addr: Addr = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self._count("stream_in")
        decoder = swim.stream_decoder()
        buf = bytearray()
        try:
            async with asyncio.timeout(self.config.tcp_timeout):
                while True:
                    chunk = await reader.read(STREAM_READ_CHUNK)
                    if not chunk:
                        self._count("stream_in_eof")
                        return
                    buf += chunk
                    if decoder.feed(chunk) is not None:
                        break
        except TimeoutError:
            self._count("stream_in_timeout")
            return
        except WireError:
            # Let the core count the reason and answer with an error, as memberlist does.
            consumed = bytes(buf)
        else:
            consumed = bytes(buf[: len(buf) - len(decoder.rest)])
        if self._stopped:
            return
        reply = swim.receive_stream(consumed, from_addr, self._now())
        self._after()
        if reply:
            writer.write(reply)
            async with asyncio.timeout(self.config.tcp_timeout):
                await writer.drain()

    # --- outbound ---------------------------------------------------------------------------

    async def _outbound(self, out: OpenStream) -> None:
        ok = False
        consumed = b""
        body: object = None
        writer: asyncio.StreamWriter | None = None
        self._count("stream_out")
        try:
            assert self._loop is not None
            async with asyncio.timeout_at(out.deadline):
                reader, writer = await asyncio.open_connection(
                    out.addr[0], out.addr[1], limit=STREAM_READ_CHUNK
                )
                writer.write(out.data)
                await writer.drain()
                decoder = self.swim.stream_decoder()
                buf = bytearray()
                result = None
                while result is None:
                    chunk = await reader.read(STREAM_READ_CHUNK)
                    if not chunk:
                        raise ConnectionError("peer closed the stream early")
                    buf += chunk
                    result = decoder.feed(chunk)
                body = result[1]
                consumed = bytes(buf[: len(buf) - len(decoder.rest)])
                ok = True
        except (TimeoutError, OSError, WireError, asyncio.IncompleteReadError) as exc:
            self._count("stream_out_failed")
            log.debug("%s: %s stream to %s failed: %r", self.name, out.purpose, out.addr, exc)
        finally:
            if writer is not None:
                writer.close()
        if self._stopped or self._swim is None:
            return
        swim = self._swim
        now = self._now()
        joined = False
        if ok:
            before = swim.counters.get("incompatible_protocol", 0)
            swim.stream_response(out.stream_id, consumed, now)
            joined = (
                isinstance(body, PushPull)
                and swim.counters.get("incompatible_protocol", 0) == before
            )
        else:
            swim.stream_failed(out.stream_id, now)
        self._after()
        fut = self._join_waiters.pop(out.stream_id, None)
        if fut is not None and not fut.done():
            fut.set_result(joined)


def member_status(member: Member) -> str:
    """Serf's vocabulary for a member's state (``dead`` is ``failed``)."""
    return "failed" if member.state == State.DEAD else str(member.state)


def event_record(ev: MemberEvent, wall: float) -> dict[str, Any]:
    """The CLI's JSON line for one event."""
    m = ev.member
    host = f"[{m.addr}]" if ":" in m.addr else m.addr
    return {
        "event": ev.kind,
        "node": m.name,
        "address": f"{host}:{m.port}",
        "status": member_status(m),
        "time": round(wall, 3),
        "tags": m.tags,
    }
