"""`edgeproxy run` with several workers: one process each, sharing the listening port, each with
its own admin port; SIGTERM stops them all; a killed worker is restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from pop_helpers import free_port, get, write_pop_toml

from edgeproxy.demo import DemoOrigin


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


async def test_two_workers_share_the_port_and_restart(tmp_path: Path) -> None:
    origin = DemoOrigin()
    origin_port = await origin.listen()
    port, admin = free_port(), free_port()
    cfg = write_pop_toml(tmp_path, pop_id="w", http_port=port, admin_port=admin, origin_port=origin_port, workers=2)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "edgeproxy", "run", "--config", str(cfg))
    try:
        for _ in range(200):
            if len(_children(proc.pid)) == 2:
                try:
                    for a in (admin, admin + 1):
                        _, w = await asyncio.open_connection("127.0.0.1", a)
                        w.close()
                    break
                except OSError:
                    pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("workers did not start")
        workers = _children(proc.pid)
        assert len(workers) == 2
        pops = {(await get(("127.0.0.1", a), "/healthz")).status for a in (admin, admin + 1)}
        assert pops == {200}
        results = await asyncio.gather(*(get(("127.0.0.1", port), "/time") for _ in range(40)))
        assert all(r.status == 200 for r in results)
        os.kill(workers[0], signal.SIGKILL)  # the supervisor starts a new one
        for _ in range(200):
            now = _children(proc.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("killed worker was not restarted")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert _children(proc.pid) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await origin.close()
