"""edgeproxy-lab for real (root + bird2): `up` the default topology, BGP, anycast HTTP from a client
namespace, a withdraw flap moving the client to another PoP and back, `down` leaving nothing behind
(also after the supervisor is killed, and after `up` itself is killed mid-way)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.state import StateDir, proc_starttime

pytestmark = [pytest.mark.root, pytest.mark.slow]

_missing = [t for t in ("ip", "bird", "birdc", "curl") if shutil.which(t) is None]
if os.geteuid() != 0:
    pytest.skip("edgeproxy-lab tests need root (network namespaces)", allow_module_level=True)
if _missing:
    pytest.skip(f"edgeproxy-lab tests need {', '.join(_missing)} (apt-get install bird2 iproute2 curl)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


def lab(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"edgeproxy-lab {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def our_namespaces(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"epl-{run_id}-")]


def live_pids(records: list[dict[str, Any]]) -> list[int]:
    return [r["pid"] for r in records if proc_starttime(r["pid"]) == r.get("starttime")]


def assert_nothing_left(run_id: str, records: list[dict[str, Any]], state_dir: Path) -> None:
    assert our_namespaces(run_id) == []
    assert live_pids(records) == []
    assert not state_dir.exists()


def teardown(run_id: str, state_dir: Path) -> None:
    """Always runs: `down` (idempotent), then checks nothing is left."""
    records = StateDir(state_dir).processes()
    if state_dir.exists():
        lab("down", "--state-dir", str(state_dir), check=False)
    assert_nothing_left(run_id, records, state_dir)


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[str, Path]]:
    run_id = "t" + secrets.token_hex(3)
    state_dir = Path("/run/edgeproxy-lab") / run_id
    try:
        lab("up", "--run-id", run_id, "--timeout", "40", timeout=90)
        yield run_id, state_dir
    finally:
        teardown(run_id, state_dir)


def curl_pop(run_id: str, client: str = "c1") -> str:
    r = subprocess.run(["ip", "netns", "exec", f"epl-{run_id}-{client}", "curl", "-s", "--noproxy", "*", "-m", "5",
                        "-o", "/dev/null", "-D", "-", "http://203.0.113.1/"], capture_output=True, text=True, timeout=10)
    for line in r.stdout.splitlines():
        if line.lower().startswith("x-edge-pop:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no x-edge-pop header from {client}: exit {r.returncode} {r.stdout!r} {r.stderr!r}")


def status(state_dir: Path) -> dict[str, Any]:
    return json.loads(lab("status", "--state-dir", str(state_dir), "--json").stdout)


def test_bgp_established(running: tuple[str, Path]) -> None:
    _, state_dir = running
    deadline = time.monotonic() + 15
    while True:
        s = status(state_dir)
        if s["sessions"] and all(v["established"] for v in s["sessions"].values()):
            break
        assert time.monotonic() < deadline, f"sessions not Established: {s['sessions']}"
        time.sleep(0.5)
    assert set(s["sessions"]) == {"bgp_p1", "bgp_p2", "bgp_p3"}
    assert s["best_path"]["pops"] == ["p1"]  # local_pref p1 > p2 > p3
    assert all(p["announcing"] and p["health"]["healthy"] for p in s["pops"].values()), s["pops"]
    imp = s["impairments"][0]
    assert imp["delay_ms"]["in_force"] and imp["rate_mbit"]["in_force"]
    assert imp["loss"]["in_force"] == (shutil.which("nft") is not None)


def test_anycast_http_reaches_a_pop(running: tuple[str, Path]) -> None:
    run_id, _ = running
    assert curl_pop(run_id, "c1") == "p1"
    assert curl_pop(run_id, "c2") == "p1"  # through the delayed, shaped, lossy link
    r = subprocess.run(["ip", "netns", "exec", f"epl-{run_id}-c2", "curl", "-s", "--noproxy", "*", "-m", "5", "-o", "/dev/null",
                        "-w", "%{time_connect}", "http://203.0.113.1/"], capture_output=True, text=True, timeout=10)
    assert float(r.stdout) >= 0.019  # 10 ms each way on the wire


def test_withdraw_flap_moves_traffic_and_back(running: tuple[str, Path]) -> None:
    run_id, state_dir = running
    sd = str(state_dir)
    down = json.loads(lab("flap", "--state-dir", sd, "--method", "withdraw", "--pop", "p1", "--action", "down", "--json").stdout)
    assert down["route_before"] == ["p1"] and down["route_after"] == ["p2"]
    assert down["fib_ms"] is not None and 0 <= down["fib_ms"] < 1000
    assert curl_pop(run_id) == "p2"
    up = json.loads(lab("flap", "--state-dir", sd, "--method", "withdraw", "--pop", "p1", "--action", "up", "--json").stdout)
    assert up["route_after"] == ["p1"] and up["fib_ms"] is not None
    assert curl_pop(run_id) == "p1"
    # a full cycle with the router-side method: local_pref demotion and back
    out = lab("flap", "--state-dir", sd, "--method", "localpref", "--pop", "p1", "--hold", "0.3", "--json").stdout
    entries = [json.loads(line) for line in out.splitlines()]
    assert [(e["action"], e["route_after"]) for e in entries] == [("down", ["p2"]), ("up", ["p1"])]
    assert all(e["fib_ms"] is not None for e in entries)
    logged = (state_dir / "flaps.jsonl").read_text().splitlines()
    assert len(logged) == 4 and all("fib_ts" in json.loads(line) for line in logged)
    assert curl_pop(run_id) == "p1"


def test_down_after_supervisor_crash(running: tuple[str, Path]) -> None:
    run_id, state_dir = running
    records = StateDir(state_dir).processes()
    sup = next(r for r in records if r["role"] == "supervisor")
    os.kill(sup["pid"], signal.SIGKILL)
    r = lab("down", "--state-dir", str(state_dir))
    assert "removed 9 namespaces" in r.stdout
    assert_nothing_left(run_id, records, state_dir)


def test_down_after_up_is_killed() -> None:
    run_id = "k" + secrets.token_hex(3)
    state_dir = Path("/run/edgeproxy-lab") / run_id
    journal = state_dir / "resources.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", "--run-id", run_id], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until daemons are being started
            if journal.exists() and '"kind": "proc"' in journal.read_text():
                break
            time.sleep(0.02)
        proc.kill()  # a crash: no chance to clean up
        proc.wait(timeout=10)
        assert our_namespaces(run_id), "up was killed before creating anything"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        teardown(run_id, state_dir)


def test_status_marks_edgeproxy_records_replaced_by_a_restart() -> None:
    from lab.netns import process_table

    recs = [
        {"role": "bird", "ns": "epl-x-p1", "pid": 10},
        {"role": "edgeproxy", "ns": "epl-x-p1", "pid": 11},
        {"role": "edgeproxy", "ns": "epl-x-p2", "pid": 12},
        {"role": "fibmon", "ns": "epl-x-r", "pid": 13},
        {"role": "edgeproxy", "ns": "epl-x-p1", "pid": 21},  # the drain's restart of p1
    ]
    table = process_table(recs, lambda r: r["pid"] != 11)
    assert [(r["pid"], r["alive"], r["replaced"]) for r in table] == [
        (10, True, False), (11, False, True), (12, True, False), (21, True, False)
    ]
