"""A 1 GiB download and a 1 GiB upload pass through a real `edgeproxy run` process in bounded memory.

The proxy runs as its own process so its peak resident memory (VmHWM) is its alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pop_helpers import RawClient, free_port, write_pop_toml

from edgeproxy.demo import DemoOrigin

GIB = 1024**3
MEMORY_BOUND = 200 * 1024**2  # the whole process, interpreter included; the body is 5x that


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    origin = DemoOrigin()
    origin_port = await origin.listen()
    port, admin = free_port(), free_port()
    # One worker, so the process started is the one whose peak memory is measured.
    cfg = write_pop_toml(tmp_path, pop_id="stream", http_port=port, admin_port=admin, origin_port=origin_port, workers=1)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edgeproxy", "run", "--config", str(cfg), stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("edgeproxy did not start")
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await origin.close()


@pytest.mark.slow
async def test_1gib_download_in_bounded_memory(proxy: tuple[int, int]) -> None:
    port, pid = proxy
    c = await RawClient.connect(("127.0.0.1", port))
    await c.send(b"GET /stream?mb=1024 HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await c.reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    received = 0
    async with asyncio.timeout(120):
        while received < GIB:
            data = await c.reader.read(1 << 20)
            assert data, f"connection closed after {received} bytes"
            received += len(data)
    assert received == GIB
    c.close()
    assert _peak_rss(pid) < MEMORY_BOUND, f"peak RSS {_peak_rss(pid) / 2**20:.0f} MiB"


@pytest.mark.slow
async def test_1gib_upload_in_bounded_memory(proxy: tuple[int, int]) -> None:
    port, pid = proxy
    c = await RawClient.connect(("127.0.0.1", port))
    await c.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB)
    block = os.urandom(1 << 20)
    async with asyncio.timeout(120):
        for _ in range(1024):
            c.writer.write(block)
            await c.writer.drain()
        r = await c.response(timeout=60)
    assert r.status == 200 and r.body == str(GIB).encode()
    c.close()
    assert _peak_rss(pid) < MEMORY_BOUND, f"peak RSS {_peak_rss(pid) / 2**20:.0f} MiB"
