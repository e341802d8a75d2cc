"""Long-lived HTTP/1.1 traffic for the TCP-steering lab test; runs inside the client namespace.

    python tests/steering_client.py --url-host 203.0.113.1 --conns 4 --duration 8 [--stream-mb 512]

Opens ``--conns`` keep-alive connections, each sending ``GET /`` every ``--interval`` seconds on
the same socket, plus one streaming download (``/stream?mb=N``) read slowly so it is still
flowing at the end. After ``--duration`` seconds prints one JSON object: requests done and
failed, connection resets, the PoPs that answered, stream bytes and any stream error. Every
loop is bounded by the duration.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from typing import Any


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed within a body")
        rest += chunk
    body, extra = rest[:length], rest[length:]
    buf[:] = extra
    return status, headers, body


def keepalive_worker(host: str, port: int, stop: float, interval: float, out: dict[str, Any], lock: threading.Lock) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        with lock:
            out["connect_errors"].append(repr(e))
        return
    buf = bytearray()
    local = sock.getsockname()
    with lock:
        out["local_ports"].append(local[1])
    try:
        while time.monotonic() < stop:
            sock.sendall(f"GET /?c={local[1]} HTTP/1.1\r\nHost: {host}\r\nCache-Control: no-cache\r\n\r\n".encode())
            status, headers, _ = read_response(sock, buf)
            with lock:
                if status == 200:
                    out["ok"] += 1
                else:
                    out["bad_status"].append(status)
                pop = headers.get("x-edge-pop", "?")
                out["pops"][pop] = out["pops"].get(pop, 0) + 1
            time.sleep(interval)
    except ConnectionResetError as e:
        with lock:
            out["resets"] += 1
            out["errors"].append(f"port {local[1]}: {e!r}")
    except OSError as e:
        with lock:
            out["errors"].append(f"port {local[1]}: {e!r}")
    finally:
        sock.close()


def stream_worker(host: str, port: int, stop: float, mb: int, out: dict[str, Any]) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        out["stream_port"] = sock.getsockname()[1]
        sock.sendall(f"GET /stream?mb={mb} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = 0
        while time.monotonic() < stop:
            chunk = sock.recv(65536)
            if not chunk:
                out["stream_error"] = "closed before the end of the test"
                break
            got += len(chunk)
            out["stream_bytes"] = got
            time.sleep(0.005)  # read slowly: the download must still be flowing at the end
        sock.close()
    except ConnectionResetError as e:
        out["stream_error"] = repr(e)
        out["resets"] += 1
    except OSError as e:
        out["stream_error"] = repr(e)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url-host", default="203.0.113.1")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--stream-mb", type=int, default=1024)
    a = p.parse_args()
    out: dict[str, Any] = {"ok": 0, "bad_status": [], "resets": 0, "errors": [], "connect_errors": [], "pops": {},
                           "local_ports": [], "stream_bytes": 0, "stream_error": None, "stream_port": None}
    lock = threading.Lock()
    stop = time.monotonic() + a.duration
    threads = [threading.Thread(target=keepalive_worker, args=(a.url_host, a.port, stop, a.interval, out, lock))
               for _ in range(a.conns)]
    threads.append(threading.Thread(target=stream_worker, args=(a.url_host, a.port, stop, a.stream_mb, out)))
    for t in threads:
        t.start()
    print(json.dumps({"started": True}), flush=True)
    for t in threads:
        t.join(timeout=a.duration + 10)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
