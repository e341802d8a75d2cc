"""The lab's load generator, run inside a client namespace (edgeproxy-lab load / demo start it).

    python -m lab.load --out FILE [--client c1] [--target 203.0.113.1] [--h3 N] [--h1 M]
        [--streams K] [--stream-mb MB] [--rate R] [--duration S] [--max-requests X]
        [--path /time] [--timeout 5]

- N long-lived HTTP/3 connections (aioquic client, certificate checks off) and M long-lived
  HTTP/1.1 keep-alive connections (raw asyncio), each making `--rate` requests per second to
  `--path` (one at a time; a slow answer delays the next).
- K streaming connections (HTTP/1.1 keep-alive), each downloading `/stream?mb=MB` again and again.
- A connection that is reset, times out (no answer in `--timeout` s), or is closed by the peer is
  counted as not surviving and reopened (a new handshake) after a short pause.
- Bounded by `--duration` and `--max-requests`; SIGTERM/SIGINT end it early (results still written).
  A progress line goes to stderr every `--progress` s; the results (lab/load_stats.py) go to --out
  as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

from .load_stats import Accounting, Conn

RECONNECT_PAUSE = 0.2
MAX_HEADER = 64 * 1024


class RequestError(Exception):
    """A failed request; `kind` is one of load_stats.ERROR_KINDS."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def header_pop(headers: dict[str, str]) -> str:
    return headers.get("x-edge-pop", "")


# -- HTTP/1.1 --------------------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status and (lower-cased) headers of an HTTP/1.1 response head (without the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise RequestError("protocol", f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


_C = TypeVar("_C", bound="H1Conn | H3Conn")


class H1Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEADER)
        except TimeoutError:
            raise RequestError("connect", "timeout") from None
        except OSError as e:
            raise RequestError("connect", e.strerror or type(e).__name__) from None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, path: str, on_data: Callable[[int], None] | None = None) -> tuple[int, dict[str, str], int]:
        """GET `path`; returns status, headers, body length. Raises RequestError."""
        assert self.reader is not None and self.writer is not None
        try:
            self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: edgeproxy-lab-load\r\n\r\n".encode())
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            status, headers = parse_head(head[:-4])
            n = 0
            if "content-length" in headers:
                left = int(headers["content-length"])
                while left > 0:
                    chunk = await self.reader.read(min(left, 256 * 1024))
                    if not chunk:
                        raise RequestError("closed", f"EOF with {left} body bytes to go")
                    left -= len(chunk)
                    n += len(chunk)
                    if on_data is not None:
                        on_data(len(chunk))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    n += len(await self.reader.readexactly(size + 2)) - 2
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, n
        except asyncio.IncompleteReadError as e:
            raise RequestError("closed" if not e.partial else "reset", "EOF from the server") from None
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as e:
            raise RequestError("reset", type(e).__name__) from None
        except asyncio.LimitOverrunError:
            raise RequestError("protocol", "response head too large") from None
        except (OSError, ValueError) as e:
            raise RequestError("reset" if isinstance(e, OSError) else "protocol", str(e)[:120]) from None


# -- HTTP/3 ----------------------------------------------------------------------------------------


class H3Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection) -> None:
        super().__init__(quic)
        self.h3 = H3Connection(quic)
        self.waiters: dict[int, asyncio.Future[tuple[int, dict[str, str], int]]] = {}
        self.heads: dict[int, tuple[int, dict[str, str]]] = {}
        self.sizes: dict[int, int] = {}
        self.terminated: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = f"0x{event.error_code:x} {event.reason_phrase}"
            for pending in self.waiters.values():
                if not pending.done():
                    pending.set_exception(RequestError("reset", f"connection closed {self.terminated}"))
            return
        if isinstance(event, StreamReset):
            waiter = self.waiters.get(event.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(RequestError("reset", f"stream reset 0x{event.error_code:x}"))
        for ev in self.h3.handle_event(event):
            sid = getattr(ev, "stream_id", -1)
            fut = self.waiters.get(sid)
            if fut is None:
                continue
            ended = False
            if isinstance(ev, HeadersReceived):
                hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
                self.heads.setdefault(sid, (int(hdrs.get(":status", "0") or 0), hdrs))
                ended = ev.stream_ended
            elif isinstance(ev, DataReceived):
                self.sizes[sid] = self.sizes.get(sid, 0) + len(ev.data)
                ended = ev.stream_ended
            if ended and not fut.done():
                status, hdrs = self.heads.get(sid, (0, {}))
                fut.set_result((status, hdrs, self.sizes.get(sid, 0)))

    async def get(self, path: str, authority: str) -> tuple[int, dict[str, str], int]:
        if self.terminated is not None:
            raise RequestError("reset", f"connection closed {self.terminated}")
        sid = self._quic.get_next_available_stream_id()
        fut: asyncio.Future[tuple[int, dict[str, str], int]] = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        try:
            self.h3.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()),
                                       (b":path", path.encode()), (b"user-agent", b"edgeproxy-lab-load")], end_stream=True)
            self.transmit()
            return await fut
        finally:
            self.waiters.pop(sid, None)
            self.heads.pop(sid, None)
            self.sizes.pop(sid, None)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_task is not None:
            self._transmit_task.cancel()
            self._transmit_task = None


