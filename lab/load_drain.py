"""`edgeproxy-lab drain POP`: take a PoP out of service through what edgeproxy offers, and back.

edgeproxy's admin API (on the PoP's backhaul address, port 9901) drains a PoP with `POST /drain`
(edgeproxy/drain.py): `/healthz` answers 503, open connections keep being served (HTTP/1.1 ones
get `Connection: close`, QUIC ones go on through the other PoPs' forwarding once the route has
moved), and edgeproxy exits when idle or at the deadline. So the lab:

1. asks `POST /drain?deadline=S` on the admin API (from inside the PoP's namespace). On 2xx the
   lab waits for the supervisor to see /healthz fail and withdraw the announcement, holds, then
   `POST /drain?cancel=1` returns it to service; if edgeproxy had already finished the drain and
   exited (it was idle), the lab starts it again with its recorded command line.
2. An edgeproxy without the endpoint (404): SIGTERM to the PoP's recorded edgeproxy process (by the pid and start time the lab
   journalled, never by name): /healthz turns 503, then stops answering; the lab's supervisor
   withdraws the announcement after `health_fall` failed probes. With `--restart` (default) the
   lab then starts edgeproxy again with the same command line (journalled like every lab
   process); the supervisor announces the PoP once /healthz passes `health_rise` times.
   `--withdraw-first` withdraws the route (`birdc disable anycast`) and waits `--grace` s before
   the SIGTERM: the order a real drain would use.

Both halves are appended to `<state>/flaps.jsonl` with method "drain" (and the router's FIB time),
so the report marks them on the timeline.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .flap import RouteMonitor, _route
from .netns import LabError, bird_ctl, birdc, load_plan, python_env
from .plan import LabPlan
from .state import StateDir, alive, is_ours, proc_starttime, terminate

Log = Callable[[str], None]


def admin_post(plan: LabPlan, pop: str, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """POST to the PoP's admin API from inside its namespace; (status, body), status 0 = no answer."""
    url = f"{plan.admin_url(pop)}{path}"
    try:
        r = subprocess.run(["ip", "netns", "exec", plan.nodes[pop].ns, sys.executable, "-m", "lab.load_drain", "post", url],
                           capture_output=True, text=True, timeout=timeout + 5, env=python_env())
    except subprocess.TimeoutExpired:
        return 0, "no answer"
    try:
        status, body = json.loads(r.stdout)
        return int(status), str(body)
    except (ValueError, TypeError):
        return 0, (r.stderr or r.stdout).strip()[:200]


