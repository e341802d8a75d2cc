"""Clients edgeproxy did not write, run inside a client namespace (edgeproxy-lab demo starts it with
the lab's recorded `spawn()`):

    python -m lab.external --out FILE.jsonl [--target 203.0.113.1] [--mb 20] [--duration S]
        [--run-timeout 30] [--clients gtlsclient,curl]

Back to back until `--duration` s have passed: Debian's `gtlsclient` (ngtcp2, HTTP/3 on :443,
certificates not checked) and `curl` (HTTP/1.1 on :80), each downloading `/stream?mb=N`.
A run is ok when the client exits 0 and the whole file (N MiB) arrived; a timeout, a short file or
a non-zero exit is a failure. Each run is one JSON line {client, start, end, ok, detail} in --out.
A run still going when the duration ends is stopped and not recorded (it was not given its time).
SIGTERM/SIGINT: stop the current run (its own child, by its pid) and exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENTS = ("gtlsclient", "curl")
PR_SET_PDEATHSIG = 1


class Stop(Exception):
    pass


def _die_with_parent() -> None:  # preexec_fn: the client goes when this runner goes
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def gtls_argv(target: str, mb: int, download: Path, timeout: float) -> list[str]:
    return ["gtlsclient", "--exit-on-all-streams-close", "--no-quic-dump", "--no-http-dump", f"--download={download}",
            f"--timeout={max(1, int(timeout))}s", f"--handshake-timeout={max(1, int(timeout))}s",
            target, "443", f"https://{target}/stream?mb={mb}"]


def curl_argv(target: str, mb: int, timeout: float) -> list[str]:
    return ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--max-time", f"{timeout:g}",
            "--limit-rate", "20M", f"http://{target}/stream?mb={mb}"]


def judge_gtls(rc: int, sizes: list[int], want: int, timed_out: bool, err: str) -> tuple[bool, str]:
    got = sum(sizes)
    if timed_out:
        return False, f"timeout; {got} of {want} bytes; {err}".strip("; ")
    if rc != 0:
        return False, f"exit {rc}; {got} of {want} bytes; {err}".strip("; ")
    if got != want:
        return False, f"short file: {got} of {want} bytes"
    return True, f"{got} bytes"


def judge_curl(rc: int, out: str, want: int, timed_out: bool, err: str) -> tuple[bool, str]:
    parts = out.split()
    if timed_out:
        return False, f"timeout; {out} {err}".strip()
    if rc != 0:
        return False, f"exit {rc}; {out} {err}".strip()
    if len(parts) != 2 or parts[0] != "200" or parts[1] != str(want):
        return False, f"status/size {out!r}, want '200 {want}'"
    return True, f"200 {want} bytes"


class Runner:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.deadline = time.monotonic() + a.duration
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _run(self, argv: list[str], errf: Path) -> tuple[int, str, bool]:
        """Runs argv (bounded by --run-timeout and the deadline); returns rc, stdout, timed out.
        Raises Stop when the duration ended or a signal came during the run."""
        limit = min(time.monotonic() + self.a.run_timeout, self.deadline)
        with open(errf, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                         preexec_fn=_die_with_parent)
        try:
            try:
                out, _ = self.proc.communicate(timeout=max(0.0, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                if self.stopping or time.monotonic() >= self.deadline - 0.01:
                    raise Stop() from None
                return -1, "", True
            if self.stopping:
                raise Stop()
            return self.proc.returncode, out.decode("utf-8", "replace").strip(), False
        finally:
            self.proc = None

    def once(self, client: str, work: Path) -> dict[str, Any]:
        a = self.a
        want = a.mb << 20
        errf = work / f"{client}.err"
        start = time.time()
        if client == "gtlsclient":
            dl = work / "dl"
            shutil.rmtree(dl, ignore_errors=True)
            dl.mkdir()
            rc, _, timed_out = self._run(gtls_argv(a.target, a.mb, dl, a.idle_timeout), errf)
            sizes = [f.stat().st_size for f in dl.rglob("*") if f.is_file()]
            ok, detail = judge_gtls(rc, sizes, want, timed_out, _tail(errf))
        else:
            rc, out, timed_out = self._run(curl_argv(a.target, a.mb, a.run_timeout), errf)
            ok, detail = judge_curl(rc, out, want, timed_out, _tail(errf))
        return {"client": client, "start": round(start, 3), "end": round(time.time(), 3), "ok": ok, "detail": detail}

    def run(self) -> int:
        clients = [c for c in self.a.clients.split(",") if c]
        out = Path(self.a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="epl-external-") as tmp, open(out, "a") as f:
            i = 0
            while not self.stopping and time.monotonic() < self.deadline and clients:
                client = clients[i % len(clients)]
                i += 1
                try:
                    rec = self.once(client, Path(tmp))
                except Stop:
                    break
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"[external] {rec['client']} {'ok' if rec['ok'] else 'FAILED'} {rec['end'] - rec['start']:.1f}s "
                      f"{rec['detail']}", file=sys.stderr, flush=True)
        return 0


def _tail(path: Path, n: int = 300) -> str:
    try:
        return " ".join(path.read_text("utf-8", "replace").split())[-n:]
    except OSError:
        return ""


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{client: {runs, ok, failed}} for every known client (zeros when it did not run)."""
    out = {c: {"runs": 0, "ok": 0, "failed": 0} for c in CLIENTS}
    for r in records:
        e = out.setdefault(str(r.get("client", "?")), {"runs": 0, "ok": 0, "failed": 0})
        e["runs"] += 1
        e["ok" if r.get("ok") else "failed"] += 1
    return out


