"""The lab's topology file: TOML in containerlab's shape, validated into typed dataclasses.

    name = "default"
    [lab]                               # lab-wide settings (all optional)
    anycast = "203.0.113.1"             # the address every PoP serves on (on its `lo`)
    prefix = "203.0.113.0/24"           # the prefix every PoP announces over BGP
    router_policy = "localpref"         # "localpref" (ordered failover) or "ecmp" (multipath)
    [nodes.p1]
    kind = "pop"                        # client | router | pop | origin | backhaul
    workers = 1
    [[links]]
    endpoints = ["p1:p1-r", "r:r-p1"]   # "node:interface" each side
    loss = 0.05                         # per direction, 0 <= loss < 1
    delay_ms = 20                       # one way
    rate_mbit = 100                     # each direction

Pure: `parse_topology` turns TOML text into a `Topology` or raises `TopologyError`, whose message
names the offending key (``links[2].loss: must be >= 0 and < 1, got 1.5``).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("client", "router", "pop", "origin", "backhaul")
POLICIES = ("localpref", "ecmp")
NODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,11}$")
IF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
RESERVED_IFS = ("lo", "br0", "wa", "wb")

DEFAULT_TOPOLOGY = Path(__file__).with_name("topologies") / "default.toml"


class TopologyError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class LabSettings:
    anycast: str = "203.0.113.1"
    prefix: str = "203.0.113.0/24"
    router_policy: str = "localpref"
    rp_filter: int = 2
    """Router reverse-path filter: 0 off, 2 loose (default); 1 (strict) breaks asymmetric replies."""
    bfd_ms: int = 0
    """BFD interval on router-PoP sessions in ms (0 = off; below 50 gave false failures under load)."""
    hold_s: int = 3
    keepalive_s: int = 1
    health_interval_s: float = 0.5
    """How often each PoP's supervisor polls the PoP's /healthz."""
    health_fall: int = 2
    health_rise: int = 2
    survival: bool = True
    """Connection survival in the PoP configs: QUIC-LB + backhaul forwarding, fleet tickets, TCP
    steering (and gossip when edgeproxy has it). false: the baseline, none of them."""


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    workers: int = 1
    local_pref: int | None = None
    asn: int | None = None
    port: int = 8080


@dataclass(frozen=True)
class Endpoint:
    node: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.node}:{self.ifname}"


@dataclass(frozen=True)
class Link:
    index: int
    a: Endpoint
    b: Endpoint
    loss: float = 0.0
    delay_ms: float = 0.0
    rate_mbit: float = 0.0

    @property
    def impaired(self) -> bool:
        return bool(self.loss or self.delay_ms or self.rate_mbit)


@dataclass(frozen=True)
class Topology:
    name: str
    lab: LabSettings
    nodes: dict[str, Node]
    links: tuple[Link, ...]
    source: str = field(default="", compare=False)

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    @property
    def router(self) -> Node:
        return self.of_kind("router")[0]

    @property
    def backhaul(self) -> Node | None:
        found = self.of_kind("backhaul")
        return found[0] if found else None

    def links_of(self, node: str) -> list[Link]:
        return [ln for ln in self.links if node in (ln.a.node, ln.b.node)]

    def link_between(self, a: str, b: str) -> Link | None:
        for ln in self.links:
            if {ln.a.node, ln.b.node} == {a, b}:
                return ln
        return None


# -- field checking ---------------------------------------------------------------------------

def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(key, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise TopologyError(key, f"must be {lo}..{hi}, got {value}")
    return value


def _num(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(key, f"expected a number, got {value!r}")
    return float(value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TopologyError(key, f"expected a string, got {value!r}")
    return value


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(key, f"expected a table, got {value!r}")
    return value


def _unknown(key: str, data: dict[str, Any], known: tuple[str, ...]) -> None:
    for name in data:
        if name not in known:
            raise TopologyError(f"{key}.{name}" if key else name, f"unknown option (known here: {', '.join(sorted(known))})")


LAB_KEYS = ("anycast", "prefix", "router_policy", "rp_filter", "bfd_ms", "hold_s", "keepalive_s",
            "health_interval_s", "health_fall", "health_rise", "survival")
NODE_KEYS: dict[str, tuple[str, ...]] = {
    "client": ("kind",),
    "router": ("kind", "asn"),
    "pop": ("kind", "workers", "local_pref", "asn"),
    "origin": ("kind", "port"),
    "backhaul": ("kind",),
}
LINK_KEYS = ("endpoints", "loss", "delay_ms", "rate_mbit")


def _parse_lab(data: dict[str, Any]) -> LabSettings:
    _unknown("lab", data, LAB_KEYS)
    d = LabSettings()
    anycast = _str("lab.anycast", data.get("anycast", d.anycast))
    prefix = _str("lab.prefix", data.get("prefix", d.prefix))
    try:
        addr = ipaddress.IPv4Address(anycast)
    except ValueError:
        raise TopologyError("lab.anycast", f"must be an IPv4 address, got {anycast!r}") from None
    try:
        net = ipaddress.IPv4Network(prefix)
    except ValueError:
        raise TopologyError("lab.prefix", f"must be an IPv4 prefix like 203.0.113.0/24, got {prefix!r}") from None
    if addr not in net:
        raise TopologyError("lab.anycast", f"{anycast} is not inside lab.prefix {prefix}")
    for lab_net in (ipaddress.IPv4Network("10.200.0.0/16"), ipaddress.IPv4Network("10.201.0.0/24")):
        if net.overlaps(lab_net):
            raise TopologyError("lab.prefix", f"{prefix} overlaps the lab's own addresses {lab_net}")
    policy = _str("lab.router_policy", data.get("router_policy", d.router_policy))
    if policy not in POLICIES:
        raise TopologyError("lab.router_policy", f"must be 'localpref' or 'ecmp', got {policy!r}")
    rp = _int("lab.rp_filter", data.get("rp_filter", d.rp_filter), 0, 2)
    bfd = _int("lab.bfd_ms", data.get("bfd_ms", d.bfd_ms), 0, 10_000)
    if 0 < bfd < 10:
        raise TopologyError("lab.bfd_ms", f"must be 0 (off) or >= 10, got {bfd}")
    hold = _int("lab.hold_s", data.get("hold_s", d.hold_s), 3, 65535)
    keepalive = _int("lab.keepalive_s", data.get("keepalive_s", d.keepalive_s), 1, 65535)
    if keepalive * 3 > hold:
        raise TopologyError("lab.keepalive_s", f"must be at most a third of lab.hold_s ({hold}), got {keepalive}")
    interval = _num("lab.health_interval_s", data.get("health_interval_s", d.health_interval_s))
    if not 0.05 <= interval <= 60:
        raise TopologyError("lab.health_interval_s", f"must be 0.05..60, got {interval}")
    fall = _int("lab.health_fall", data.get("health_fall", d.health_fall), 1, 100)
    rise = _int("lab.health_rise", data.get("health_rise", d.health_rise), 1, 100)
    survival = data.get("survival", d.survival)
    if not isinstance(survival, bool):
        raise TopologyError("lab.survival", f"must be true or false, got {survival!r}")
    return LabSettings(str(addr), str(net), policy, rp, bfd, hold, keepalive, interval, fall, rise, survival)


def _parse_node(name: str, data: Any) -> Node:
    key = f"nodes.{name}"
    if not NODE_NAME.match(name):
        raise TopologyError(key, "node names are 1-12 characters: a lowercase letter, then lowercase letters, digits or '_'")
    data = _table(key, data)
    if "kind" not in data:
        raise TopologyError(f"{key}.kind", f"is required (one of {', '.join(KINDS)})")
    kind = _str(f"{key}.kind", data["kind"])
    if kind not in KINDS:
        raise TopologyError(f"{key}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    known = NODE_KEYS[kind]
    for opt in data:
        if opt not in known:
            raise TopologyError(f"{key}.{opt}", f"unknown option for kind {kind!r} (known: {', '.join(known)})")
    workers = _int(f"{key}.workers", data.get("workers", 1), 1, 64)
    local_pref = data.get("local_pref")
    if local_pref is not None:
        local_pref = _int(f"{key}.local_pref", local_pref, 0, 2**32 - 1)
    asn = data.get("asn")
    if asn is not None:
        asn = _int(f"{key}.asn", asn, 1, 2**32 - 1)
    port = _int(f"{key}.port", data.get("port", 8080), 1, 65535)
    return Node(name, kind, workers, local_pref, asn, port)


def _parse_endpoint(key: str, value: Any, nodes: dict[str, Node]) -> Endpoint:
    text = _str(key, value)
    node, sep, ifname = text.partition(":")
    if not sep or not node or not ifname:
        raise TopologyError(key, f"expected 'node:interface', got {text!r}")
    if node not in nodes:
        raise TopologyError(key, f"no such node {node!r} (nodes: {', '.join(sorted(nodes))})")
    if not IF_NAME.match(ifname):
        raise TopologyError(key, f"interface name must be 1-15 characters of letters, digits, '_', '.', '-', got {ifname!r}")
    if ifname in RESERVED_IFS:
        raise TopologyError(key, f"interface name {ifname!r} is reserved by the lab ({', '.join(RESERVED_IFS)})")
    return Endpoint(node, ifname)


def _parse_link(i: int, data: Any, nodes: dict[str, Node]) -> Link:
    key = f"links[{i}]"
    data = _table(key, data)
    _unknown(key, data, LINK_KEYS)
    if "endpoints" not in data:
        raise TopologyError(f"{key}.endpoints", 'is required: ["node:interface", "node:interface"]')
    eps = data["endpoints"]
    if not isinstance(eps, list) or len(eps) != 2:
        raise TopologyError(f"{key}.endpoints", f"expected a list of two 'node:interface' strings, got {eps!r}")
    a = _parse_endpoint(f"{key}.endpoints[0]", eps[0], nodes)
    b = _parse_endpoint(f"{key}.endpoints[1]", eps[1], nodes)
    if a.node == b.node:
        raise TopologyError(f"{key}.endpoints", f"a link joins two different nodes, both ends are {a.node!r}")
    loss = _num(f"{key}.loss", data.get("loss", 0.0))
    if not 0 <= loss < 1:
        raise TopologyError(f"{key}.loss", f"must be >= 0 and < 1 (a fraction: 0.05 is 5 %), got {loss}")
    delay = _num(f"{key}.delay_ms", data.get("delay_ms", 0.0))
    if not 0 <= delay <= 10_000:
        raise TopologyError(f"{key}.delay_ms", f"must be 0..10000, got {delay}")
    rate = _num(f"{key}.rate_mbit", data.get("rate_mbit", 0.0))
    if rate < 0 or rate > 100_000 or (0 < rate < 0.1):
        raise TopologyError(f"{key}.rate_mbit", f"must be 0 (unlimited) or 0.1..100000, got {rate}")
    return Link(i, a, b, loss, delay, rate)


def _check_structure(nodes: dict[str, Node], links: tuple[Link, ...]) -> None:
    kinds = {k: [n for n in nodes.values() if n.kind == k] for k in KINDS}
    if len(kinds["router"]) != 1:
        raise TopologyError("nodes", f"exactly one node of kind 'router' is supported, got {len(kinds['router'])}")
    if not kinds["pop"]:
        raise TopologyError("nodes", "at least one node of kind 'pop' is needed")
    if not kinds["origin"]:
        raise TopologyError("nodes", "at least one node of kind 'origin' is needed (the PoPs' origin group)")
    if len(kinds["backhaul"]) != 1:
        raise TopologyError("nodes", f"exactly one node of kind 'backhaul' is needed, got {len(kinds['backhaul'])}")
    router = kinds["router"][0].name
    backhaul = kinds["backhaul"][0].name
    seen: dict[tuple[str, str], str] = {}
    for ln in links:
        for j, ep in enumerate((ln.a, ln.b)):
            where = f"links[{ln.index}].endpoints[{j}]"
            if (ep.node, ep.ifname) in seen:
                raise TopologyError(where, f"interface {ep} is already used by {seen[(ep.node, ep.ifname)]}")
            seen[(ep.node, ep.ifname)] = f"links[{ln.index}]"
        pair = {nodes[ln.a.node].kind, nodes[ln.b.node].kind}
        allowed = [{"client", "router"}, {"pop", "router"}, {"pop", "backhaul"}, {"origin", "backhaul"}]
        if pair not in allowed:
            raise TopologyError(
                f"links[{ln.index}].endpoints",
                f"a {' - '.join(sorted(pair))} link is not supported (client-router, pop-router, pop-backhaul, origin-backhaul are)",
            )
    joined: dict[frozenset[str], int] = {}
    for ln in links:
        ends = frozenset((ln.a.node, ln.b.node))
        if ends in joined:
            raise TopologyError(f"links[{ln.index}].endpoints",
                                f"{' and '.join(sorted(ends))} are already joined by links[{joined[ends]}] (one link per pair)")
        joined[ends] = ln.index
    for n in nodes.values():
        peers = [(ln.b.node if ln.a.node == n.name else ln.a.node) for ln in links if n.name in (ln.a.node, ln.b.node)]
        if n.kind == "client" and peers != [router]:
            raise TopologyError(f"nodes.{n.name}", f"a client needs exactly one link, to the router {router!r}")
        if n.kind == "pop" and router not in peers:
            raise TopologyError(f"nodes.{n.name}", f"a pop needs a link to the router {router!r}")
        if n.kind == "pop" and backhaul not in peers:
            raise TopologyError(f"nodes.{n.name}", f"a pop needs a link to the backhaul {backhaul!r} (its origin traffic and admin)")
        if n.kind == "origin" and peers != [backhaul]:
            raise TopologyError(f"nodes.{n.name}", f"an origin needs exactly one link, to the backhaul {backhaul!r}")
    # The address plan (lab/plan.py): PoP i gets 10.200.i.0/30 and 10.201.0.i, client i 10.200.(100+i).0/30,
    # origin i 10.201.0.(100+i).
    for kind, most in (("pop", 99), ("client", 150), ("origin", 150)):
        if len(kinds[kind]) > most:
            raise TopologyError("nodes", f"at most {most} nodes of kind {kind!r}, got {len(kinds[kind])}")


def parse_topology(text: str) -> Topology:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError("", f"not valid TOML: {e}") from None
    return topology_from_dict(data, source=text)


def topology_from_dict(data: dict[str, Any], source: str = "") -> Topology:
    _unknown("", data, ("name", "lab", "nodes", "links"))
    name = _str("name", data.get("name", "lab"))
    lab = _parse_lab(_table("lab", data.get("lab", {})))
    raw_nodes = _table("nodes", data.get("nodes", {}))
    if not raw_nodes:
        raise TopologyError("nodes", "is required: [nodes.<name>] tables with a kind")
    nodes = {n: _parse_node(n, v) for n, v in raw_nodes.items()}
    raw_links = data.get("links", [])
    if not isinstance(raw_links, list):
        raise TopologyError("links", "expected an array of tables ([[links]])")
    links = tuple(_parse_link(i, v, nodes) for i, v in enumerate(raw_links))
    _check_structure(nodes, links)
    return Topology(name, lab, nodes, links, source)


def load_topology(path: str | Path | None = None) -> Topology:
    p = Path(path) if path else DEFAULT_TOPOLOGY
    try:
        text = p.read_text("utf-8")
    except OSError as e:
        raise TopologyError("", f"cannot read {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TopologyError("", f"{p}: not UTF-8") from None
    try:
        return parse_topology(text)
    except TopologyError as e:
        raise TopologyError(e.key, f"{e.message} (in {p})") from None
