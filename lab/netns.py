"""The thin shell: namespaces, veths, addresses, impairments and daemons for a `LabPlan`.

Everything created is journalled in the state directory (lab/state.py) as it is created; `down`
removes exactly what the journal lists. Every wait here is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import configgen
from .observe import parse_show_protocols, route_nexthops
from .plan import LabPlan, make_plan
from .state import BASE_DIR, LAB_FILE, StateDir, alive, is_ours, netns_inode, spawn, terminate
from .topology import Topology, parse_topology

REPO_ROOT = Path(__file__).resolve().parent.parent
Log = Callable[[str], None]


class LabError(Exception):
    pass


def run(args: list[str], *, check: bool = True, timeout: float = 15.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError:
        raise LabError(f"{args[0]}: not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(args)}: no answer within {timeout:g} s") from None
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()} (exit {r.returncode})")
    return r


def nsx(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def birdc(ctl: str | Path, *args: str, check: bool = True) -> str:
    r = run(["birdc", "-s", str(ctl), *args], check=check, timeout=5.0)
    text = (r.stdout + r.stderr).strip()
    if check and "Unable to connect" in text:
        raise LabError(f"birdc -s {ctl}: {text}")
    return text


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(k, None)
    return env


def missing_tools(plan: LabPlan) -> list[str]:
    """Tools `up` cannot do without (bird2, iproute2); impairment tools are reported, not required."""
    need = {"ip": "iproute2", "bird": "bird2", "birdc": "bird2"}
    return sorted({pkg for cmd, pkg in need.items() if shutil.which(cmd) is None})


# -- paths ----------------------------------------------------------------------------------------

def node_dir(state: StateDir, node: str) -> Path:
    d = state.path / node
    d.mkdir(parents=True, exist_ok=True)
    return d


def bird_ctl(state: StateDir, node: str) -> Path:
    return state.path / node / "bird.ctl"


def load_plan(state: StateDir) -> LabPlan:
    info = state.read_json(LAB_FILE)
    if not info:
        raise LabError(f"{state.path}: no lab here ({LAB_FILE} missing)")
    topo = parse_topology(info["topology"])
    topo = apply_overrides(topo, info.get("overrides", {}))
    return make_plan(topo, info["run_id"])


def apply_overrides(topo: Topology, overrides: dict[str, Any]) -> Topology:
    if not overrides:
        return topo
    import dataclasses
    return dataclasses.replace(topo, lab=dataclasses.replace(topo.lab, **overrides))


# -- up ---------------------------------------------------------------------------------------------

def up(topo_text: str, run_id: str, state_dir: Path, *, overrides: dict[str, Any] | None = None,
       timeout: float = 60.0, keep_on_error: bool = False, log: Log = print) -> LabPlan:
    topo = apply_overrides(parse_topology(topo_text), overrides or {})
    plan = make_plan(topo, run_id)
    if os.geteuid() != 0:
        raise LabError("edgeproxy-lab up needs root (network namespaces)")
    missing = missing_tools(plan)
    if missing:
        raise LabError(f"missing Debian packages: {', '.join(missing)} (apt-get install {' '.join(missing)})")
    state = StateDir(state_dir)
    if state.exists():
        raise LabError(f"{state_dir} already holds a lab (run `edgeproxy-lab down --state-dir {state_dir}` first)")
    created = not state.path.exists()
    state.path.mkdir(parents=True, exist_ok=True)
    if created:
        state.record("dir", path=str(state.path))
    else:
        state.record("existing-dir", path=str(state.path))
    state.write_json(LAB_FILE, {"run_id": run_id, "state_dir": str(state.path), "created": time.time(),
                                "topology": topo_text, "overrides": overrides or {}, "name": topo.name})
    try:
        t0 = time.monotonic()
        _build_network(plan, state)
        log(f"network: {len(plan.namespaces)} namespaces, {len(plan.veths)} veth pairs ({time.monotonic() - t0:.1f} s)")
        impairments = _apply_impairments(plan, state)
        state.write_json("impairments.json", impairments)
        _start_daemons(plan, state)
        log(f"daemons started ({time.monotonic() - t0:.1f} s); waiting for BGP and PoP health")
        _wait_ready(plan, state, timeout)
        log(f"lab {run_id} up in {time.monotonic() - t0:.1f} s; state in {state.path}")
    except BaseException:
        if not keep_on_error:
            log("up failed: tearing down what was created")
            down(state, keep_logs=True, log=log)
            log(f"logs kept in {state.path} (`edgeproxy-lab down --state-dir {state.path}` removes them)")
        raise
    return plan


def _build_network(plan: LabPlan, state: StateDir) -> None:
    for ns in plan.namespaces:
        if netns_inode(ns) is not None:
            raise LabError(f"namespace {ns} already exists and was not created by this run; choose another --run-id")
        state.record("netns", name=ns)
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    for v in plan.veths:
        state.record("veth", ns=v.a_ns, ifname=v.a_if, peer_ns=v.b_ns, peer=v.b_if)
        run(["ip", "-n", v.a_ns, "link", "add", v.a_if, "type", "veth", "peer", "name", v.b_if, "netns", v.b_ns])
    bh = plan.topology.backhaul
    if bh is not None:
        ns = plan.nodes[bh.name].ns
        run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
        for port in plan.bridge_ports:
            run(["ip", "-n", ns, "link", "set", port, "master", "br0"])
            run(["ip", "-n", ns, "link", "set", port, "up"])
        run(["ip", "-n", ns, "link", "set", "br0", "up"])
    for w in plan.wires:
        for ifname in ("wa", "wb"):
            run(["ip", "-n", w.ns, "link", "set", ifname, "up"])
    for n in plan.nodes.values():
        for i in n.ifaces.values():
            if i.address:
                run(["ip", "-n", n.ns, "addr", "add", i.address, "dev", i.ifname])
                run(["ip", "-n", n.ns, "link", "set", i.ifname, "up"])
        for a in n.lo_addresses:
            run(["ip", "-n", n.ns, "addr", "add", a, "dev", "lo"])
        if n.sysctls:
            run(nsx(n.ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in n.sysctls.items())))
        for dst, via, dev in n.routes:
            run(["ip", "-n", n.ns, "route", "replace", dst, "via", via, "dev", dev])


def _apply_impairments(plan: LabPlan, state: StateDir) -> list[dict[str, Any]]:
    """Applies loss (nft numgen), rate (tbf) and delay (wire process); returns what is in force."""
    report: list[dict[str, Any]] = []
    topo = plan.topology
    has = {t: shutil.which(t) is not None for t in ("nft", "tc", "ethtool")}
    loss_by_ns: dict[str, list[tuple[str, float]]] = {}
    for imp in plan.impairments:
        if imp.loss:
            loss_by_ns.setdefault(imp.ns, []).append((imp.ifname, imp.loss))
    nft_ok: dict[str, str] = {}
    for ns, ifs in loss_by_ns.items():
        if not has["nft"]:
            nft_ok[ns] = "nft not installed (apt-get install nftables)"
            continue
        state.record("nft", ns=ns, family="netdev", table=configgen.LOSS_TABLE)
        r = run(nsx(ns, "nft", "-f", "-"), input=configgen.nft_loss_ruleset(ifs), check=False)
        nft_ok[ns] = "" if r.returncode == 0 else f"nft failed: {r.stderr.strip()}"
    tbf_ok: dict[tuple[str, str], str] = {}
    for imp in plan.impairments:
        if imp.rate_mbit:
            if not has["tc"]:
                tbf_ok[(imp.ns, imp.ifname)] = "tc not installed (apt-get install iproute2)"
                continue
            r = run(["tc", "-n", imp.ns, *configgen.tbf_args(imp.ifname, imp.rate_mbit)], check=False)
            tbf_ok[(imp.ns, imp.ifname)] = "" if r.returncode == 0 else f"tc failed: {r.stderr.strip()}"
    wire_note: dict[int, str] = {}
    for w in plan.wires:
        note = ""
        if has["ethtool"]:
            for ns, ifname in ((w.ns, "wa"), (w.ns, "wb"), (w.a_ns, w.a_if), (w.b_ns, w.b_if)):
                run(nsx(ns, "ethtool", "-K", ifname, "tx", "off", "gro", "off", "tso", "off", "gso", "off"), check=False)
        else:
            note = "offloads left on (ethtool not installed): TCP over this link may stall"
        spawn(state, "wire", w.ns, [sys.executable, "-m", "lab.wire", "--a", "wa", "--b", "wb", "--delay-ms", f"{w.delay_ms:g}"],
              state.path / "wires" / f"link{w.link}.log", env=python_env())
        wire_note[w.link] = note
    for ln in topo.links:
        if not ln.impaired:
            continue
        ends = [plan.nodes[ep.node].ns for ep in (ln.a, ln.b)]
        entry: dict[str, Any] = {"link": ln.index, "endpoints": [str(ln.a), str(ln.b)]}
        if ln.loss:
            errs = [nft_ok.get(ns, "") for ns in ends if nft_ok.get(ns)]
            entry["loss"] = {"value": ln.loss, "in_force": not errs, "how": "nft netdev ingress `numgen random` drop at both ends (each direction)",
                             **({"why_not": errs[0]} if errs else {})}
        if ln.rate_mbit:
            errs = [tbf_ok.get((plan.nodes[ep.node].ns, ep.ifname), "") for ep in (ln.a, ln.b)]
            errs = [e for e in errs if e]
            entry["rate_mbit"] = {"value": ln.rate_mbit, "in_force": not errs, "how": "tbf on egress at both ends",
                                  **({"why_not": errs[0]} if errs else {})}
        if ln.delay_ms:
            entry["delay_ms"] = {"value": ln.delay_ms, "in_force": True, "how": "userspace AF_PACKET wire (lab/wire.py), each direction",
                                 **({"note": wire_note[ln.index]} if wire_note.get(ln.index) else {})}
        report.append(entry)
    return report


def _start_daemons(plan: LabPlan, state: StateDir) -> None:
    env = python_env()
    run_dir = str(state.path)
    py = sys.executable
    for o in plan.topology.of_kind("origin"):
        n = plan.nodes[o.name]
        spawn(state, "origin", n.ns, [py, "-m", "lab.origin_main", "--host", "0.0.0.0", "--port", str(o.port)],
              node_dir(state, o.name) / "origin.log", env=env)
    bird_nodes = [(plan.router.name, configgen.bird_router_conf(plan, run_dir))]
    bird_nodes += [(p.name, configgen.bird_pop_conf(plan, p.name, run_dir)) for p in plan.pops()]
    for name, conf in bird_nodes:
        d = node_dir(state, name)
        (d / "bird.conf").write_text(conf)
        run(["bird", "-p", "-c", str(d / "bird.conf")])
        spawn(state, "bird", plan.nodes[name].ns,
              ["bird", "-f", "-c", str(d / "bird.conf"), "-s", str(d / "bird.ctl"), "-P", str(d / "bird.pid")],
              d / "bird.stderr", env=env)
    lab = plan.topology.lab
    configgen.write_lab_secrets(run_dir)  # fleet keys and gossip keyring, mode 0600, in the state dir
    # Until gossip replicates the flow table, each PoP's supervisor relays its published TCP flows
    # to the other PoPs (GET /steering?own=1 -> POST /steering/inject, every 200 ms).
    relay = lab.survival and configgen.flow_replication() and not configgen.gossip_in_force()
    for p in plan.pops():
        d = node_dir(state, p.name)
        (d / "edgeproxy.toml").write_text(
            "# generated by edgeproxy-lab\n" + configgen.dump_toml(configgen.edgeproxy_pop_config(plan, p.name, run_dir)))
        spawn(state, "edgeproxy", p.ns, [py, "-m", "edgeproxy.cli", "run", "--config", str(d / "edgeproxy.toml")],
              d / "edgeproxy.log", env=env)
    for p in plan.pops():
        others = [plan.admin_url(q.name) for q in plan.pops() if q.name != p.name]
        relay_args = ["--relay-from", plan.admin_url(p.name), "--relay-to", ",".join(others)] if relay and others else []
        spawn(state, "supervisor", p.ns,
              [py, "-m", "lab.supervisor", "--state-dir", run_dir, "--pop", p.name,
               "--url", f"{plan.admin_url(p.name)}/healthz", "--ctl", str(bird_ctl(state, p.name)),
               "--interval", str(lab.health_interval_s), "--fall", str(lab.health_fall), "--rise", str(lab.health_rise),
               *relay_args],
              node_dir(state, p.name) / "supervisor.log", env=env)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n    ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def readiness(plan: LabPlan, state: StateDir) -> tuple[bool, list[str]]:
    problems: list[str] = []
    text = birdc(bird_ctl(state, plan.router.name), "show", "protocols", check=False)
    protos = parse_show_protocols(text)
    for p in plan.pops():
        proto = protos.get(configgen.bgp_name(p.name))
        if proto is None or not proto.established:
            problems.append(f"router session {configgen.bgp_name(p.name)}: {proto.info if proto else 'no answer from BIRD'}")
        h = state.read_json(f"{p.name}/health.json", {})
        if h.get("healthy") is not True:
            problems.append(f"{p.name} not healthy yet: {h.get('last_result', 'no probe yet')}")
    route = run(["ip", "-n", plan.router.ns, "route", "show", plan.topology.lab.prefix], check=False).stdout.strip()
    if not route:
        problems.append(f"router has no route for {plan.topology.lab.prefix}")
    return not problems, problems


def _wait_ready(plan: LabPlan, state: StateDir, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    while time.monotonic() < deadline:
        for rec in state.processes():
            if not alive(rec["pid"], rec.get("starttime")):
                raise LabError(f"{rec['role']} in {rec['ns']} exited:\n    {_tail(Path(rec['log']))}")
        ok, problems = readiness(plan, state)
        if ok:
            return
        time.sleep(0.25)
    raise LabError(f"lab not ready within {timeout:g} s: " + "; ".join(problems))


# -- down -------------------------------------------------------------------------------------------

def down(state: StateDir, *, keep_logs: bool = False, log: Log = print) -> list[str]:
    """Removes exactly what the journal lists; returns what could not be removed."""
    recs = state.resources()
    problems: list[str] = []
    procs = [r for r in recs if r["kind"] == "proc"]
    ours = [(int(r["pid"]), r.get("starttime")) for r in reversed(procs) if is_ours(r)]
    left = terminate(ours)
    problems += [f"pid {p} did not exit" for p in left]
    for rec in recs:
        if rec["kind"] == "nft" and netns_inode(rec["ns"]) is not None:
            run(nsx(rec["ns"], "nft", "delete", "table", rec["family"], rec["table"]), check=False)
    namespaces = [r["name"] for r in recs if r["kind"] == "netns"]
    deleted = 0
    for ns in reversed(namespaces):
        if netns_inode(ns) is None:
            continue
        pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
        if pids:
            problems.append(f"namespace {ns} still holds pids not started by the lab: {' '.join(pids)} (left running)")
        r = run(["ip", "netns", "del", ns], check=False)
        if r.returncode != 0:
            problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        else:
            deleted += 1
    log(f"down: stopped {len(ours) - len(left)} processes, removed {deleted} namespaces")
    dir_recs = [r for r in recs if r["kind"] == "dir" and Path(r["path"]) == state.path]
    if keep_logs or problems:
        state.write_json("down.json", {"ts": time.time(), "problems": problems})
        if not keep_logs:
            log(f"kept {state.path} because of the problems above")
    elif dir_recs:
        shutil.rmtree(state.path, ignore_errors=True)
        if state.path.parent == BASE_DIR:
            with contextlib.suppress(OSError):
                BASE_DIR.rmdir()
    else:  # a directory we did not create: remove only the lab's own files
        for name in ("lab.json", "impairments.json", "resources.jsonl"):
            (state.path / name).unlink(missing_ok=True)
    for p in problems:
        log(f"down: {p}")
    return problems


# -- status -----------------------------------------------------------------------------------------

def pop_of_gateway(plan: LabPlan, addr: str) -> str:
    for p in plan.pops():
        if p.router_addr == addr:
            return p.name
    return addr


def process_table(records: list[dict[str, Any]], is_alive: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The recorded processes for `status`, in recording order. A drain restarts edgeproxy under
    a new record: the record it replaced is marked `replaced` (history, not a failure)."""
    procs = [r for r in records if r["role"] != "fibmon"]
    latest = {(r["role"], r["ns"]): r for r in procs if r["role"] == "edgeproxy"}
    return [{"role": r["role"], "ns": r["ns"], "pid": r["pid"], "alive": is_alive(r),
             "replaced": r["role"] == "edgeproxy" and latest[(r["role"], r["ns"])] is not r} for r in procs]


