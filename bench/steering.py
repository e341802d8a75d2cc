"""TCP steering figures: table-to-kernel sync lag under churn, and map scale.

    sudo .venv/bin/python bench/steering.py [--rate 10000] [--seconds 5] [--sizes 100000,1000000]

Runs in a namespace of its own (``epl-bench<hex>``, created here, deleted at the end; nothing
outside it is touched):

1. churn: the real :class:`edgeproxy.steering.service.Steering` (nft table, routing over a veth)
   fed through the replication path (``FlowTable.apply_group``) at ``--rate`` changes/s, half
   new flows and half removals once the population is steady; prints p50/p99/max of the lag
   from a flow-table change to its kernel commit;
2. scale: the map filled to each of ``--sizes`` in batches (insertion rate), then a 100-element
   update timed at that size, and a TCP request/response loop over loopback (every segment
   looked up in the map by the prerouting hook) compared with an empty map.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INNER = "EPL_STEERING_BENCH_INNER"


def outer(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("bench/steering.py needs root (a network namespace and nftables)", file=sys.stderr)
        return 2
    ns = f"epl-bench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = dict(os.environ, **{INNER: ns})
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, *argv], env=env, timeout=900).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        print(f"namespace {ns} removed: {ns not in left}")


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def churn(rate: int, seconds: float, steady: int) -> dict[str, object]:
    from edgeproxy.config import SteeringSection
    from edgeproxy.steering.service import Steering
    from gossip.flowtable import FlowTable, tcp_key

    sh("ip", "link", "add", "bh0", "type", "veth", "peer", "name", "bh1")
    sh("ip", "addr", "add", "10.99.0.1/24", "dev", "bh0")
    sh("ip", "link", "set", "bh0", "up")
    sh("ip", "link", "set", "bh1", "up")
    loop = asyncio.get_running_loop()
    table = FlowTable("a", max_entries=steady * 4)
    cfg = SteeringSection(enabled=True, backhaul_device="bh0", peers={"a": "10.99.0.1", "b": "10.99.0.2"})
    tmp = tempfile.TemporaryDirectory(prefix="epl-bench")
    st = Steering(cfg, "a", table, state_dir=Path(tmp.name))
    assert await st.start(), st.reason
    st.lags = deque(maxlen=10**7)
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    version = 0
    live: list[bytes] = []
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    n = 0
    t_start = loop.time()
    t_end = t_start + seconds
    st.lags.clear()
    changes = 0
    while loop.time() < t_end:
        t0 = loop.time()
        items = []
        due = max(0, int(rate * (t0 - t_start)) + per_tick - changes)  # catch up on late ticks
        adds = due if len(live) < steady else due // 2
        dels = 0 if len(live) < steady else due - adds
        for _ in range(adds):
            n += 1
            key = tcp_key(ipaddress.IPv4Address(base + n // 60000).packed, 1024 + n % 60000, "203.0.113.1", 443)
            live.append(key)
            version += 1
            items.append((key, 1, version, 60.0, False))
        for _ in range(dels):
            key = live.pop(0)
            version += 1
            items.append((key, 1, version, 60.0, True))
        table.apply_group("b", version - len(items), version, items, loop.time())
        changes += len(items)
        await asyncio.sleep(max(0.0, tick - (loop.time() - t0)))
    elapsed = loop.time() - t_start
    for _ in range(500):  # bounded drain
        if not st.projection.pending:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    lags = list(st.lags)
    out = {"changes": changes, "rate_per_s": round(changes / elapsed), "kernel_entries": len(st.projection.installed),
           "batches": st.stats["batches"], "errors": st.stats["errors"],
           "lag_p50_ms": round(pct(lags, 0.5) * 1000, 2), "lag_p99_ms": round(pct(lags, 0.99) * 1000, 2),
           "lag_max_ms": round(max(lags, default=0) * 1000, 2), "samples": len(lags)}
    await st.stop()
    tmp.cleanup()
    sh("ip", "link", "del", "bh0")
    return out


def rr_loop(rounds: int) -> float:
    """Mean microseconds per request/response over one loopback TCP connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            for _ in range(rounds):
                if not c.recv(64):
                    break
                c.sendall(b"y")

    t = threading.Thread(target=serve)
    t.start()
    cli = socket.create_connection(srv.getsockname())
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(rounds):
        cli.sendall(b"x")
        cli.recv(64)
    dt = time.perf_counter() - t0
    cli.close()
    t.join(timeout=10)
    srv.close()
    return dt / rounds * 1e6


def scale(sizes: list[int], batch: int) -> list[dict[str, object]]:
    from edgeproxy.steering.nft import Nft, ruleset

    nft = Nft()
    name = "edgeproxy_bench"
    nft.run(ruleset(name, size=max(sizes) + 1000, exclude_ifaces=[]))
    results: list[dict[str, object]] = []
    rr_empty = min(rr_loop(5000) for _ in range(3))
    have = 0
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for size in sorted(sizes):
        t0 = time.perf_counter()
        while have < size:
            k = min(batch, size - have)
            els = ", ".join(f"{ipaddress.IPv4Address(base + (have + i) // 60000)} . {1024 + (have + i) % 60000} . 203.0.113.1 . 443 : 0x1"
                            for i in range(k))
            nft.run(f"add element inet {name} flows4 {{ {els} }}")
            have += k
        fill = time.perf_counter() - t0
        small = []
        for j in range(20):
            els = ", ".join(f"10.250.{j}.{i} . 1 . 203.0.113.1 . 443 : 0x2" for i in range(100))
            t1 = time.perf_counter()
            nft.run(f"add element inet {name} flows4 {{ {els} }}")
            small.append(time.perf_counter() - t1)
            nft.run(f"delete element inet {name} flows4 {{ {', '.join(e.rsplit(' : ', 1)[0] for e in els.split(', '))} }}")
        rr = min(rr_loop(5000) for _ in range(3))
        results.append({"elements": size, "fill_s": round(fill, 2), "insert_per_s": round(size / fill) if size == have and fill else None,
                        "update100_p50_ms": round(pct(small, 0.5) * 1000, 2), "update100_max_ms": round(max(small) * 1000, 2),
                        "rr_us": round(rr, 1), "rr_us_empty_map": round(rr_empty, 1)})
    t0 = time.perf_counter()
    nft.run(f"delete table inet {name}")
    results.append({"delete_table_s": round(time.perf_counter() - t0, 2)})
    nft.close()
    return results


def inner(args: argparse.Namespace) -> int:
    sh("ip", "link", "set", "lo", "up")
    out: dict[str, object] = {"namespace": os.environ[INNER]}
    out["churn"] = asyncio.run(churn(args.rate, args.seconds, args.steady))
    print("churn:", json.dumps(out["churn"]), flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    out["scale"] = scale(sizes, args.batch) if sizes else []
    for row in out["scale"]:  # type: ignore[attr-defined]
        print("scale:", json.dumps(row), flush=True)
    left = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.strip()
    print(f"nft tables left in the namespace: {left or 'none'}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=10000, help="flow-table changes per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--steady", type=int, default=20000, help="population after which half the changes are removals")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--batch", type=int, default=20000)
    args = p.parse_args()
    if os.environ.get(INNER):
        return inner(args)
    return outer(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
