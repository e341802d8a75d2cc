"""`edgeproxy-lab load`, `drain` and `demo`.

  load   start lab/load.py in client namespaces (journalled like every lab process), show their
         progress, wait for them (bounded) and print the survival summary.
  drain  take a PoP out of service and back (lab/load_drain.py).
  demo   up -> load with periodic or random flaps and one drain -> report -> down (always, also on
         error or Ctrl-C); prints the summary and exits 1 when a connection did not survive or a
         request failed (CI gate), 2 when the demo itself could not run.

`--no-survival` (demo): the baseline run: `up` with the lab setting `survival = false`, so the PoP
configs have no backhaul (no QUIC forwarding) and no TCP steering: TCP connections that a flap
moves to another PoP are reset there; QUIC packets reaching another PoP are dropped, so QUIC
connections stall (and outlast a short flap only by retransmission).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .state import BASE_DIR, StateDir, alive, spawn, terminate

Log = Callable[[str], None]


# -- load processes ---------------------------------------------------------------------------------

@dataclass
class LoadProc:
    client: str
    ns: str
    pid: int
    out: Path
    log: Path


def load_argv(client: str, out: Path, a: argparse.Namespace, *, baseline: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "lab.load", "--out", str(out), "--client", client,
            "--h3", str(a.h3), "--h1", str(a.h1), "--streams", str(a.streams), "--stream-mb", str(a.stream_mb),
            "--rate", str(a.rate), "--duration", str(a.duration), "--max-requests", str(a.max_requests),
            "--timeout", str(a.req_timeout), "--path", a.path]
    return [*argv, "--baseline"] if baseline else argv


def start_load(state: StateDir, a: argparse.Namespace, *, baseline: bool = False, tag: str = "") -> list[LoadProc]:
    """One load process per client namespace (or those in --clients). Call with no other threads
    running (the child journals itself before exec)."""
    from .netns import load_plan, python_env

    plan = load_plan(state)
    clients = [n for n in plan.nodes.values() if n.kind == "client"]
    if a.clients:
        want = a.clients.split(",")
        unknown = [c for c in want if c not in {n.name for n in clients}]
        if unknown:
            raise ValueError(f"--clients: no client {', '.join(unknown)} (clients: {', '.join(n.name for n in clients)})")
        clients = [n for n in clients if n.name in want]
    out_dir = state.path / "load"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = tag or time.strftime("%H%M%S")
    procs = []
    for n in clients:
        out = out_dir / f"{n.name}-{stamp}.json"
        log = out_dir / f"{n.name}-{stamp}.log"
        pid = spawn(state, "load", n.ns, load_argv(n.name, out, a, baseline=baseline), log, env=python_env())
        procs.append(LoadProc(n.name, n.ns, pid, out, log))
    return procs


def _starttime(state: StateDir, pid: int) -> int | None:
    for r in state.processes():
        if r["pid"] == pid and r["role"] == "load":
            return r.get("starttime")
    return None


def last_progress(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((ln for ln in reversed(lines) if ln.startswith("[")), "")


def wait_load(state: StateDir, procs: list[LoadProc], timeout: float, *, show: bool = True) -> list[LoadProc]:
    """Waits (at most `timeout` s) for the load processes to exit, relaying their progress lines;
    returns those still running."""
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    last_print = 0.0
    starts = {p.pid: _starttime(state, p.pid) for p in procs}
    while time.monotonic() < deadline:
        running = [p for p in procs if alive(p.pid, starts[p.pid])]
        if not running:
            break
        if show and time.monotonic() - last_print >= (0.5 if tty else 5.0):
            line = "  ".join(x for x in (last_progress(p.log) for p in procs) if x)
            if line:
                sys.stderr.write(("\r" + line[:200] + "\x1b[K") if tty else line + "\n")
                sys.stderr.flush()
            last_print = time.monotonic()
        time.sleep(0.2)
    if show and tty:
        sys.stderr.write("\n")
    return [p for p in procs if alive(p.pid, starts[p.pid])]


def stop_load(state: StateDir, procs: list[LoadProc]) -> None:
    """SIGTERM (the load writes its results and exits), SIGKILL after a grace period."""
    terminate([(p.pid, _starttime(state, p.pid)) for p in procs], grace=10.0)


def read_results(procs: list[LoadProc]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(p.out.read_text()))
    return out


# -- schedule (pure) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    at: float  # seconds after the load started
    kind: str  # "flap" | "drain"
    method: str = ""


def plan_events(duration: float, schedule: str, methods: list[str], *, drain_at: float | None, warmup: float = 3.0,
                hold: float = 2.0, drain_span: float = 6.0, max_flaps: int = 100) -> list[Event]:
    """Flap times from `schedule` (none | periodic:5s | random:SEED:MEAN, as `flap --schedule`),
    in [warmup, duration - hold - 3], none within the drain's span; methods in turn."""
    from .observe import parse_schedule

    events: list[Event] = []
    end = duration - hold - 3.0
    if schedule != "none":
        sched = parse_schedule(schedule)
        t = warmup
        i = 0
        for gap in sched.intervals(max_flaps if sched.kind != "once" else 1):
            t += gap
            if t > end:
                break
            if drain_at is not None and drain_at - hold - 1.0 <= t <= drain_at + drain_span:
                continue
            events.append(Event(round(t, 3), "flap", methods[i % len(methods)]))
            i += 1
            t += hold  # a flap cycle takes `hold` s; gaps are counted from its end
    if drain_at is not None and warmup <= drain_at <= duration - 3.0:
        events.append(Event(round(drain_at, 3), "drain"))
    return sorted(events, key=lambda e: e.at)