class H3Conn:
    def __init__(self, host: str, port: int, idle_timeout: float) -> None:
        self.host, self.port, self.idle_timeout = host, port, idle_timeout
        self.proto: H3Protocol | None = None
        self.transport: asyncio.DatagramTransport | None = None

    async def open(self, timeout: float) -> None:
        cfg = QuicConfiguration(is_client=True, alpn_protocols=list(H3_ALPN), server_name="localhost",
                                idle_timeout=self.idle_timeout, verify_mode=ssl.CERT_NONE)
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(lambda: H3Protocol(QuicConnection(configuration=cfg)),
                                                               local_addr=("0.0.0.0", 0))
        assert isinstance(proto, H3Protocol)
        self.transport, self.proto = transport, proto
        try:
            proto.connect((self.host, self.port))
            async with asyncio.timeout(timeout):
                await proto.wait_connected()
        except TimeoutError:
            self.close()
            raise RequestError("connect", "QUIC handshake timeout") from None
        except ConnectionError as e:
            self.close()
            raise RequestError("connect", str(e)[:120]) from None

    def close(self) -> None:
        if self.proto is not None:
            self.proto.shutdown()
        if self.transport is not None:
            self.transport.close()
        self.proto = self.transport = None

    async def request(self, path: str) -> tuple[int, dict[str, str], int]:
        assert self.proto is not None
        return await self.proto.get(path, self.host)


# -- workers ---------------------------------------------------------------------------------------


