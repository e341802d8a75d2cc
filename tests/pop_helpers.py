"""Test helpers: a PoP with the demo origin on loopback ports, and a raw HTTP/1.1 client.

The raw client sends exact bytes (smuggling cases need that) and parses responses by hand, so the
tests do not trust the parser under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeproxy.config import config_from_dict
from edgeproxy.demo import DemoOrigin
from edgeproxy.pop import Pop

# The HTTP/1.1 parser the PoPs of this test run use; tests/conftest.py runs the HTTP/1.1 suites once
# per parser.
H1_PARSER = "httptools"


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None


@dataclass
class RunningPop:
    pop: Pop
    origin: DemoOrigin
    http: tuple[str, int]
    https: tuple[str, int] | None
    quic: tuple[str, int] | None
    admin: tuple[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; lists of tables merge by index (so an override can change one
    origin group's option and keep its servers)."""
    out = dict(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = deep_merge(old, v)
        elif isinstance(v, list) and isinstance(old, list) and v and all(isinstance(x, dict) for x in v + old):
            out[k] = [deep_merge(old[i], x) if i < len(old) else x for i, x in enumerate(v)]
        else:
            out[k] = v
    return out


@contextlib.asynccontextmanager
async def running_pop(tmp_path: Path, overrides: dict[str, Any] | None = None, *, tls: bool = False, quic: bool = False) -> AsyncIterator[RunningPop]:
    origin = DemoOrigin()
    port = await origin.listen("127.0.0.1", 0)
    base: dict[str, Any] = {
        "pop": {"id": "test-pop", "state_dir": str(tmp_path / "state")},
        "listen": {
            "http": ["127.0.0.1:0"],
            "https": ["127.0.0.1:0"] if tls else [],
            "quic": ["127.0.0.1:0"] if quic else [],
        },
        "origin_groups": [{"name": "demo", "servers": [f"127.0.0.1:{port}"], "health": {"enabled": False}}],
        "admin": {"listen": "127.0.0.1:0"},
        "log": {"access_log": str(tmp_path / "access.log")},
        "http1": {"parser": H1_PARSER},
    }
    cfg = config_from_dict(deep_merge(base, overrides or {}))
    pop = Pop(cfg)
    await pop.start()
    try:
        yield RunningPop(
            pop,
            origin,
            pop.addresses["http"][0],
            pop.addresses["https"][0] if tls else None,
            pop.addresses["quic"][0] if quic else None,
            pop.addresses["admin"][0],
        )
    finally:
        await pop.stop(grace=1.0)
        await origin.close()


class RawClient:
    """One HTTP/1.1 connection driven with raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, addr: tuple[str, int], **kw: Any) -> RawClient:
        reader, writer = await asyncio.open_connection(addr[0], addr[1], **kw)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_request: bool = False, timeout: float = 5.0) -> Response:
        async with asyncio.timeout(timeout):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = []
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers.append((k.strip().lower(), v.strip()))
            resp = Response(status, headers, b"", raw)
            if head_request or status in (101, 204, 304) or 100 <= status < 200:
                return resp
            te = resp.header("transfer-encoding")
            cl = resp.header("content-length")
            if te and "chunked" in te:
                body = bytearray()
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    body += await self.reader.readexactly(size + 2)
                    del body[-2:]
                resp.body = bytes(body)
            elif cl is not None:
                resp.body = await self.reader.readexactly(int(cl))
            else:
                resp.body = await self.reader.read()  # close-delimited
            return resp

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"", host: str = "example.test") -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await self.response(head_request=method == "HEAD")

    async def closed(self, timeout: float = 3.0) -> bool:
        """True if the server closes the connection (EOF) within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
                return data == b""
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


async def get(addr: tuple[str, int], path: str, **kw: Any) -> Response:
    client = await RawClient.connect(addr)
    try:
        return await client.request("GET", path, **kw)
    finally:
        client.close()


def free_port() -> int:
    """A TCP port nothing listens on right now (for PoPs run as separate processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_pop_toml(tmp_path: Path, *, pop_id: str, http_port: int, admin_port: int, origin_port: int, workers: int) -> Path:
    """The config of a plain-HTTP PoP for `edgeproxy run` in a subprocess; `workers` is explicit
    because the default (one per core) makes the started process a supervisor, not a worker."""
    cfg = tmp_path / "pop.toml"
    cfg.write_text(
        f"""
[pop]
id = "{pop_id}"
state_dir = "{tmp_path}"
[listen]
http = ["127.0.0.1:{http_port}"]
https = []
quic = []
[[origin_groups]]
servers = ["127.0.0.1:{origin_port}"]
[origin_groups.health]
enabled = false
[admin]
listen = "127.0.0.1:{admin_port}"
[backhaul]
workers = {workers}
[log]
access_log = ""
"""
    )
    return cfg