def status(state: StateDir) -> dict[str, Any]:
    plan = load_plan(state)
    info = state.read_json(LAB_FILE, {})
    out: dict[str, Any] = {"run_id": plan.run_id, "state_dir": str(state.path), "topology": info.get("name"),
                           "router_policy": plan.topology.lab.router_policy}
    out["processes"] = process_table(state.processes(), lambda r: alive(r["pid"], r.get("starttime")))
    rctl = bird_ctl(state, plan.router.name)
    protos = parse_show_protocols(birdc(rctl, "show", "protocols", check=False))
    out["sessions"] = {name: {"state": p.state, "info": p.info, "established": p.established}
                       for name, p in protos.items() if p.proto == "BGP"}
    route = run(["ip", "-n", plan.router.ns, "route", "show", plan.topology.lab.prefix], check=False).stdout.strip()
    hops = route_nexthops(route)
    out["best_path"] = {"fib": route, "pops": [pop_of_gateway(plan, h) for h in hops],
                        "bird": birdc(rctl, "show", "route", "for", plan.topology.lab.anycast, check=False)}
    pops: dict[str, Any] = {}
    for p in plan.pops():
        pp = parse_show_protocols(birdc(bird_ctl(state, p.name), "show", "protocols", check=False))
        anycast, core = pp.get("anycast"), pp.get("core")
        edge = [r for r in out["processes"] if r["ns"] == p.ns and r["role"] == "edgeproxy" and not r["replaced"]]
        pops[p.name] = {"announcing": bool(anycast and anycast.state == "up" and core and core.established),
                        "anycast_protocol": anycast.state if anycast else "?", "core": core.info if core else "?",
                        "health": state.read_json(f"{p.name}/health.json", {}),
                        "edgeproxy_alive": bool(edge) and all(e["alive"] for e in edge),
                        "workers": plan.topology.nodes[p.name].workers}
    out["pops"] = pops
    out["impairments"] = state.read_json("impairments.json", [])
    return out


