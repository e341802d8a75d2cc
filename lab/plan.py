"""Address and namespace plan for a topology (pure: no I/O).

- Namespaces: ``epl-<run>-<node>`` for nodes, ``epl-<run>--w<link>`` for delay wires (node names
  have no '-', so the two can never clash).
- PoP i (in file order, from 1): ``10.200.i.2/30`` facing the router (router ``10.200.i.1``) and
  ``10.201.0.i/24`` on the backhaul; the anycast address as /32 on ``lo``; default via the router.
- Client i: ``10.200.(100+i).2/30``, router ``.1``, default via the router.
- Origin i: ``10.201.0.(100+i)/24`` on the backhaul (on-link with every PoP; no default route).
- Backhaul: a bridge ``br0`` in its namespace with every backhaul-facing interface as a port.
- A link with ``delay_ms`` runs through a wire namespace: ``a:if <-> wa`` and ``wb <-> b:if``,
  with a userspace AF_PACKET process (lab/wire.py) forwarding between ``wa`` and ``wb``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .topology import Link, Topology

RUN_ID = re.compile(r"^[a-z0-9]{1,12}$")
NS_PREFIX = "epl-"
ROUTER_NET = "10.200"
BACKHAUL_NET = "10.201.0"
BRIDGE = "br0"
ADMIN_PORT = 9901


def node_ns(run_id: str, node: str) -> str:
    return f"{NS_PREFIX}{run_id}-{node}"


def wire_ns(run_id: str, link_index: int) -> str:
    return f"{NS_PREFIX}{run_id}--w{link_index}"


@dataclass(frozen=True)
class Iface:
    ifname: str
    address: str | None  # CIDR, or None for a bridge port
    peer: str | None = None  # the other end's address on a point-to-point link


@dataclass
class NodePlan:
    name: str
    kind: str
    ns: str
    ifaces: dict[str, Iface] = field(default_factory=dict)
    lo_addresses: list[str] = field(default_factory=list)
    routes: list[tuple[str, str, str]] = field(default_factory=list)  # (dst, via, dev)
    sysctls: dict[str, str] = field(default_factory=dict)
    router_if: str = ""  # pop/client: the interface facing the router
    router_addr: str = ""  # pop/client: its own address facing the router (no prefix length)
    gateway: str = ""  # pop/client: the router's address on that link
    backhaul_addr: str = ""  # pop/origin: address on the backhaul (no prefix length)
    backhaul_if: str = ""


@dataclass(frozen=True)
class VethPlan:
    link: int
    a_ns: str
    a_if: str
    b_ns: str
    b_if: str


@dataclass(frozen=True)
class WirePlan:
    link: int
    ns: str
    a_if: str  # the real endpoints' interfaces (offloads off on them too)
    a_ns: str
    b_if: str
    b_ns: str
    delay_ms: float


@dataclass(frozen=True)
class Impairment:
    link: int
    ns: str
    ifname: str
    loss: float
    rate_mbit: float
    delay_ms: float


@dataclass
class LabPlan:
    run_id: str
    topology: Topology
    nodes: dict[str, NodePlan]
    veths: list[VethPlan]
    wires: list[WirePlan]
    bridge_ports: list[str]  # interfaces enslaved to br0 in the backhaul namespace
    impairments: list[Impairment]

    @property
    def namespaces(self) -> list[str]:
        return [n.ns for n in self.nodes.values()] + [w.ns for w in self.wires]

    def pops(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.kind == "pop"]

    @property
    def router(self) -> NodePlan:
        return self.nodes[self.topology.router.name]

    def admin_url(self, pop: str) -> str:
        return f"http://{self.nodes[pop].backhaul_addr}:{ADMIN_PORT}"


def _side(link: Link, node: str) -> tuple[str, str]:
    """(this node's interface, the peer node) on a link."""
    if link.a.node == node:
        return link.a.ifname, link.b.node
    return link.b.ifname, link.a.node


def make_plan(topo: Topology, run_id: str) -> LabPlan:
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id must be 1-12 lowercase letters or digits, got {run_id!r}")
    router = topo.router.name
    backhaul = topo.backhaul.name if topo.backhaul else ""
    nodes = {n.name: NodePlan(n.name, n.kind, node_ns(run_id, n.name)) for n in topo.nodes.values()}
    for p in nodes.values():
        p.sysctls["net.ipv4.conf.all.rp_filter"] = "0"
        p.sysctls["net.ipv4.conf.default.rp_filter"] = "0"
    rp = str(topo.lab.rp_filter)
    rplan = nodes[router]
    rplan.sysctls.update({
        "net.ipv4.ip_forward": "1",
        "net.ipv4.conf.all.rp_filter": rp,
        "net.ipv4.conf.default.rp_filter": rp,
    })
    if topo.lab.router_policy == "ecmp":
        rplan.sysctls["net.ipv4.fib_multipath_hash_policy"] = "1"

    pop_index = {n.name: i for i, n in enumerate(topo.of_kind("pop"), 1)}
    client_index = {n.name: i for i, n in enumerate(topo.of_kind("client"), 1)}
    origin_index = {n.name: i for i, n in enumerate(topo.of_kind("origin"), 1)}
    for name in pop_index:
        p = nodes[name]
        p.lo_addresses.append(f"{topo.lab.anycast}/32")
        p.sysctls["net.ipv4.ip_forward"] = "1"  # forwarding PoPs (cross-PoP steering) need it

    for ln in topo.links:
        kinds = {topo.nodes[ln.a.node].kind, topo.nodes[ln.b.node].kind}
        if "router" in kinds:
            other = ln.b.node if ln.a.node == router else ln.a.node
            third = pop_index[other] if other in pop_index else 100 + client_index[other]
            r_if, _ = _side(ln, router)
            o_if, _ = _side(ln, other)
            r_addr, o_addr = f"{ROUTER_NET}.{third}.1", f"{ROUTER_NET}.{third}.2"
            rplan.ifaces[r_if] = Iface(r_if, f"{r_addr}/30", o_addr)
            rplan.sysctls[f"net.ipv4.conf.{r_if}.rp_filter"] = rp
            op = nodes[other]
            op.ifaces[o_if] = Iface(o_if, f"{o_addr}/30", r_addr)
            op.router_if, op.router_addr, op.gateway = o_if, o_addr, r_addr
            op.routes.append(("default", r_addr, o_if))
        else:  # backhaul link
            other = ln.b.node if ln.a.node == backhaul else ln.a.node
            last = pop_index[other] if other in pop_index else 100 + origin_index[other]
            o_if, _ = _side(ln, other)
            bh_if, _ = _side(ln, backhaul)
            op = nodes[other]
            op.ifaces[o_if] = Iface(o_if, f"{BACKHAUL_NET}.{last}/24")
            op.backhaul_addr, op.backhaul_if = f"{BACKHAUL_NET}.{last}", o_if
            nodes[backhaul].ifaces[bh_if] = Iface(bh_if, None)

    veths: list[VethPlan] = []
    wires: list[WirePlan] = []
    impairments: list[Impairment] = []
    for ln in topo.links:
        a_ns, b_ns = nodes[ln.a.node].ns, nodes[ln.b.node].ns
        if ln.delay_ms:
            w = wire_ns(run_id, ln.index)
            veths.append(VethPlan(ln.index, a_ns, ln.a.ifname, w, "wa"))
            veths.append(VethPlan(ln.index, b_ns, ln.b.ifname, w, "wb"))
            wires.append(WirePlan(ln.index, w, ln.a.ifname, a_ns, ln.b.ifname, b_ns, ln.delay_ms))
        else:
            veths.append(VethPlan(ln.index, a_ns, ln.a.ifname, b_ns, ln.b.ifname))
        if ln.impaired:
            for ep in (ln.a, ln.b):
                impairments.append(Impairment(ln.index, nodes[ep.node].ns, ep.ifname, ln.loss, ln.rate_mbit, ln.delay_ms))
    bridge_ports = list(nodes[backhaul].ifaces) if backhaul else []
    return LabPlan(run_id, topo, nodes, veths, wires, bridge_ports, impairments)