def _post(url: str, timeout: float = 3.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(2000).decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return 0, f"{type(e).__name__}: {e}"


def edgeproxy_record(state: StateDir, pop_ns: str) -> dict[str, Any] | None:
    """The PoP's running edgeproxy, as the lab journalled it (the last one that is still ours)."""
    recs = [r for r in state.processes() if r["role"] == "edgeproxy" and r["ns"] == pop_ns]
    for rec in reversed(recs):
        if is_ours(rec):
            return rec
    return None


def _health(state: StateDir, pop: str) -> bool | None:
    return state.read_json(f"{pop}/health.json", {}).get("healthy")


def _wait(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _entry(state: StateDir, plan: LabPlan, mon: RouteMonitor, pop: str, action: str, how: str, t0: float,
           before: list[str], fib_timeout: float, **extra: Any) -> dict[str, Any]:
    seq = len((state.path / "flaps.jsonl").read_text().splitlines()) if (state.path / "flaps.jsonl").exists() else 0
    events = mon.wait_change(t0, fib_timeout)
    e: dict[str, Any] = {"seq": seq, "ts": t0, "run": plan.run_id, "method": "drain", "pop": pop, "action": action,
                         "command": how, "route_before": before, "ok": True, **extra}
    if events:
        e["fib_ts"] = events[0].ts
        e["fib_ms"] = round((events[0].ts - t0) * 1000, 2)
    else:
        e["fib_ts"] = e["fib_ms"] = None
        e["fib_note"] = f"no FIB change within {fib_timeout:g} s"
    e["route_text"], e["route_after"] = _route(plan)
    state.append_jsonl("flaps.jsonl", e)
    return e


def _restart(state: StateDir, rec: dict[str, Any]) -> int:
    """Start edgeproxy again with the recorded command line, journalling it (parent-side record:
    this process may have a route-monitor thread, so no preexec_fn)."""
    log = Path(rec["log"])
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", rec["ns"], *rec["argv"]], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=python_env(), close_fds=True)
    state.record("proc", role="edgeproxy", ns=rec["ns"], argv=rec["argv"], log=str(log), pid=proc.pid,
                 starttime=proc_starttime(proc.pid), restarted_by="drain")
    return proc.pid


def drain(state: StateDir, pop: str, *, restart: bool = True, hold: float = 2.0, withdraw_first: bool = False,
          grace: float = 1.0, timeout: float = 20.0, fib_timeout: float = 5.0, log: Log = print) -> list[dict[str, Any]]:
    plan = load_plan(state)
    if pop not in plan.nodes or plan.nodes[pop].kind != "pop":
        raise LabError(f"no PoP named {pop!r} (PoPs: {', '.join(p.name for p in plan.pops())})")
    ns = plan.nodes[pop].ns
    lab = plan.topology.lab
    entries: list[dict[str, Any]] = []
    mon = RouteMonitor(state, plan.router.ns, lab.prefix)
    try:
        _, before = _route(plan)
        t0 = time.time()
        rec0 = edgeproxy_record(state, ns)
        status, body = admin_post(plan, pop, f"/drain?deadline={max(30.0, hold + 2 * timeout):g}")
        if 200 <= status < 300:  # edgeproxy drains itself; the supervisor withdraws it
            withdrawn = _wait(lambda: _health(state, pop) is False, timeout)
            e = _entry(state, plan, mon, pop, "down", "POST /drain", t0, before, fib_timeout, withdrawn=withdrawn)
            entries.append(e)
            log(f"drain {pop}: POST /drain -> {status}; withdrawn {withdrawn}; best path {','.join(before)} -> {','.join(e['route_after'])}")
            time.sleep(max(0.0, hold))
            _, before = _route(plan)
            t1 = time.time()
            s2, _ = admin_post(plan, pop, "/drain?cancel=1")
            how = "POST /drain?cancel=1"
            extra: dict[str, Any] = {}
            if s2 != 200 and restart and rec0 is not None and not alive(int(rec0["pid"]), rec0.get("starttime")):
                # the drain had finished (idle) and edgeproxy exited: start it again
                mon.close()
                extra["pid"] = _restart(state, rec0)
                mon = RouteMonitor(state, plan.router.ns, lab.prefix)
                how += f" -> {s2 or 'no answer'}: edgeproxy had exited (drain finished); restarted"
            back = _wait(lambda: _health(state, pop) is True, timeout)
            entries.append(_entry(state, plan, mon, pop, "up", how, t1, before, fib_timeout,
                                  admin_status=s2, announced=back, **extra))
            log(f"drain {pop}: {how}; announced again {back}")
            return entries
        rec = edgeproxy_record(state, ns)
        if rec is None:
            raise LabError(f"{pop}: no running edgeproxy recorded by the lab (POST /drain answered {status or body})")
        note = (f"POST /drain answered {status or body!r}: no drain endpoint; draining by SIGTERM (graceful stop: "
                f"/healthz 503, the supervisor withdraws after {lab.health_fall} failed probes)")
        log(f"drain {pop}: {note}")
        how = "SIGTERM edgeproxy (graceful stop)"
        if withdraw_first:
            birdc(bird_ctl(state, pop), "disable", "anycast")
            how = f"birdc disable anycast, {grace:g} s, then SIGTERM edgeproxy"
            time.sleep(max(0.0, grace))
        pid, start = int(rec["pid"]), rec.get("starttime")
        left = terminate([(pid, start)], grace=timeout)
        stopped_at = time.time()
        withdrawn = _wait(lambda: _health(state, pop) is False, timeout)
        e = _entry(state, plan, mon, pop, "down", how, t0, before, fib_timeout, withdrawn=withdrawn,
                   stop_s=round(stopped_at - t0, 3), admin_status=status, note=note, killed=bool(left))
        entries.append(e)
        log(f"drain {pop}: edgeproxy pid {pid} stopped after {stopped_at - t0:.2f} s; withdrawn {withdrawn}; "
            f"best path {','.join(before)} -> {','.join(e['route_after']) or 'none'}")
        if not restart:
            return entries
        time.sleep(max(0.0, hold))
        mon.close()  # no thread of ours while the new process starts
        _, before = _route(plan)
        t1 = time.time()
        new_pid = _restart(state, rec)
        mon = RouteMonitor(state, plan.router.ns, lab.prefix)
        back = _wait(lambda: _health(state, pop) is True and alive(new_pid, None), timeout)
        e = _entry(state, plan, mon, pop, "up", "restart edgeproxy; the supervisor announces it when healthy", t1,
                   before, fib_timeout, announced=back, pid=new_pid, ok=back)
        entries.append(e)
        log(f"drain {pop}: edgeproxy restarted (pid {new_pid}); healthy and announced {back} after "
            f"{time.time() - t1:.2f} s; best path {','.join(before) or 'none'} -> {','.join(e['route_after'])}")
        if not back:
            raise LabError(f"{pop}: edgeproxy did not come back healthy within {timeout:g} s (see {rec['log']})")
        return entries
    finally:
        mon.close()
        with contextlib.suppress(RuntimeError):
            mon.thread.join(timeout=1.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "post":  # inside a PoP namespace: POST and print [status, body]
        print(json.dumps(list(_post(args[1]))))
        return 0
    print("usage: python -m lab.load_drain post URL   (the lab's in-namespace helper; use `edgeproxy-lab drain`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
