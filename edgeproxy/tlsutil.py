"""TLS certificates of a PoP: SNI selection, reload without restart, and the self-signed default.

`CertStore` loads the configured certificates into one `ssl.SSLContext` each and answers SNI
callbacks from the current set; `reload()` (called on an interval and on SIGHUP) swaps in changed
files, so new handshakes use the new certificate while established connections keep theirs.
"""

from __future__ import annotations

import datetime
import fnmatch
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("edgeproxy.tls")


def make_self_signed(
    cert_path: Path, key_path: Path, names: tuple[str, ...] = ("localhost",), days: int = 365
) -> None:
    """Writes an EC P-256 self-signed certificate for `names` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_key = key_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)


def ensure_self_signed(state_dir: Path) -> tuple[Path, Path]:
    """The state directory's self-signed localhost certificate, made on first use and remade when
    it is about to expire."""
    cert_path = state_dir / "tls" / "selfsigned.crt"
    key_path = state_dir / "tls" / "selfsigned.key"
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=7):
                return cert_path, key_path
        except ValueError:
            log.warning("unreadable self-signed certificate in %s; making a new one", cert_path)
    make_self_signed(cert_path, key_path, ("localhost", "127.0.0.1", "::1"))
    return cert_path, key_path


def certificate_names(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


@dataclass
class _Loaded:
    cert: Path
    key: Path
    names: list[str]
    mtimes: tuple[float, float]
    context: ssl.SSLContext


class CertStore:
    """The PoP's certificates, selected by SNI; the first one is the default."""

    def __init__(self, pairs: list[tuple[Path, Path, list[str]]], alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        if not pairs:
            raise ValueError("no certificates")
        self._pairs = pairs
        self._alpn = alpn
        self._loaded: list[_Loaded] = [self._load(c, k, n) for c, k, n in pairs]
        self.reloads = 0

    def _load(self, cert: Path, key: Path, names: list[str]) -> _Loaded:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
        ctx.set_alpn_protocols(list(self._alpn))
        return _Loaded(
            cert, key, names or certificate_names(cert), (cert.stat().st_mtime, key.stat().st_mtime), ctx
        )

    @property
    def default(self) -> _Loaded:
        return self._loaded[0]

    def select(self, server_name: str | None) -> _Loaded:
        if server_name:
            name = server_name.lower().rstrip(".")
            for entry in self._loaded:
                if any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in entry.names):
                    return entry
        return self._loaded[0]

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with: its SNI callback switches every handshake to the current
        context for the requested name, so reloads apply to new connections."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self._pairs[0][0]), str(self._pairs[0][1]))
        ctx.set_alpn_protocols(list(self._alpn))

        def on_sni(sock: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            sock.context = self.select(server_name).context

        ctx.sni_callback = on_sni
        return ctx

    def reload(self) -> bool:
        """Reloads every certificate whose files changed; a broken new file keeps the old one
        (logged), so a bad deploy never takes TLS down. True if anything changed."""
        changed = False
        for i, entry in enumerate(self._loaded):
            try:
                mtimes = (entry.cert.stat().st_mtime, entry.key.stat().st_mtime)
            except OSError as e:
                log.error("certificate %s: %s; keeping the loaded one", entry.cert, e)
                continue
            if mtimes == entry.mtimes:
                continue
            try:
                self._loaded[i] = self._load(entry.cert, entry.key, self._pairs[i][2])
            except (OSError, ssl.SSLError, ValueError) as e:
                log.error("certificate %s: cannot load (%s); keeping the loaded one", entry.cert, e)
                continue
            log.info("certificate %s reloaded", entry.cert)
            changed = True
        if changed:
            self.reloads += 1
        return changed
