"""Generated configuration (pure): BIRD 2 for the router and the PoPs, edgeproxy's PoP TOML, the
nftables loss table and tbf arguments. Timers and shapes follow shared/reference/lab-kernel-and-bird.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .plan import ADMIN_PORT, LabPlan, NodePlan

ROUTER_AS = 65000
POP_AS = 65100
LOSS_TABLE = "epl_loss"  # netdev table in a namespace whose links lose packets
ORIGIN_GROUP = "origin"
BACKHAUL_PORT = 4434  # UDP, edgeproxy's [backhaul] listen on each PoP's backhaul address
GOSSIP_PORT = 7946  # edgeproxy's [gossip] bind (the flow channel uses the next port)
FLEET_KEY_FILE = "fleet-keys.toml"  # in the lab state dir, shared by every PoP (mode 0600)
GOSSIP_KEYRING_FILE = "gossip-keyring.json"
# Router-side overrides of one PoP's import, used by flaps: a local_pref, or REJECT (drop its routes).
REJECT = -1


def default_local_pref(plan: LabPlan, pop: str) -> int:
    node = plan.topology.nodes[pop]
    if node.local_pref is not None:
        return node.local_pref
    if plan.topology.lab.router_policy == "ecmp":
        return 100
    order = [p.name for p in plan.pops()].index(pop)
    return 290 - 10 * order  # p1 > p2 > p3 ..., as in the reference


def demoted_local_pref(plan: LabPlan, pop: str) -> int:
    """A local_pref below every other PoP's, for the `localpref` flap."""
    others = [default_local_pref(plan, p.name) for p in plan.pops() if p.name != pop]
    return max(0, min([*others, 100]) - 10)


def _timers(plan: LabPlan) -> str:
    lab = plan.topology.lab
    return (f"hold time {lab.hold_s}; keepalive time {lab.keepalive_s}; connect retry time 1; "
            f"connect delay time 1; error wait time 1, 5; error forget time 10;")


def _bfd(ifpattern: str, ms: int) -> str:
    return (f'protocol bfd {{ interface "{ifpattern}" {{ min rx interval {ms} ms; '
            f"min tx interval {ms} ms; multiplier 3; }}; }}\n")


def _head(run_dir: str, node: str, router_id: str) -> str:
    return (f'log "{run_dir}/{node}/bird.log" all;\n'
            'timeformat log "%F %T.%3f";\n'
            'timeformat protocol "%F %T.%3f";\n'
            f"router id {router_id};\n"
            "protocol device { scan time 10; }\n")


def bird_router_conf(plan: LabPlan, run_dir: str, overrides: dict[str, int] | None = None) -> str:
    """The core router: one eBGP session per PoP; best path by local_pref, or ECMP."""
    overrides = overrides or {}
    topo = plan.topology
    r = plan.router
    asn = topo.router.asn or ROUTER_AS
    ecmp = topo.lab.router_policy == "ecmp"
    first = next(iter(r.ifaces.values()))
    assert first.address is not None
    out = [_head(run_dir, r.name, first.address.split("/")[0])]
    merge = "merge paths yes limit 8;" if ecmp else "merge paths no;"
    out.append("protocol kernel {\n  ipv4 { import none; export where source = RTS_BGP; };\n"
               f"  {merge}\n}}\n")
    bfd = topo.lab.bfd_ms
    if bfd:
        out.append(_bfd("*", bfd))
    out.append(f"template bgp pop {{\n  local as {asn};\n  {_timers(plan)}\n"
               f"{'  bfd on;' + chr(10) if bfd else ''}}}\n")
    for p in plan.pops():
        node = topo.nodes[p.name]
        pref = overrides.get(p.name, default_local_pref(plan, p.name))
        imp = "import none;" if pref == REJECT else f"import filter {{ bgp_local_pref = {pref}; accept; }};"
        out.append(f"protocol bgp {bgp_name(p.name)} from pop {{ neighbor {p.router_addr} as {node.asn or POP_AS}; "
                   f"local {p.gateway}; ipv4 {{ import table yes; {imp} export none; }}; }}\n")
    return "".join(out)


def bgp_name(pop: str) -> str:
    """The router's BGP protocol name for a PoP's session."""
    return f"bgp_{pop}"


def bird_pop_conf(plan: LabPlan, pop: str, run_dir: str) -> str:
    """A PoP: announces the anycast prefix from a static protocol `anycast`, which starts disabled;
    the lab's supervisor enables it once the PoP's /healthz answers (`birdc disable anycast`
    withdraws it)."""
    topo = plan.topology
    p = plan.nodes[pop]
    node = topo.nodes[pop]
    out = [_head(run_dir, pop, p.router_addr)]
    out.append("# the anycast prefix; 'disable anycast' withdraws it, 'enable anycast' announces it\n"
               f"protocol static anycast {{\n  disabled yes;\n  ipv4;\n  route {topo.lab.prefix} blackhole;\n}}\n")
    bfd = topo.lab.bfd_ms
    if bfd:
        out.append(_bfd(p.router_if, bfd))
    out.append(f"protocol bgp core {{\n  local {p.router_addr} as {node.asn or POP_AS};\n"
               f"  neighbor {p.gateway} as {topo.router.asn or ROUTER_AS};\n  {_timers(plan)}\n"
               f"{'  bfd on;' + chr(10) if bfd else ''}"
               '  ipv4 { import none; export where proto = "anycast"; };\n}\n')
    return "".join(out)


