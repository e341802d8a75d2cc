"""Test helpers for the HTTP/3 front end: a self-signed certificate and a small aioquic H3 client.

The client is deliberately low level: it can send malformed header sections, stream request
bodies, read responses slowly (holding back flow-control credit through `EdgeQuicConnection`, so
a slow reader really is slow on the wire) and reports stream resets and STOP_SENDING codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeproxy.quic.dispatcher import EdgeQuicConnection

Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------------------------
# Certificate
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def make_certificate() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 certificate for localhost and 127.0.0.1 (generated once)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_certificate(directory: str) -> tuple[str, str]:
    """PEM files (cert, key) of the test certificate in `directory`."""
    cert, key = make_certificate()
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def server_configuration_factory() -> Callable[[], QuicConfiguration]:
    """What the edge's TLS layer would provide: a fresh server configuration per call."""
    cert, key = make_certificate()

    def factory() -> QuicConfiguration:
        return QuicConfiguration(is_client=False, certificate=cert, private_key=key)

    return factory


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class StreamResetError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"stream reset by server with code 0x{code:x}")
        self.code = code


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(eq=False)
class ResponseStream:
    """One request stream as seen by the client."""

    client: H3Client
    stream_id: int
    headers: Headers | None = None
    reset_code: int | None = None  # RESET_STREAM from the server
    stop_code: int | None = None  # STOP_SENDING from the server
    ended: bool = False
    received: int = 0
    unread: int = 0
    _chunks: deque[bytes] = field(default_factory=deque)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    @property
    def status(self) -> int:
        assert self.headers is not None
        return int(dict(self.headers)[b":status"])

    async def wait_headers(self) -> Headers:
        while self.headers is None:
            self._raise_if_broken()
            await self._wait()
        return self.headers

    def _raise_if_broken(self) -> None:
        if self.reset_code is not None:
            raise StreamResetError(self.reset_code)
        if self.client.closed_error is not None:
            raise ConnectionError(f"connection closed: {self.client.closed_error}")

    async def read(self) -> bytes:
        """Next body chunk, b"" at the end. Consuming it frees flow-control credit."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self.unread -= len(data)
                self.client._consumed(self.stream_id, self.unread)
                return data
            if self.ended:
                return b""
            self._raise_if_broken()
            await self._wait()

    async def read_all(self) -> bytes:
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    async def response(self) -> Response:
        headers = await self.wait_headers()
        body = await self.read_all()
        return Response(int(dict(headers)[b":status"]), headers, body)

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, data: bytes, end: bool = False, *, max_unsent: int = 256 * 1024) -> None:
        """Send request body bytes; waits (bounded) while much of it is still unsent."""
        self.client.h3.send_data(self.stream_id, data, end_stream=end)
        self.client.transmit()
        for _ in range(20000):  # up to ~100 s; a stuck test fails on its own timeout first
            if self.client.unsent(self.stream_id) <= max_unsent or self.stop_code is not None:
                return
            self._raise_if_broken()
            await asyncio.sleep(0.005)

    async def end(self) -> None:
        await self.send(b"", end=True)


class H3Client(QuicConnectionProtocol):
    """A minimal HTTP/3 client connection over aioquic (certificate verification off)."""

    def __init__(self, quic: EdgeQuicConnection) -> None:
        super().__init__(quic)
        self.edge_quic = quic
        self.h3 = H3Connection(quic)
        self.streams: dict[int, ResponseStream] = {}
        self.closed_error: str | None = None
        self.close_event: ConnectionTerminated | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.closed_error = f"0x{event.error_code:x} {event.reason_phrase}"
            self.close_event = event
            for stream in self.streams.values():
                stream._notify()
            return
        if isinstance(event, StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset_code = event.error_code
                stream._notify()
        elif isinstance(event, StopSendingReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.stop_code = event.error_code
                stream._notify()
        for h3_event in self.h3.handle_event(event):
            stream = self.streams.get(getattr(h3_event, "stream_id", -1))
            if stream is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                if stream.headers is None:
                    stream.headers = h3_event.headers
                if h3_event.stream_ended:
                    stream.ended = True
            elif isinstance(h3_event, DataReceived):
                if h3_event.data:
                    stream._chunks.append(h3_event.data)
                    stream.received += len(h3_event.data)
                    stream.unread += len(h3_event.data)
                    self.edge_quic.set_stream_unread(stream.stream_id, stream.unread)
                if h3_event.stream_ended:
                    stream.ended = True
            stream._notify()

    def shutdown(self) -> None:
        """Send CONNECTION_CLOSE and stop aioquic's timers (its closing period is not waited
        for: the socket is closed right after)."""
        self.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transmit_task is not None:
            self._transmit_task.cancel()
            self._transmit_task = None

    def _consumed(self, stream_id: int, unread: int) -> None:
        if self.edge_quic.set_stream_unread(stream_id, unread):
            self.transmit()

    def unsent(self, stream_id: int) -> int:
        stream = self.edge_quic._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender.highest_offset

    def send_request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/",
        *,
        headers: Headers | None = None,
        body: bytes | None = None,
        end: bool = True,
        authority: bytes = b"localhost",
        raw_headers: Headers | None = None,
    ) -> ResponseStream:
        """Open a request stream. `raw_headers` replaces the whole field section (malformed
        requests); otherwise pseudo-headers are built from method/path/authority."""
        stream_id = self._quic.get_next_available_stream_id()
        stream = ResponseStream(self, stream_id)
        self.streams[stream_id] = stream
        fields = raw_headers
        if fields is None:
            fields = [
                (b":method", method),
                (b":scheme", b"https"),
                (b":authority", authority),
                (b":path", path),
                *(headers or []),
            ]
        self.h3.send_headers(stream_id, fields, end_stream=end and body is None)
        if body is not None:
            self.h3.send_data(stream_id, body, end_stream=end)
        self.transmit()
        return stream

    async def request(self, method: bytes = b"GET", path: bytes = b"/", **kwargs: Any) -> Response:
        return await self.send_request(method, path, **kwargs).response()


@contextlib.asynccontextmanager
async def connect_h3(
    host: str,
    port: int,
    *,
    stream_receive_window: int | None = None,
    idle_timeout: float = 30.0,
    token: bytes = b"",
    token_handler: Callable[[bytes], None] | None = None,
) -> AsyncIterator[H3Client]:
    """Connect, complete the handshake, yield the client; close it on exit.

    With `stream_receive_window` the client grants response credit only as `read()` consumes
    data (a genuinely slow reader); without it, aioquic's usual auto-tuning applies. `token` is
    an address-validation token for the Initial; `token_handler` gets NEW_TOKEN tokens.
    """
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=list(H3_ALPN),
        server_name="localhost",
        idle_timeout=idle_timeout,
        verify_mode=0,  # ssl.CERT_NONE: self-signed test certificate
        token=token,
    )
    if stream_receive_window is not None:
        configuration.max_stream_data = stream_receive_window
    quic = EdgeQuicConnection(
        configuration=configuration,
        stream_receive_window=stream_receive_window,
        token_handler=token_handler,
    )
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: H3Client(quic), local_addr=("127.0.0.1", 0)
    )
    client = cast(H3Client, protocol)
    try:
        client.connect((host, port))
        async with asyncio.timeout(10):
            await client.wait_connected()
        yield client
    finally:
        client.shutdown()
        transport.close()


def temp_cert_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edgeproxy-h3-test-")
