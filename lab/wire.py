"""A userspace "wire" with a fixed one-way delay (the kernel here has no netem).

Runs in a wire namespace holding two veth ends (`wa`, `wb`); every frame received on one is sent
out of the other `delay_ms` later. Offloads must be off on every veth the frames cross (the lab
does `ethtool -K ... tx off gro off tso off gso off`), else re-injected frames carry unfinished
checksums and TCP stalls.

    python -m lab.wire --a wa --b wb --delay-ms 20 [--max-queue 20000] [--max-seconds 86400]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20; frames we send are not read back


def open_if(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with contextlib.suppress(OSError):  # else filtered by pkttype below
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def run(a: str, b: str, delay_ms: float, max_queue: int, max_seconds: float) -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sa, sb = open_if(a), open_if(b)
    peer = {sa.fileno(): sb, sb.fileno(): sa}
    socks = {sa.fileno(): sa, sb.fileno(): sb}
    delay = delay_ms / 1000.0
    # One FIFO per direction: the delay is constant, so due times are in order.
    queues: dict[int, collections.deque[tuple[float, bytes]]] = {sa.fileno(): collections.deque(), sb.fileno(): collections.deque()}
    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + max_seconds
    dropped = 0
    while not stop and time.monotonic() < deadline:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout_ms = 200 if not due else max(0, min(200, int((min(due) - now) * 1000)))
        for fd, _ in poller.poll(timeout_ms):
            sock = socks[fd]
            for _ in range(256):  # bounded burst per wake-up
                try:
                    frame, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                q = queues[fd]
                if len(q) >= max_queue:
                    dropped += 1
                    continue
                q.append((time.monotonic() + delay, frame))
        now = time.monotonic()
        for fd, q in queues.items():
            out = peer[fd]
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                try:
                    out.send(frame)
                except (BlockingIOError, OSError):
                    dropped += 1
    print(f"wire {a}<->{b}: stopped, {dropped} frames dropped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.wire")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--max-queue", type=int, default=20000, help="frames queued per direction before dropping")
    p.add_argument("--max-seconds", type=float, default=86400.0, help="exit after this long")
    args = p.parse_args(argv)
    return run(args.a, args.b, args.delay_ms, args.max_queue, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