def edgeproxy_supports(option: str) -> bool:
    """Whether edgeproxy's config has `[pop] <option>` (e.g. `workers`), so the lab can plug in
    features as they land without breaking `edgeproxy check` today."""
    try:
        from edgeproxy.config import PopSection
    except ImportError:  # pragma: no cover - edgeproxy is part of this repository
        return False
    return option in {f.name for f in dataclasses.fields(PopSection)}


def edgeproxy_pop_config(plan: LabPlan, pop: str, run_dir: str, *, with_workers: bool | None = None) -> dict[str, Any]:
    """edgeproxy's config for a PoP: listens on the anycast address (:80, :443 TCP and UDP), admin on
    its backhaul address, one origin group with every origin over the backhaul."""
    topo = plan.topology
    node = topo.nodes[pop]
    p = plan.nodes[pop]
    anycast = topo.lab.anycast
    origins = [f"{plan.nodes[o.name].backhaul_addr}:{o.port}" for o in topo.of_kind("origin")]
    pop_section: dict[str, Any] = {"id": pop, "state_dir": f"{run_dir}/{pop}/edgeproxy"}
    if with_workers is None:
        with_workers = edgeproxy_supports("workers")
    if with_workers:
        pop_section["workers"] = node.workers
    out: dict[str, Any] = {
        "pop": pop_section,
        "listen": {"http": [f"{anycast}:80"], "https": [f"{anycast}:443"], "quic": [f"{anycast}:443"]},
        "origin_groups": [{
            "name": ORIGIN_GROUP,
            "servers": origins,
            "policy": "round_robin",
            "connect_timeout": 2.0,
            "health": {"path": "/healthz", "interval": 1.0, "timeout": 1.0},
        }],
        "admin": {"listen": f"{p.backhaul_addr}:{ADMIN_PORT}"},
        "log": {"access_log": f"{run_dir}/{pop}/access.log", "level": "info"},
    }
    survival = topo.lab.survival
    if edgeproxy_has_section("steering"):
        out["steering"] = steering_section(plan, pop)
        out["steering"]["enabled"] = survival
    out.update(survival_sections(plan, pop, run_dir, survival=survival))
    # The topology's worker count, also without survival (edgeproxy's default is one per core).
    out.setdefault("backhaul", {})["workers"] = node.workers
    return out


def pop_index(plan: LabPlan, pop: str) -> int:
    """The PoP's quic_lb.pop_index: 1, 2, 3 ... in file order."""
    return [p.name for p in plan.pops()].index(pop) + 1


def gossip_in_force() -> bool:
    """Whether `edgeproxy run` has gossip membership and flow-table replication: the config has a
    [gossip] section and the PoP wires it. Until then the lab keeps static backhaul peers and
    relays TCP flows between PoPs itself (lab/supervisor.py --relay-to)."""
    import os

    want = os.environ.get("EDGEPROXY_LAB_GOSSIP", "auto")  # auto | 1 | 0 (a lab-wide override)
    if want in ("0", "off", "no") or not flow_replication() or not edgeproxy_has_section("gossip"):
        return False
    if want in ("1", "on", "yes"):
        return True
    try:
        import inspect

        from edgeproxy import pop as pop_module
        return "gossip.enabled" in inspect.getsource(pop_module)
    except (ImportError, OSError):  # pragma: no cover
        return False


def flow_replication() -> bool:
    """False with EDGEPROXY_LAB_FLOW_REPLICATION=0: neither gossip nor the lab's relay copies
    flows between PoPs (tests that inject flows by hand through POST /steering/inject)."""
    import os

    return os.environ.get("EDGEPROXY_LAB_FLOW_REPLICATION", "1") not in ("0", "off", "no")


def survival_sections(plan: LabPlan, pop: str, run_dir: str, *, survival: bool = True,
                      gossip: bool | None = None) -> dict[str, Any]:
    """[fleet], [quic_lb], [backhaul], [tickets] (and [gossip]): every PoP has the lab's fleet key
    file, its own QUIC-LB pop_index, a backhaul socket on its backhaul address and the other PoPs
    as static peers; fleet session tickets on. Without survival: QUIC-LB and tickets stay on
    (each PoP alone), no backhaul (no forwarding)."""
    p = plan.nodes[pop]
    out: dict[str, Any] = {
        "fleet": {"key_file": f"{run_dir}/{FLEET_KEY_FILE}"},
        "quic_lb": {"enabled": True, "pop_index": pop_index(plan, pop), "host_index": 0},
        "tickets": {"enabled": True},
    }
    if not survival:
        return out
    others = [q for q in plan.pops() if q.name != pop]
    out["backhaul"] = {
        "listen": f"{p.backhaul_addr}:{BACKHAUL_PORT}",
        "peers": [{"name": q.name, "pop_index": pop_index(plan, q.name), "host_index": 0,
                   "address": f"{q.backhaul_addr}:{BACKHAUL_PORT}"} for q in others],
    }
    if gossip is None:
        gossip = gossip_in_force()
    if gossip:
        out["gossip"] = {
            "enabled": True,
            "bind": f"{p.backhaul_addr}:{GOSSIP_PORT}",
            "join": [f"{q.backhaul_addr}:{GOSSIP_PORT}" for q in others],
            "keyring": f"{run_dir}/{GOSSIP_KEYRING_FILE}",
            "region": "lab",
            "flow_port": GOSSIP_PORT + 1,
            "profile": "local",
            "retry_interval": 1.0,
        }
    return out


