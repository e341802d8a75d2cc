"""Policy routing for steered segments: ip rules, route tables, VXLAN, sysctls; restored exactly.

For every peer PoP ``i`` (peers sorted by name, from 1) with backhaul address ``A_i``:

* ``ip rule add pref <rule_pref> fwmark <mark + i> lookup <table + i>``
* route mode (a shared L2 backhaul): ``ip route replace default via A_i dev <backhaul_device>
  table <table + i>``
* vxlan mode: one device ``vxlan_device`` (``id vxlan_id local <own address> dstport
  vxlan_port dev <backhaul_device> nolearning``) whose MAC is derived from the PoP's backhaul
  address (``02:45:a:b:c:d``); per peer a static FDB entry (peer MAC -> ``dst A_i``), a
  permanent neighbour (``A_i`` -> peer MAC on the vxlan device) and ``default via A_i dev
  <vxlan_device> onlink table <table + i>``, plus ``throw A_i/32`` in that table (the
  encapsulated packet keeps the mark and must take the underlay). No inner addressing is needed;
  the device only gets ``169.254.69.80/32`` (link scope, no prefix route: never routed to),
  because reverse-path filtering drops every packet arriving on a device without an address.

The ``local`` table's rule (pref 0) would match the anycast address first, so it is moved below
the mark rules: ``pref <rule_pref + 1> lookup local`` is added, then pref 0 removed. Sysctls:
``net.ipv4.ip_forward = 1`` (a PoP forwards segments of flows it does not own) and
``rp_filter`` of the device segments arrive on at the owner (backhaul or vxlan) lowered from
strict (1) to loose (2): those segments come from clients whose route points elsewhere.

Every change is journalled (``<state_dir>/steering-routing.json``: the undo commands, written
before the change is made) and undone in reverse order at stop; a journal left by a crash is
undone at the next start, before anything new is set up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgeproxy.steering")


VXLAN_RPF_ADDRESS = "169.254.69.80/32"


class RoutingError(Exception):
    pass


Runner = Callable[[list[str]], str]


def run_cmd(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        raise RoutingError(f"{args[0]}: not installed (apt-get install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise RoutingError(f"{' '.join(args)}: no answer within 10 s") from None
    if r.returncode != 0:
        raise RoutingError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def mac_for(address: str) -> str:
    a = ipaddress.IPv4Address(address).packed
    return "02:45:" + ":".join(f"{b:02x}" for b in a)


@dataclass(frozen=True)
class PeerRoute:
    pop: str
    address: str
    mark: int
    table: int


def peer_routes(pop: str, peers: Mapping[str, str], mark: int, table: int) -> list[PeerRoute]:
    """Marks and tables of the other PoPs (sorted by name, indices from 1; ``pop`` skipped)."""
    names = sorted(peers)
    out = []
    for i, name in enumerate(names, 1):
        if name != pop:
            out.append(PeerRoute(name, peers[name], mark + i, table + i))
    return out


class Routing:
    def __init__(
        self,
        *,
        pop: str,
        routes: list[PeerRoute],
        device: str,
        mode: str,
        rule_pref: int,
        journal: Path,
        vxlan_device: str = "epvx0",
        vxlan_id: int = 4550,
        vxlan_port: int = 4789,
        own_address: str = "",
        runner: Runner = run_cmd,
    ) -> None:
        self.pop = pop
        self.routes = routes
        self.device = device
        self.mode = mode
        self.rule_pref = rule_pref
        self.journal = journal
        self.vxlan_device = vxlan_device
        self.vxlan_id = vxlan_id
        self.vxlan_port = vxlan_port
        self.own_address = own_address
        self.run = runner
        self.undo: list[list[str]] = []  # commands, applied in reverse; "sysctl" entries are writes
        self.applied: list[str] = []  # human-readable log of what was changed

    # -- journal --------------------------------------------------------------------------

    def _save(self) -> None:
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "undo": self.undo}) + "\n")
        os.replace(tmp, self.journal)

    def _do(self, args: list[str], undo: list[list[str]]) -> None:
        """Journal the undo, then make the change (a failed change leaves a harmless undo)."""
        self.undo.extend(undo)
        self._save()
        self.run(args)
        self.applied.append(" ".join(args))

    def _sysctl(self, name: str, value: str) -> None:
        path = sysctl_path(name)
        old = path.read_text().strip()
        if old == value:
            return
        self.undo.append(["sysctl", name, old])
        self._save()
        path.write_text(value + "\n")
        self.applied.append(f"sysctl {name}={value} (was {old})")

    def recover(self) -> bool:
        """Undo what a previous run left journalled (after a crash); True if there was any."""
        try:
            data = json.loads(self.journal.read_text())
        except FileNotFoundError:
            return False
        except ValueError:
            self.journal.unlink(missing_ok=True)
            return False
        self.undo = [list(map(str, u)) for u in data.get("undo", [])]
        log.warning("steering: undoing %d routing changes left by a previous run", len(self.undo))
        self.teardown()
        return True

    # -- set up / tear down ---------------------------------------------------------------

    def _rules(self) -> str:
        return self.run(["ip", "-4", "rule", "show"])

    def setup(self) -> None:
        dev = self.device
        if self.mode == "vxlan":
            own = self.own_address or self._device_address(dev)
            vx = self.vxlan_device
            self._do(["ip", "link", "add", vx, "type", "vxlan", "id", str(self.vxlan_id), "local", own,
                      "dstport", str(self.vxlan_port), "dev", dev, "nolearning"],
                     [["ip", "link", "del", vx]])
            self.run(["ip", "link", "set", vx, "address", mac_for(own)])
            # Reverse-path filtering rejects everything on a device without an IPv4 address,
            # whatever the mode; a /32 link-scope address that is never routed to fixes that.
            self.run(["ip", "addr", "add", VXLAN_RPF_ADDRESS, "dev", vx, "scope", "link", "noprefixroute"])
            self.run(["ip", "link", "set", vx, "up"])
            dev = vx
        for r in self.routes:
            if self.mode == "vxlan":
                mac = mac_for(r.address)
                self._do(["bridge", "fdb", "append", mac, "dev", dev, "dst", r.address], [])
                self._do(["ip", "neigh", "replace", r.address, "lladdr", mac, "dev", dev, "nud", "permanent"], [])
                self._do(["ip", "route", "replace", "default", "via", r.address, "dev", dev, "onlink", "table", str(r.table)],
                         [["ip", "route", "flush", "table", str(r.table)]])
                # The encapsulated packet keeps the mark: without this it would be routed into
                # the tunnel again (the kernel drops it as a circular route). `throw` sends its
                # lookup on to the next rules (local, main), i.e. the underlay.
                self._do(["ip", "route", "replace", "throw", f"{r.address}/32", "table", str(r.table)], [])
            else:
                self._do(["ip", "route", "replace", "default", "via", r.address, "dev", dev, "table", str(r.table)],
                         [["ip", "route", "flush", "table", str(r.table)]])
            self._do(["ip", "-4", "rule", "add", "pref", str(self.rule_pref), "fwmark", hex(r.mark), "lookup", str(r.table)],
                     [["ip", "-4", "rule", "del", "pref", str(self.rule_pref), "fwmark", hex(r.mark), "lookup", str(r.table)]])
        local_pref = str(self.rule_pref + 1)
        rules = self._rules()
        if any(line.split(":")[0].strip() == "0" and line.rstrip().endswith("lookup local") for line in rules.splitlines()):
            # Add the new local rule before removing pref 0: local addresses never go unrouted.
            self._do(["ip", "-4", "rule", "add", "pref", local_pref, "lookup", "local"],
                     [["ip", "-4", "rule", "del", "pref", local_pref, "lookup", "local"]])
            self._do(["ip", "-4", "rule", "del", "pref", "0", "lookup", "local"],
                     [["ip", "-4", "rule", "add", "pref", "0", "lookup", "local"]])
        self._sysctl("net.ipv4.ip_forward", "1")
        rp = f"net.ipv4.conf.{dev}.rp_filter"
        if sysctl_path(rp).read_text().strip() == "1":
            self._sysctl(rp, "2")

    def _device_address(self, dev: str) -> str:
        out = json.loads(self.run(["ip", "-j", "-4", "addr", "show", "dev", dev]) or "[]")
        for link in out:
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    return str(a["local"])
        raise RoutingError(f"{dev} has no IPv4 address (needed as the vxlan local address)")

    def teardown(self) -> list[str]:
        """Undo everything, newest first; returns the undo steps that failed."""
        failed: list[str] = []
        while self.undo:
            step = self.undo.pop()
            try:
                if step[0] == "sysctl":
                    sysctl_path(step[1]).write_text(step[2] + "\n")
                else:
                    self.run(step)
            except (RoutingError, OSError) as e:
                # e.g. routes already gone with their vxlan device
                if "table" not in step and "link" not in step:
                    failed.append(f"{' '.join(step)}: {e}")
            self._save()
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()
        for f in failed:
            log.warning("steering: restore failed: %s", f)
        return failed
