"""TCP steering kernel mechanics in namespaces of its own (root, nft): VXLAN mode steers a flow
owned by PoP a that arrives at PoP b; rules, routes, devices, sysctls and the nft table are
restored exactly at stop, and after a crash (SIGKILL) by the next start.

Topology (namespaces ``epl-k<hex>-{a,b,c}``, created and deleted here)::

    c (10.8.0.1) ── b (10.8.0.2 | 10.9.0.2 backhaul) ── a (10.9.0.1 backhaul)
    c (10.7.0.1) ─────────────────────────────────────── a (10.7.0.2): a's replies to c
    a and b both hold 203.0.113.1 on lo and serve TCP :8080 answering their name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root]

if os.geteuid() != 0:
    pytest.skip("steering kernel tests need root (network namespaces, nftables)", allow_module_level=True)
if shutil.which("ip") is None or shutil.which("nft") is None:
    pytest.skip("steering kernel tests need iproute2 and nftables (apt-get install iproute2 nftables)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
HELPER = HERE / "steering_kernel_helper.py"
PEERS = json.dumps({"a": "10.9.0.1", "b": "10.9.0.2"})
SERVER = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
          "s.bind(('203.0.113.1',8080));s.listen(16);print('up',flush=True)\n"
          "for _ in range(100):\n c,_=s.accept();c.sendall(sys.argv[1].encode());c.close()\n")


def sh(*args: str, check: bool = True) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=15)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.stderr}")
    return r.stdout


def snapshot(ns: str) -> dict[str, Any]:
    return {
        "rules": sh("ip", "-n", ns, "-4", "rule", "show"),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-n", ns, "-o", "link").splitlines()),
        "tables": sh("ip", "netns", "exec", ns, "nft", "list", "tables"),
        "routes": sh("ip", "-n", ns, "-4", "route", "show", "table", "all"),
        "sysctl": sh("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.b-bh.rp_filter")
        if ns.endswith("-b") else "",
    }


@pytest.fixture
def net() -> Iterator[dict[str, str]]:
    tag = secrets.token_hex(3)
    names = {n: f"epl-k{tag}-{n}" for n in "abc"}
    made: list[str] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        for ns in names.values():
            made.append(ns)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        a, b, c = names["a"], names["b"], names["c"]
        sh("ip", "-n", a, "link", "add", "a-bh", "type", "veth", "peer", "name", "b-bh", "netns", b)
        sh("ip", "-n", c, "link", "add", "c-b", "type", "veth", "peer", "name", "b-c", "netns", b)
        sh("ip", "-n", c, "link", "add", "c-a", "type", "veth", "peer", "name", "a-c", "netns", a)
        for ns, dev, addr in ((a, "a-bh", "10.9.0.1/24"), (b, "b-bh", "10.9.0.2/24"), (b, "b-c", "10.8.0.2/24"),
                              (c, "c-b", "10.8.0.1/24"), (a, "a-c", "10.7.0.2/24"), (c, "c-a", "10.7.0.1/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        for ns in (a, b):
            sh("ip", "-n", ns, "addr", "add", "203.0.113.1/32", "dev", "lo")
        sh("ip", "-n", a, "route", "add", "10.8.0.0/24", "via", "10.7.0.1")  # replies go straight to c
        sh("ip", "-n", c, "route", "add", "default", "via", "10.8.0.2")
        sh("ip", "netns", "exec", b, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv4.conf.b-bh.rp_filter=1")
        sh("ip", "netns", "exec", a, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.default.rp_filter=1")
        for ns, name in ((a, "a"), (b, "b")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, name], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "up"
        yield names
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        left = sh("ip", "netns", "list")
        assert not any(ns in left for ns in made)


def start(ns: str, pop: str, dev: str, state: str, inject: list[dict[str, Any]] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(HELPER), "--pop", pop, "--device", dev, "--mode", "vxlan",
                          "--peers", PEERS, "--state-dir", state, "--inject", json.dumps(inject or [])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait(timeout=5)
        raise AssertionError(f"helper failed: {p.stderr.read() if p.stderr else ''}")
    return p, json.loads(line)


def stop(p: subprocess.Popen[str]) -> None:
    out, err = p.communicate("stop\n", timeout=15)
    assert json.loads(out.strip().splitlines()[-1]) == {"stopped": True}, err


def ask(c: str, sport: int) -> str:
    code = (f"import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('10.8.0.1',{sport}))\n"
            "s.settimeout(3);s.connect(('203.0.113.1',8080));print(s.recv(16).decode())")
    return sh("ip", "netns", "exec", c, sys.executable, "-c", code).strip()


def test_vxlan_mode_steers_and_restores(net: dict[str, str]) -> None:
    a, b, c = net["a"], net["b"], net["c"]
    before_a, before_b = snapshot(a), snapshot(b)
    entry = {"src": "10.8.0.1", "sport": 40000, "dst": "203.0.113.1", "dport": 8080, "owner": "a"}
    with tempfile.TemporaryDirectory(prefix="epl-k") as d:
        pa, sa = start(a, "a", "a-bh", f"{d}/a")
        pb, sb = start(b, "b", "b-bh", f"{d}/b", [entry])
        try:
            assert sa["ok"] and sb["ok"], (sa["reason"], sb["reason"])
            assert sb["entries"] == 1 and sb["steered"][0]["owner"] == "a"
            assert ask(c, 40000) == "a"  # steered over VXLAN to a, answered by a
            assert ask(c, 40001) == "b"  # not in the map: b's own socket
            assert sh("ip", "netns", "exec", b, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
            assert sh("ip", "netns", "exec", a, "sysctl", "-n", "net.ipv4.conf.epvx0.rp_filter").strip() == "2"
            assert "edgeproxy_b" in sh("ip", "netns", "exec", b, "nft", "list", "tables")
        finally:
            stop(pb)
            stop(pa)
        assert snapshot(a) == before_a
        assert snapshot(b) == before_b
        assert ask(c, 40000) == "b"


def test_crash_leftovers_are_undone_at_next_start(net: dict[str, str]) -> None:
    b = net["b"]
    before = snapshot(b)
    with tempfile.TemporaryDirectory(prefix="epl-k") as d:
        p, s = start(b, "b", "b-bh", d)
        assert s["ok"]
        p.kill()  # a crash: nothing restored
        p.wait(timeout=5)
        assert snapshot(b) != before
        assert list(Path(d).glob("steering-routing-*.json"))
        p2, s2 = start(b, "b", "b-bh", d)  # recovers the journal, then sets up afresh
        assert s2["ok"]
        assert sh("ip", "-n", b, "-4", "rule", "show").count("lookup local") == 1
        stop(p2)
        assert snapshot(b) == before
        assert not list(Path(d).glob("steering-routing-*.json"))
