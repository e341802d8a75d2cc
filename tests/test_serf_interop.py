"""Interoperability with real Serf agents (Debian ``serf`` 0.9.4, memberlist 0.2.2) on loopback.

One mixed cluster per variant (plaintext, and AES-256-GCM with ``serf agent -encrypt``): two
``serf agent`` processes and three ``python -m gossip agent`` processes, default LAN timing on
both sides. Joins go both ways (gossip agents join a Serf agent with ``--join``; Serf agents join
gossip agents with ``serf join -rpc-addr=...``), then:

* ``serf members -format=json`` lists every gossip agent ``alive`` with its tags;
* a Serf agent killed with SIGKILL is reported ``failed`` by every gossip agent (JSON lines);
* a gossip agent killed with SIGKILL is marked ``failed`` by Serf;
* a gossip agent stopped with SIGTERM leaves gracefully and Serf marks it ``left``.

Detection times are printed (``-s``) and checked against memberlist LAN timing: probe every 1 s,
suspicion 4 s with enough confirmations (24 s without), so well under 15 s with three or more
live members. Skipped only when no ``serf`` binary can be found (``apt-get install serf``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERF = shutil.which("serf") or ("/usr/bin/serf" if os.access("/usr/bin/serf", os.X_OK) else None)
HOST = "127.0.0.1"
#: Generous bound on failure detection with LAN timing (typically 5-7 s).
DETECTION_BOUND = 15.0
#: Bound on a graceful leave becoming visible (intent + dead; typically 1-3 s).
LEAVE_BOUND = 12.0

if SERF is None:
    pytest.skip(
        "serf binary not found (Debian package 'serf'; `./run setup` or apt-get install serf)",
        allow_module_level=True,
    )


_used_ports: set[int] = set()


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (not handed out twice by this module)."""
    for _ in range(100):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind((HOST, 0))
            port = tcp.getsockname()[1]
            udp.bind((HOST, port))
        except OSError:
            continue
        finally:
            tcp.close()
            udp.close()
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> float:
    """Poll ``pred`` until truthy; return the elapsed seconds or fail after ``timeout``."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


class Proc:
    """A child process stopped by its pid when the test ends."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    def kill(self, sig: int = signal.SIGKILL) -> float:
        """Send ``sig``; return the wall-clock time it was sent."""
        t = time.time()
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
        return t

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  [{self.name}] {line}" for line in text[-lines:])


class SerfAgent(Proc):
    def __init__(self, name: str, tmp: Path, key: str | None, tags: dict[str, str]) -> None:
        self.port = free_port()
        self.rpc = f"{HOST}:{free_port()}"
        self.addr = f"{HOST}:{self.port}"
        cmd = [
            str(SERF), "agent", f"-node={name}", f"-bind={self.addr}", f"-rpc-addr={self.rpc}",
            "-log-level=debug",
        ]  # fmt: skip
        for k, v in tags.items():
            cmd += ["-tag", f"{k}={v}"]
        if key:
            cmd.append(f"-encrypt={key}")
        log = tmp / f"{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        super().__init__(name, popen, log)

    def members(self) -> dict[str, dict[str, Any]]:
        out = subprocess.run(
            [str(SERF), "members", f"-rpc-addr={self.rpc}", "-format=json"],
            capture_output=True,
            timeout=5,
        )
        if out.returncode != 0:
            return {}
        return {m["name"]: m for m in json.loads(out.stdout)["members"]}

    def status(self, node: str) -> str | None:
        m = self.members().get(node)
        return m["status"] if m else None

    def join(self, addr: str) -> None:
        out = subprocess.run(
            [str(SERF), "join", f"-rpc-addr={self.rpc}", addr], capture_output=True, timeout=15
        )
        assert out.returncode == 0, out.stdout + out.stderr


