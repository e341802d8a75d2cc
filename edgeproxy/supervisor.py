"""The `edgeproxy run` parent process when a host runs several workers: starts one process per
worker, passes SIGTERM/SIGINT/SIGHUP on to them, restarts a worker that dies (a bounded number
of times), and exits when all have stopped.

The workers share the client-facing ports with SO_REUSEPORT; the parent holds no socket, so a
restarted worker binds again beside its siblings and nothing else has to change.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("edgeproxy.supervisor")

RESTART_WINDOW = 60.0  # seconds
MAX_RESTARTS = 5  # per worker within RESTART_WINDOW, then the worker stays down
STOP_GRACE = 20.0  # seconds workers get to drain after the signal, before SIGKILL


def supervise(commands: Sequence[Sequence[str]], *, poll: float = 0.2) -> int:
    """Runs one process per command until all exit; returns 0 if all stopped cleanly."""
    stopping: list[int] = []  # the signal that asked us to stop, if any

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)
            return
        if not stopping:
            stopping.append(signum)
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    procs = [subprocess.Popen(list(cmd)) for cmd in commands]
    restarts: list[list[float]] = [[] for _ in commands]
    given_up: set[int] = set()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
    failed = False
    try:
        stop_deadline: float | None = None
        while any(p.poll() is None for p in procs):
            time.sleep(poll)
            if stopping:
                stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE
                if time.monotonic() > stop_deadline:
                    for proc in procs:
                        if proc.poll() is None:
                            proc.kill()
                continue
            for i, proc in enumerate(procs):
                code = proc.poll()
                # A worker that finished cleanly (e.g. --duration) is not restarted.
                if code is None or code == 0 or i in given_up:
                    continue
                now = time.monotonic()
                restarts[i] = [t for t in restarts[i] if now - t < RESTART_WINDOW]
                if len(restarts[i]) >= MAX_RESTARTS:
                    log.error("worker %d exited with %s %d times within %gs; leaving it down", i, code, MAX_RESTARTS, RESTART_WINDOW)
                    given_up.add(i)
                    failed = True
                    continue
                log.warning("worker %d (pid %d) exited with %s; restarting it", i, proc.pid, code)
                restarts[i].append(now)
                procs[i] = subprocess.Popen(list(commands[i]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [p.returncode for p in procs]
    return 1 if failed or any(c not in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 0
