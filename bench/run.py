"""edgeproxy benchmarks against reference servers, on one machine, in one run.

    .venv/bin/python bench/run.py [--duration S] [--runs N] [--warmup S] [--quick] [--only h1|h3]

1. HTTP/1.1 cache hits and misses, edgeproxy vs nginx proxy_cache (one worker), per core: the
   proxy under test is pinned to CPU0; wrk (-t1 -c64, keep-alive) and the origin (a separate nginx
   with a 14-byte body: /hit is cacheable, /miss is no-store) share CPU1. The per-core figure is
   requests/s divided by the CPU share the proxy used during the run (from /proc/PID/stat).
2. HTTP/3 requests/s on one connection, edgeproxy (serving a cache hit) vs aioquic's own example
   server (fetched from the aioquic sdist into bench/.cache/), server on CPU0, gtlsclient on CPU1.

It reports and does not gate: figures below target are marked, the exit code is 0. It is non-zero
only when something could not be measured. Figures also go to bench/results/<timestamp>.json.
Every process it starts is stopped by its pid; its temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aioquic_example
import configs
from harness import BenchError, Service, Services, cpu_times, cpu_usage, free_port, run_client

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"

SUT_CPU = "0"  # system under test
LOAD_CPU = "1"  # load generator and origin

TARGET_H1_HIT = 0.5
TARGET_H1_MISS = 0.35
TARGET_H3 = 0.8

H3_VERIFY_REQUESTS = 20


# ---------------------------------------------------------------------------------------------
# Small helpers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "NOT MEASURED"
    return "PASS" if ratio >= target else "BELOW TARGET"


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def scrape_metrics(admin_port: int | None) -> dict[str, float] | None:
    """edgeproxy's Prometheus counters, keyed by `name{labels}`; None when unavailable (the numbers
    are a cross-check, not a figure, so the bench goes on without them)."""
    if admin_port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def metric_delta(before: dict[str, float] | None, after: dict[str, float] | None, name: str, **labels: str) -> float | None:
    """Sum of the increase of `name` over the series whose labels include `labels`."""
    if before is None or after is None:
        return None
    total, seen = 0.0, False
    for key, value in after.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        series = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(series.get(k) == v for k, v in labels.items()):
            seen = True
            total += value - before.get(key, 0.0)
    return total if seen else None


# ---------------------------------------------------------------------------------------------
# wrk


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class WrkOutput:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx_3xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> str:
        parts = [f"{k} {v}" for k, v in self.socket_errors.items() if v]
        if self.non_2xx_3xx:
            parts.insert(0, f"non-2xx/3xx {self.non_2xx_3xx}")
        return ", ".join(parts)


def parse_wrk(text: str) -> WrkOutput:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (rps and total and p50 and p99):
        raise BenchError(f"could not read wrk's output:\n{text[-1500:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), (int(x) for x in sock.groups()), strict=True)) if sock else {}
    return WrkOutput(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class H1Target:
    name: str  # "edgeproxy" or "nginx"
    service: Service
    port: int
    admin_port: int | None = None


@dataclass
class Setup:
    tmp: Path
    services: Services
    origin: Service | None = None
    origin_port: int = 0
    nginx: H1Target | None = None
    edgeproxy: H1Target | None = None
    edgeproxy_h3_port: int = 0
    cert: Path = field(default_factory=Path)
    key: Path = field(default_factory=Path)
    errors: list[str] = field(default_factory=list)  # something could not be measured
    flags: list[str] = field(default_factory=list)  # measured, with a caveat


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _nginx_argv(prefix: Path) -> list[str]:
    binary = nginx_binary()
    # -e: the error log nginx opens before it has read the config (else /var/log/nginx).
    return [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]


def start_origin(s: Setup) -> None:
    prefix = s.tmp / "origin"
    prefix.mkdir()
    s.origin_port = free_port()
    (prefix / "nginx.conf").write_text(configs.nginx_origin_conf(prefix, s.origin_port))
    svc = s.services.start("origin-nginx", ["taskset", "-c", LOAD_CPU, *_nginx_argv(prefix)])
    svc.wait_tcp(s.origin_port)
    status, _, body = http_get(s.origin_port, "/hit")
    if status != 200 or body != configs.BODY.encode():
        raise svc.fail(f"origin answered /hit with {status} {body[:60]!r}")
    s.origin = svc


def start_nginx_peer(s: Setup) -> None:
    prefix = s.tmp / "peer"
    prefix.mkdir()
    port = free_port()
    (prefix / "nginx.conf").write_text(configs.nginx_peer_conf(prefix, port, s.origin_port))
    svc = s.services.start("peer-nginx", ["taskset", "-c", SUT_CPU, *_nginx_argv(prefix)])
    svc.wait_tcp(port)
    s.nginx = H1Target("nginx", svc, port)


def edgeproxy_argv(config: Path) -> list[str]:
    script = Path(sys.executable).parent / "edgeproxy"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "edgeproxy"]
    return [*base, "run", "--config", str(config)]


def start_edgeproxy(s: Setup) -> None:
    state = s.tmp / "edgeproxy-state"
    state.mkdir()
    http_port, admin_port = free_port(), free_port()
    s.edgeproxy_h3_port = free_port(tcp=True, udp=True)
    config = s.tmp / "edgeproxy.toml"
    config.write_text(configs.edgeproxy_toml(state, http_port, s.edgeproxy_h3_port, s.origin_port, admin_port, s.cert, s.key))
    svc = s.services.start("edgeproxy", ["taskset", "-c", SUT_CPU, *edgeproxy_argv(config)])
    svc.wait_tcp(http_port, timeout=30)
    svc.wait_tcp(admin_port, timeout=10)
    s.edgeproxy = H1Target("edgeproxy", svc, http_port, admin_port)


def cache_status(target: H1Target, headers: dict[str, str]) -> str:
    return headers.get("x-cache" if target.name == "edgeproxy" else "x-cache-status", "")


def verify_h1(target: H1Target) -> None:
    """Before timing: /hit comes from the cache once warm, /miss never does; both carry the
    origin's body."""
    for _ in range(3):  # the first fills the cache
        status, headers, body = http_get(target.port, "/hit")
    if status != 200 or body != configs.BODY.encode():
        raise target.service.fail(f"/hit answered {status} {body[:60]!r}")
    if "HIT" not in cache_status(target, headers).upper():
        raise target.service.fail(f"/hit is not served from the cache after warm-up (headers: {headers})")
    for _ in range(2):
        status, headers, body = http_get(target.port, "/miss")
        if status != 200 or body != configs.BODY.encode():
            raise target.service.fail(f"/miss answered {status} {body[:60]!r}")
        if "HIT" in cache_status(target, headers).upper():
            raise target.service.fail(f"/miss was served from the cache (headers: {headers})")


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 measurement