#: What Serf/memberlist log when our packets or streams are not quite right.
SERF_COMPLAINTS = re.compile(
    r"Failed to decode|[Dd]ecrypt|Unsupported|mismatch|unknown|[Cc]hecksum|Rejecting|"
    r"[Cc]onflict|Failed to handle|bad type|panic"
)


def serf_complaints(agent: SerfAgent) -> list[str]:
    text = agent.log.read_text(errors="replace")
    return [line for line in text.splitlines() if SERF_COMPLAINTS.search(line)]


class GossipCli(Proc):
    """``python -m gossip agent``; its JSON lines are collected with their arrival time."""

    def __init__(
        self, name: str, tmp: Path, keyfile: Path | None, join: list[str], tags: dict[str, str]
    ) -> None:
        self.port = free_port()
        self.addr = f"{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "gossip", "agent", "--name", name, "--bind", self.addr]
        for j in join:
            cmd += ["--join", j]
        for k, v in tags.items():
            cmd += ["--tag", f"{k}={v}"]
        if keyfile is not None:
            cmd += ["--keyring", str(keyfile)]
        log = tmp / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._errlog = log.open("wb")
        popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._errlog, env=env, cwd=str(ROOT)
        )
        super().__init__(name, popen, log)
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            rec["_recv"] = time.time()
            with self._lock:
                self.lines.append(rec)

    def find(self, event: str, node: str) -> dict[str, Any] | None:
        with self._lock:
            for rec in self.lines:
                if rec["event"] == event and rec["node"] == node:
                    return rec
        return None

    def stop(self) -> None:
        super().stop()
        self._reader.join(timeout=5)
        self._errlog.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