# -- commands ---------------------------------------------------------------------------------------

def add_load_args(p: argparse.ArgumentParser, *, duration: float) -> None:
    p.add_argument("--clients", default="", help="client nodes to load from (default: all), e.g. c1,c2")
    p.add_argument("--h3", type=int, default=4, help="HTTP/3 connections per client (default 4)")
    p.add_argument("--h1", type=int, default=4, help="HTTP/1.1 keep-alive connections per client (default 4)")
    p.add_argument("--streams", type=int, default=1, help="streaming-download connections per client (default 1)")
    p.add_argument("--stream-mb", type=int, default=4, help="MiB per download (default 4)")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per connection (default 5)")
    p.add_argument("--path", default="/time", help="request path (default /time: never cached, goes to the origin)")
    p.add_argument("--duration", type=float, default=duration, help=f"seconds of load (default {duration:g})")
    p.add_argument("--max-requests", type=int, default=200_000, help="most requests per client")
    p.add_argument("--req-timeout", type=float, default=5.0, help="seconds without an answer = timed out (default 5)")


def add_subcommands(sub: Any, add_where: Callable[[argparse.ArgumentParser], None]) -> None:
    load = sub.add_parser("load", help="HTTP/3 + HTTP/1.1 load from the client namespaces; survival summary")
    add_where(load)
    add_load_args(load, duration=30.0)
    load.add_argument("--out", help="also write the report (report.json, report.html) to this directory")
    load.add_argument("--background", action="store_true", help="start the load and return (results in <state>/load/)")

    drain = sub.add_parser("drain", help="drain a PoP through edgeproxy (today: graceful stop), then bring it back")
    add_where(drain)
    drain.add_argument("pop")
    drain.add_argument("--no-restart", action="store_true", help="leave the PoP drained (edgeproxy stopped)")
    drain.add_argument("--hold", type=float, default=2.0, help="seconds drained before the restart (default 2)")
    drain.add_argument("--withdraw-first", action="store_true", help="withdraw the route, wait --grace s, then stop")
    drain.add_argument("--grace", type=float, default=1.0)
    drain.add_argument("--timeout", type=float, default=20.0, help="bound on each wait (default 20 s)")

    demo = sub.add_parser("demo", help="up, load with flaps and a drain, report, down; exit 1 if anything did not survive")
    demo.add_argument("--topology", "-t", default=None, help="topology file (default: the lab's default)")
    demo.add_argument("--run-id", help="run id (default: random)")
    demo.add_argument("--policy", choices=("localpref", "ecmp"), help="router policy override")
    demo.add_argument("--report", default=None, help="report directory (default ./edgeproxy-lab-report-<run-id>)")
    demo.add_argument("--no-survival", action="store_true",
                      help="baseline: survival features off (no QUIC forwarding, no TCP steering)")
    demo.add_argument("--schedule", default="periodic:1s",
                      help="flap schedule: none | periodic:1s (default: about 22 flaps a minute) | random:SEED:MEAN")
    demo.add_argument("--methods", default="withdraw,localpref", help="flap methods, used in turn (default withdraw,localpref)")
    demo.add_argument("--flap-pops", default="best", help="'best' (a PoP on the router's best path at that moment) or a list, e.g. p1,p2")
    demo.add_argument("--hold", type=float, default=0.8, help="seconds a flapped or drained PoP stays out (default 0.8)")
    demo.add_argument("--no-drain", action="store_true", help="no drain during the demo")
    demo.add_argument("--drain-pop", default="best", help="PoP to drain (default: the best path's)")
    demo.add_argument("--seed", type=int, default=1, help="seed for PoP choice")
    demo.add_argument("--no-external", action="store_true",
                      help="do not run the external clients (gtlsclient, curl) from c1 during the load")
    add_load_args(demo, duration=60.0)