def wrk_argv(port: int, path: str, duration: int) -> list[str]:
    return ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}{path}"]


def measure_h1(s: Setup, target: H1Target, path: str, duration: int) -> dict[str, Any]:
    assert s.origin is not None
    if not target.service.alive():
        raise target.service.fail("died before the run")
    m0 = scrape_metrics(target.admin_port)
    sys0, sys1 = cpu_times(int(SUT_CPU)), cpu_times(int(LOAD_CPU))
    cpu0, origin0, t0 = target.service.cpu_seconds(), s.origin.cpu_seconds(), time.monotonic()
    run = run_client(wrk_argv(target.port, path, duration), timeout=duration + 60, workdir=s.tmp)
    wall = time.monotonic() - t0
    cpu = target.service.cpu_seconds() - cpu0
    origin_cpu = s.origin.cpu_seconds() - origin0
    busy0, steal0 = cpu_usage(sys0, cpu_times(int(SUT_CPU)))
    busy1, steal1 = cpu_usage(sys1, cpu_times(int(LOAD_CPU)))
    m1 = scrape_metrics(target.admin_port)
    if run.returncode != 0:
        raise BenchError(f"wrk exited with {run.returncode}:\n{run.stderr[-1500:]}{run.stdout[-1500:]}")
    out = parse_wrk(run.stdout)
    share = cpu / wall
    result: dict[str, Any] = {
        "rps": out.rps,
        "requests": out.requests,
        "cpu_share": share,
        "rps_per_core": out.rps / share if share > 0 else float("nan"),
        "p50_ms": out.p50_ms,
        "p99_ms": out.p99_ms,
        "wall_s": wall,
        "wrk_cpu_share": run.cpu / wall,
        "origin_cpu_share": origin_cpu / wall,
        # Whole-CPU figures from /proc/stat (everything on the CPU, kernel included): show when a
        # run was limited by the load side or by other work on the shared machine.
        "cpu0_busy": busy0,
        "cpu1_busy": busy1,
        "steal": max(steal0, steal1),
        "non_2xx_3xx": out.non_2xx_3xx,
        "socket_errors": out.socket_errors,
        "errors": out.errors,
    }
    hits = metric_delta(m0, m1, "edgeproxy_cache_requests_total", result="hit")
    served = metric_delta(m0, m1, "edgeproxy_requests_total")
    if hits is not None and served:
        # edgeproxy's own count of cache hits in the run: shows a hit run really hit.
        result["cache_hit_fraction"] = hits / served
    return result


