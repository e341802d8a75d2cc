"""Ties a PoP's BGP announcement to its health: polls the PoP's admin /healthz and runs
`birdc disable anycast` after `fall` failures in a row, `birdc enable anycast` after `rise`
successes. It acts only on health transitions, so a withdraw flap done by hand stays in force
until the PoP's health changes. Runs inside the PoP's namespace, one process per PoP; writes
`<state>/<pop>/health.json` and appends transitions to `<state>/health.jsonl`.

    python -m lab.supervisor --state-dir DIR --pop p1 --url http://10.201.0.1:9901/healthz \
        --ctl DIR/p1/bird.ctl [--interval 0.5 --fall 2 --rise 2 --max-seconds 86400]
        [--relay-from http://10.201.0.1:9901 --relay-to http://10.201.0.2:9901,... --relay-interval 0.2]

With --relay-to it also stands in for flow-table replication (until gossip replicates it in
`edgeproxy run`): every --relay-interval s it reads the TCP flows its PoP published
(GET /steering?own=1) and merges them into the other PoPs (POST /steering/inject), so their
kernel steering sends a moved TCP connection's packets back to its owner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def probe(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status == 200, f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (OSError, ValueError) as e:
        return False, type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError) else "")


def birdc(ctl: str, *args: str) -> tuple[bool, str]:
    try:
        r = subprocess.run(["birdc", "-s", ctl, *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    text = (r.stdout + r.stderr).strip()
    return r.returncode == 0 and "Unable to connect" not in text, text


def relay_once(source: str, targets: list[str], timeout: float = 1.0) -> tuple[int, int]:
    """One relay round: (flows read, targets that took them)."""
    with _OPENER.open(f"{source}/steering?own=1&limit=1000000", timeout=timeout) as resp:
        own = json.loads(resp.read()).get("own", [])
    if not own:
        return 0, 0
    body = json.dumps(own).encode()
    ok = 0
    for t in targets:
        req = urllib.request.Request(f"{t}/steering/inject", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                ok += resp.status == 200
        except (OSError, ValueError):
            continue  # that PoP is down or restarting: next round
    return len(own), ok


def relay_loop(source: str, targets: list[str], interval: float, stop: threading.Event, deadline: float,
               state: Path) -> None:
    """Bounded: until `stop`, the deadline, or the state directory is gone."""
    while not stop.is_set() and time.monotonic() < deadline and state.is_dir():
        with contextlib.suppress(OSError, ValueError):
            relay_once(source, targets)
        stop.wait(interval)


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state = Path(args.state_dir)
        self.healthy: bool | None = None  # None until the first transition
        self.ok_run = 0
        self.fail_run = 0
        self.since = time.time()
        self.last = ""
        self.transitions = 0

    def _write(self) -> None:
        data = {"pop": self.args.pop, "healthy": self.healthy, "since": self.since, "last_probe": time.time(),
                "last_result": self.last, "transitions": self.transitions, "pid": os.getpid()}
        path = self.state / self.args.pop / "health.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)

    def _transition(self, healthy: bool) -> None:
        action = "enable" if healthy else "disable"
        ok, out = birdc(self.args.ctl, action, "anycast")
        if not ok:
            return  # BIRD not up yet (or gone); try again on the next probe
        self.healthy, self.since = healthy, time.time()
        self.transitions += 1
        with open(self.state / "health.jsonl", "a") as f:
            f.write(json.dumps({"ts": self.since, "pop": self.args.pop, "healthy": healthy,
                                "action": f"birdc {action} anycast", "bird": out.splitlines()[-1:],
                                "probe": self.last}) + "\n")

    def step(self) -> None:
        ok, self.last = probe(self.args.url, min(1.0, max(0.2, self.args.interval * 2)))
        self.ok_run, self.fail_run = (self.ok_run + 1, 0) if ok else (0, self.fail_run + 1)
        if self.healthy is not True and self.ok_run >= self.args.rise:
            self._transition(True)
        elif self.healthy is not False and self.fail_run >= self.args.fall:
            self._transition(False)
        self._write()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.supervisor")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--pop", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--ctl", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--fall", type=int, default=2)
    p.add_argument("--rise", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=86400.0, help="exit after this long")
    p.add_argument("--relay-from", default="", help="this PoP's admin base URL (flow relay source)")
    p.add_argument("--relay-to", default="", help="other PoPs' admin base URLs, comma-separated (flow relay)")
    p.add_argument("--relay-interval", type=float, default=0.2)
    args = p.parse_args(argv)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sup = Supervisor(args)
    deadline = time.monotonic() + args.max_seconds
    relay_stop = threading.Event()
    relay: threading.Thread | None = None
    targets = [t for t in args.relay_to.split(",") if t]
    if args.relay_from and targets:
        relay = threading.Thread(target=relay_loop, daemon=True, name="relay",
                                 args=(args.relay_from, targets, max(0.05, args.relay_interval), relay_stop, deadline, sup.state))
        relay.start()
    # Bounded: by time, by a signal, and by the state directory (gone after `down`).
    while not stop and time.monotonic() < deadline and sup.state.is_dir():
        started = time.monotonic()
        sup.step()
        time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    relay_stop.set()
    if relay is not None:
        relay.join(timeout=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
