"""Route flaps: take one PoP out of the router's best path and back, timing the router's FIB.

Methods (reference §6):
  withdraw   `birdc disable anycast` in the PoP (UPDATE withdraw); up: `enable anycast`
  localpref  the router imports the PoP with a local_pref below every other PoP (`birdc configure`)
  ecmp       the router drops the PoP's routes from its multipath set (import none + `configure`;
             needs router_policy = "ecmp"); up: back in the set
  link       `ip link set <pop>-r down` in the PoP (carrier loss at the router); up: link up and
             the PoP's default route back

Each action is appended to `<state>/flaps.jsonl` with the time just before the command and the
time of the router's first kernel route event for the anycast prefix after it (from
`ip -ts monitor route` in the router namespace).
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from . import configgen
from .netns import LabError, bird_ctl, birdc, load_plan, pop_of_gateway, run
from .observe import RouteEvent, Schedule, parse_monitor_line, route_nexthops
from .plan import LabPlan
from .state import StateDir, proc_starttime, self_recorder, terminate

METHODS = ("withdraw", "localpref", "link", "ecmp")
OVERRIDES = "router_overrides.json"


class RouteMonitor:
    """`ip -ts monitor route` in a namespace; events for one prefix, in a queue."""

    def __init__(self, state: StateDir, ns: str, prefix: str) -> None:
        self.prefix = prefix
        self.events: queue.Queue[RouteEvent] = queue.Queue(maxsize=100_000)
        argv = ["ip", "-ts", "monitor", "route"]
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True, preexec_fn=self_recorder(state, "fibmon", ns, argv, ""))
        self.starttime = proc_starttime(self.proc.pid)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(0.2)  # let it subscribe before the first flap

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = parse_monitor_line(line)
            if ev is not None and ev.prefix == self.prefix:
                with contextlib.suppress(queue.Full):
                    self.events.put_nowait(ev)

    def wait_change(self, after: float, timeout: float) -> list[RouteEvent]:
        """The first route event at or after `after` (wall clock), plus any within 50 ms of it."""
        deadline = time.monotonic() + timeout
        first: RouteEvent | None = None
        out: list[RouteEvent] = []
        while True:
            remaining = deadline - time.monotonic()
            if first is not None:
                remaining = min(remaining, 0.05)
            if remaining <= 0:
                return out
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                return out
            if ev.ts < after:
                continue
            if first is None:
                first = ev
            out.append(ev)

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            for _ in range(100_000):
                self.events.get_nowait()

    def close(self) -> None:
        terminate([(self.proc.pid, self.starttime)], grace=1.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _set_override(state: StateDir, plan: LabPlan, pop: str, value: int | None) -> list[str]:
    overrides: dict[str, int] = state.read_json(OVERRIDES, {})
    if value is None:
        overrides.pop(pop, None)
    else:
        overrides[pop] = value
    state.write_json(OVERRIDES, overrides)
    r = plan.router.name
    (state.path / r / "bird.conf").write_text(configgen.bird_router_conf(plan, str(state.path), overrides))
    return ["birdc", "-s", str(bird_ctl(state, r)), "configure"]


def flap_action(state: StateDir, plan: LabPlan, method: str, pop: str, action: str) -> list[str]:
    """Performs one half of a flap (`down` or `up`); returns the command that did it."""
    p = plan.nodes[pop]
    if method == "withdraw":
        cmd = "disable" if action == "down" else "enable"
        out = birdc(bird_ctl(state, pop), cmd, "anycast")
        if "disabled" not in out and "enabled" not in out:
            raise LabError(f"birdc {cmd} anycast: {out}")
        return ["birdc", "-s", str(bird_ctl(state, pop)), cmd, "anycast"]
    if method in ("localpref", "ecmp"):
        value: int | None = None
        if action == "down":
            value = configgen.demoted_local_pref(plan, pop) if method == "localpref" else configgen.REJECT
        cmdline = _set_override(state, plan, pop, value)
        out = birdc(bird_ctl(state, plan.router.name), "configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise LabError(f"birdc configure: {out}")
        return cmdline
    if method == "link":
        if action == "down":
            run(["ip", "-n", p.ns, "link", "set", p.router_if, "down"])
            return ["ip", "-n", p.ns, "link", "set", p.router_if, "down"]
        run(["ip", "-n", p.ns, "link", "set", p.router_if, "up"])
        for _ in range(40):  # bounded: the route needs the carrier back (usually at once)
            r = run(["ip", "-n", p.ns, "route", "replace", "default", "via", p.gateway, "dev", p.router_if], check=False)
            if r.returncode == 0:
                break
            time.sleep(0.05)
        return ["ip", "-n", p.ns, "link", "set", p.router_if, "up", "+", "route", "replace", "default"]
    raise LabError(f"unknown flap method {method!r} (one of {', '.join(METHODS)})")


def _route(plan: LabPlan) -> tuple[str, list[str]]:
    text = run(["ip", "-n", plan.router.ns, "route", "show", plan.topology.lab.prefix], check=False).stdout.strip()
    return text, [pop_of_gateway(plan, h) for h in route_nexthops(text)]


def timed_action(state: StateDir, plan: LabPlan, mon: RouteMonitor, method: str, pop: str, action: str,
                 fib_timeout: float, seq: int) -> dict[str, Any]:
    _, before = _route(plan)
    mon.drain()
    t0 = time.time()
    entry: dict[str, Any] = {"seq": seq, "ts": t0, "run": plan.run_id, "method": method, "pop": pop, "action": action,
                             "route_before": before}
    try:
        entry["command"] = " ".join(flap_action(state, plan, method, pop, action))
        entry["cmd_ms"] = round((time.time() - t0) * 1000, 2)
        events = mon.wait_change(t0, fib_timeout)
        entry["ok"] = True
    except LabError as e:
        entry.update(ok=False, error=str(e))
        events = []
    if events:
        entry["fib_ts"] = events[0].ts
        entry["fib_ms"] = round((events[0].ts - t0) * 1000, 2)
        entry["fib_events"] = [("Deleted " if e.deleted else "") + e.text for e in events]
    else:
        entry["fib_ts"] = None
        entry["fib_ms"] = None
        entry["fib_note"] = f"no FIB change for {plan.topology.lab.prefix} within {fib_timeout:g} s"
    entry["route_text"], entry["route_after"] = _route(plan)
    state.append_jsonl("flaps.jsonl", entry)
    return entry


def describe(e: dict[str, Any]) -> str:
    fib = f"FIB changed after {e['fib_ms']:.1f} ms" if e.get("fib_ms") is not None else e.get("fib_note", "")
    err = f" ERROR {e['error']}" if not e.get("ok") else ""
    return (f"flap {e['seq']} {e['method']} {e['pop']} {e['action']}: {fib}; best path "
            f"{','.join(e['route_before']) or 'none'} -> {','.join(e['route_after']) or 'none'}{err}")


def flap(state: StateDir, method: str, pop: str, schedule: Schedule, *, action: str = "cycle", hold: float = 2.0,
         count: int = 5, duration: float = 600.0, fib_timeout: float = 5.0,
         log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    plan = load_plan(state)
    if method not in METHODS:
        raise LabError(f"unknown flap method {method!r} (one of {', '.join(METHODS)})")
    if pop not in plan.nodes or plan.nodes[pop].kind != "pop":
        raise LabError(f"no PoP named {pop!r} (PoPs: {', '.join(p.name for p in plan.pops())})")
    if method == "ecmp" and plan.topology.lab.router_policy != "ecmp":
        raise LabError("--method ecmp needs router_policy = \"ecmp\" (lab.router_policy, or `up --policy ecmp`)")
    if action not in ("cycle", "down", "up"):
        raise LabError("--action must be cycle, down or up")
    if action != "cycle" and schedule.kind != "once":
        raise LabError("--action down/up goes with --schedule once")
    entries: list[dict[str, Any]] = []
    seq0 = len((state.path / "flaps.jsonl").read_text().splitlines()) if (state.path / "flaps.jsonl").exists() else 0
    mon = RouteMonitor(state, plan.router.ns, plan.topology.lab.prefix)
    is_down = False
    deadline = time.monotonic() + duration
    try:
        for gap in schedule.intervals(count):
            wake = time.monotonic() + gap
            if wake > deadline:
                break
            time.sleep(max(0.0, wake - time.monotonic()))
            halves = ["down", "up"] if action == "cycle" else [action]
            for i, half in enumerate(halves):
                if i:
                    time.sleep(min(hold, max(0.0, deadline - time.monotonic())))
                is_down = is_down or half == "down"  # before the command: an interrupt restores
                e = timed_action(state, plan, mon, method, pop, half, fib_timeout, seq0 + len(entries))
                if half == "up" and e["ok"]:
                    is_down = False
                entries.append(e)
                log(describe(e))
    finally:
        if is_down and action == "cycle":  # interrupted between the halves: put the PoP back
            e = timed_action(state, plan, mon, method, pop, "up", min(fib_timeout, 2.0), seq0 + len(entries))
            e["interrupted"] = True
            entries.append(e)
            log(f"flap interrupted: {pop} put back: {describe(e)}")
        mon.close()
    return entries
