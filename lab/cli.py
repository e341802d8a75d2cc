"""`edgeproxy-lab`: the network-namespace anycast lab.

  edgeproxy-lab check  [--topology FILE]                  validate a topology, print the address plan
  edgeproxy-lab up     [--topology FILE] [--run-id ID] [--policy localpref|ecmp]
  edgeproxy-lab status [--json]                           BGP sessions, best path, PoP health, impairments
  edgeproxy-lab flap   --method withdraw|localpref|link|ecmp --pop p1 [--schedule once|periodic:5s|random:SEED:MEAN]
  edgeproxy-lab exec   NODE -- CMD...                     run a command in a node's namespace
  edgeproxy-lab load   [--h3 N --h1 M --streams K --rate R --duration S] [--out DIR]
                                                          HTTP/3 + HTTP/1.1 load from the clients, survival summary
  edgeproxy-lab drain  POP [--no-restart]                 drain a PoP through POST /drain, then bring it back
  edgeproxy-lab demo   [--duration S] [--report DIR] [--no-survival] [--no-external]
                                                          up, load + flaps + a drain, report, down; exit 1 on any loss
  edgeproxy-lab down   [--keep-logs]                      remove exactly what `up` recorded

`up` keeps its state in /run/edgeproxy-lab/<run-id> (or --state-dir); the other commands find the
lab by --run-id / --state-dir, or take the only one running. `load`, `drain` and `demo` live in
lab/demo.py (load generator lab/load.py, report lab/report.py, drain lab/load_drain.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from .state import BASE_DIR, LAB_FILE, StateDir
from .topology import DEFAULT_TOPOLOGY, TopologyError

COMMANDS = ("check", "up", "down", "status", "flap", "exec", "load", "drain", "demo")
NOT_BUILT: tuple[str, ...] = ()  # load, drain, demo: lab/demo.py


def _err(msg: str) -> int:
    print(f"edgeproxy-lab: {msg}", file=sys.stderr)
    return 1


def _find_state(args: argparse.Namespace) -> StateDir:
    if getattr(args, "state_dir", None):
        return StateDir(args.state_dir)
    if getattr(args, "run_id", None):
        return StateDir(BASE_DIR / args.run_id)
    runs = sorted(p for p in BASE_DIR.glob("*") if (p / LAB_FILE).exists() and not (p / "down.json").exists()) \
        if BASE_DIR.is_dir() else []
    if len(runs) == 1:
        return StateDir(runs[0])
    if not runs:
        raise LookupError(f"no lab found under {BASE_DIR} (give --state-dir or --run-id)")
    raise LookupError(f"several labs under {BASE_DIR}: {', '.join(p.name for p in runs)} (give --run-id)")


def _add_where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-id", help="the lab's run id (state in /run/edgeproxy-lab/<run-id>)")
    p.add_argument("--state-dir", help="the lab's state directory (overrides --run-id)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeproxy-lab", description="Anycast lab with real BGP, route flaps and a survival report.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a topology file and print its address plan")
    check.add_argument("--topology", "-t", default=str(DEFAULT_TOPOLOGY))
    check.add_argument("--run-id", default="x")

    up = sub.add_parser("up", help="build the lab: namespaces, links, BIRD, edgeproxy PoPs, origin")
    up.add_argument("--topology", "-t", default=str(DEFAULT_TOPOLOGY))
    _add_where(up)
    up.add_argument("--policy", choices=("localpref", "ecmp"), help="override lab.router_policy")
    up.add_argument("--bfd-ms", type=int, help="override lab.bfd_ms (0 = off)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for BGP and PoP health")
    up.add_argument("--keep-on-error", action="store_true", help="leave a failed lab up for inspection")

    down = sub.add_parser("down", help="remove everything the lab recorded")
    _add_where(down)
    down.add_argument("--keep-logs", action="store_true", help="keep the state directory (logs, flaps.jsonl)")

    status = sub.add_parser("status", help="BGP sessions, the router's best path, PoP health, impairments")
    _add_where(status)
    status.add_argument("--json", action="store_true")

    flap = sub.add_parser("flap", help="take a PoP out of the best path and back, timing the router's FIB")
    _add_where(flap)
    flap.add_argument("--method", required=True, choices=("withdraw", "localpref", "link", "ecmp"))
    flap.add_argument("--pop", required=True)
    flap.add_argument("--schedule", default="once", help="once | periodic:5s | random:SEED:MEAN (default once)")
    flap.add_argument("--action", default="cycle", choices=("cycle", "down", "up"),
                      help="cycle = down, hold, up (default); down/up = only that half (with --schedule once)")
    flap.add_argument("--hold", type=float, default=2.0, help="seconds between down and up (default 2)")
    flap.add_argument("--count", type=int, default=5, help="most flaps for periodic/random schedules (default 5)")
    flap.add_argument("--duration", type=float, default=600.0, help="stop scheduling after this many seconds")
    flap.add_argument("--fib-timeout", type=float, default=5.0, help="seconds to wait for the router's FIB to change")
    flap.add_argument("--json", action="store_true", help="print the log entries as JSON lines")

    ex = sub.add_parser("exec", help="run a command inside a node's namespace")
    _add_where(ex)
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    from .demo import add_subcommands

    add_subcommands(sub, _add_where)
    return parser


def _check(args: argparse.Namespace) -> int:
    from .configgen import describe_plan
    from .plan import make_plan
    from .topology import load_topology

    topo = load_topology(args.topology)
    plan = make_plan(topo, args.run_id)
    print(f"{args.topology}: ok ({topo.name}: {len(topo.nodes)} nodes, {len(topo.links)} links, router policy {topo.lab.router_policy})")
    for line in describe_plan(plan):
        print("  " + line)
    return 0


def _up(args: argparse.Namespace) -> int:
    from . import netns

    run_id = args.run_id or secrets.token_hex(3)
    state_dir = Path(args.state_dir) if args.state_dir else BASE_DIR / run_id
    try:
        text = Path(args.topology).read_text("utf-8")
    except OSError as e:
        return _err(f"cannot read {args.topology}: {e.strerror}")
    overrides: dict[str, Any] = {}
    if args.policy:
        overrides["router_policy"] = args.policy
    if args.bfd_ms is not None:
        overrides["bfd_ms"] = args.bfd_ms

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # `up` tears down what it built on the way out

    signal.signal(signal.SIGTERM, on_term)
    try:
        netns.up(text, run_id, state_dir, overrides=overrides, timeout=args.timeout, keep_on_error=args.keep_on_error)
    except KeyboardInterrupt:
        return _err("interrupted; what was built has been removed")
    print(f"run id {run_id}: `edgeproxy-lab status --run-id {run_id}`, `edgeproxy-lab down --run-id {run_id}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in NOT_BUILT:
        print(f"edgeproxy-lab {args.command}: not built yet (up, down, status, flap and check are)", file=sys.stderr)
        return 2
    from .netns import LabError

    try:
        if args.command == "check":
            return _check(args)
        if args.command == "up":
            return _up(args)
        if args.command in ("load", "drain", "demo"):
            from .demo import run_subcommand

            return run_subcommand(args, _find_state)
        state = _find_state(args)
        if args.command == "down":
            from .netns import down

            if not state.exists():
                return _err(f"{state.path}: no lab here")
            problems = down(state, keep_logs=args.keep_logs)
            return 1 if problems else 0
        if args.command == "status":
            from .netns import format_status, status

            s = status(state)
            print(json.dumps(s, indent=2) if args.json else format_status(s))
            return 0
        if args.command == "flap":
            from .flap import flap
            from .observe import parse_schedule

            try:
                schedule = parse_schedule(args.schedule)
            except ValueError as e:
                return _err(f"--schedule: {e}")
            done = flap(state, args.method, args.pop, schedule, action=args.action, hold=args.hold,
                           count=args.count, duration=args.duration, fib_timeout=args.fib_timeout,
                           log=(lambda s: None) if args.json else print)
            if args.json:
                for entry in done:
                    print(json.dumps(entry))
            else:
                print(f"logged to {state.path / 'flaps.jsonl'}" if done else "no flaps done")
            return 0 if all(entry.get("ok") for entry in done) else 1
        if args.command == "exec":
            from .netns import load_plan

            plan = load_plan(state)
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if args.node not in plan.nodes:
                return _err(f"no node {args.node!r} (nodes: {', '.join(plan.nodes)})")
            if not cmd:
                return _err("give a command: edgeproxy-lab exec NODE -- CMD...")
            os.execvp("ip", ["ip", "netns", "exec", plan.nodes[args.node].ns, *cmd])
    except TopologyError as e:
        return _err(str(e))
    except (LabError, LookupError, ValueError) as e:
        return _err(str(e))
    except KeyboardInterrupt:
        print("edgeproxy-lab: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