class _Progress:
    """Bytes of a download so far and when the last ones came."""

    def __init__(self) -> None:
        self.bytes = 0
        self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.bytes += n
        self.last = time.monotonic()


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.acc = Accounting(args.client, args.max_requests)
        self.stop = asyncio.Event()
        self.t0 = time.time()
        self.m0 = time.monotonic()
        self.deadline = self.m0 + args.duration

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, min(seconds, self.deadline - time.monotonic())))

    async def rr_worker(self, c: Conn, make: Callable[[], H1Conn | H3Conn], offset: float) -> None:
        a = self.args
        period = 1.0 / a.rate
        await self._pause(offset)
        conn: H1Conn | H3Conn | None = None
        next_at = time.monotonic()
        try:
            while self.running():
                if conn is None:
                    conn = await self._open(c, make())
                    if conn is None:
                        continue
                    next_at = time.monotonic()
                await self._pause(next_at - time.monotonic())
                if not self.running() or not self.acc.may_start():
                    break
                next_at = max(next_at + period, time.monotonic())
                ts, m = time.time(), time.perf_counter()
                try:
                    async with asyncio.timeout(a.timeout):
                        status, headers, _ = await conn.request(a.path)
                except TimeoutError:
                    self._failed(c, ts, m, "timeout", f"no answer in {a.timeout:g} s")
                    conn.close()
                    conn = None
                except RequestError as e:
                    self._failed(c, ts, m, e.kind, e.detail)
                    conn.close()
                    conn = None
                else:
                    self.acc.request(c, ts, (time.perf_counter() - m) * 1000, status, header_pop(headers))
                    if isinstance(conn, H1Conn) and conn.writer is None:  # the server asked to close
                        self.acc.graceful_close(c, time.time())
                        conn = None
                if conn is None:
                    await self._pause(RECONNECT_PAUSE)
        finally:
            if conn is not None:
                conn.close()

    async def _open(self, c: Conn, conn: _C) -> _C | None:
        """`conn` once connected (a handshake counted), or None after a counted failure and a
        pause before the next attempt."""
        try:
            await conn.open(self.args.timeout)
        except RequestError as e:
            self.acc.conn_error(c, time.time(), "connect", e.detail)
            await self._pause(RECONNECT_PAUSE * 5)
            return None
        self.acc.handshake(c)
        return conn

    def _failed(self, c: Conn, ts: float, m: float, kind: str, detail: str) -> None:
        self.acc.request(c, ts, (time.perf_counter() - m) * 1000, 0, "", kind)
        self.acc.conn_error(c, time.time(), kind, detail)

    async def stream_worker(self, c: Conn, offset: float) -> None:
        a = self.args
        await self._pause(offset)
        conn: H1Conn | None = None
        path = f"/stream?mb={a.stream_mb}"
        try:
            while self.running():
                if conn is None:
                    conn = await self._open(c, H1Conn(a.target, a.port))
                    if conn is None:
                        continue
                if not self.acc.may_start():
                    break
                ts, m = time.time(), time.monotonic()
                seen = _Progress()
                task = asyncio.ensure_future(conn.request(path, seen.add))
                error, detail, pop = "", "", ""
                try:
                    while not task.done():  # a stall (no byte for --timeout s) is a timeout
                        await asyncio.wait({task}, timeout=0.5)
                        if not task.done() and time.monotonic() - seen.last > a.timeout:
                            task.cancel()
                            error, detail = "timeout", f"no data for {a.timeout:g} s"
                            break
                        if not task.done() and self.stop.is_set():
                            task.cancel()
                            error = "stopped"
                            break
                    if not error:
                        status, headers, _ = task.result()
                        pop = header_pop(headers)
                        if status >= 400:
                            error, detail = "http", f"HTTP {status}"
                except RequestError as e:
                    error, detail = e.kind, e.detail
                finally:
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                if error == "stopped":  # cut short by the end of the run: not a failure
                    break
                self.acc.download(c, ts, time.monotonic() - m, seen.bytes, pop, error)
                if error and error != "http":
                    self.acc.conn_error(c, time.time(), error, detail)
                    conn.close()
                    conn = None
                    await self._pause(RECONNECT_PAUSE)
                elif conn.writer is None:
                    self.acc.graceful_close(c, time.time())
                    conn = None
                if a.stream_gap:
                    await self._pause(a.stream_gap)
        finally:
            if conn is not None:
                conn.close()

    async def progress(self) -> None:
        tty = sys.stderr.isatty()
        while not self.stop.is_set():
            line = self.acc.progress(time.monotonic() - self.m0)
            sys.stderr.write(("\r" + line + "\x1b[K") if tty else (line + "\n"))
            sys.stderr.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.args.progress)
        if tty:
            sys.stderr.write("\n")

    async def run(self) -> dict[str, Any]:
        a = self.args
        tasks: list[asyncio.Task[None]] = []
        n = a.h3 + a.h1
        spread = 1.0 / a.rate / max(1, n)  # stagger the connections' request slots
        for i in range(a.h3):
            c = self.acc.new_conn("quic", "rr")
            tasks.append(asyncio.create_task(self.rr_worker(
                c, lambda: H3Conn(a.target, a.quic_port, a.idle_timeout), i * spread)))
        for i in range(a.h1):
            c = self.acc.new_conn("tcp", "rr")
            tasks.append(asyncio.create_task(self.rr_worker(c, lambda: H1Conn(a.target, a.port), (a.h3 + i) * spread)))
        for i in range(a.streams):
            c = self.acc.new_conn("tcp", "stream")
            tasks.append(asyncio.create_task(self.stream_worker(c, 0.1 * i)))
        prog = asyncio.create_task(self.progress())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        # Bounded: every worker checks the deadline; give in-flight requests their timeout to end.
        await asyncio.wait(tasks, timeout=a.duration + a.timeout + 5)
        self.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - self.m0
        await asyncio.gather(prog, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        meta = {"client": a.client, "target": a.target, "pid": os.getpid(), "started": self.t0, "ended": time.time(),
                "elapsed_s": round(elapsed, 3), "args": {k: v for k, v in vars(a).items() if k != "out"},
                "survival_features": not a.baseline}
        return self.acc.to_json(meta, elapsed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lab.load", description="HTTP/3 + HTTP/1.1 load from a lab client namespace")
    p.add_argument("--out", required=True, help="results JSON file")
    p.add_argument("--client", default=os.environ.get("EPL_NODE", "client"), help="label for this client")
    p.add_argument("--target", default="203.0.113.1")
    p.add_argument("--port", type=int, default=80, help="HTTP/1.1 port")
    p.add_argument("--quic-port", type=int, default=443, help="HTTP/3 port")
    p.add_argument("--h3", type=int, default=4, help="HTTP/3 connections")
    p.add_argument("--h1", type=int, default=4, help="HTTP/1.1 keep-alive connections")
    p.add_argument("--streams", type=int, default=1, help="streaming download connections (HTTP/1.1)")
    p.add_argument("--stream-mb", type=int, default=4, help="MiB per download")
    p.add_argument("--stream-gap", type=float, default=0.2, help="seconds between downloads")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per connection")
    p.add_argument("--path", default="/time", help="request path (default /time, never cached)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds to run")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds without an answer = timed out")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="QUIC idle timeout")
    p.add_argument("--progress", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--baseline", action="store_true", help="label the results as a baseline (--no-survival) run")
    return p


def validate(a: argparse.Namespace) -> str | None:
    if a.rate <= 0:
        return "--rate must be > 0"
    if min(a.h3, a.h1, a.streams) < 0 or a.h3 + a.h1 + a.streams == 0:
        return "give at least one connection (--h3/--h1/--streams)"
    if not 0 < a.duration <= 24 * 3600:
        return "--duration must be in (0, 86400]"
    if a.timeout <= 0 or a.progress <= 0:
        return "--timeout and --progress must be > 0"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = validate(args)
    if err:
        print(f"lab.load: {err}", file=sys.stderr)
        return 2
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    result = runner(Load(args).run())
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, out)
    s = result["summary"]
    print(f"lab.load [{args.client}]: " + "; ".join(
        f"{p} {s[p]['survived']}/{s[p]['connections']} survived, {s[p]['requests_ok']} ok, {s[p]['requests_failed']} failed"
        for p in ("quic", "tcp")) + f" -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
