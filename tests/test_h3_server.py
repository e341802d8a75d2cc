"""HTTP/3 front end with real clients over UDP on 127.0.0.1: aioquic's H3 client and gtlsclient."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aioquic.h3.connection import ErrorCode
from h3_client import (
    H3Client,
    ResponseStream,
    StreamResetError,
    connect_h3,
    server_configuration_factory,
)

from edgeproxy.config import LimitsSection
from edgeproxy.http.errors import error_response
from edgeproxy.http.h3server import (
    DEFAULT_SEND_BUFFER,
    H3ServerProtocol,
    parse_request_head,
    response_fields,
)
from edgeproxy.http.messages import (
    Body,
    BodyError,
    HTTPError,
    RequestHead,
    ResponseHead,
    ResponseSink,
)
from edgeproxy.metrics import Registry
from edgeproxy.quic.dispatcher import QuicDispatcher, start_quic_server

GTLSCLIENT = "/usr/bin/gtlsclient"
PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(size: int) -> bytes:
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


# --------------------------------------------------------------------------------------------
# Test double of the pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class RecordingHandler:
    """Echoes and streams; handles HTTPError/BodyError the way the real pipeline does."""

    pop_id: str = "test-pop"
    heads: list[RequestHead] = field(default_factory=list)
    rejects: list[tuple[str, int, str, RequestHead | None, str]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    bodies: dict[str, Body] = field(default_factory=dict)
    sinks: dict[str, ResponseSink] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    max_active: int = 0
    cancelled: int = 0
    n: int = 0

    def new_request_id(self) -> str:
        self.n += 1
        return f"req-{self.n}"

    def reject(
        self,
        protocol: str,
        status: int,
        detail: str,
        head: RequestHead | None,
        client_addr: tuple[str, int],
        request_id: str,
    ) -> tuple[ResponseHead, bytes]:
        self.rejects.append((protocol, status, detail, head, request_id))
        return error_response(status, detail, pop_id=self.pop_id, request_id=request_id, close=True)

    async def handle(self, head: RequestHead, body: Body, sink: ResponseSink) -> None:
        self.heads.append(head)
        self.bodies[head.request_id] = body
        self.sinks[head.request_id] = sink
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._route(head, body, sink)
        except HTTPError as err:
            self.errors.append(err)
            if sink.started:
                sink.abort()
            else:
                rhead, payload = self.reject(
                    "h3", err.status, err.detail, head, head.client_addr, head.request_id
                )
                await sink.start(rhead)
                await sink.write(payload)
                await sink.end()
        except BodyError as err:
            self.errors.append(err)
            sink.abort()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _route(self, head: RequestHead, body: Body, sink: ResponseSink) -> None:
        path = head.path
        if path == b"/hello":
            await sink.start(
                ResponseHead(
                    200,
                    [
                        (b"content-type", b"text/plain"),
                        (b"connection", b"keep-alive"),
                        (b"transfer-encoding", b"chunked"),
                        (b"X-Mixed-Case", b"  padded  "),
                    ],
                )
            )
            await sink.write(b"hello")
            await sink.end()
        elif path == b"/echo":
            data = await read_all(body)
            await sink.start(ResponseHead(200, [(b"content-length", str(len(data)).encode())]))
            await sink.write(data)
            await sink.end()
        elif path == b"/slow-echo":
            digest = hashlib.sha256()
            total = 0
            while chunk := await body.read():
                digest.update(chunk)
                total += len(chunk)
                await asyncio.sleep(0.02)  # a slow consumer (e.g. a slow origin): <= 3.2 MB/s
            await sink.start(ResponseHead(200))
            await sink.write(f"{total} {digest.hexdigest()}".encode())
            await sink.end()
        elif path == b"/start-then-read":
            await sink.start(ResponseHead(200))
            data = await read_all(body)
            await sink.write(str(len(data)).encode())
            await sink.end()
        elif path.startswith(b"/download/"):
            size = int(path.rsplit(b"/", 1)[1])
            await sink.start(ResponseHead(200, [(b"content-length", str(size).encode())]))
            sent = 0
            self.written[head.request_id] = 0
            while sent < size:
                piece = PATTERN[: min(len(PATTERN), size - sent)]
                await sink.write(piece)
                sent += len(piece)
                self.written[head.request_id] = sent
            await sink.end()
        elif path == b"/gate":
            await self.gate.wait()
            await sink.start(ResponseHead(200))
            await sink.write(b"ok")
            await sink.end()
        elif path == b"/forever":
            await asyncio.Event().wait()
        elif path == b"/head":
            info = {
                "method": head.method.decode(),
                "target": head.target.decode(),
                "scheme": head.scheme,
                "authority": head.authority.decode(),
                "http_version": head.http_version,
                "client": list(head.client_addr),
                "request_id": head.request_id,
                "headers": [[k.decode(), v.decode()] for k, v in head.headers],
                "length": getattr(body, "length", "missing"),
            }
            await sink.start(ResponseHead(200))
            await sink.write(json.dumps(info).encode())
            await sink.end()
        else:
            await sink.start(ResponseHead(404))
            await sink.end()


async def read_all(body: Body) -> bytes:
    parts = []
    while chunk := await body.read():
        parts.append(chunk)
    return b"".join(parts)


@dataclass
class Env:
    server: QuicDispatcher
    handler: RecordingHandler
    metrics: Registry

    @property
    def port(self) -> int:
        return self.server.local_address[1]

    def protocol(self) -> H3ServerProtocol:
        (proto,) = self.server.connections
        assert isinstance(proto, H3ServerProtocol)
        return proto

    def client(self, **kwargs: object) -> contextlib.AbstractAsyncContextManager[H3Client]:
        return connect_h3("127.0.0.1", self.port, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def h3_env(limits: LimitsSection | None = None, **kwargs: int) -> AsyncIterator[Env]:
    metrics = Registry()
    handler = RecordingHandler()
    server = await start_quic_server(
        "127.0.0.1",
        0,
        server_configuration_factory(),
        handler,
        limits or LimitsSection(),
        metrics,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        yield Env(server, handler, metrics)
    finally:
        await server.close()


def counter(metrics: Registry, name: str, *labels: str) -> float:
    metric = metrics.get(name)
    assert metric is not None
    return metric.get(*labels)  # type: ignore[attr-defined, no-any-return]


# --------------------------------------------------------------------------------------------
# Requests and responses
# --------------------------------------------------------------------------------------------


async def test_get_builds_the_request_head_and_cleans_response_headers() -> None:
    async with h3_env() as env, env.client() as client:
        response = await client.request(
            b"GET",
            b"/head?x=1",
            authority=b"example.com",
            headers=[(b"user-agent", b"t"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
        )
        assert response.status == 200
        info = json.loads(response.body)
        assert info["method"] == "GET"
        assert info["target"] == "/head?x=1"
        assert info["scheme"] == "https"
        assert info["authority"] == "example.com"
        assert info["http_version"] == "3"
        assert info["client"][0] == "127.0.0.1"
        assert info["request_id"] == "req-1"
        assert info["headers"] == [["user-agent", "t"], ["cookie", "a=1; b=2"]]
        assert info["length"] == 0

        hello = await client.request(b"GET", b"/hello")
        assert hello.status == 200 and hello.body == b"hello"
        names = [k for k, _ in hello.headers]
        assert b"connection" not in names and b"transfer-encoding" not in names
        assert hello.header(b"x-mixed-case") == b"padded"
    assert counter(env.metrics, "edgeproxy_connections_total", "h3") == 1
    assert counter(env.metrics, "edgeproxy_connections_open", "h3") == 0
    assert counter(env.metrics, "edgeproxy_bytes_total", "h3", "out") >= len(b"hello")


async def test_post_with_a_streamed_body() -> None:
    async with h3_env() as env, env.client() as client:
        stream = client.send_request(b"POST", b"/echo", end=False, headers=[(b"x-a", b"1")])
        sent = b""
        for i in range(20):
            piece = bytes([65 + i]) * 5000
            await stream.send(piece)
            sent += piece
            await asyncio.sleep(0.001)
        await stream.end()
        response = await stream.response()
        assert response.status == 200
        assert response.body == sent
        assert counter(env.metrics, "edgeproxy_bytes_total", "h3", "in") == len(sent)
        assert env.handler.heads[0].method == b"POST"


async def test_request_trailers_end_the_body() -> None:
    async with h3_env() as env, env.client() as client:
        # HEADERS, DATA and trailers in separate packets ...
        stream = client.send_request(b"POST", b"/echo", body=b"abc", end=False)
        await asyncio.sleep(0.01)
        client.h3.send_headers(stream.stream_id, [(b"x-checksum", b"1")], end_stream=True)
        client.transmit()
        assert (await stream.response()).body == b"abc"
        # ... and all in one packet, so both HEADERS frames are parsed in one batch
        sid = client._quic.get_next_available_stream_id()
        batch = ResponseStream(client, sid)
        client.streams[sid] = batch
        client.h3.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"x"),
                (b":path", b"/echo"),
            ],
        )
        client.h3.send_data(sid, b"defg", end_stream=False)
        client.h3.send_headers(sid, [(b"x-checksum", b"2")], end_stream=True)
        client.transmit()
        assert (await batch.response()).body == b"defg"
        assert len(env.handler.heads) == 2 and not env.handler.rejects


async def test_slow_consumer_keeps_the_request_body_bounded() -> None:
    window = 64 * 1024
    size = 2 * 1024 * 1024
    async with h3_env(stream_receive_window=window) as env, env.client() as client:
        payload = pattern_bytes(size)
        stream = client.send_request(b"POST", b"/slow-echo", end=False)
        for pos in range(0, size, 256 * 1024):
            await stream.send(payload[pos : pos + 256 * 1024])
        await stream.end()
        response = await stream.response()
        assert response.body == f"{size} {hashlib.sha256(payload).hexdigest()}".encode()
        body = env.handler.bodies["req-1"]
        peak = body.peak_unread  # type: ignore[attr-defined]
        # The client can never be more than one window ahead of the handler's reads ...
        assert peak <= window
        # ... and it did run into that limit (the handler was the bottleneck; with aioquic's
        # own credit policy the peak here is over a megabyte).
        assert peak >= window * 3 // 4


async def test_many_concurrent_requests_on_one_connection() -> None:
    async with h3_env() as env, env.client() as client:
        streams = [
            client.send_request(b"POST", b"/echo", body=f"request {i}".encode() * (i + 1))
            for i in range(60)
        ]
        responses = await asyncio.gather(*(s.response() for s in streams))
        for i, response in enumerate(responses):
            assert response.status == 200
            assert response.body == f"request {i}".encode() * (i + 1)
        assert len(env.server.connections) == 1
        assert len(env.handler.heads) == 60


async def test_max_streams_limits_concurrent_requests() -> None:
    async with h3_env(LimitsSection(max_streams=4)) as env, env.client() as client:
        streams = [client.send_request(b"GET", b"/gate") for _ in range(10)]
        for _ in range(200):
            if env.handler.active == 4:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert env.handler.active == 4  # the other six are blocked in the client
        env.handler.gate.set()
        responses = await asyncio.gather(*(s.response() for s in streams))
        assert [r.status for r in responses] == [200] * 10
        assert env.handler.max_active == 4


# --------------------------------------------------------------------------------------------
# Limits and malformed requests
# --------------------------------------------------------------------------------------------


async def test_header_section_too_large_is_431() -> None:
    async with h3_env(LimitsSection(max_header_bytes=2048)) as env, env.client() as client:
        # decodes to more than the limit
        r1 = await client.request(b"GET", b"/hello", headers=[(b"x-big", b"a" * 3000)])
        # so large that its HEADERS frame is refused before it is even buffered
        r2 = await client.request(
            b"GET", b"/hello", headers=[(b"x-big", os.urandom(8000).hex().encode())]
        )
        assert (r1.status, r2.status) == (431, 431)
        assert [r[1] for r in env.handler.rejects] == [431, 431]
        assert env.handler.heads == []  # the handler never saw them
        assert (await client.request(b"GET", b"/hello")).status == 200


async def test_request_headers_slower_than_header_timeout_get_408() -> None:
    async with h3_env(LimitsSection(header_timeout=0.3)) as env, env.client() as client:
        sid = client._quic.get_next_available_stream_id()
        stalled = ResponseStream(client, sid)
        client.streams[sid] = stalled
        # A HEADERS frame announcing 40 bytes of field section, of which 3 ever arrive.
        client._quic.send_stream_data(sid, b"\x01\x28\x00\x00\xd1", end_stream=False)
        client.transmit()
        await asyncio.sleep(0.1)
        # Another request on the same connection is not held up meanwhile.
        assert (await client.request(b"GET", b"/hello")).status == 200
        t0 = asyncio.get_running_loop().time()
        response = await stalled.response()
        waited = asyncio.get_running_loop().time() - t0
        assert response.status == 408 and 0.05 < waited < 2.0, (response.status, waited)
        assert [r[1] for r in env.handler.rejects] == [408]
        assert len(env.handler.heads) == 1  # the handler saw only the complete request
        assert (await client.request(b"GET", b"/hello")).status == 200


async def test_body_too_large_is_413() -> None:
    limits = LimitsSection(max_body_bytes=10_000)
    async with h3_env(limits) as env, env.client() as client:
        # declared too large: refused before the handler runs
        declared = await client.request(
            b"POST", b"/echo", headers=[(b"content-length", b"20000")], body=b"x" * 20000
        )
        assert declared.status == 413
        assert env.handler.heads == []

        # undeclared: the body raises HTTPError(413) while the handler reads it
        stream = client.send_request(b"POST", b"/echo", end=False)
        await stream.send(b"y" * 8000)
        await stream.send(b"y" * 8000)
        response = await stream.response()
        assert response.status == 413
        assert isinstance(env.handler.errors[-1], HTTPError)
        for _ in range(100):
            if stream.stop_code is not None:
                break
            await asyncio.sleep(0.01)
        assert stream.stop_code == ErrorCode.H3_NO_ERROR  # "stop sending, the answer is complete"

        # the response already started: the stream is reset instead
        stream = client.send_request(b"POST", b"/start-then-read", end=False)
        await stream.wait_headers()
        await stream.send(b"z" * 12000)
        with pytest.raises(StreamResetError) as exc:
            await stream.read_all()
        assert exc.value.code == ErrorCode.H3_EXCESSIVE_LOAD

        assert (await client.request(b"GET", b"/hello")).status == 200


def _fields(**overrides: bytes | None) -> list[tuple[bytes, bytes]]:
    base = {":method": b"GET", ":scheme": b"https", ":authority": b"localhost", ":path": b"/hello"}
    base.update(overrides)  # type: ignore[arg-type]
    return [(k.encode(), v) for k, v in base.items() if v is not None]


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (_fields(**{":path": None}), 400),  # missing :path (checked by edgeproxy)
        (_fields(**{":scheme": None}), 400),
        (_fields(**{":scheme": b"ftp"}), 400),
        (_fields(**{":path": b"no-slash"}), 400),
        ([*_fields(), (b"X-Upper", b"1")], 400),  # uppercase name (aioquic's MessageError)
        ([*_fields(), (b"connection", b"close")], 400),  # connection-specific
        ([*_fields(), (b"te", b"gzip")], 400),
        ([*_fields(), (b"host", b"other.example")], 400),  # Host disagrees with :authority
        ([*_fields(), (b":path", b"/again")], 400),  # pseudo-header after a regular one... twice
        ([(b"x-a", b"1"), *_fields()], 400),  # pseudo-headers after regular fields
        ([*_fields(), (b":protocol", b"websocket")], 400),
        ([*_fields(), (b"content-length", b"1"), (b"content-length", b"2")], 400),
        (_fields(**{":method": b"CONNECT", ":path": None, ":scheme": None}), 405),
    ],
)
async def test_malformed_requests_are_answered_per_stream(
    fields: list[tuple[bytes, bytes]], status: int
) -> None:
    async with h3_env() as env, env.client() as client:
        response = await client.send_request(raw_headers=fields).response()
        assert response.status == status
        assert env.handler.rejects[0][1] == status
        assert env.handler.heads == []
        # a stream error, not a connection error: the connection keeps working
        assert (await client.request(b"GET", b"/hello")).body == b"hello"


async def test_malformed_request_with_a_body_gets_stop_sending_message_error() -> None:
    async with h3_env() as env, env.client() as client:
        stream = client.send_request(raw_headers=[*_fields(), (b"Bad", b"1")], end=False)
        response = await stream.response()
        assert response.status == 400
        for _ in range(100):
            if stream.stop_code is not None:
                break
            await asyncio.sleep(0.01)
        assert stream.stop_code == ErrorCode.H3_MESSAGE_ERROR
        assert (await client.request(b"GET", b"/hello")).status == 200


@pytest.mark.parametrize("sent", [5, 15])
async def test_content_length_mismatch_is_400(sent: int) -> None:
    async with h3_env() as env, env.client() as client:
        response = await client.request(
            b"POST", b"/echo", headers=[(b"content-length", b"10")], body=b"q" * sent
        )
        assert response.status == 400
        assert "content-length" in str(env.handler.errors).lower()
        assert (await client.request(b"GET", b"/hello")).status == 200


async def test_client_reset_reaches_the_handler_as_body_error() -> None:
    async with h3_env() as env, env.client() as client:
        stream = client.send_request(b"POST", b"/echo", end=False)
        await stream.send(b"partial")
        for _ in range(100):
            if env.handler.heads:
                break
            await asyncio.sleep(0.01)
        client._quic.reset_stream(stream.stream_id, ErrorCode.H3_REQUEST_CANCELLED)
        client.transmit()
        for _ in range(100):
            if env.handler.errors:
                break
            await asyncio.sleep(0.01)
        assert isinstance(env.handler.errors[0], BodyError)
        assert (await client.request(b"GET", b"/hello")).status == 200


# --------------------------------------------------------------------------------------------
# Responses: backpressure, close, idle
# --------------------------------------------------------------------------------------------


async def test_large_download_to_a_stalled_reader_stays_bounded() -> None:
    size = 8 * 1024 * 1024
    client_window = 256 * 1024
    async with h3_env() as env, env.client(stream_receive_window=client_window) as client:
        stream = client.send_request(b"GET", f"/download/{size}".encode())
        await stream.wait_headers()
        got = bytearray()
        while len(got) < 1024 * 1024:
            got += await stream.read()
        # the reader stalls: the client grants no credit, so the handler must stop writing
        await asyncio.sleep(0.5)
        written = env.handler.written["req-1"]
        assert written <= len(got) + client_window + DEFAULT_SEND_BUFFER + 2 * len(PATTERN)
        await asyncio.sleep(0.2)
        assert env.handler.written["req-1"] == written  # still blocked
        while chunk := await stream.read():
            got += chunk
        assert len(got) == size and bytes(got) == pattern_bytes(size)
        sink = env.handler.sinks["req-1"]
        assert sink.peak_buffered <= client_window + DEFAULT_SEND_BUFFER + 2 * len(PATTERN)  # type: ignore[attr-defined]


async def test_close_sends_connection_close_and_cancels_handlers() -> None:
    async with h3_env() as env, env.client() as client:
        stream = client.send_request(b"GET", b"/forever")
        for _ in range(100):
            if env.handler.active:
                break
            await asyncio.sleep(0.01)
        protocol = env.protocol()
        await env.server.close()
        assert env.handler.cancelled == 1
        assert not protocol._tasks
        for _ in range(100):
            if client.close_event is not None:
                break
            await asyncio.sleep(0.01)
        assert client.close_event is not None
        assert client.close_event.error_code == ErrorCode.H3_NO_ERROR
        with pytest.raises(ConnectionError):
            await stream.response()
        assert counter(env.metrics, "edgeproxy_connections_open", "h3") == 0


async def test_idle_timeout_closes_the_connection() -> None:
    async with h3_env(LimitsSection(idle_timeout=0.3)) as env, env.client() as client:
        assert (await client.request(b"GET", b"/hello")).status == 200
        for _ in range(300):
            if not env.server.connections:
                break
            await asyncio.sleep(0.01)
        assert not env.server.connections
        assert env.server.router.connection_count == 0
        assert counter(env.metrics, "edgeproxy_connections_open", "h3") == 0


# --------------------------------------------------------------------------------------------
# gtlsclient (ngtcp2 + nghttp3)
# --------------------------------------------------------------------------------------------


def _need_gtlsclient() -> None:
    if not os.path.exists(GTLSCLIENT):
        pytest.skip(f"{GTLSCLIENT} not installed (Debian package ngtcp2-client)")


async def _run_gtlsclient(*args: str, timeout: float = 20) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        GTLSCLIENT,
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err


async def test_gtlsclient_get_and_post() -> None:
    _need_gtlsclient()
    async with h3_env() as env:
        port = str(env.port)
        with tempfile.TemporaryDirectory() as tmp:
            upload = os.path.join(tmp, "upload.bin")
            with open(upload, "wb") as f:
                f.write(b"posted by ngtcp2\n" * 1000)
            rc, err = await _run_gtlsclient(
                "--exit-on-all-streams-close",
                "--quiet",
                f"--download={tmp}",
                "127.0.0.1",
                port,
                f"https://localhost:{port}/hello",
            )
            assert rc == 0, err
            with open(os.path.join(tmp, "hello"), "rb") as f:
                assert f.read() == b"hello"
            rc, err = await _run_gtlsclient(
                "--exit-on-all-streams-close",
                "--quiet",
                f"--download={tmp}",
                "--http-method=POST",
                f"--data={upload}",
                "127.0.0.1",
                port,
                f"https://localhost:{port}/echo",
            )
            assert rc == 0, err
            with open(os.path.join(tmp, "echo"), "rb") as f:
                assert f.read() == b"posted by ngtcp2\n" * 1000
        assert env.handler.heads[0].authority == f"localhost:{port}".encode()


def _read_exactly(fd: int, size: int, digest: hashlib._Hash) -> int:
    got = 0
    while got < size:
        data = os.read(fd, min(1 << 20, size - got))
        if not data:
            break
        digest.update(data)
        got += len(data)
    return got


async def test_gtlsclient_50mb_download_to_a_slow_reader_stays_bounded() -> None:
    """gtlsclient saves the body into a FIFO this test reads: while the test does not read,
    gtlsclient blocks in write() and stops acknowledging and granting credit."""
    _need_gtlsclient()
    size = 50 * 1024 * 1024
    async with h3_env() as env:
        port = str(env.port)
        tmp = tempfile.mkdtemp()
        fifo = os.path.join(tmp, str(size))
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDWR)  # also a writer: no EOF before gtlsclient opens it
        try:
            proc = asyncio.ensure_future(
                _run_gtlsclient(
                    "--exit-on-all-streams-close",
                    "--quiet",
                    f"--download={tmp}",
                    "--max-stream-data-bidi-local=1M",
                    "--max-data=2M",
                    "127.0.0.1",
                    port,
                    f"https://localhost:{port}/download/{size}",
                    timeout=60,
                )
            )
            digest = hashlib.sha256()
            first = 1024 * 1024
            assert await asyncio.to_thread(_read_exactly, fd, first, digest) == first
            await asyncio.sleep(0.6)  # the reader stalls
            written = env.handler.written["req-1"]
            await asyncio.sleep(0.4)
            assert env.handler.written["req-1"] == written  # the handler is blocked in write()
            # what gtlsclient took (read + pipe) + its windows + edgeproxy's unsent bound
            bound = first + 64 * 1024 + 2 * 1024 * 1024 + DEFAULT_SEND_BUFFER + 2 * len(PATTERN)
            assert written <= bound
            rest = await asyncio.to_thread(_read_exactly, fd, size - first, digest)
            assert rest == size - first
            rc, err = await proc
            assert rc == 0, err
            assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
            sink = env.handler.sinks["req-1"]
            assert sink.peak_buffered <= 4 * 1024 * 1024  # type: ignore[attr-defined]
        finally:
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_parse_request_head_rules() -> None:
    head, length = parse_request_head(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/p?q"),
            (b"host", b"h.example"),  # Host instead of :authority is allowed
            (b"content-length", b"12"),
            (b"te", b"trailers"),
        ],
        max_header_bytes=4096,
        client_addr=("127.0.0.1", 1),
        request_id="r",
    )
    assert head.authority == b"h.example"
    assert head.headers == [(b"content-length", b"12"), (b"te", b"trailers")]
    assert length == 12
    with pytest.raises(HTTPError) as exc:
        parse_request_head(
            _fields(**{":authority": None}),
            max_header_bytes=4096,
            client_addr=("", 0),
            request_id="r",
        )
    assert exc.value.status == 400
    with pytest.raises(HTTPError) as exc:
        parse_request_head(_fields(), max_header_bytes=100, client_addr=("", 0), request_id="r")
    assert exc.value.status == 431
    head, _ = parse_request_head(
        _fields(**{":method": b"OPTIONS", ":path": b"*"}),
        max_header_bytes=4096,
        client_addr=("", 0),
        request_id="r",
    )
    assert head.target == b"*"


def test_response_fields_filter() -> None:
    fields = response_fields(
        ResponseHead(
            204,
            [
                (b"Upgrade", b"h2c"),
                (b"keep-alive", b"5"),
                (b"proxy-connection", b"x"),
                (b"te", b"trailers"),
                (b"bad name", b"x"),
                (b"x-ok", b"\tv "),
                (b"x-bad", b"a\r\nb"),
            ],
        )
    )
    assert fields == [(b":status", b"204"), (b"x-ok", b"v")]
    with pytest.raises(ValueError):
        response_fields(ResponseHead(101))
