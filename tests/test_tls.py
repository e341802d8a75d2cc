"""TLS termination: SNI certificate selection, reload without restart, and curl as a real client."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from pop_helpers import RawClient, running_pop

from edgeproxy.tlsutil import make_self_signed


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _peer_cn(addr: tuple[str, int], sni: str | None) -> str:
    _reader, writer = await asyncio.open_connection(addr[0], addr[1], ssl=_client_ctx(), server_hostname=sni or "")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _certs(tmp_path: Path) -> dict:
    for name in ("a.test", "b.test"):
        make_self_signed(tmp_path / f"{name}.crt", tmp_path / f"{name}.key", (name,))
    return {
        "tls": {
            "reload_interval": 0.1,
            "certificates": [
                {"cert": str(tmp_path / "a.test.crt"), "key": str(tmp_path / "a.test.key")},
                {"cert": str(tmp_path / "b.test.crt"), "key": str(tmp_path / "b.test.key"), "names": ["b.test", "*.b.test"]},
            ],
        }
    }


async def test_sni_selects_the_certificate(tmp_path: Path) -> None:
    async with running_pop(tmp_path, _certs(tmp_path), tls=True) as p:
        assert p.https is not None
        assert await _peer_cn(p.https, "a.test") == "a.test"
        assert await _peer_cn(p.https, "b.test") == "b.test"
        assert await _peer_cn(p.https, "www.b.test") == "b.test"
        assert await _peer_cn(p.https, "unknown.test") == "a.test"  # the first is the default
        assert await _peer_cn(p.https, None) == "a.test"


async def test_certificate_reload_without_restart(tmp_path: Path) -> None:
    async with running_pop(tmp_path, _certs(tmp_path), tls=True) as p:
        assert p.https is not None
        assert await _peer_cn(p.https, "b.test") == "b.test"
        make_self_signed(tmp_path / "new.crt", tmp_path / "new.key", ("b-renewed.test",))
        shutil.copy(tmp_path / "new.key", tmp_path / "b.test.key")
        shutil.copy(tmp_path / "new.crt", tmp_path / "b.test.crt")
        future = os.stat(tmp_path / "b.test.crt").st_mtime + 5
        os.utime(tmp_path / "b.test.crt", (future, future))
        for _ in range(50):
            if await _peer_cn(p.https, "b.test") == "b-renewed.test":
                break
            await asyncio.sleep(0.1)
        assert await _peer_cn(p.https, "b.test") == "b-renewed.test"


async def test_broken_certificate_file_keeps_the_old_one(tmp_path: Path) -> None:
    async with running_pop(tmp_path, _certs(tmp_path), tls=True) as p:
        assert p.https is not None
        (tmp_path / "b.test.crt").write_text("not a certificate")
        await asyncio.sleep(0.4)
        assert await _peer_cn(p.https, "b.test") == "b.test"


async def test_https_request_and_forwarded_proto(tmp_path: Path) -> None:
    async with running_pop(tmp_path, tls=True) as p:
        assert p.https is not None
        c = await RawClient.connect(p.https, ssl=_client_ctx(), server_hostname="localhost")
        r = await c.request("GET", "/headers")
        assert r.status == 200
        assert b'["x-forwarded-proto", "https"]' in r.body
        c.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (Debian package curl; ./run installs it)")
async def test_curl_http_and_https(tmp_path: Path) -> None:
    async with running_pop(tmp_path, tls=True) as p:
        assert p.https is not None
        for url in (f"http://127.0.0.1:{p.http[1]}/cached/curl", f"https://localhost:{p.https[1]}/cached/curl"):
            args = ["curl", "-sk", "-D", "-", "--resolve", f"localhost:{p.https[1]}:127.0.0.1", url]
            proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert proc.returncode == 0
            assert b"cached object /cached/curl" in out
        # The second request (over HTTPS) was a hit of the first (over HTTP)? No: scheme is part of
        # the key, because origins may answer http and https differently (redirects).
        proc = await asyncio.create_subprocess_exec("curl", "-s", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{p.http[1]}/cached/curl", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert b"x-cache: hit" in out.lower()