@pytest.mark.parametrize("variant", ["plain", "aes"])
def test_mixed_cluster_with_serf(variant: str, tmp_path: Path, procs: list[Proc]) -> None:
    key = base64.b64encode(os.urandom(32)).decode() if variant == "aes" else None
    keyfile = None
    if key is not None:
        keyfile = tmp_path / "keyring.json"
        keyfile.write_text(json.dumps([key]))

    s1 = SerfAgent("s1", tmp_path, key, {"k": "v1", "kind": "serf"})
    procs.append(s1)
    s2 = SerfAgent("s2", tmp_path, key, {"k": "v2", "kind": "serf"})
    procs.append(s2)
    try:
        for s in (s1, s2):
            wait_for(s.members, 10, f"{s.name} RPC")
        gtags = {n: {"kind": "gossip", "id": n} for n in ("g1", "g2", "g3")}
        # Gossip agents join a Serf agent ...
        g1 = GossipCli("g1", tmp_path, keyfile, [s1.addr], gtags["g1"])
        procs.append(g1)
        g2 = GossipCli("g2", tmp_path, keyfile, [s1.addr], gtags["g2"])
        procs.append(g2)
        g3 = GossipCli("g3", tmp_path, keyfile, [], gtags["g3"])
        procs.append(g3)
        gossips = [g1, g2, g3]
        for g in gossips:
            wait_for(partial(g.find, "join", g.name), 15, f"{g.name} listening")
        wait_for(lambda: {"g1", "g2"} <= set(s1.members()), 10, "g1, g2 in s1's members")
        # ... and Serf agents join gossip agents (s2 through g1, s1 pulls in the lone g3).
        s2.join(g1.addr)
        s1.join(g3.addr)
        everyone = {"s1", "s2", "g1", "g2", "g3"}

        def converged() -> bool:
            for s in (s1, s2):
                ms = s.members()
                if set(ms) != everyone or any(m["status"] != "alive" for m in ms.values()):
                    return False
            return all(
                g.find("join", other) for g in gossips for other in everyone if other != g.name
            )

        t = wait_for(converged, 20, "a converged 5-member cluster", step=0.2)
        print(f"\n[{variant}] cluster of 5 converged {t:.1f} s after the serf joins")
        ms = s1.members()
        for g in gossips:
            assert ms[g.name]["status"] == "alive"
            assert ms[g.name]["tags"] == gtags[g.name]
            assert ms[g.name]["addr"] == g.addr
            assert ms[g.name]["protocol"] == {"max": 5, "min": 2, "version": 5}
        for s in (s1, s2):
            rec = g3.find("join", s.name)
            assert rec is not None and rec["status"] == "alive"
            assert rec["address"] == s.addr and rec["tags"]["kind"] == "serf"

        for s in (s1, s2):
            assert serf_complaints(s) == [], f"{s.name} complained about our traffic"

        # 1. A Serf agent dies: every gossip agent reports it failed.
        t_kill = s2.kill()
        serf_seen: list[float] = []

        def s2_failed_everywhere() -> bool:
            if not serf_seen and s1.status("s2") == "failed":
                serf_seen.append(time.time() - t_kill)
            return bool(serf_seen) and all(g.find("failed", "s2") for g in gossips)

        wait_for(s2_failed_everywhere, DETECTION_BOUND + 5, "s2 failed everywhere", step=0.05)
        times = {g.name: g.find("failed", "s2")["time"] - t_kill for g in gossips}  # type: ignore[index]
        print(
            f"[{variant}] serf s2 SIGKILL -> failed event at gossip agents: "
            + ", ".join(f"{n} {v:.2f} s" for n, v in times.items())
            + f"; serf s1 shows failed after {serf_seen[0]:.2f} s"
        )
        for n, v in times.items():
            assert 1.0 < v < DETECTION_BOUND, f"{n} detected s2's death after {v:.2f} s"
        for g in gossips:
            assert g.find("leave", "s2") is None

        # 2. A gossip agent dies: Serf marks it failed.
        t_kill = g3.kill()
        serf_time = wait_for(lambda: s1.status("g3") == "failed", DETECTION_BOUND + 5,
                             "s1: g3 failed", step=0.05)  # fmt: skip
        serf_time = min(serf_time, time.time() - t_kill)
        for g in (g1, g2):
            wait_for(partial(g.find, "failed", "g3"), 10, f"{g.name}: g3 failed")
        gtimes = {g.name: g.find("failed", "g3")["time"] - t_kill for g in (g1, g2)}  # type: ignore[index]
        print(
            f"[{variant}] gossip g3 SIGKILL -> serf s1 shows failed after {serf_time:.2f} s; "
            + ", ".join(f"{n} {v:.2f} s" for n, v in gtimes.items())
        )
        assert 1.0 < serf_time < DETECTION_BOUND
        for n, v in gtimes.items():
            assert v < DETECTION_BOUND, f"{n} detected g3's death after {v:.2f} s"

        # 3. A gossip agent leaves gracefully (SIGTERM): Serf marks it left, not failed.
        t_term = g2.kill(signal.SIGTERM)
        left_time = wait_for(lambda: s1.status("g2") == "left", LEAVE_BOUND, "s1: g2 left",
                             step=0.05)  # fmt: skip
        assert g2.popen.wait(timeout=15) == 0
        wait_for(lambda: g2.find("leave", "g2"), 5, "g2's own leave line")
        wait_for(lambda: g1.find("leave", "g2"), 5, "g1: g2 left")
        print(
            f"[{variant}] gossip g2 SIGTERM -> serf s1 shows left after "
            f"{min(left_time, time.time() - t_term):.2f} s; g2 exited 0"
        )
        assert g1.find("failed", "g2") is None
        assert s1.status("g2") == "left"
        assert s1.status("g1") == "alive" and s1.status("s1") == "alive"
        assert serf_complaints(s1) == [], "s1 complained about our traffic"
    except BaseException:
        for p in procs:
            print(p.log_tail(), file=sys.stderr)
            if isinstance(p, GossipCli):
                for rec in p.lines:
                    print(f"  [{p.name} stdout] {json.dumps(rec)}", file=sys.stderr)
            elif isinstance(p, SerfAgent) and p.popen.poll() is None:
                print(f"  [{p.name} members] {json.dumps(p.members())}", file=sys.stderr)
        raise