def write_lab_secrets(run_dir: str) -> list[str]:
    """The lab run's fleet key file and gossip keyring (mode 0600), shared by its PoPs."""
    import base64
    import json
    import os
    import time

    from edgeproxy.quic.fleet import FleetKeys

    made = []
    key_file = f"{run_dir}/{FLEET_KEY_FILE}"
    if not os.path.exists(key_file):
        FleetKeys.generate(key_file, now=time.time())
        made.append(key_file)
    keyring = f"{run_dir}/{GOSSIP_KEYRING_FILE}"
    if not os.path.exists(keyring):
        fd = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps([base64.b64encode(os.urandom(32)).decode()]) + "\n")
        made.append(keyring)
    return made


def edgeproxy_has_section(name: str) -> bool:
    try:
        from edgeproxy.config import Config
    except ImportError:  # pragma: no cover - edgeproxy is part of this repository
        return False
    return name in {f.name for f in dataclasses.fields(Config)}


def steering_section(plan: LabPlan, pop: str) -> dict[str, Any]:
    """TCP steering over the shared backhaul bridge (plain routing): every PoP's backhaul address;
    connections are published at accept (min_age 0: a flap right after a handshake must find the
    flow at the other PoPs already); /steering/inject is on so tests can stand in for
    flow-table replication."""
    p = plan.nodes[pop]
    return {
        "enabled": True,
        "min_age": 0.0,
        "backhaul_device": p.backhaul_if,
        "mode": "route",
        "peers": {q.name: q.backhaul_addr for q in plan.pops()},
        "inject": True,
    }


# -- a small TOML writer (no third-party packages): tables, arrays of tables, scalars, lists --

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in v) + '"'
    if isinstance(v, list) and not any(isinstance(x, dict) for x in v):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as a TOML value")


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else _toml_value(k)


def dump_toml(data: dict[str, Any], _prefix: str = "") -> str:
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict) and not (
        isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    arrays = [(k, v) for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    out = [f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in scalars]
    for k, v in tables:
        name = f"{_prefix}{_toml_key(k)}"
        body = dump_toml(v, name + ".")
        out.append(f"\n[{name}]\n{body}")
    for k, items in arrays:
        name = f"{_prefix}{_toml_key(k)}"
        for item in items:
            out.append(f"\n[[{name}]]\n{dump_toml(item, name + '.')}")
    return "".join(out)


# -- impairments --------------------------------------------------------------------------------

def nft_loss_ruleset(ifaces: list[tuple[str, float]]) -> str:
    """One netdev table for a namespace: each (interface, loss) drops that fraction of the frames it
    receives (so a link with loss on both ends loses that fraction in each direction)."""
    chains = []
    for i, (ifname, loss) in enumerate(ifaces):
        threshold = round(loss * 10000)
        chains.append(f'  chain in{i} {{\n    type filter hook ingress device "{ifname}" priority 0; policy accept;\n'
                      f"    numgen random mod 10000 < {threshold} counter drop\n  }}\n")
    return f"table netdev {LOSS_TABLE} {{\n{''.join(chains)}}}\n"


def tbf_args(ifname: str, rate_mbit: float) -> list[str]:
    """`tc` arguments shaping an interface's egress to rate_mbit (token bucket)."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes * 0.005), 15140)  # 5 ms of traffic, at least ten full frames
    return ["qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{rate_mbit:g}mbit",
            "burst", str(burst), "latency", "50ms"]


def describe_plan(plan: LabPlan) -> list[str]:
    lines = []
    for n in plan.nodes.values():
        addrs = ", ".join(f"{i.ifname} {i.address or '(bridge port)'}" for i in n.ifaces.values())
        lo = f"; lo {', '.join(n.lo_addresses)}" if n.lo_addresses else ""
        lines.append(f"{n.name:<8} {n.kind:<8} {n.ns:<20} {addrs}{lo}")
    for w in plan.wires:
        lines.append(f"wire     link{w.link:<4} {w.ns:<20} {w.a_ns}:{w.a_if} <-> {w.b_ns}:{w.b_if}, {w.delay_ms:g} ms each way")
    return lines


def node_summary(n: NodePlan) -> dict[str, Any]:
    return {"kind": n.kind, "ns": n.ns, "ifaces": {i.ifname: i.address for i in n.ifaces.values()},
            "router_addr": n.router_addr, "gateway": n.gateway, "backhaul_addr": n.backhaul_addr}
