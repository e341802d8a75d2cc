"""edgeproxy-lab without root: topology parsing and validation, the address plan, generated BIRD and
edgeproxy configs, parsers, the journal."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.config import config_from_dict
from lab import cli, configgen
from lab.observe import parse_monitor_line, parse_schedule, parse_show_protocols, route_nexthops
from lab.plan import make_plan
from lab.state import StateDir, is_ours, proc_starttime
from lab.topology import (
    DEFAULT_TOPOLOGY,
    TopologyError,
    load_topology,
    parse_topology,
    topology_from_dict,
)

DEFAULT_TEXT = DEFAULT_TOPOLOGY.read_text()


def default_dict() -> dict[str, Any]:
    return tomllib.loads(DEFAULT_TEXT)


def test_default_topology_shape() -> None:
    topo = load_topology()
    kinds = sorted(n.kind for n in topo.nodes.values())
    assert kinds == ["backhaul", "client", "client", "origin", "pop", "pop", "pop", "router"]
    assert topo.lab.anycast == "203.0.113.1" and topo.lab.router_policy == "localpref"
    impaired = [ln for ln in topo.links if ln.impaired]
    assert len(impaired) == 1 and impaired[0].delay_ms == 10 and impaired[0].loss == 0.01 and impaired[0].rate_mbit == 100


def test_address_plan() -> None:
    plan = make_plan(load_topology(), "ab12")
    p1, p3, r, o1, c1 = (plan.nodes[n] for n in ("p1", "p3", "r", "o1", "c1"))
    assert p1.ns == "epl-ab12-p1"
    assert p1.ifaces["p1-r"].address == "10.200.1.2/30" and p1.gateway == "10.200.1.1"
    assert p3.router_addr == "10.200.3.2" and p3.backhaul_addr == "10.201.0.3"
    assert p1.lo_addresses == ["203.0.113.1/32"]
    assert ("default", "10.200.1.1", "p1-r") in p1.routes
    assert r.ifaces["r-p2"].address == "10.200.2.1/30"
    assert r.sysctls["net.ipv4.ip_forward"] == "1" and r.sysctls["net.ipv4.conf.all.rp_filter"] == "2"
    assert r.sysctls["net.ipv4.conf.r-p1.rp_filter"] == "2"
    assert p1.sysctls["net.ipv4.ip_forward"] == "1"
    assert o1.ifaces["o1-bh"].address == "10.201.0.101/24" and not o1.routes
    assert c1.ifaces["eth0"].address == "10.200.101.2/30"
    assert sorted(plan.bridge_ports) == ["bh-o1", "bh-p1", "bh-p2", "bh-p3"]
    # the delayed link runs through a wire namespace that cannot clash with a node's
    assert [(w.ns, w.a_if, w.b_if, w.delay_ms) for w in plan.wires] == [("epl-ab12--w1", "eth0", "r-c2", 10.0)]
    assert len(plan.namespaces) == len(set(plan.namespaces)) == 9
    assert plan.admin_url("p2") == "http://10.201.0.2:9901"
    # loss/rate on both ends of the impaired link
    assert {(i.ns, i.ifname) for i in plan.impairments} == {("epl-ab12-c2", "eth0"), ("epl-ab12-r", "r-c2")}


def test_ecmp_plan_sets_l4_hash() -> None:
    d = default_dict()
    d["lab"]["router_policy"] = "ecmp"
    plan = make_plan(topology_from_dict(d), "x")
    assert plan.router.sysctls["net.ipv4.fib_multipath_hash_policy"] == "1"
    assert {configgen.default_local_pref(plan, p.name) for p in plan.pops()} == {100}


def test_bad_run_id() -> None:
    with pytest.raises(ValueError, match="run id"):
        make_plan(load_topology(), "Bad-Id")


def _mutate(path: str, value: Any) -> dict[str, Any]:
    d = default_dict()
    target: Any = d
    parts = path.split("/")
    for p in parts[:-1]:
        target = target[int(p)] if isinstance(target, list) else target[p]
    last = parts[-1]
    if value is DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return d


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "key", "text"),
    [
        ("bogus", 1, "bogus", "unknown option"),
        ("lab/anycast", "203.0.113.x", "lab.anycast", "IPv4 address"),
        ("lab/anycast", "198.51.100.1", "lab.anycast", "not inside lab.prefix"),
        ("lab/router_policy", "hotpotato", "lab.router_policy", "'localpref' or 'ecmp'"),
        ("lab/rp_filter", 3, "lab.rp_filter", "0..2"),
        ("lab/bfd_ms", 5, "lab.bfd_ms", ">= 10"),
        ("lab/keepalive_s", 2, "lab.keepalive_s", "third"),
        ("lab/colour", "red", "lab.colour", "unknown option"),
        ("nodes/p1/kind", "server", "nodes.p1.kind", "must be one of"),
        ("nodes/p1/kind", DELETE, "nodes.p1.kind", "is required"),
        ("nodes/p1/workers", 0, "nodes.p1.workers", "1..64"),
        ("nodes/p1/workers", "2", "nodes.p1.workers", "expected an integer"),
        ("nodes/p1/port", 80, "nodes.p1.port", "unknown option for kind 'pop'"),
        ("nodes/o1/port", 70000, "nodes.o1.port", "1..65535"),
        ("nodes/P-1", {"kind": "pop"}, "nodes.P-1", "node names"),
        ("links/0/loss", 1.5, "links[0].loss", ">= 0 and < 1"),
        ("links/0/loss", "5%", "links[0].loss", "expected a number"),
        ("links/0/delay_ms", -1, "links[0].delay_ms", "0..10000"),
        ("links/0/rate_mbit", -5, "links[0].rate_mbit", "0 (unlimited)"),
        ("links/0/jitter_ms", 3, "links[0].jitter_ms", "unknown option"),
        ("links/0/endpoints", ["c1:eth0"], "links[0].endpoints", "two"),
        ("links/0/endpoints", ["c1", "r:r-c1"], "links[0].endpoints[0]", "node:interface"),
        ("links/0/endpoints", ["zz:eth0", "r:r-c1"], "links[0].endpoints[0]", "no such node 'zz'"),
        ("links/0/endpoints", ["c1:eth0", "r:an-interface-name-too-long"], "links[0].endpoints[1]", "1-15"),
        ("links/0/endpoints", ["c1:lo", "r:r-c1"], "links[0].endpoints[0]", "reserved"),
        ("links/0/endpoints", ["c1:eth0", "c1:eth1"], "links[0].endpoints", "two different nodes"),
        ("links/0/endpoints", ["c1:eth0", "r:r-c2"], "links[1].endpoints[1]", "already used"),
        ("links/0/endpoints", ["c1:eth0", "p1:p1-c"], "links[0].endpoints", "not supported"),
        ("links/1/endpoints", ["c1:eth1", "r:r-c9"], "links[1].endpoints", "already joined by links[0]"),
        ("nodes/r", {"kind": "client"}, "nodes", "exactly one node of kind 'router'"),
        ("nodes/bh/kind", "origin", "nodes", "backhaul"),
    ],
)
def test_validation_errors_name_the_key(path: str, value: Any, key: str, text: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology_from_dict(_mutate(path, value))
    assert info.value.key == key, str(info.value)
    assert text in info.value.message


def test_structure_errors() -> None:
    d = default_dict()
    d["lab"].update(prefix="10.200.0.0/24", anycast="10.200.0.1")
    with pytest.raises(TopologyError, match=r"^lab\.prefix: .*overlaps"):
        topology_from_dict(d)
    d = default_dict()
    d["links"] = [ln for ln in d["links"] if ln["endpoints"][0] != "p1:p1-r"]
    with pytest.raises(TopologyError, match=r"^nodes\.p1: a pop needs a link to the router"):
        topology_from_dict(d)
    d = default_dict()
    del d["nodes"]["o1"]
    d["links"] = [ln for ln in d["links"] if "o1:o1-bh" not in ln["endpoints"]]
    with pytest.raises(TopologyError, match="origin"):
        topology_from_dict(d)
    with pytest.raises(TopologyError, match="not valid TOML"):
        parse_topology("nodes = [")


def test_load_topology_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text(DEFAULT_TEXT.replace('kind = "origin"', 'kind = "origin"\ncolour = 1'))
    with pytest.raises(TopologyError, match=r"nodes\.o1\.colour: unknown option .* \(in .*t\.toml\)"):
        load_topology(bad)
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")


# -- generated configs ---------------------------------------------------------------------------

def test_edgeproxy_config_is_valid(tmp_path: Path) -> None:
    plan = make_plan(load_topology(), "x")
    configgen.write_lab_secrets(str(tmp_path))  # the run's fleet keys and gossip keyring
    assert (tmp_path / configgen.FLEET_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / configgen.GOSSIP_KEYRING_FILE).stat().st_mode & 0o777 == 0o600
    for pop in ("p1", "p2", "p3"):
        data = configgen.edgeproxy_pop_config(plan, pop, str(tmp_path), with_workers=False)
        text = configgen.dump_toml(data)
        assert tomllib.loads(text) == data
        cfg = config_from_dict(tomllib.loads(text), base_dir=str(tmp_path))
        assert cfg.pop.id == pop
        assert cfg.listen.http == ["203.0.113.1:80"] and cfg.listen.https == cfg.listen.quic == ["203.0.113.1:443"]
        assert cfg.admin.listen == f"{plan.nodes[pop].backhaul_addr}:9901"
        assert cfg.origin_groups[0].servers == ["10.201.0.101:8080"]
        # survival on: shared fleet keys, own QUIC-LB index, static backhaul peers, tickets, steering
        assert cfg.fleet.key_file == f"{tmp_path}/{configgen.FLEET_KEY_FILE}"
        assert cfg.quic_lb.enabled and cfg.quic_lb.pop_index == int(pop[1:])
        assert cfg.backhaul.listen == f"{plan.nodes[pop].backhaul_addr}:{configgen.BACKHAUL_PORT}"
        assert sorted(p.name for p in cfg.backhaul.peers) == sorted({"p1", "p2", "p3"} - {pop})
        assert cfg.tickets.enabled and cfg.steering.enabled
    with_workers = configgen.edgeproxy_pop_config(plan, "p1", str(tmp_path), with_workers=True)
    assert with_workers["pop"]["workers"] == 1


toml_keys = st.text(alphabet="abcxyz_-", min_size=1, max_size=6)
toml_scalars = st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.text(max_size=20),
                         st.floats(allow_nan=False, allow_infinity=False))
toml_tables = st.recursive(
    st.dictionaries(toml_keys, st.one_of(toml_scalars, st.lists(st.integers(), max_size=3)), max_size=4),
    lambda children: st.dictionaries(toml_keys, st.one_of(children, st.lists(children, min_size=1, max_size=2)), max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(toml_tables)
def test_dump_toml_round_trips(data: dict[str, Any]) -> None:
    assert tomllib.loads(configgen.dump_toml(data)) == data


def _bird_parses(conf: str, tmp_path: Path) -> None:
    path = tmp_path / "bird.conf"
    path.write_text(conf)
    r = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr + "\n" + conf


needs_bird = pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed (apt-get install bird2)")


@pytest.mark.parametrize("policy", ["localpref", "ecmp"])
@pytest.mark.parametrize("bfd", [0, 50])
def test_bird_configs(policy: str, bfd: int, tmp_path: Path) -> None:
    d = default_dict()
    d["lab"].update(router_policy=policy, bfd_ms=bfd)
    plan = make_plan(topology_from_dict(d), "x")
    run_dir = str(tmp_path)
    router = configgen.bird_router_conf(plan, run_dir)
    assert "protocol bgp bgp_p1 from pop { neighbor 10.200.1.2 as 65100; local 10.200.1.1;" in router
    assert ("merge paths yes" in router) == (policy == "ecmp")
    assert ("bfd on;" in router) == bool(bfd)
    if policy == "localpref":
        assert [f"bgp_local_pref = {v};" in router for v in (290, 280, 270)] == [True] * 3
    pop = configgen.bird_pop_conf(plan, "p2", run_dir)
    assert "route 203.0.113.0/24 blackhole;" in pop and "disabled yes;" in pop
    assert "neighbor 10.200.2.1 as 65000;" in pop and "connect delay time 1;" in pop
    demoted = configgen.bird_router_conf(plan, run_dir, {"p1": configgen.demoted_local_pref(plan, "p1")})
    rejected = configgen.bird_router_conf(plan, run_dir, {"p1": configgen.REJECT})
    assert "import none;" in rejected.split("bgp_p1")[1].split("\n")[0]
    if shutil.which("bird") is None:
        pytest.skip("bird2 not installed: generated configs not checked with `bird -p`")
    for node in ("r", "p2"):
        (tmp_path / node).mkdir()
    for conf in (router, pop, demoted, rejected):
        _bird_parses(conf, tmp_path)


def test_demoted_local_pref_is_lowest() -> None:
    plan = make_plan(load_topology(), "x")
    assert configgen.demoted_local_pref(plan, "p1") < min(configgen.default_local_pref(plan, p) for p in ("p2", "p3"))


def test_impairment_commands() -> None:
    rules = configgen.nft_loss_ruleset([("eth0", 0.05), ("r-c2", 0.2)])
    assert 'device "eth0"' in rules and "numgen random mod 10000 < 500 counter drop" in rules
    assert "< 2000" in rules and rules.startswith("table netdev epl_loss {")
    args = configgen.tbf_args("eth0", 100)
    assert args[:7] == ["qdisc", "replace", "dev", "eth0", "root", "tbf", "rate"] and "100mbit" in args


# -- parsers -----------------------------------------------------------------------------------------

SHOW_PROTOCOLS = "\n".join([  # birdc pads its columns with trailing spaces
    "BIRD 2.0.12 ready.",
    "Name       Proto      Table      State  Since         Info",
    "device1    Device     ---        up     2026-11-21 11:35:04.120  ",
    "kernel1    Kernel     master4    up     2026-11-21 11:35:04.120  ",
    "bgp_p1     BGP        ---        up     2026-11-21 11:35:05.311  Established   ",
    "bgp_p2     BGP        ---        start  2026-11-21 11:35:04.120  Active        Socket: Connection refused",
    "anycast    Static     master4    down   2026-11-21 11:35:04.120  ",
])

def test_parse_show_protocols() -> None:
    protos = parse_show_protocols(SHOW_PROTOCOLS)
    assert set(protos) == {"device1", "kernel1", "bgp_p1", "bgp_p2", "anycast"}
    assert protos["bgp_p1"].established and not protos["bgp_p2"].established
    assert protos["bgp_p2"].info == "Active        Socket: Connection refused"
    assert protos["anycast"].state == "down" and not protos["anycast"].established


def test_parse_monitor_line_and_nexthops() -> None:
    ev = parse_monitor_line("[2026-11-21T11:35:04.120227] 203.0.113.0/24 via 10.200.2.2 dev r-p2 proto bird metric 32 ")
    assert ev is not None and ev.prefix == "203.0.113.0/24" and not ev.deleted
    assert abs(ev.ts % 1 - 0.120227) < 1e-5
    gone = parse_monitor_line("[2026-11-21T11:35:04.5] Deleted 203.0.113.0/24 via 10.200.1.2 dev r-p1 proto bird metric 32")
    assert gone is not None and gone.deleted and gone.prefix == "203.0.113.0/24"
    assert parse_monitor_line("nexthop via 10.200.1.2 dev r-p1 weight 1") is None
    multi = "203.0.113.0/24 proto bird metric 32\n\tnexthop via 10.200.1.2 dev r-p1 weight 1\n\tnexthop via 10.200.3.2 dev r-p3 weight 1"
    assert route_nexthops(multi) == ["10.200.1.2", "10.200.3.2"]


def test_schedules_are_bounded() -> None:
    assert list(parse_schedule("once").intervals(100)) == [0.0]
    assert list(parse_schedule("periodic:5s").intervals(3)) == [0.0, 5.0, 5.0]
    assert list(parse_schedule("periodic:250ms").intervals(2)) == [0.0, 0.25]
    r1 = list(parse_schedule("random:7:10s").intervals(20))
    assert r1 == list(parse_schedule("random:7:10s").intervals(20)) and len(r1) == 20 and all(x >= 0 for x in r1)
    for bad in ("sometimes", "periodic:", "periodic:0s", "random:x:1s", "random:1", "periodic:5h"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


# -- journal and CLI -------------------------------------------------------------------------------

def test_journal_survives_a_torn_line(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.record("netns", name="epl-x-a")
    state.record("proc", role="bird", ns="", pid=os.getpid(), starttime=proc_starttime(os.getpid()))
    with open(state.journal, "a") as f:
        f.write('{"kind": "netns", "na')  # a crash mid-write
    assert state.namespaces() == ["epl-x-a"]
    (rec,) = state.processes()
    assert is_ours(rec)
    assert not is_ours({**rec, "starttime": rec["starttime"] + 1})  # a recycled pid is not ours


def test_cli_check_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == 0
    assert "epl-x-p1" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_TEXT.replace("loss = 0.01", "loss = 2"))
    assert cli.main(["check", "--topology", str(bad)]) == 1
    assert "links[1].loss: must be >= 0 and < 1" in capsys.readouterr().err
    assert cli.main(["load"]) == 2
    assert cli.main(["status", "--state-dir", str(tmp_path / "none")]) == 1


def test_edgeproxy_config_without_survival(tmp_path: Path) -> None:
    import dataclasses

    topo = load_topology()
    plan = make_plan(dataclasses.replace(topo, lab=dataclasses.replace(topo.lab, survival=False)), "x")
    configgen.write_lab_secrets(str(tmp_path))
    data = configgen.edgeproxy_pop_config(plan, "p1", str(tmp_path), with_workers=False)
    cfg = config_from_dict(tomllib.loads(configgen.dump_toml(data)), base_dir=str(tmp_path))
    assert cfg.backhaul.listen == "" and not cfg.backhaul.peers and not cfg.steering.enabled
    assert not getattr(getattr(cfg, "gossip", None), "enabled", False)
