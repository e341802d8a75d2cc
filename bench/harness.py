"""Process handling for the benchmarks: start services with a handle, wait for their ports with a
bound, account their CPU time from /proc, and stop every one of them by pid (descendants included).

Nothing here kills by name: a process is only ever signalled if this module started it, or if it
is a descendant of one that it started and still has the start time recorded for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something could not be set up or measured; the message says what and why."""


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def free_port(*, tcp: bool = True, udp: bool = False, host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out, free for the requested protocols (released on return:
    another process could take it before the service binds it, which is rare enough on a bench
    machine and shows up as a clear start-up error)."""
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
            socks.append(first)
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if tcp and udp:
                second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(second)
                second.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise BenchError("could not find a free port")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    starttime: int
    cpu_ticks: int  # utime + stime, plus reaped children's (cutime + cstime)


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    rest = raw[raw.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcStat(pid=pid, ppid=int(rest[1]), starttime=int(rest[19]), cpu_ticks=utime + stime + cutime + cstime)


def descendants(root: int) -> list[ProcStat]:
    """Every live descendant of `root` (one /proc scan; the tree is small)."""
    by_parent: dict[int, list[ProcStat]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                by_parent.setdefault(st.ppid, []).append(st)
    out: list[ProcStat] = []
    todo = [root]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and its live descendants (nginx master + worker)."""
    total = 0
    st = read_stat(root)
    if st is not None:
        total += st.cpu_ticks
    total += sum(d.cpu_ticks for d in descendants(root))
    return total / CLK_TCK


@dataclass(frozen=True)
class CpuTimes:
    """One CPU's line of /proc/stat, in ticks."""

    busy: int  # user, nice, system, irq, softirq: work done on this CPU
    steal: int  # time the hypervisor gave to someone else
    total: int


def cpu_times(cpu: int) -> CpuTimes:
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
            return CpuTimes(busy=user + nice + system + irq + softirq, steal=steal, total=user + nice + system + idle + iowait + irq + softirq + steal)
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def cpu_usage(before: CpuTimes, after: CpuTimes) -> tuple[float, float]:
    """(busy, steal) fractions of one CPU between two samples."""
    total = after.total - before.total
    if total <= 0:
        return float("nan"), float("nan")
    return (after.busy - before.busy) / total, (after.steal - before.steal) / total


def _same_process(st: ProcStat) -> bool:
    now = read_stat(st.pid)
    return now is not None and now.starttime == st.starttime


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def fail(self, what: str) -> BenchError:
        state = "running" if self.alive() else f"exited with {self.proc.returncode}"
        return BenchError(f"{self.name} (pid {self.pid}, {state}): {what}\n--- last output of {self.name}:\n{tail(self.log)}")

    def wait_tcp(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited before listening on {host}:{port}")
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
                return
            time.sleep(0.1)
        raise self.fail(f"TCP {host}:{port} did not open within {timeout:.0f} s")

    def wait_udp(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        # A UDP port cannot be probed without speaking QUIC, and binding it ourselves to test would
        # race the server; the kernel's socket table says whether someone has it bound.
        want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited before binding UDP {host}:{port}")
            with contextlib.suppress(OSError):
                for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
                    if line.split()[1] == want:
                        return
            time.sleep(0.1)
        raise self.fail(f"UDP {host}:{port} was not bound within {timeout:.0f} s")


@dataclass
class Services:
    """Owns every long-running process of a benchmark; `stop_all` runs in the caller's finally."""

    logdir: Path
    services: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> Service:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            # A new session keeps a terminal's Ctrl-C away from the services: they are stopped in
            # order by stop_all, after the load generator, so nothing is measured half-dead.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        svc = Service(name, proc, log)
        self.services.append(svc)
        return svc

    def stop(self, svc: Service, grace: float = 10.0) -> None:
        if svc.alive():
            kids = descendants(svc.pid)
            with contextlib.suppress(ProcessLookupError):
                svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    svc.proc.kill()
                svc.proc.wait(timeout=grace)
            # A worker left behind by a killed master is re-parented to init: end it by the pid
            # recorded above, but only if that pid still names the same process.
            for kid in kids:
                if _same_process(kid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(kid.pid, signal.SIGKILL)
        if svc in self.services:
            self.services.remove(svc)

    def stop_all(self) -> None:
        for svc in reversed(list(self.services)):
            try:
                self.stop(svc)
            except Exception as e:  # keep stopping the others; report what was left
                print(f"bench: could not stop {svc.name} (pid {svc.pid}): {e}", flush=True)


@dataclass
class ClientRun:
    """A load generator run: its output, exit code, wall time and its own CPU time."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    cpu: float


def run_client(argv: list[str], timeout: float, workdir: Path) -> ClientRun:
    """Runs a short-lived client to completion; killed (by its pid) past `timeout`."""
    out_path, err_path = workdir / "client.out", workdir / "client.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        before = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        # The child is not reaped until wait4 below returns, so its pid cannot be reused when the
        # timer fires.
        timer = threading.Timer(timeout, _kill_quietly, args=(proc.pid,))
        timer.start()
        try:
            # wait4 rather than Popen.wait: it also hands back this child's own CPU usage.
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: leave no client behind
            _kill_quietly(proc.pid)
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.monotonic() - before
        proc.returncode = os.waitstatus_to_exitcode(status)
    if status and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and wall >= timeout:
        raise BenchError(f"{argv[0]} ... still running after {timeout:.0f} s; killed")
    return ClientRun(
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
    )


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
