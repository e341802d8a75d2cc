"""The lab's load generator and demo.

Without root: the accounting (survival, errors, histogram), the HTTP/1.1 response parser, the demo's
event schedule, and the load generator itself against a PoP on loopback (HTTP/3 + HTTP/1.1 +
a streaming download) and against a server that resets a connection.
With root and bird2: a short `edgeproxy-lab demo` end to end (up, load, flaps, drain, report, down).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pop_helpers
import pytest

from lab import demo, load
from lab.load_stats import BUCKETS_MS, Accounting, bucket_index, histogram, percentile

REPO = Path(__file__).resolve().parent.parent


# -- accounting (pure) -------------------------------------------------------------------------------

def test_survival_rules() -> None:
    acc = Accounting("c1")
    ok, reset, never, retried = (acc.new_conn("tcp", "rr") for _ in range(4))
    for c in (ok, reset, retried):
        acc.handshake(c)
    acc.request(ok, 1.0, 2.0, 200, "p1")
    acc.request(ok, 2.0, 2.0, 503, "p2")  # an HTTP error: a failed request, the connection lives on
    assert ok.survived and ok.requests_failed == 1 and ok.pops == [[1.0, "p1"], [2.0, "p2"]]
    acc.request(reset, 1.0, 0.1, 0, "", "reset")
    acc.conn_error(reset, 1.0, "reset", "ConnectionResetError")
    assert not reset.survived and reset.errors[0][1] == "reset"
    acc.conn_error(never, 1.0, "connect", "refused")
    assert not never.survived  # never connected
    acc.conn_error(retried, 1.0, "timeout")
    acc.handshake(retried)
    assert not retried.survived and retried.handshakes == 2
    s = acc.summary(10.0)["tcp"]
    assert (s["connections"], s["survived"], s["resets"], s["timeouts"]) == (4, 1, 1, 1)
    assert s["requests_ok"] == 1 and s["requests_failed"] == 2
    assert s["errors"]["http"] == 1 and s["errors"]["reset"] == 1
    assert acc.requests[1][4:] == ["p2", "http"]
    assert acc.requests[2][4] == ""  # no PoP ever answered on that connection


def test_failed_request_is_charged_to_the_last_pop() -> None:
    acc = Accounting("c1")
    c = acc.new_conn("quic", "rr")
    acc.handshake(c)
    acc.request(c, 1.0, 1.0, 200, "p2")
    acc.request(c, 2.0, 5000.0, 0, "", "timeout")
    assert acc.requests[-1][4:] == ["p2", "timeout"]


def test_max_requests_bound() -> None:
    acc = Accounting("c1", max_requests=3)
    assert [acc.may_start() for _ in range(5)] == [True, True, True, False, False]


def test_histogram_and_percentile() -> None:
    assert bucket_index(0.1) == 0 and bucket_index(1.0) == 1 and bucket_index(1e6) == len(BUCKETS_MS)
    h = histogram([0.2, 0.9, 4.0, 4.5, 20000.0])
    assert sum(h["counts"]) == 5 and h["counts"][-1] == 1 and h["counts"][bucket_index(4.0)] == 2
    assert percentile([], 50) is None
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile(list(range(1, 101)), 99) == 99
    assert percentile([7.0], 99) == 7.0


def test_progress_line() -> None:
    acc = Accounting("c2")
    c = acc.new_conn("quic", "rr")
    acc.handshake(c)
    acc.request(c, 1.0, 3.0, 200, "p1")
    line = acc.progress(2.0)
    assert line.startswith("[c2]") and "quic 1/1 intact" in line and "req 1 ok 1 failed 0" in line


def test_parse_head() -> None:
    status, headers = load.parse_head(b"HTTP/1.1 200 OK\r\nX-Edge-Pop: p3\r\nContent-Length: 5")
    assert status == 200 and load.header_pop(headers) == "p3" and headers["content-length"] == "5"
    with pytest.raises(load.RequestError) as e:
        load.parse_head(b"SSH-2.0-nope")
    assert e.value.kind == "protocol"


def test_cli_validation() -> None:
    args = load.build_parser().parse_args(["--out", "x", "--rate", "0"])
    assert load.validate(args) == "--rate must be > 0"
    args = load.build_parser().parse_args(["--out", "x", "--h3", "0", "--h1", "0", "--streams", "0"])
    assert load.validate(args) is not None
    assert load.validate(load.build_parser().parse_args(["--out", "x"])) is None


def test_demo_schedule() -> None:
    ev = demo.plan_events(60, "periodic:8s", ["withdraw", "localpref"], drain_at=36.0, hold=2.0)
    flaps = [e for e in ev if e.kind == "flap"]
    assert [e.at for e in flaps] == [3.0, 13.0, 23.0, 49.0]  # 33 and 41 fall in the drain's span
    assert not any(36.0 - 3.0 <= e.at <= 46.0 for e in flaps)  # none near the drain
    assert [e.method for e in flaps][:2] == ["withdraw", "localpref"]
    assert [e.at for e in ev if e.kind == "drain"] == [36.0]
    assert [e.at for e in ev] == sorted(e.at for e in ev)
    assert demo.plan_events(20, "none", ["withdraw"], drain_at=None) == []
    assert len(demo.plan_events(600, "random:7:5s", ["withdraw"], drain_at=None, max_flaps=4)) == 4
    with pytest.raises(ValueError):
        demo.plan_events(60, "sometimes", ["withdraw"], drain_at=None)


def test_load_and_drain_need_an_explicit_lab(capsys: pytest.CaptureFixture[str]) -> None:
    from lab import cli

    assert cli.main(["load"]) == 2
    assert cli.main(["drain", "p1"]) == 2
    assert "give --run-id or --state-dir" in capsys.readouterr().err


# -- the load generator on loopback -----------------------------------------------------------------

def _args(**kw: Any) -> argparse.Namespace:
    argv = ["--out", "unused", "--client", "t", "--target", "127.0.0.1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = load.build_parser().parse_args(argv)
    assert load.validate(args) is None
    return args


async def test_load_against_a_loopback_pop(tmp_path: Path) -> None:
    async with pop_helpers.running_pop(tmp_path, quic=True) as rp:
        args = _args(port=rp.http[1], quic_port=rp.quic[1], h3=2, h1=2, streams=1, stream_mb=1, rate=20,
                     duration=2.0, progress=0.5)
        result = await load.Load(args).run()
    s = result["summary"]
    assert s["quic"]["connections"] == 2 and s["quic"]["survived"] == 2, result["connections"]
    assert s["tcp"]["connections"] == 3 and s["tcp"]["survived"] == 3, result["connections"]
    assert s["quic"]["requests_failed"] == 0 and s["tcp"]["requests_failed"] == 0
    assert s["quic"]["requests_ok"] >= 40 and s["tcp"]["requests_ok"] >= 40
    assert {r[4] for r in result["requests"]} == {"test-pop"}  # x-edge-pop of every answer
    assert s["tcp"]["download_bytes"] >= 1 << 20 and result["downloads"][0][4] is True
    assert all(c["handshakes"] == 1 for c in result["connections"])
    json.dumps(result)  # what the load process writes


async def test_reset_and_close_are_counted(tmp_path: Path) -> None:
    """A server that resets the first connection after 3 answers: that connection does not
    survive (reset, then a new handshake); the other one does."""
    conns = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        me = conns
        n = 0
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                n += 1
                if me == 1 and n == 4:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nx-edge-pop: px\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await load.Load(_args(port=port, h3=0, h1=2, streams=0, rate=20, duration=1.0)).run()
    finally:
        server.close()
        await server.wait_closed()
    c0, c1 = result["connections"]
    assert not c0["survived"] and c0["handshakes"] == 2 and c0["resets"] + c0["closed"] == 1
    assert c1["survived"] and c1["requests_failed"] == 0
    assert result["summary"]["tcp"]["requests_failed"] == 1
    failed = [r for r in result["requests"] if r[5]]
    assert failed[0][4] == "px" and failed[0][5] in ("reset", "closed")


# -- the demo for real (root + bird2) ------------------------------------------------------------------

ROOT_MISSING = [t for t in ("ip", "bird", "birdc") if shutil.which(t) is None]


def _our_namespaces(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"epl-{run_id}-")]


def _run_demo(run_id: str, report_dir: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--run-id", run_id, "--report", str(report_dir),
                        "--h3", "2", "--h1", "2", "--streams", "1", "--rate", "5", *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout)
    print(f"demo {run_id} ({time.monotonic() - t0:.0f} s, exit {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
    assert _our_namespaces(run_id) == [], "the demo left namespaces behind"
    assert not (Path("/run/edgeproxy-lab") / run_id).exists(), "the demo left its state directory"
    assert r.returncode in (0, 1), f"the demo could not run: exit {r.returncode}"
    return r, json.loads((report_dir / "report.json").read_text())


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or bool(ROOT_MISSING), reason="needs root and bird2")
def test_demo_flap_free_then_with_flaps(tmp_path: Path) -> None:
    """≤ 90 s: a flap-free demo (every TCP connection survives, no request fails), then a short demo
    with flaps and a drain (report structure; survival figures printed, asserted only where they
    hold today)."""
    run_id = "l" + secrets.token_hex(3)
    r, rep = _run_demo(run_id, tmp_path / "calm", "--duration", "12", "--schedule", "none", "--no-drain", timeout=80)
    for key in ("flaps", "quic", "tcp", "load", "run", "ok", "failures"):
        assert key in rep
    assert rep["flaps"]["count"] == 0
    assert rep["tcp"]["connections"] == 2 * 3 and rep["tcp"]["survived"] == rep["tcp"]["connections"], rep["tcp"]
    assert rep["tcp"]["requests_failed"] == 0 and rep["tcp"]["requests_ok"] > 0
    assert rep["quic"]["connections"] == 2 * 2 and rep["quic"]["requests_ok"] > 0
    assert "RESULT:" in r.stdout and (tmp_path / "calm" / "report.html").exists()

    run_id = "l" + secrets.token_hex(3)
    r, rep = _run_demo(run_id, tmp_path / "flaps", "--duration", "30", "--schedule", "periodic:4s", timeout=120)
    assert rep["flaps"]["count"] >= 2 and rep["flaps"]["drains"] == 1
    assert set(rep["flaps"]["methods"]) <= {"withdraw", "localpref"}
    for proto in ("quic", "tcp"):
        e = rep[proto]
        for key in ("connections", "survived", "requests_ok", "requests_failed", "latency_ms", "latency_ms_after_flap"):
            assert key in e
        assert set(e["latency_ms"]) >= {"p50", "p99", "max"}
        assert e["requests_ok"] > 0
    assert (r.returncode == 0) == rep["ok"]
    html = (tmp_path / "flaps" / "report.html").read_text()
    assert html.count('class="flap"') == rep["flaps"]["events"] and html.count('class="drain"') == 2
    with contextlib.suppress(OSError):
        print((tmp_path / "flaps" / "flaps.jsonl").read_text()[-2000:])