def format_status(s: dict[str, Any]) -> str:
    lines = [f"lab {s['run_id']} ({s['topology']}, router policy {s['router_policy']}) state {s['state_dir']}", "BGP sessions (router):"]
    for name, v in s["sessions"].items():
        lines.append(f"  {name:<10} {v['state']:<5} {v['info']}")
    bp = s["best_path"]
    fib = " ".join(bp["fib"].split()) or "no FIB route"
    lines.append(f"best path: {', '.join(bp['pops']) or 'none'}   [{fib}]")
    lines.append("PoPs:")
    for name, p in s["pops"].items():
        h = p["health"]
        health = {True: "healthy", False: "UNHEALTHY", None: "unknown"}[h.get("healthy")]
        workers = f"workers {p['workers']}"
        lines.append(f"  {name:<6} {'announcing' if p['announcing'] else 'withdrawn':<11} health {health:<9} "
                     f"({h.get('last_result', '-')}) edgeproxy {'up' if p['edgeproxy_alive'] else 'DOWN'}, {workers}")
    current = [r for r in s["processes"] if not r["replaced"]]
    dead = [f"{r['role']}@{r['ns']}({r['pid']})" for r in current if not r["alive"]]
    replaced = len(s["processes"]) - len(current)
    lines.append(f"processes: {len(current) - len(dead)} alive" + (f", dead: {' '.join(dead)}" if dead else "")
                 + (f", {replaced} replaced by a restart" if replaced else ""))
    if s["impairments"]:
        lines.append("impairments:")
        for imp in s["impairments"]:
            parts = []
            for k in ("loss", "delay_ms", "rate_mbit"):
                if k in imp:
                    v = imp[k]
                    parts.append(f"{k}={v['value']:g} {'in force' if v['in_force'] else 'NOT in force: ' + v.get('why_not', '')}")
            lines.append(f"  link {imp['link']} {' - '.join(imp['endpoints'])}: {'; '.join(parts)}")
    else:
        lines.append("impairments: none configured")
    return "\n".join(lines)
