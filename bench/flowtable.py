"""Flow-table replication benchmark: N PoP processes on loopback, each a FlowTable + FlowChannel.

    .venv/bin/python bench/flowtable.py [--duration 10] [--nodes 3] [--publishers 1|all]
                                        [--batch 256] [--rate 0] [--ttl 30] [--json FILE]

Every process runs :class:`gossip.flowtable.FlowTable`, its :class:`FlowReplicator` and the
asyncio :class:`gossip.flowchannel.FlowChannel` on its own UDP port of 127.0.0.1 (uvloop, AES-GCM
sealed packets, static peers). The publishers (pop0, or every PoP) publish new flows as fast as
they can for ``--duration`` seconds (``--rate`` caps it, in entries/s per publisher), in batches
of ``--batch`` between event-loop turns, waiting whenever the channel holds more than ``--batch``
x 16 unsent writes. Each key carries its publisher, a sequence number and the publish time
(``time.time_ns()``: all processes share the host clock), so every receiver records when each
entry became visible there. After a settle period the parent merges the records:

* **sustained rate**: entries visible at *every* other PoP within the publish window (after the
  first second), per second;
* **publish-to-visible-everywhere latency**: per entry, the latest arrival over the other PoPs
  minus the publish time; p50 / p99 / max (entries never seen everywhere are reported apart).

Targets: >= 50k entries/s sustained, p99 <= 50 ms; each figure is printed with PASS or BELOW.
This is a measurement, not a test: the exit code is 0 unless something could not be measured.
Every child process is stopped by its pid at the end. ``FLOWBENCH_PROFILE=<i>`` writes a cProfile
of child ``i`` to ``/tmp/flowbench-<i>.prof``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATE = 50_000.0
TARGET_P99_MS = 50.0
KEY = bytes(range(32))
_KEY = struct.Struct(">BBQQ")  # magic, publisher, seq, publish time (ns)
MAGIC = 0xB7
PACE_TICK = 0.002


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# Child: one PoP


async def run_child(args: argparse.Namespace) -> None:
    from gossip.flowchannel import FlowChannel
    from gossip.flowtable import FlowEntry, FlowReplicator, FlowTable
    from gossip.keyring import Keyring

    ports = [int(p) for p in args.ports.split(",")]
    me = args.child
    names = [f"pop{i}" for i in range(len(ports))]
    table = FlowTable(
        names[me], max_entries=args.max_entries, initial_version=time.time_ns() // 1000
    )
    rep = FlowReplicator(
        table, Keyring(KEY), region="bench", peers={n: "bench" for n in names if n != names[me]}
    )
    peers = {n: (("127.0.0.1", ports[i]), "bench") for i, n in enumerate(names) if i != me}
    channel = FlowChannel(rep, ("127.0.0.1", ports[me]), peers, gossip_interval=args.gossip)
    # arrivals[publisher] = (seqs, arrival ns)
    seqs = [array.array("q") for _ in ports]
    arrivals = [array.array("q") for _ in ports]
    stamps = [array.array("q") for _ in ports]
    unpack = _KEY.unpack_from
    now_ns = time.time_ns

    def on_change(key: bytes, old: FlowEntry | None, new: FlowEntry | None) -> None:
        if old is None and new is not None and len(key) == _KEY.size and key[0] == MAGIC:
            _, pub, seq, ts = unpack(key)
            if pub != me:
                seqs[pub].append(seq)
                arrivals[pub].append(now_ns())
                stamps[pub].append(ts)

    table.listeners.append(on_change)
    # (time since start, loop stall ms, CPU ms this process used meanwhile) for stalls > 20 ms
    stalls: list[tuple[float, float, float]] = []

    async def watch_loop() -> None:
        while True:
            t0 = time.monotonic()
            c0 = time.process_time()
            await asyncio.sleep(0.005)
            lag = time.monotonic() - t0 - 0.005
            if lag > 0.02:
                cpu = (time.process_time() - c0) * 1000
                stalls.append(
                    (round(time.time() - args.start_at, 2), round(lag * 1000, 1), round(cpu, 1))
                )

    gc_pauses: list[tuple[float, int, float]] = []
    gc_t0 = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        elif info["generation"] >= 1:
            ms = (time.perf_counter() - gc_t0[0]) * 1000
            if ms > 5:
                gc_pauses.append((round(time.time() - args.start_at, 2), info["generation"], ms))

    import gc

    gc.callbacks.append(on_gc)
    watcher = asyncio.create_task(watch_loop())
    await channel.start()
    published = 0
    full = 0
    waited = 0.0
    iterations = 0
    t_start = t_stop = 0.0
    try:
        # Everybody starts at the same wall-clock instant.
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        if args.publish:
            end = args.start_at + args.duration
            clock = time.monotonic
            batch = args.batch
            max_backlog = batch * 16
            pack = _KEY.pack
            t_start = time.time()
            while True:
                iterations += 1
                t = time.time()
                if t >= end:
                    break
                if args.rate > 0:
                    # Paced: whatever is due, every PACE_TICK (a real PoP's new flows arrive
                    # continuously; the channel sends what one loop turn published).
                    behind = (t - t_start) * args.rate - published
                    if behind < max(1.0, args.rate * PACE_TICK / 2):
                        await asyncio.sleep(min(PACE_TICK, end - t))
                        continue
                    n = int(min(batch, behind))
                else:
                    n = batch
                now = clock()
                for _ in range(n):
                    try:
                        table.publish(pack(MAGIC, me, published, now_ns()), now, args.ttl)
                    except Exception:
                        full += 1
                        break
                    published += 1
                await asyncio.sleep(0)
                if channel.backlog > max_backlog:
                    t0 = time.monotonic()
                    await channel.drained(batch)
                    waited += time.monotonic() - t0
            t_stop = time.time()
        await asyncio.sleep(max(0.0, args.start_at + args.duration + args.settle - time.time()))
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await channel.stop()
    out = Path(args.out)
    for pub in range(len(ports)):
        with (out / f"r{me}_p{pub}.seq").open("wb") as fh:
            seqs[pub].tofile(fh)
        with (out / f"r{me}_p{pub}.ns").open("wb") as fh:
            arrivals[pub].tofile(fh)
        with (out / f"r{me}_p{pub}.ts").open("wb") as fh:
            stamps[pub].tofile(fh)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "node": names[me],
        "published": published,
        "publish_failed": full,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_mb": ru.ru_maxrss / 1024,
        "entries": len(table),
        "publish_window": [t_start - args.start_at, t_stop - args.start_at],
        "iterations": iterations,
        "backpressure_wait_s": waited,
        "counters": dict(rep.counters),
        "loop_stalls": stalls,
        "gc_pauses": gc_pauses,
    }
    (out / f"summary{me}.json").write_text(json.dumps(summary))


# ---------------------------------------------------------------------------------------------
# Parent


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def analyse(
    out: Path, n: int, publishers: list[int], start_at: float, duration: float, warmup: float
) -> dict[str, Any]:
    summaries = [json.loads((out / f"summary{i}.json").read_text()) for i in range(n)]
    start_ns = int(start_at * 1e9)
    window_lo = start_ns + int(warmup * 1e9)
    window_hi = start_ns + int(duration * 1e9)
    steady: list[float] = []  # published after the warm-up
    every: list[float] = []
    worst: dict[int, float] = {}  # 100 ms publish-time bucket -> worst latency (ms)
    complete_in_window = 0
    never = 0
    for pub in publishers:
        receivers = [r for r in range(n) if r != pub]
        published = summaries[pub]["published"]
        last = array.array("q", [0]) * published
        ts = array.array("q", [0]) * published
        seen = array.array("b", [0]) * published
        for r in receivers:
            seqs, arr, stamps = (_load(out / f"r{r}_p{pub}.{ext}") for ext in ("seq", "ns", "ts"))
            for s, a, t in zip(seqs, arr, stamps, strict=True):
                if s < published:
                    seen[s] += 1
                    ts[s] = t
                    if a > last[s]:
                        last[s] = a
        need = len(receivers)
        for s in range(published):
            if seen[s] < need:
                never += 1
                continue
            lat = (last[s] - ts[s]) / 1e6
            every.append(lat)
            if ts[s] >= window_lo:
                steady.append(lat)
            bucket = (ts[s] - start_ns) // 100_000_000
            if lat > worst.get(bucket, 0.0):
                worst[bucket] = lat
            if window_lo <= last[s] <= window_hi:
                complete_in_window += 1
    steady.sort()
    every.sort()
    total_published = sum(summaries[p]["published"] for p in publishers)
    return {
        "summaries": summaries,
        "published": total_published,
        "publish_rate": total_published / duration,
        "sustained_rate": complete_in_window / max(1e-9, duration - warmup),
        "replicated": len(every),
        "never_everywhere": never,
        "p50_ms": percentile(steady, 50),
        "p99_ms": percentile(steady, 99),
        "max_ms": steady[-1] if steady else float("nan"),
        "all_p50_ms": percentile(every, 50),
        "all_p99_ms": percentile(every, 99),
        "all_max_ms": every[-1] if every else float("nan"),
        "slowest_windows": sorted(
            ((round(b / 10, 1), round(v, 1)) for b, v in worst.items()), key=lambda x: -x[1]
        )[:6],
    }


def _load(path: Path) -> array.array[int]:
    values = array.array("q")
    values.frombytes(path.read_bytes())
    return values


def run_once(args: argparse.Namespace, publishers: list[int], rate: float) -> dict[str, Any]:
    """One cluster of ``args.nodes`` child processes; returns the analysed figures."""
    n = args.nodes
    ports = [free_udp_port() for _ in range(n)]
    start_at = time.time() + 1.5
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="flowbench-") as tmp:
        try:
            for i in range(n):
                cmd = [
                    sys.executable, __file__, "--child", str(i), "--ports",
                    ",".join(map(str, ports)), "--publish", str(int(i in publishers)),
                    "--start-at", repr(start_at), "--out", tmp, "--duration", str(args.duration),
                    "--batch", str(args.batch), "--rate", str(rate), "--ttl", str(args.ttl),
                    "--settle", str(args.settle), "--gossip", str(args.gossip),
                    "--max-entries", str(args.max_entries), "--gc", args.gc,
                ]  # fmt: skip
                procs.append(subprocess.Popen(cmd, cwd=str(ROOT)))
            deadline = start_at + args.duration + args.settle + 60
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    p.wait()
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"children {bad} failed")
        return analyse(Path(tmp), n, publishers, start_at, args.duration, args.warmup)


def report(res: dict[str, Any], title: str, args: argparse.Namespace, offered: float) -> None:
    print(title)
    for s in res["summaries"]:
        c = s["counters"]
        print(
            f"  {s['node']}: published {s['published']:>8}, stored {s['entries']:>7}, "
            f"cpu {s['cpu_s']:5.1f} s, rss {s['maxrss_mb']:4.0f} MB, packets in/out "
            f"{c.get('packets_in', 0)}/{c.get('packets_out', 0)}, catch-up "
            f"{c.get('catchup_packets', 0)}, dropped "
            f"{sum(v for k, v in c.items() if k.startswith('drop.'))}, loop stalls > 20 ms: "
            f"{len(s['loop_stalls'])} (max {max((x[1] for x in s['loop_stalls']), default=0):.0f}"
            f" ms), GC pauses > 5 ms: {len(s['gc_pauses'])} (max "
            f"{max((x[2] for x in s['gc_pauses']), default=0):.0f} ms)"
        )
    ok_rate = res["sustained_rate"] >= TARGET_RATE
    ok_p99 = res["p99_ms"] <= TARGET_P99_MS
    print(f"  published              {res['publish_rate']:>9,.0f} entries/s")
    verdict = (
        f"target >= {TARGET_RATE:,.0f}/s  {'PASS' if ok_rate else 'BELOW'}"
        if offered <= 0
        else f"(offered {offered:,.0f}/s: the latency run)"
    )
    print(
        f"  replicated everywhere  {res['sustained_rate']:>9,.0f} entries/s sustained "
        f"(after {args.warmup:g} s)   {verdict}"
    )
    print(
        f"  publish -> visible at every other PoP: p50 {res['p50_ms']:.1f} ms, "
        f"p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms   target p99 <= "
        f"{TARGET_P99_MS:.0f} ms  {'PASS' if ok_p99 else 'BELOW'}"
    )
    print(
        f"    including the warm-up (tables growing): p50 {res['all_p50_ms']:.1f} ms, "
        f"p99 {res['all_p99_ms']:.1f} ms, max {res['all_max_ms']:.1f} ms; slowest 100 ms "
        "windows (s: ms) " + ", ".join(f"{t}: {v}" for t, v in res["slowest_windows"])
    )
    print(
        f"  {res['replicated']:,} of {res['published']:,} entries reached every other PoP "
        f"({res['never_everywhere']:,} did not within {args.settle:g} s)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="leave entries published in the first S seconds out of the figures")  # fmt: skip
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--publishers", default="1", help="1 (pop0 publishes) or all")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rate", type=float, default=None,
                    help="entries/s per publisher; default: a max-rate run, then one paced at "
                    "the target rate")  # fmt: skip
    ap.add_argument("--ttl", type=float, default=3.0,
                    help="entry TTL: tables reach a steady size of rate x TTL")  # fmt: skip
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--gossip", type=float, default=0.5, help="digest interval (s)")
    ap.add_argument("--max-entries", type=int, default=2_000_000)
    ap.add_argument("--gc", choices=("default", "tuned", "off"), default="tuned",
                    help="children's cyclic GC: CPython defaults, edgeproxy's tune_gc (as a PoP "
                    "runs), or off")  # fmt: skip
    ap.add_argument("--json", help="also write the figures to this file")
    # child mode
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--publish", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        import gc

        import uvloop

        if args.gc == "tuned":
            from edgeproxy.cli import tune_gc

            tune_gc()
        elif args.gc == "off":
            gc.disable()
        if os.environ.get("FLOWBENCH_PROFILE") == str(args.child):
            import cProfile

            cProfile.runctx(
                "uvloop.run(run_child(args))", globals(), {"uvloop": uvloop, "args": args},
                f"/tmp/flowbench-{args.child}.prof",
            )  # fmt: skip
        else:
            uvloop.run(run_child(args))
        return 0

    n = args.nodes
    publishers = list(range(n)) if args.publishers == "all" else list(range(int(args.publishers)))
    who = ", ".join(f"pop{p}" for p in publishers)
    runs: list[tuple[str, float]] = []
    if args.rate is None:
        runs = [("as fast as possible", 0.0), ("paced", TARGET_RATE / len(publishers))]
    else:
        runs = [("as fast as possible" if args.rate <= 0 else "paced", args.rate)]
    results = {}
    print(
        f"flow-table replication: {n} PoPs on 127.0.0.1 (one process each, uvloop, AES-GCM), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; publishers {who}; "
        f"{args.duration:g} s, TTL {args.ttl:g} s, GC {args.gc}"
    )
    for label, rate in runs:
        try:
            res = run_once(args, publishers, rate)
        except RuntimeError as exc:
            print(f"flowtable bench: {exc}", file=sys.stderr)
            return 1
        title = label if rate <= 0 else f"{label} at {rate * len(publishers):,.0f} entries/s"
        report(res, f"- {title}:", args, rate * len(publishers))
        results[title] = res
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
