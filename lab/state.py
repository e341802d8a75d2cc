"""The lab's state directory and its journal of everything the lab created.

`resources.jsonl` gets one JSON line per resource, written (and fsynced) as it is created — a
namespace *before* `ip netns add` (after checking the name is free), a process right after it
starts, with its start time so a recycled pid is never mistaken for it. `down` reads only this
journal, so it works after a crash or Ctrl-C, and never touches what the lab did not create.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BASE_DIR = Path("/run/edgeproxy-lab")
JOURNAL = "resources.jsonl"
LAB_FILE = "lab.json"


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    def exists(self) -> bool:
        return self.journal.exists() or (self.path / LAB_FILE).exists()

    def record(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, "ts": round(time.time(), 6), **fields}) + "\n"
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def resources(self) -> list[dict[str, Any]]:
        try:
            text = self.journal.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and "kind" in rec:
                    out.append(rec)
        return out

    def namespaces(self) -> list[str]:
        return [r["name"] for r in self.resources() if r["kind"] == "netns"]

    def processes(self) -> list[dict[str, Any]]:
        return [r for r in self.resources() if r["kind"] == "proc"]

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path / name)

    def read_json(self, name: str, default: Any = None) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (FileNotFoundError, ValueError):
            return default

    def append_jsonl(self, name: str, data: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(data) + "\n")


# -- processes ----------------------------------------------------------------------------------

def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None when the pid is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except FileNotFoundError:
        return None


def proc_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def is_ours(rec: dict[str, Any]) -> bool:
    """The recorded process is still that process: same start time, and (while its namespace
    exists) inside that namespace."""
    pid = int(rec["pid"])
    start = proc_starttime(pid)
    if start is None or start != rec.get("starttime"):
        return False
    ns_ino = netns_inode(rec["ns"]) if rec.get("ns") else None
    return ns_ino is None or proc_netns_inode(pid) == ns_ino


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int, starttime: int | None) -> bool:
    _reap(pid)
    st = proc_starttime(pid)
    return st is not None and (starttime is None or st == starttime)


def terminate(pids: list[tuple[int, int | None]], grace: float = 3.0) -> list[int]:
    """SIGTERM, wait up to `grace` s, then SIGKILL and wait up to 2 s; returns pids still alive."""
    targets = [(p, s) for p, s in pids if alive(p, s)]
    for pid, _ in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p, s) for p, s in targets):
        time.sleep(0.05)
    for pid, s in targets:
        if alive(pid, s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(p, s) for p, s in targets):
        time.sleep(0.05)
    return [p for p, s in targets if alive(p, s)]


def self_recorder(state: StateDir, role: str, ns: str, argv: list[str], log: str) -> Callable[[], None]:
    """A Popen `preexec_fn`: the child journals its own pid and start time after fork and before
    exec, so a crash of the lab between fork and a parent-side record cannot leak the process.
    (`ip netns exec` execs in place, so that pid is the program's.) Use only while the lab has no
    other threads (preexec_fn is not thread-safe)."""
    head = json.dumps({"kind": "proc", "role": role, "ns": ns, "argv": argv, "log": log})[:-1]
    path = str(state.journal)

    def record() -> None:
        pid = os.getpid()
        line = f'{head}, "ts": {time.time():.6f}, "pid": {pid}, "starttime": {json.dumps(proc_starttime(pid))}}}\n'
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    return record


def spawn(state: StateDir, role: str, ns: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> int:
    """Start argv inside namespace `ns` with stdout+stderr to `log`; the child journals itself."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, close_fds=True,
            preexec_fn=self_recorder(state, role, ns, argv, str(log)),
        )
    return proc.pid
