"""The lab's survival scenario in CI (root + bird2): `edgeproxy-lab demo` with periodic route flaps
and one drain must keep every QUIC and TCP connection and every request; the `--no-survival`
baseline (no QUIC forwarding, no TCP steering) must lose connections under the same flaps.
About 2 minutes in all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

_missing = [t for t in ("ip", "bird", "birdc") if shutil.which(t) is None]
if os.geteuid() != 0:
    pytest.skip("lab survival scenario needs root (network namespaces)", allow_module_level=True)
if _missing:
    pytest.skip(f"lab survival scenario needs {', '.join(_missing)} (apt-get install bird2 iproute2)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent


def demo(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], str]:
    run_id = "s" + secrets.token_hex(3)
    report_dir = tmp_path / run_id
    r = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--run-id", run_id, "--report", str(report_dir), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"epl-{run_id}-" not in listed, f"demo left namespaces behind\n{out}"
    assert not Path(f"/run/edgeproxy-lab/{run_id}").exists(), f"demo left its state dir\n{out}"
    report_file = report_dir / "report.json"
    assert report_file.exists(), f"no report\n{out}"
    return r, json.loads(report_file.read_text()), out


def test_connections_survive_flaps_and_a_drain(tmp_path: Path) -> None:
    # Load from c1 only: c2's link is deliberately lossy (1%, 10 ms), and a TCP handshake that
    # loses a packet stays half-open across a flap at one flap a second; half-open connections
    # are not in the flow table yet (only accepted ones are published), so such a connection can
    # be reset. That limit is shown by the full demo (./run demo), not gated on here.
    r, report, out = demo(tmp_path, "--duration", "45", "--h3", "3", "--h1", "3", "--clients", "c1", timeout=170)
    flaps = report["flaps"]
    assert flaps["count"] >= 12, out
    assert flaps["drains"] == 1, out
    assert flaps["failed_commands"] == 0, out
    for proto in ("quic", "tcp"):
        e = report[proto]
        assert e["connections"] > 0, out
        assert e["survived"] == e["connections"], f"{proto}: {e['not_survived']}\n{out}"
        assert e["requests_failed"] == 0 and e["requests_ok"] > 0, f"{proto}: {e['errors']}\n{out}"
    ext = report["external_clients"]
    for name in ("gtlsclient", "curl"):
        assert ext[name]["runs"] > 0 and ext[name]["failed"] == 0, f"{name}: {ext[name]}\n{out}"
    assert report["ok"] and r.returncode == 0, out


def test_without_survival_flaps_lose_connections(tmp_path: Path) -> None:
    # Losses can only show where TCP requests crossed the flaps. Once in about a dozen runs the
    # TCP load stopped at the first flap without an error or a timeout (4 requests near flaps
    # instead of 100+; not explained yet), which proves nothing either way: such a run is
    # repeated once, and the verdict is the repeat's.
    for attempt in range(2):
        r, report, out = demo(tmp_path / f"run{attempt}", "--no-survival", "--no-drain", "--duration", "15",
                              "--h3", "2", "--h1", "2", "--streams", "0", timeout=120)
        if report["tcp"]["requests_after_flap"] >= 20:
            break
        print(f"baseline run {attempt}: only {report['tcp']['requests_after_flap']} TCP requests near flaps\n{out}")
    assert report["run"]["baseline"] is True, out
    assert report["flaps"]["count"] >= 3, out
    lost = {p: report[p]["connections"] - report[p]["survived"] for p in ("quic", "tcp")}
    # TCP connections moved to a PoP without steering are reset. QUIC ones are not answered there
    # (no backhaul: dropped), so they may outlast a short flap by retransmission, late.
    assert lost["tcp"] > 0, f"baseline lost no TCP connection: {lost}\n{out}"
    assert not report["ok"] and r.returncode == 1, out