# -- in the lab (edgeproxy-lab demo) ---------------------------------------------------------------

def start_external(state: Any, plan: Any, duration: float, *, client: str = "c1", log: Any = print) -> Any:
    """Starts the runner in `client`'s namespace (recorded pid, role "external"); None when the
    topology has no such client or a client program is missing. Call with no other threads running."""
    from .demo import LoadProc
    from .netns import python_env
    from .state import spawn

    node = plan.nodes.get(client)
    missing = [c for c in CLIENTS if shutil.which(c) is None]
    if node is None or node.kind != "client" or missing:
        log(f"external clients: not run ({'missing ' + ', '.join(missing) if missing else 'no client ' + client})")
        return None
    out_dir = state.path / "load"
    out = out_dir / f"external-{client}.jsonl"
    logf = out_dir / f"external-{client}.log"
    argv = [sys.executable, "-m", "lab.external", "--out", str(out), "--duration", str(duration)]
    pid = spawn(state, "external", node.ns, argv, logf, env=python_env())
    log(f"external clients: {', '.join(CLIENTS)} back to back from {client} (pid {pid}), results {out}")
    return LoadProc(client, node.ns, pid, out, logf)


def stop_external(state: Any, proc: Any, wait: float = 5.0) -> None:
    """Waits up to `wait` s for the runner to end by itself (its duration is the load's), then
    SIGTERM (it stops its current run), SIGKILL after a grace period. Recorded pid only."""
    from .state import alive, terminate

    start = next((r.get("starttime") for r in state.processes() if r["pid"] == proc.pid and r["role"] == "external"), None)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and alive(proc.pid, start):
        time.sleep(0.1)
    terminate([(proc.pid, start)], grace=5.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.external")
    p.add_argument("--out", required=True, help="JSON lines, one per run")
    p.add_argument("--target", default="203.0.113.1")
    p.add_argument("--mb", type=int, default=20)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--run-timeout", type=float, default=30.0, help="wall-clock bound on one run (default 30 s)")
    p.add_argument("--idle-timeout", type=float, default=10.0, help="gtlsclient --timeout (idle, default 10 s)")
    p.add_argument("--clients", default=",".join(CLIENTS))
    a = p.parse_args(argv)
    r = Runner(a)
    signal.signal(signal.SIGTERM, r.stop)
    signal.signal(signal.SIGINT, r.stop)
    return r.run()


if __name__ == "__main__":
    sys.exit(main())