def cmd_load(args: argparse.Namespace, state: StateDir) -> int:
    from .report import format_summary, read_jsonl, write_report

    procs = start_load(state, args)
    for p in procs:
        print(f"load {p.client}: pid {p.pid} in {p.ns}, results {p.out}, log {p.log}")
    if args.background:
        return 0
    try:
        left = wait_load(state, procs, args.duration + args.req_timeout + 30)
    except KeyboardInterrupt:
        left = procs
    if left:
        stop_load(state, left)
    results = read_results(procs)
    if not results:
        print("edgeproxy-lab load: no results (see the logs above)", file=sys.stderr)
        return 2
    flaps = read_jsonl(state.path / "flaps.jsonl")
    t0 = min(r["meta"]["started"] for r in results)
    flaps = [f for f in flaps if float(f.get("ts", 0)) >= t0 - 1]
    if args.out:
        report = write_report(args.out, results, flaps)
        print(f"report: {args.out}/report.json, {args.out}/report.html")
    else:
        from .report import summarize
        report = summarize(results, flaps)
    print(format_summary(report))
    return 0 if report["ok"] else 1


def cmd_drain(args: argparse.Namespace, state: StateDir) -> int:
    from .load_drain import drain

    entries = drain(state, args.pop, restart=not args.no_restart, hold=args.hold, withdraw_first=args.withdraw_first,
                    grace=args.grace, timeout=args.timeout)
    return 0 if all(e.get("ok") for e in entries) else 1


def _survival_override() -> dict[str, Any]:
    """{"survival": False} once the lab's topology settings have that switch (else nothing)."""
    from .topology import LabSettings

    return {"survival": False} if "survival" in {f.name for f in dataclasses.fields(LabSettings)} else {}


def _pick_pop(plan: Any, state: StateDir, want: str, rng: random.Random, turn: int) -> str | None:
    from .flap import _route

    if want == "best":
        _, best = _route(plan)
        best = [p for p in best if p in plan.nodes]
        return rng.choice(best) if best else None
    pops = [p for p in want.split(",") if p]
    return pops[turn % len(pops)] if pops else None