def flag_h1(s: Setup, key: str, runs: list[dict[str, Any]]) -> None:
    for i, r in enumerate(runs, 1):
        where = f"HTTP/1.1 {key} run {i}"
        if r["errors"]:
            s.flags.append(f"{where}: wrk reported {r['errors']}")
        if r.get("cache_hit_fraction", 1.0) < 0.99 and key.endswith("hit"):
            s.flags.append(f"{where}: edgeproxy counted only {r['cache_hit_fraction']:.1%} of its responses as cache hits")
        if r["steal"] > 0.05:
            s.flags.append(f"{where}: {r['steal']:.0%} CPU steal (other work on the host)")
        if r["cpu0_busy"] - r["cpu_share"] > 0.1:
            s.flags.append(f"{where}: {r['cpu0_busy'] - r['cpu_share']:.0%} of CPU0 went to other processes than the proxy")
        if r["cpu1_busy"] > 0.95:
            s.flags.append(f"{where}: CPU1 (wrk + origin) was saturated, the load side may have been the limit")


def run_h1(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    targets = [t for t in (s.edgeproxy, s.nginx) if t is not None]
    for t in list(targets):
        try:
            verify_h1(t)
        except BenchError as e:
            s.errors.append(f"HTTP/1.1 {t.name}: correctness check failed: {e}")
            targets.remove(t)
    scenarios = [(t, path) for path in ("hit", "miss") for t in targets]
    runs: dict[str, list[dict[str, Any]]] = {f"{t.name} {p}": [] for t, p in scenarios}
    failed: set[str] = set()
    for t, path in scenarios:
        print(f"bench: HTTP/1.1 warm-up {t.name} /{path} ({args.warmup} s)", flush=True)
        try:
            measure_h1(s, t, f"/{path}", args.warmup)
        except BenchError as e:
            s.errors.append(f"HTTP/1.1 {t.name} {path}: warm-up failed: {e}")
            failed.add(f"{t.name} {path}")
    # Interleaved, so that drifting background load on the shared machine spreads over all.
    for i in range(args.runs):
        for t, path in scenarios:
            key = f"{t.name} {path}"
            if key in failed:
                continue
            print(f"bench: HTTP/1.1 run {i + 1}/{args.runs} {key} ({args.duration} s)", flush=True)
            try:
                runs[key].append(measure_h1(s, t, f"/{path}", args.duration))
            except BenchError as e:
                s.errors.append(f"HTTP/1.1 {key}: {e}")
                failed.add(key)
    results: dict[str, Any] = {}
    for key, rs in runs.items():
        if not rs or key in failed:
            continue
        summary: dict[str, Any] = {
            k: median([r[k] for r in rs])
            for k in ("rps", "cpu_share", "rps_per_core", "p50_ms", "p99_ms", "wrk_cpu_share", "origin_cpu_share", "cpu0_busy", "cpu1_busy", "steal")
        }
        if all("cache_hit_fraction" in r for r in rs):
            summary["cache_hit_fraction"] = median([r["cache_hit_fraction"] for r in rs])
        summary["errors"] = "; ".join(sorted({r["errors"] for r in rs if r["errors"]}))
        results[key] = {"median": summary, "runs": rs}
        flag_h1(s, key, rs)
    ratios: dict[str, Any] = {}
    for path, target in (("hit", TARGET_H1_HIT), ("miss", TARGET_H1_MISS)):
        ep, ng = results.get(f"edgeproxy {path}"), results.get(f"nginx {path}")
        ratio = ep["median"]["rps_per_core"] / ng["median"]["rps_per_core"] if ep and ng else None
        ratios[path] = {"ratio": ratio, "target": target, "verdict": verdict(ratio, target)}
    return {"scenarios": results, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# HTTP/3 measurement


@dataclass
class H3Server:
    key: str
    label: str
    service: Service
    port: int
    path: str
    expect_cache_hit: bool = False
    admin_port: int | None = None
    rate_estimate: float = 0.0
    requests: int = 0


def h3_argv(port: int, path: str, n: int, quiet: bool = True) -> list[str]:
    argv = ["taskset", "-c", LOAD_CPU, "gtlsclient"]
    if quiet:
        argv.append("-q")
    # Without dumps the client spends its time on the protocol, not on printing bodies.
    argv += ["--no-quic-dump", "--no-http-dump", "--exit-on-all-streams-close", "--handshake-timeout=5s", "--timeout=10s"]
    return [*argv, "-n", str(n), "127.0.0.1", str(port), f"https://localhost:{port}{path}"]


def verify_h3(s: Setup, srv: H3Server) -> None:
    """gtlsclient exits 0 even when the handshake times out, so success is read from the response
    headers it prints when not quiet."""
    n = H3_VERIFY_REQUESTS
    run = run_client(h3_argv(srv.port, srv.path, n, quiet=False), timeout=60, workdir=s.tmp)
    text = run.stdout + run.stderr
    ok = len(re.findall(r"\[:status: 200\]", text))
    if ok != n:
        statuses = sorted(set(re.findall(r"\[:status: (\d+)\]", text)))
        raise srv.service.fail(
            f"gtlsclient got {ok}/{n} responses with status 200 (statuses seen: {statuses or 'none'}; exit {run.returncode})\n"
            f"--- client output tail:\n{text[-1200:]}"
        )
    if srv.expect_cache_hit:
        hits = len(re.findall(r"\[x-cache: HIT\]", text, re.I))
        if hits != n:
            raise srv.service.fail(f"only {hits}/{n} HTTP/3 responses carried x-cache: HIT after warm-up")


def h3_once(s: Setup, srv: H3Server, n: int) -> dict[str, Any]:
    if not srv.service.alive():
        raise srv.service.fail("died before the run")
    m0 = scrape_metrics(srv.admin_port)
    sys0 = cpu_times(int(SUT_CPU))
    cpu0 = srv.service.cpu_seconds()
    run = run_client(h3_argv(srv.port, srv.path, n), timeout=max(120.0, n / 50), workdir=s.tmp)
    cpu = srv.service.cpu_seconds() - cpu0
    busy0, steal0 = cpu_usage(sys0, cpu_times(int(SUT_CPU)))
    m1 = scrape_metrics(srv.admin_port)
    if run.returncode != 0:
        raise BenchError(f"gtlsclient exited with {run.returncode}: {(run.stderr or run.stdout)[-1200:]}")
    # Wall clock of the whole client process: handshake and teardown included, nothing subtracted.
    share = cpu / run.wall
    result: dict[str, Any] = {
        "requests": n,
        "wall_s": run.wall,
        "rps": n / run.wall,
        "server_cpu_share": share,
        "rps_per_core": n / run.wall / share if share > 0 else float("nan"),
        "client_cpu_share": run.cpu / run.wall,
        "cpu0_busy": busy0,
        "steal": steal0,
    }
    ok = metric_delta(m0, m1, "edgeproxy_requests_total", status="200")
    if ok is not None:
        # The quiet client says nothing about statuses; edgeproxy's own counters do.
        result["server_counted_200"] = ok
    return result


def connect_latency_ms(s: Setup, srv: H3Server) -> float:
    """Handshake plus one request on a fresh connection (client process start to exit)."""
    return median([run_client(h3_argv(srv.port, srv.path, 1), timeout=30, workdir=s.tmp).wall * 1e3 for _ in range(5)])


def start_h3_servers(s: Setup) -> list[H3Server]:
    servers: list[H3Server] = []
    if s.edgeproxy is not None:
        try:
            s.edgeproxy.service.wait_udp(s.edgeproxy_h3_port, timeout=10)
            servers.append(
                H3Server("edgeproxy", "edgeproxy, /hit (cache hit)", s.edgeproxy.service, s.edgeproxy_h3_port, "/hit",
                         expect_cache_hit=True, admin_port=s.edgeproxy.admin_port)
            )
        except BenchError as e:
            s.errors.append(f"HTTP/3 edgeproxy: {e}")
    try:
        example = aioquic_example.prepare(CACHE_DIR)
    except (BenchError, OSError, subprocess.SubprocessError) as e:
        s.errors.append(f"HTTP/3 aioquic example server: could not be fetched: {e}")
        return servers
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(example.site), *filter(None, [env.get("PYTHONPATH")])])
    for key, label, app, path in (
        ("aioquic", f"aioquic {example.version} example, bare ASGI app", "aioquic_shim:app", "/hit"),
        ("aioquic-demo", f"aioquic {example.version} example, demo app /14", "demo:app", "/14"),
    ):
        port = free_port(tcp=False, udp=True)
        argv = [
            "taskset", "-c", SUT_CPU, sys.executable, str(BENCH_DIR / "aioquic_shim.py"), str(example.examples), app,
            "--certificate", str(s.cert), "--private-key", str(s.key), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        svc = s.services.start(key, argv, cwd=example.examples, env=env)
        try:
            svc.wait_udp(port)
            servers.append(H3Server(key, label, svc, port, path))
        except BenchError as e:
            s.errors.append(f"HTTP/3 {label}: {e}")
    return servers


def run_h3(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    servers = start_h3_servers(s)
    for srv in list(servers):
        try:
            # A short calibration run sizes the warm-up and the measured runs; the warm-up also
            # puts edgeproxy's /hit (keyed on its HTTP/3 authority) in the cache.
            cal = h3_once(s, srv, 500)
            warm = h3_once(s, srv, max(500, round(cal["rps"] * args.warmup)))
            srv.rate_estimate = warm["rps"]
            verify_h3(s, srv)
        except BenchError as e:
            s.errors.append(f"HTTP/3 {srv.label}: {e}")
            servers.remove(srv)
    if not servers:
        return {"servers": {}, "ratios": {}}
    # Each server gets the request count it serves in about --duration seconds: the handshake
    # (tens of ms, shown as "connect") is then well under 1% of any run, and slow baselines do not
    # stretch the bench. --h3-requests sets one count for all instead.
    for srv in servers:
        srv.requests = args.h3_requests or max(1000, int(round(srv.rate_estimate * args.duration, -3)))
    runs: dict[str, list[dict[str, Any]]] = {srv.key: [] for srv in servers}
    failed: set[str] = set()
    for i in range(args.runs):
        for srv in servers:
            if srv.key in failed:
                continue
            print(f"bench: HTTP/3 run {i + 1}/{args.runs} {srv.label} ({srv.requests} requests)", flush=True)
            try:
                runs[srv.key].append(h3_once(s, srv, srv.requests))
            except BenchError as e:
                s.errors.append(f"HTTP/3 {srv.label}: {e}")
                failed.add(srv.key)
    results: dict[str, Any] = {}
    for srv in servers:
        rs = runs[srv.key]
        if not rs or srv.key in failed:
            continue
        try:
            # Re-checked after the timed runs: the quiet client would not have shown failures.
            verify_h3(s, srv)
            connect_ms = connect_latency_ms(s, srv)
        except BenchError as e:
            s.errors.append(f"HTTP/3 {srv.label}: check after the runs failed: {e}")
            continue
        summary: dict[str, Any] = {k: median([r[k] for r in rs]) for k in ("rps", "server_cpu_share", "rps_per_core", "client_cpu_share", "cpu0_busy", "steal", "wall_s")}
        summary["connect_plus_1_request_ms"] = connect_ms
        for i, r in enumerate(rs, 1):
            if r["steal"] > 0.05:
                s.flags.append(f"HTTP/3 {srv.label} run {i}: {r['steal']:.0%} CPU steal (other work on the host)")
            if r["cpu0_busy"] - r["server_cpu_share"] > 0.1:
                # req/s is then low for a reason outside the server; req/s/core is the fairer figure.
                s.flags.append(f"HTTP/3 {srv.label} run {i}: {r['cpu0_busy'] - r['server_cpu_share']:.0%} of CPU0 went to other processes than the server")
            if r["client_cpu_share"] > 0.9:
                s.flags.append(f"HTTP/3 {srv.label} run {i}: the client was CPU-bound, the server may not have been the limit")
        counted = [r["server_counted_200"] for r in rs if "server_counted_200" in r]
        if counted:
            summary["server_counted_200_per_run"] = min(counted)
            if min(counted) < srv.requests:
                s.errors.append(f"HTTP/3 {srv.label}: server counted only {min(counted):.0f} of {srv.requests} responses as 200 in a run")
        results[srv.key] = {"label": srv.label, "path": srv.path, "requests_per_run": srv.requests, "median": summary, "runs": rs}
    ratios: dict[str, Any] = {}
    ep = results.get("edgeproxy")
    for key, target in (("aioquic", TARGET_H3), ("aioquic-demo", None)):
        base = results.get(key)
        ratio = ep["median"]["rps"] / base["median"]["rps"] if ep and base else None
        ratios[key] = {"ratio": ratio, "target": target, "verdict": verdict(ratio, target) if target else "info"}
    return {"servers": results, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    p = print
    st = report["settings"]
    p()
    p(f"edgeproxy bench {report['timestamp']}: median of {st['runs']} run(s) x {st['duration_s']} s after {st['warmup_s']} s warm-up;"
      f" load average at start {report['host']['loadavg']}")
    h1 = report.get("h1")
    if h1 is not None:
        p()
        p("HTTP/1.1 (wrk -t1 -c64 --latency, keep-alive). Proxy on CPU0; wrk and origin nginx on CPU1.")
        p("  cpu = the proxy's CPU share (1.00 = one core busy); per core = req/s / cpu;")
        p("  cpu0, cpu1 = whole-CPU busy share from /proc/stat (kernel included); steal = hypervisor steal")
        p(f"  {'scenario':<16}{'req/s':>9}{'cpu':>6}{'req/s/core':>12}{'p50 ms':>9}{'p99 ms':>9}{'cpu0':>6}{'cpu1':>6}{'steal':>7}  errors")
        for key in ("edgeproxy hit", "nginx hit", "edgeproxy miss", "nginx miss"):
            r = h1["scenarios"].get(key)
            if r is None:
                p(f"  {key:<16}{'not measured':>14}")
                continue
            m = r["median"]
            p(f"  {key:<16}{fmt(m['rps']):>9}{fmt(m['cpu_share'], '.2f'):>6}{fmt(m['rps_per_core']):>12}"
              f"{fmt(m['p50_ms'], '.2f'):>9}{fmt(m['p99_ms'], '.2f'):>9}{fmt(m['cpu0_busy'], '.2f'):>6}"
              f"{fmt(m['cpu1_busy'], '.2f'):>6}{fmt(m['steal'], '.2f'):>7}  {m['errors'] or 'none'}")
        for path, label in (("hit", "hits"), ("miss", "misses")):
            r = h1["ratios"][path]
            p(f"  edgeproxy/nginx req/s per core, {label:<7}{fmt(r['ratio'], '.3f'):>7}  (target >= {r['target']})  {r['verdict']}")
    h3 = report.get("h3")
    if h3 is not None:
        p()
        p("HTTP/3 (gtlsclient, one connection, all requests on it). Server on CPU0; client on CPU1.")
        p("  req/s = requests / client wall time (handshake included); connect = fresh connection + 1 request")
        p("  cpu = the server's CPU share; client = gtlsclient's; cpu0 = whole CPU0 busy share; steal = hypervisor steal")
        p(f"  {'server':<44}{'requests':>9}{'req/s':>9}{'cpu':>6}{'req/s/core':>12}{'client':>8}{'cpu0':>6}{'steal':>7}{'connect ms':>12}")
        for r in h3["servers"].values():
            m = r["median"]
            p(f"  {r['label']:<44}{r['requests_per_run']:>9}{fmt(m['rps']):>9}{fmt(m['server_cpu_share'], '.2f'):>6}"
              f"{fmt(m['rps_per_core']):>12}{fmt(m['client_cpu_share'], '.2f'):>8}{fmt(m['cpu0_busy'], '.2f'):>6}"
              f"{fmt(m['steal'], '.2f'):>7}{fmt(m['connect_plus_1_request_ms'], '.1f'):>12}")
        for key, r in h3["ratios"].items():
            base = "aioquic example server (bare ASGI app)" if key == "aioquic" else "aioquic example server (demo app, for information)"
            target = f"(target >= {r['target']})" if r["target"] else ""
            p(f"  edgeproxy/{base}: {fmt(r['ratio'], '.2f')} {target} {r['verdict']}")
    if report["flags"]:
        p()
        p("FLAGGED (measured, but read with care):")
        for f in report["flags"]:
            p("  - " + f)
    if report["errors"]:
        p()
        p("NOT MEASURED / FLAGGED:")
        for e in report["errors"]:
            p("  - " + e.replace("\n", "\n    "))
    p()
    p(f"results: {report['results_file']}")


# ---------------------------------------------------------------------------------------------


def check_prerequisites() -> None:
    missing = [c for c in ("wrk", "gtlsclient", "taskset") if shutil.which(c) is None]
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        missing.append("nginx")
    if missing:
        raise BenchError(f"missing commands: {', '.join(missing)} (./run setup installs them)")
    cpus = os.sched_getaffinity(0)
    if not {int(SUT_CPU), int(LOAD_CPU)} <= cpus:
        raise BenchError(f"needs CPUs {SUT_CPU} and {LOAD_CPU}; this process may use {sorted(cpus)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per timed run (default 10)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per scenario; medians are reported (default 3)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per scenario (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 run of 3 s, 1 s warm-up")
    ap.add_argument("--only", choices=("h1", "h3"), help="run one section only")
    ap.add_argument("--h3-requests", type=int, default=0, help="HTTP/3 requests per run for every server (default: what each serves in about --duration s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.runs, args.warmup = 3, 1, 1
    if args.duration < 1 or args.runs < 1 or args.warmup < 1:
        ap.error("--duration, --runs and --warmup must be at least 1")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    # Turned into an exception so the finally blocks stop every service and remove the temp dir.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        check_prerequisites()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"duration_s": args.duration, "runs": args.runs, "warmup_s": args.warmup, "wrk": "-t1 -c64 --latency",
                     "sut_cpu": int(SUT_CPU), "load_cpu": int(LOAD_CPU)},
        "host": {"cpus": os.cpu_count(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                 "python": platform.python_version(), "kernel": platform.release(),
                 "nginx": _version([nginx_binary(), "-v"]), "wrk": _version(["wrk", "-v"]),
                 "ngtcp2-client": _version(["dpkg-query", "-W", "-f", "${Version}", "ngtcp2-client"])},
    }
    tmp = Path(tempfile.mkdtemp(prefix="edgeproxy-bench-"))
    s = Setup(tmp=tmp, services=Services(tmp))
    try:
        s.cert, s.key = tmp / "cert.pem", tmp / "key.pem"
        configs.write_self_signed(s.cert, s.key)
        try:
            start_origin(s)
        except BenchError as e:
            s.errors.append(f"origin nginx: {e}")
        if s.origin is not None:
            if args.only != "h3":
                try:
                    start_nginx_peer(s)
                except BenchError as e:
                    s.errors.append(f"nginx peer: {e}")
            try:
                start_edgeproxy(s)
            except BenchError as e:
                s.errors.append(f"edgeproxy: {e}")
            if args.only != "h3":
                report["h1"] = run_h1(s, args)
            if args.only != "h1":
                report["h3"] = run_h3(s, args)
    finally:
        s.services.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report["errors"] = s.errors
    report["flags"] = s.flags
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    report["results_file"] = str(out.relative_to(BENCH_DIR.parent))
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    return 1 if s.errors else 0


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else "?"


if __name__ == "__main__":
    sys.exit(main())
