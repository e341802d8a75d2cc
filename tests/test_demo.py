"""`edgeproxy demo` as the README tells users to run it, driven by clients edgeproxy did not write:
curl over HTTP/1.1 and HTTPS, Debian's gtlsclient (ngtcp2) over HTTP/3."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
from pathlib import Path

import pytest


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    # A port free for both TCP and UDP, since HTTPS and HTTP/3 share it.
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


async def _run(*args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("gtlsclient") is None, reason="needs curl and gtlsclient (Debian packages curl, ngtcp2-client; ./run installs them)")
async def test_demo_with_curl_and_gtlsclient(tmp_path: Path) -> None:
    http, https, admin = _free_port(), _free_port(), _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeproxy", "demo", "--http-port", str(http), "--https-port", str(https),
        "--admin-port", str(admin), "--state-dir", str(tmp_path), "--duration", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        banner = b""
        async with asyncio.timeout(20):
            while b"Ctrl-C" not in banner:
                line = await proc.stdout.readline()
                assert line, f"demo exited: {banner!r}"
                banner += line
        assert f"http://127.0.0.1:{http}/".encode() in banner
        assert (tmp_path / "tls" / "selfsigned.crt").is_file()  # made on first run, in the state dir

        code, out, _ = await _run("curl", "-si", f"http://127.0.0.1:{http}/cached/hello")
        assert code == 0 and b"200 OK" in out and b"x-cache: MISS" in out
        assert b"cached object /cached/hello" in out
        code, out, _ = await _run("curl", "-si", f"http://127.0.0.1:{http}/cached/hello")
        assert b"x-cache: HIT" in out
        code, out, _ = await _run("curl", "-ski", "--resolve", f"localhost:{https}:127.0.0.1", f"https://localhost:{https}/cached/hello")
        assert code == 0 and b"200 OK" in out and f'alt-svc: h3=":{https}"'.encode() in out

        # HTTP/3 with ngtcp2's client: the same object, a miss over https then a hit over h3.
        url = f"https://localhost:{https}/cached/h3"
        for expect in (b"x-cache: MISS", b"x-cache: HIT"):
            download = tmp_path / "download"
            shutil.rmtree(download, ignore_errors=True)
            download.mkdir()
            code, out, err = await _run("gtlsclient", "--exit-on-all-streams-close", "--no-quic-dump", f"--download={download}", "127.0.0.1", str(https), url)
            text = out + err
            assert code == 0, text[-2000:]
            assert b":status: 200" in text, text[-2000:]
            assert expect in text, text[-2000:]
            assert b"cached object /cached/h3" in (download / "h3").read_bytes()

        code, out, _ = await _run("curl", "-s", f"http://127.0.0.1:{admin}/metrics")
        assert b'edgeproxy_cache_requests_total{result="hit"} 2' in out
        assert b'edgeproxy_requests_total{protocol="h3",status="200"} 2' in out
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