def cmd_demo(args: argparse.Namespace, log: Log = print) -> int:
    from . import netns
    from .flap import flap
    from .load_drain import drain
    from .observe import Schedule
    from .report import format_summary, read_jsonl, write_report
    from .topology import DEFAULT_TOPOLOGY

    run_id = args.run_id or "d" + secrets.token_hex(3)
    state_dir = BASE_DIR / run_id
    report_dir = Path(args.report or f"edgeproxy-lab-report-{run_id}")
    methods = [m for m in args.methods.split(",") if m]
    drain_at = None if args.no_drain else round(args.duration * 0.6, 1)
    try:
        events = plan_events(args.duration, args.schedule, methods or ["withdraw"], drain_at=drain_at, hold=args.hold)
    except ValueError as e:
        log(f"edgeproxy-lab demo: --schedule: {e}")
        return 2
    topo_text = Path(args.topology or DEFAULT_TOPOLOGY).read_text("utf-8")
    overrides: dict[str, Any] = {}
    if args.policy:
        overrides["router_policy"] = args.policy
    if args.no_survival:
        overrides.update(_survival_override())
        log("baseline (--no-survival): " + ("survival features off" if overrides.get("survival") is False else
            "the lab has no switch for the survival features yet: this run is the same as a normal one"))

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    state = StateDir(state_dir)
    procs: list[LoadProc] = []
    ext: LoadProc | None = None
    report: dict[str, Any] | None = None
    t_start = time.monotonic()
    try:
        plan = netns.up(topo_text, run_id, state_dir, overrides=overrides, timeout=60.0, log=log)  # removes itself on failure
        procs = start_load(state, args, baseline=args.no_survival, tag="demo")
        if not args.no_external:
            from .external import start_external
            ext = start_external(state, plan, args.duration, log=log)
        load_t0 = time.monotonic()
        log(f"load: {len(procs)} clients x ({args.h3} HTTP/3 + {args.h1} HTTP/1.1 at {args.rate:g} req/s + {args.streams} "
            f"downloads) for {args.duration:g} s; {sum(e.kind == 'flap' for e in events)} flaps and "
            f"{sum(e.kind == 'drain' for e in events)} drain planned")
        rng = random.Random(args.seed)
        for i, ev in enumerate(events):
            wait = load_t0 + ev.at - time.monotonic()
            if wait > 0:
                wait_load(state, procs, wait)
            if not any(alive(p.pid, None) for p in procs):
                log("load processes ended early; no more flaps")
                break
            if ev.kind == "flap":
                pop = _pick_pop(plan, state, args.flap_pops, rng, i)
                if pop is None:
                    log(f"t+{ev.at:g}s: no PoP on the best path; flap skipped")
                    continue
                flap(state, ev.method, pop, Schedule("once"), hold=args.hold, log=lambda s: log(f"t+{time.monotonic() - load_t0:.1f}s {s}"))
            else:
                pop = _pick_pop(plan, state, args.drain_pop, rng, i)
                if pop is None:
                    continue
                drain(state, pop, hold=args.hold, log=lambda s: log(f"t+{time.monotonic() - load_t0:.1f}s {s}"))
        left = wait_load(state, procs, max(0.0, load_t0 + args.duration - time.monotonic()) + args.req_timeout + 20)
        if left:
            stop_load(state, left)
        if ext is not None:
            from .external import stop_external
            stop_external(state, ext)
        results = read_results(procs)
        if not results:
            raise RuntimeError("no load results (see the load logs)")
        flaps = read_jsonl(state.path / "flaps.jsonl")
        external = read_jsonl(ext.out) if ext is not None else None
        report = write_report(report_dir, results, flaps, external=external)
        report["run"]["baseline"] = bool(args.no_survival)
        (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    except KeyboardInterrupt:
        log("edgeproxy-lab demo: interrupted")
    except Exception as e:  # the lab comes down in any case (below)
        log(f"edgeproxy-lab demo: {type(e).__name__}: {e}")
    finally:
        if procs:
            with contextlib.suppress(Exception):
                stop_load(state, procs)
        if ext is not None:
            from .external import stop_external
            with contextlib.suppress(Exception):
                stop_external(state, ext)
        with contextlib.suppress(OSError):  # keep the raw material with the report; the state dir goes
            report_dir.mkdir(parents=True, exist_ok=True)
            raw = [f for p in procs + ([ext] if ext else []) for f in (p.out, p.log)] + [state.path / n for n in ("flaps.jsonl", "health.jsonl")]
            for f in raw:
                if f.exists():
                    shutil.copy(f, report_dir / f.name)
        if state.exists() and not (state.path / "down.json").exists():
            netns.down(state, log=log)
        log(f"demo took {time.monotonic() - t_start:.0f} s")
    if report is None:
        return 2
    print(f"report: {report_dir / 'report.json'}, {report_dir / 'report.html'}")
    print(format_summary(report))
    return 0 if report["ok"] else 1


def run_subcommand(args: argparse.Namespace, find_state: Callable[[argparse.Namespace], StateDir]) -> int:
    if args.command == "demo":
        return cmd_demo(args)
    if not (args.run_id or args.state_dir):  # load and drain disturb a lab: never pick one implicitly
        print(f"edgeproxy-lab {args.command}: give --run-id or --state-dir (the lab to {args.command})", file=sys.stderr)
        return 2
    try:
        state = find_state(args)
    except LookupError as e:  # nothing to load or drain: could not run (exit 2, like a usage error)
        print(f"edgeproxy-lab {args.command}: {e}", file=sys.stderr)
        return 2
    if not state.exists():
        print(f"edgeproxy-lab {args.command}: {state.path}: no lab here", file=sys.stderr)
        return 2
    if args.command == "load":
        return cmd_load(args, state)
    return cmd_drain(args, state)
