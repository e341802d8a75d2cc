"""Fleet keys and the QUIC state every PoP must be able to produce and check: pure, sans-IO.

Every PoP of the anycast fleet announces the same address, so a client's packets, tokens and
tickets can reach any PoP. Whatever one PoP issues, another must accept; hence one set of
*fleet keys*, shared by every PoP, from which all sub-keys are derived.

Key file (TOML, mode 0600, never world-accessible)::

    primary = 1                   # the key id used to issue; must be one of the keys

    [[keys]]
    id = 1                        # 0..255, carried in every token/ticket/frame as one byte
    secret = "<base64>"           # at least 32 random bytes
    created = 1767225600          # unix time, informational (age of the key)

Rotation, in three fleet-wide steps, each completed on every PoP before the next starts:
(1) ``add_key`` the new key everywhere (everyone accepts it, nobody issues under it yet);
(2) ``set_primary`` to it everywhere (everyone issues under it, the old one still opens);
(3) once the longest-lived thing issued under the old key has expired (24 h NEW_TOKEN tokens,
the ticket lifetime, and QUIC connections whose CIDs were issued under it), ``remove_key`` the
old one. Skipping step 1 makes PoPs that have not yet received the new key reject what the early
ones issue. On a PoP each step is ``edgeproxy keys ...`` on its key file, then SIGHUP
(``edgeproxy run`` re-reads the file; no restart).

Sub-keys come from HKDF-SHA256(secret, info=label) with one label per purpose, so one secret
never keys two algorithms: ``"edgeproxy reset"`` (HMAC key of stateless reset tokens),
``"edgeproxy ticket"`` (AES-256-GCM, session tickets), ``"edgeproxy retry"`` (AES-128-GCM, Retry
tokens), ``"edgeproxy token"`` (AES-128-GCM, NEW_TOKEN tokens) and ``"edgeproxy forward"`` (HMAC
key of backhaul forwarding frames, see `edgeproxy.quic.forward`).

Byte layouts (all integers big-endian; "ip16" is an IPv6 address or an IPv4-mapped IPv4 one,
so a dual-stack socket's ``::ffff:a.b.c.d`` and plain ``a.b.c.d`` name the same client)::

    Retry token      0x01 | key id | nonce(12) | AES-128-GCM(retry key,
                         issued_ms(8) | port(2) | odcid_len(1) | odcid | retry_scid) | tag(16)
                     AAD = 0x01 | key id | client ip16  (41 + |odcid| + |retry_scid| bytes)
    NEW_TOKEN token  0x02 | key id | nonce(12) | AES-128-GCM(token key,
                         issued_ms(8) | token_id(16)) | tag(16)
                     AAD = 0x02 | key id | client ip16          (54 bytes)
    Session ticket   0x03 | key id | nonce(12) | AES-256-GCM(ticket key,
                         issued_ms(8) | plaintext) | tag(16)
                     AAD = 0x03 | key id                        (plaintext + 38 bytes)

The first byte tells the two token kinds apart (RFC 9000 section 8.1.3 requires it), and the key
id byte selects the fleet key, so anything sealed under a key that is still live opens on any
PoP. Nonces are 96 random bits: the AES-GCM bound of 2**32 seals per key is far beyond one
key's lifetime under the rotation above, but keys should be rotated (daily, say) anyway.
Lifetimes are enforced by the opener from the issue time, with 2 s of tolerated clock skew
between PoPs in both directions. The openers never raise on attacker input: they return a
`TokenError` (or None for tickets), which the dispatcher counts; per RFC 9000 section 8.1.3 an
invalid token means "address not validated", not "drop the Initial".

NEW_TOKEN tokens should be accepted only once (RFC 9000 section 8.1.3). Each carries a random
16-byte id, which the dispatcher's router checks against a `ReplayFilter`; since the filter is
per PoP, single use across the fleet is best-effort: a token can be used once at each PoP until filter state propagates. That only
saves a round trip for an address that already proved it could receive the token.

0-RTT replay scope. Fleet-sealed tickets let any PoP resume a session and accept its 0-RTT data
(aioquic accepts 0-RTT whenever the ticket is found). TLS 1.3 anti-replay is per server: a
`ReplayFilter` keyed by ticket id (or early-data id) stops a second use *at this PoP*, but an
attacker who captured a client's first flight can replay its 0-RTT once at every other PoP
(anycast lets it choose which by where it sends from) until filter state propagates, if ever.
RFC 9001 section 9.2 calls the TLS protections "imperfect" for exactly this. The defence is at
the HTTP layer (RFC 8470): only safe, idempotent requests (GET/HEAD/OPTIONS without a body) may
be served from 0-RTT; anything else received as early data gets 425 Too Early, and the client
retries it after the handshake, where it cannot be replayed.

Stateless resets (RFC 9000 section 10.3). ``reset_token(cid)`` is computable by every PoP, so a
PoP *could* reset any fleet connection; section 21.11 forbids doing so while the connection may
be alive anywhere. A PoP therefore forwards packets whose CID names another PoP and sends a
reset only for CIDs it knows are dead by a signal an attacker cannot influence.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hmac
import os
import socket
import stat
import struct
import tomllib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from hashlib import sha256
from types import MappingProxyType
from typing import Any

from aioquic.tls import CipherSuite, SessionTicket
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CLOCK_SKEW",
    "MIN_SECRET_LENGTH",
    "NEW_TOKEN_LIFETIME",
    "RESET_TOKEN_LENGTH",
    "RETRY_TOKEN_LIFETIME",
    "TICKET_LIFETIME",
    "FleetKey",
    "FleetKeyError",
    "FleetKeys",
    "NewTokenContents",
    "ReplayFilter",
    "ReplayVerdict",
    "RetryTokenContents",
    "TicketFormatError",
    "TokenError",
    "TokenErrorReason",
    "TokenKind",
    "build_stateless_reset",
    "deserialize_session_ticket",
    "serialize_session_ticket",
    "token_kind",
]

RandomSource = Callable[[int], bytes]

MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 1024  # anything longer is a mistake (a certificate pasted in, say)
MAX_KEY_FILE_SIZE = 1 << 20
RESET_TOKEN_LENGTH = 16
RETRY_TOKEN_LIFETIME = 10.0
NEW_TOKEN_LIFETIME = 24 * 3600.0
# aioquic's NewSessionTicket advertises 86400 s; the opener must not be stricter than that.
TICKET_LIFETIME = 24 * 3600.0
CLOCK_SKEW = 2.0

_NONCE_LEN = 12
_TAG_LEN = 16
_TOKEN_ID_LEN = 16
_MAX_CID_LEN = 20  # QUIC v1
_LABELS = {
    "reset": b"edgeproxy reset",
    "ticket": b"edgeproxy ticket",
    "retry": b"edgeproxy retry",
    "token": b"edgeproxy token",
    "forward": b"edgeproxy forward",
}


class FleetKeyError(ValueError):
    """A key file or key operation is invalid; the message names the file, key and field."""


class TicketFormatError(ValueError):
    """Bytes that are not a serialized `SessionTicket` (see `deserialize_session_ticket`)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hkdf(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=label).derive(secret)


class FleetKey:
    """One fleet secret and the sub-keys derived from it (derived once, at construction)."""

    __slots__ = (
        "_forward_hmac",
        "_reset_hmac",
        "created",
        "key_id",
        "retry_aead",
        "secret",
        "ticket_aead",
        "token_aead",
    )

    def __init__(self, key_id: int, secret: bytes, created: int) -> None:
        if not _is_int(key_id) or not 0 <= key_id <= 255:
            raise FleetKeyError(f"key id must be an int in 0..255, got {key_id!r}")
        if not isinstance(secret, bytes) or not (
            MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH
        ):
            got = f"{len(secret)} bytes" if isinstance(secret, bytes) else type(secret).__name__
            raise FleetKeyError(
                f"key {key_id}: secret must be {MIN_SECRET_LENGTH}..{MAX_SECRET_LENGTH} bytes, "
                f"got {got}"
            )
        if not _is_int(created) or created < 0:
            raise FleetKeyError(f"key {key_id}: created must be a unix time >= 0, got {created!r}")
        self.key_id = key_id
        self.secret = secret
        self.created = created
        # Prepared HMAC states are copied per use: cheaper than re-keying every packet.
        self._reset_hmac = hmac.new(_hkdf(secret, _LABELS["reset"], 32), digestmod=sha256)
        self._forward_hmac = hmac.new(_hkdf(secret, _LABELS["forward"], 32), digestmod=sha256)
        self.ticket_aead = AESGCM(_hkdf(secret, _LABELS["ticket"], 32))
        self.retry_aead = AESGCM(_hkdf(secret, _LABELS["retry"], 16))
        self.token_aead = AESGCM(_hkdf(secret, _LABELS["token"], 16))

    def __repr__(self) -> str:
        return f"FleetKey(key_id={self.key_id}, secret=<{len(self.secret)} bytes>, created={self.created})"

    def reset_token(self, cid: bytes) -> bytes:
        mac = self._reset_hmac.copy()
        mac.update(cid)
        return mac.digest()[:RESET_TOKEN_LENGTH]

    def forward_hmac(self) -> hmac.HMAC:
        """A fresh HMAC-SHA256 state under this key's forward key (for `forward`)."""
        return self._forward_hmac.copy()


# --------------------------------------------------------------------------------------------
# Address-validation tokens
# --------------------------------------------------------------------------------------------


class TokenKind(IntEnum):
    RETRY = 0x01
    NEW_TOKEN = 0x02


_TICKET_KIND = 0x03


class TokenErrorReason(StrEnum):
    """Why a token did not validate (stable strings, usable as metric labels)."""

    MALFORMED = "malformed"  # not bytes, too short or too long, or a bad inner layout
    WRONG_KIND = "wrong_kind"  # a NEW_TOKEN token given to the Retry opener, or vice versa
    UNKNOWN_KEY = "unknown_key"  # sealed under a key id that is not live (removed, or forged)
    BAD_SEAL = "bad_seal"  # authentication failed: forged, altered, or another client IP
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  # issued further in the future than the clock skew allows
    ADDRESS_MISMATCH = "address_mismatch"  # Retry token: same IP, another port
    CID_MISMATCH = "cid_mismatch"  # Retry token: the Initial's DCID is not the Retry SCID
    BAD_ADDRESS = "bad_address"  # the client address itself could not be parsed


@dataclass(frozen=True, slots=True)
class TokenError:
    reason: TokenErrorReason


_TOKEN_ERRORS = {reason: TokenError(reason) for reason in TokenErrorReason}


@dataclass(frozen=True, slots=True)
class RetryTokenContents:
    original_dcid: bytes  # for the original_destination_connection_id transport parameter
    retry_scid: bytes  # for retry_source_connection_id
    issued_at: float  # unix time, at the issuing PoP's clock
    key_id: int


@dataclass(frozen=True, slots=True)
class NewTokenContents:
    token_id: bytes  # 16 random bytes: feed to a ReplayFilter for (per-PoP) single use
    issued_at: float
    key_id: int


def token_kind(token: bytes) -> TokenKind | None:
    """Which opener a token from an Initial belongs to, by its first byte; None if neither."""
    if not isinstance(token, (bytes, bytearray)) or not token:
        return None
    try:
        return TokenKind(token[0])
    except ValueError:
        return None


def _ip16(addr: object) -> tuple[bytes, int] | None:
    """(16-byte IP, port) of a socket address (host, port[, flowinfo, scope_id]), or None."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not _is_int(port) or not 0 <= port <= 0xFFFF:
        return None
    host = host.split("%", 1)[0]  # a scoped IPv6 address; the scope is not part of the IP
    try:
        if ":" in host:
            return socket.inet_pton(socket.AF_INET6, host), port
        return b"\x00" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host), port
    except (OSError, ValueError):
        return None


def _ms(now: float) -> int:
    ms = round(now * 1000)
    if not 0 <= ms < 1 << 64:
        raise ValueError(f"now out of range: {now!r}")
    return ms


def _check_age(issued_ms: int, now: float, lifetime: float) -> TokenErrorReason | None:
    age = now - issued_ms / 1000
    if age < -CLOCK_SKEW:
        return TokenErrorReason.NOT_YET_VALID
    if not age <= lifetime + CLOCK_SKEW:  # "not": a NaN clock expires everything
        return TokenErrorReason.EXPIRED
    return None


# --------------------------------------------------------------------------------------------
# The key set
# --------------------------------------------------------------------------------------------


def _check_codepoints(keys: Mapping[int, object]) -> None:
    """Live key ids must differ mod 7: each live key has its own QUIC-LB config codepoint."""
    seen: dict[int, int] = {}
    for key_id in sorted(keys):
        other = seen.setdefault(key_id % 7, key_id)
        if other != key_id:
            raise FleetKeyError(
                f"key ids {other} and {key_id} are equal mod 7 and would share a QUIC-LB config "
                "codepoint; remove one before adding the other"
            )


class FleetKeys:
    """The live fleet keys and the primary one; issues and opens everything keyed by them.

    ``urandom`` supplies every nonce and new secret (tests inject a deterministic one). Time is
    always passed in as unix seconds (``now``); PoPs' clocks are assumed within `CLOCK_SKEW`.
    """

    def __init__(
        self, keys: Iterable[FleetKey], primary: int, *, urandom: RandomSource = os.urandom
    ) -> None:
        self._keys: dict[int, FleetKey] = {}
        for key in keys:
            if not isinstance(key, FleetKey):
                raise TypeError(f"keys must be FleetKey objects, got {type(key).__name__}")
            if key.key_id in self._keys:
                raise FleetKeyError(f"duplicate key id {key.key_id}")
            self._keys[key.key_id] = key
        if primary not in self._keys:
            raise FleetKeyError(f"primary key id {primary!r} is not among the keys")
        _check_codepoints(self._keys)
        self._primary = self._keys[primary]
        self._urandom = urandom

    # -- key file ------------------------------------------------------------------------------

    @classmethod
    def parse(
        cls, text: str, *, source: str = "<string>", urandom: RandomSource = os.urandom
    ) -> FleetKeys:
        """Keys from the TOML text of a key file; FleetKeyError naming ``source`` and the field."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FleetKeyError(f"{source}: not valid TOML: {e}") from None
        unknown = set(data) - {"primary", "keys"}
        if unknown:
            raise FleetKeyError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        entries = data.get("keys")
        if not isinstance(entries, list) or not entries:
            raise FleetKeyError(f"{source}: needs at least one [[keys]] table")
        keys: list[FleetKey] = []
        seen: set[int] = set()
        for index, entry in enumerate(entries):
            where = f"{source}: keys[{index}]"
            if not isinstance(entry, dict):
                raise FleetKeyError(f"{where}: must be a table")
            unknown = set(entry) - {"id", "secret", "created"}
            if unknown:
                raise FleetKeyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            for field in ("id", "secret", "created"):
                if field not in entry:
                    raise FleetKeyError(f"{where}.{field}: missing")
            key_id = entry["id"]
            if not _is_int(key_id) or not 0 <= key_id <= 255:
                raise FleetKeyError(f"{where}.id: must be an integer 0..255, got {key_id!r}")
            if key_id in seen:
                raise FleetKeyError(f"{where}.id: duplicate key id {key_id}")
            seen.add(key_id)
            raw = entry["secret"]
            if not isinstance(raw, str):
                raise FleetKeyError(f"{where}.secret: must be a base64 string")
            try:
                secret = base64.b64decode(raw.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise FleetKeyError(f"{where}.secret: not valid base64") from None
            if len(secret) < MIN_SECRET_LENGTH:
                raise FleetKeyError(
                    f"{where}.secret: {len(secret)} bytes, at least {MIN_SECRET_LENGTH} required "
                    f"(generate one with: head -c 32 /dev/urandom | base64)"
                )
            if len(secret) > MAX_SECRET_LENGTH:
                raise FleetKeyError(f"{where}.secret: longer than {MAX_SECRET_LENGTH} bytes")
            created = entry["created"]
            if not _is_int(created) or created < 0:
                raise FleetKeyError(f"{where}.created: must be a unix time >= 0, got {created!r}")
            keys.append(FleetKey(key_id, secret, created))
        primary = data.get("primary")
        if primary is None:
            raise FleetKeyError(f"{source}: primary: missing")
        if not _is_int(primary) or primary not in seen:
            raise FleetKeyError(f"{source}: primary: {primary!r} is not the id of a key")
        return cls(keys, primary, urandom=urandom)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, urandom: RandomSource = os.urandom) -> FleetKeys:
        """Read a key file; refuses anything but a regular file that others cannot access.

        Group read is tolerated (a service group); group write and any access by others are
        not. Symlinks are followed (secret volumes are usually symlinked), the checks apply to
        the file itself, made on the open descriptor so the file cannot be swapped in between.
        """
        name = os.fspath(path)
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise FleetKeyError(f"{name}: cannot open fleet key file: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FleetKeyError(f"{name}: not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o027:
                raise FleetKeyError(
                    f"{name}: fleet key file has mode {mode:04o}; it holds fleet secrets and must "
                    f"not be accessible to others or writable by the group (chmod 600 {name})"
                )
            if st.st_size > MAX_KEY_FILE_SIZE:
                raise FleetKeyError(f"{name}: larger than {MAX_KEY_FILE_SIZE} bytes")
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_KEY_FILE_SIZE + 1)
        finally:
            os.close(fd)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FleetKeyError(f"{name}: not UTF-8 text") from None
        return cls.parse(text, source=name, urandom=urandom)

    @classmethod
    def generate(
        cls,
        path: str | os.PathLike[str],
        *,
        now: float,
        key_id: int = 0,
        urandom: RandomSource = os.urandom,
    ) -> FleetKeys:
        """Create a new key file with one random key (mode 0600); refuses to overwrite."""
        keys = cls(
            [FleetKey(key_id, urandom(MIN_SECRET_LENGTH), int(now))], key_id, urandom=urandom
        )
        name = os.fspath(path)
        if os.path.lexists(name):
            raise FleetKeyError(f"{name}: already exists; refusing to overwrite fleet keys")
        tmp = _write_private(name, keys.dumps())
        try:
            # link() fails if the name exists: no window in which an existing file is replaced.
            os.link(tmp, name)
        except FileExistsError:
            raise FleetKeyError(
                f"{name}: already exists; refusing to overwrite fleet keys"
            ) from None
        finally:
            os.unlink(tmp)
        return keys

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file atomically (temporary file, mode 0600, then rename over)."""
        name = os.fspath(path)
        tmp = _write_private(name, self.dumps())
        try:
            os.replace(tmp, name)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def dumps(self) -> str:
        lines = [
            "# edgeproxy fleet keys: identical on every PoP. Secret; keep mode 0600.",
            "# Rotate: add the new key everywhere, then make it primary everywhere, then remove",
            "# the old one once tokens and tickets issued under it have expired (24 h).",
            f"primary = {self._primary.key_id}",
        ]
        for key in self._keys.values():
            lines += [
                "",
                "[[keys]]",
                f"id = {key.key_id}",
                f'secret = "{base64.b64encode(key.secret).decode("ascii")}"',
                f"created = {key.created}",
            ]
        return "\n".join(lines) + "\n"

    # -- rotation ------------------------------------------------------------------------------

    @property
    def primary(self) -> FleetKey:
        return self._primary

    @property
    def keys(self) -> Mapping[int, FleetKey]:
        return MappingProxyType(dict(self._keys))

    def get(self, key_id: int) -> FleetKey | None:
        return self._keys.get(key_id)

    def add_key(
        self, key_id: int | None = None, *, now: float, secret: bytes | None = None
    ) -> FleetKey:
        """Add a (by default random) key that opens but does not issue until `set_primary`.

        A picked id differs mod 7 from every live one: each live key has its own QUIC-LB config
        codepoint (see `identity`)."""
        if key_id is None:
            start = max(self._keys) + 1
            taken = {k % 7 for k in self._keys}
            key_id = next(
                (
                    i % 256
                    for i in range(start, start + 256)
                    if i % 256 not in self._keys and (i % 256) % 7 not in taken
                ),
                None,
            )
            if key_id is None:
                raise FleetKeyError(
                    "no free key id: 7 keys are live (one per QUIC-LB codepoint); remove one"
                )
        if key_id in self._keys:
            raise FleetKeyError(f"key id {key_id} already exists")
        _check_codepoints({**self._keys, key_id: None})
        key = FleetKey(
            key_id, self._urandom(MIN_SECRET_LENGTH) if secret is None else secret, int(now)
        )
        self._keys[key_id] = key
        return key

    def same_keys(self, other: FleetKeys) -> bool:
        """The same secrets under the same ids, and the same primary."""
        return self._primary.key_id == other._primary.key_id and {
            i: k.secret for i, k in self._keys.items()
        } == {i: k.secret for i, k in other._keys.items()}

    def replace(self, other: FleetKeys) -> None:
        """Take `other`'s keys and primary (a reloaded key file). Everything holding this
        object issues under the new primary and opens under the new set from now on."""
        self._keys, self._primary = dict(other._keys), other._primary

    def set_primary(self, key_id: int) -> None:
        key = self._keys.get(key_id)
        if key is None:
            raise FleetKeyError(f"key id {key_id!r} does not exist")
        self._primary = key

    def remove_key(self, key_id: int) -> None:
        """Drop a key: everything sealed under it stops opening. Not the primary."""
        if key_id not in self._keys:
            raise FleetKeyError(f"key id {key_id!r} does not exist")
        if key_id == self._primary.key_id:
            raise FleetKeyError(f"key id {key_id} is the primary; make another key primary first")
        del self._keys[key_id]

    # -- stateless reset tokens ----------------------------------------------------------------

    def reset_token(self, cid: bytes, *, key_id: int | None = None) -> bytes:
        """Stateless reset token of ``cid``: HMAC-SHA256(reset key, cid)[:16], primary key by
        default. The same (key, CID) gives the same token on every PoP."""
        key = self._primary if key_id is None else self._keys.get(key_id)
        if key is None:
            raise FleetKeyError(f"key id {key_id!r} does not exist")
        return key.reset_token(bytes(cid))

    def reset_tokens_for(self, cid: bytes) -> list[bytes]:
        """The token of ``cid`` under every live key, primary first: a CID issued before a
        rotation carries a token of the then-primary key."""
        others = [k for k in self._keys.values() if k is not self._primary]
        return [k.reset_token(bytes(cid)) for k in (self._primary, *others)]

    # -- Retry tokens ---------------------------------------------------------------------------

    def make_retry_token(
        self, client_addr: tuple[Any, ...], original_dcid: bytes, retry_scid: bytes, *, now: float
    ) -> bytes:
        """A Retry token binding the client's IP and port, the original DCID and the Retry SCID."""
        ip_port = _ip16(client_addr)
        if ip_port is None:
            raise ValueError(f"client_addr must be (ip, port), got {client_addr!r}")
        for name, cid in (("original_dcid", original_dcid), ("retry_scid", retry_scid)):
            if not isinstance(cid, bytes) or len(cid) > _MAX_CID_LEN:
                raise ValueError(f"{name} must be at most {_MAX_CID_LEN} bytes, got {cid!r}")
        ip, port = ip_port
        key = self._primary
        head = bytes((TokenKind.RETRY, key.key_id))
        nonce = self._urandom(_NONCE_LEN)
        body = struct.pack("!QHB", _ms(now), port, len(original_dcid)) + original_dcid + retry_scid
        return head + nonce + key.retry_aead.encrypt(nonce, body, head + ip)

    def open_retry_token(
        self,
        token: bytes,
        client_addr: tuple[Any, ...],
        now: float,
        *,
        dcid: bytes | None = None,
        lifetime: float = RETRY_TOKEN_LIFETIME,
    ) -> RetryTokenContents | TokenError:
        """Validate a Retry token from a client Initial. Never raises.

        ``dcid``, if given, is the Initial's Destination CID, which must equal the Retry SCID
        (RFC 9000 section 8.1.2: the token is valid only on the connection the Retry created).
        """
        opened = self._open(token, TokenKind.RETRY, client_addr)
        if isinstance(opened, TokenError):
            return opened
        key_id, body, port = opened
        if len(body) < 11:
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        issued_ms, token_port, odcid_len = struct.unpack_from("!QHB", body)
        if odcid_len > _MAX_CID_LEN or len(body) - 11 - odcid_len > _MAX_CID_LEN:
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        odcid = body[11 : 11 + odcid_len]
        if len(odcid) != odcid_len:
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        rscid = body[11 + odcid_len :]
        age_error = _check_age(issued_ms, now, lifetime)
        if age_error is not None:
            return _TOKEN_ERRORS[age_error]
        if token_port != port:
            return _TOKEN_ERRORS[TokenErrorReason.ADDRESS_MISMATCH]
        if dcid is not None and not hmac.compare_digest(bytes(dcid), rscid):
            return _TOKEN_ERRORS[TokenErrorReason.CID_MISMATCH]
        return RetryTokenContents(odcid, rscid, issued_ms / 1000, key_id)

    # -- NEW_TOKEN tokens -----------------------------------------------------------------------

    def make_new_token(self, client_addr: tuple[Any, ...], *, now: float) -> bytes:
        """A NEW_TOKEN token for a future connection from the same client IP (any port)."""
        ip_port = _ip16(client_addr)
        if ip_port is None:
            raise ValueError(f"client_addr must be (ip, port), got {client_addr!r}")
        key = self._primary
        head = bytes((TokenKind.NEW_TOKEN, key.key_id))
        nonce = self._urandom(_NONCE_LEN)
        body = struct.pack("!Q", _ms(now)) + self._urandom(_TOKEN_ID_LEN)
        return head + nonce + key.token_aead.encrypt(nonce, body, head + ip_port[0])

    def open_new_token(
        self,
        token: bytes,
        client_addr: tuple[Any, ...],
        now: float,
        *,
        lifetime: float = NEW_TOKEN_LIFETIME,
    ) -> NewTokenContents | TokenError:
        """Validate a NEW_TOKEN token (IP only: clients change ports between connections).

        Never raises. Single use is the caller's: check ``token_id`` against a `ReplayFilter`.
        """
        opened = self._open(token, TokenKind.NEW_TOKEN, client_addr)
        if isinstance(opened, TokenError):
            return opened
        key_id, body, _port = opened
        if len(body) != 8 + _TOKEN_ID_LEN:
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        (issued_ms,) = struct.unpack_from("!Q", body)
        age_error = _check_age(issued_ms, now, lifetime)
        if age_error is not None:
            return _TOKEN_ERRORS[age_error]
        return NewTokenContents(body[8:], issued_ms / 1000, key_id)

    def _open(
        self, token: object, kind: TokenKind, client_addr: tuple[Any, ...]
    ) -> tuple[int, bytes, int] | TokenError:
        """(key id, plaintext, client port) of a sealed token, or why not."""
        if not isinstance(token, (bytes, bytearray, memoryview)):
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        token = bytes(token)
        # Bounded both ways: a Retry token is at most 2 + 12 + 11 + 40 + 16 bytes.
        if not 2 + _NONCE_LEN + _TAG_LEN + 8 <= len(token) <= 2 + _NONCE_LEN + 51 + _TAG_LEN:
            if token and token[0] not in (TokenKind.RETRY, TokenKind.NEW_TOKEN):
                return _TOKEN_ERRORS[TokenErrorReason.WRONG_KIND]
            return _TOKEN_ERRORS[TokenErrorReason.MALFORMED]
        if token[0] != kind:
            return _TOKEN_ERRORS[TokenErrorReason.WRONG_KIND]
        key = self._keys.get(token[1])
        if key is None:
            return _TOKEN_ERRORS[TokenErrorReason.UNKNOWN_KEY]
        ip_port = _ip16(client_addr)
        if ip_port is None:
            return _TOKEN_ERRORS[TokenErrorReason.BAD_ADDRESS]
        aead = key.retry_aead if kind == TokenKind.RETRY else key.token_aead
        try:
            body = aead.decrypt(token[2:14], token[14:], token[:2] + ip_port[0])
        except InvalidTag:
            return _TOKEN_ERRORS[TokenErrorReason.BAD_SEAL]
        return key.key_id, body, ip_port[1]

    # -- session tickets ------------------------------------------------------------------------

    def seal_ticket(self, plaintext: bytes, now: float) -> bytes:
        """Seal a serialized ticket under the primary key so any PoP can open it."""
        if not isinstance(plaintext, (bytes, bytearray)):
            raise TypeError("plaintext must be bytes")
        key = self._primary
        head = bytes((_TICKET_KIND, key.key_id))
        nonce = self._urandom(_NONCE_LEN)
        return (
            head
            + nonce
            + key.ticket_aead.encrypt(nonce, struct.pack("!Q", _ms(now)) + bytes(plaintext), head)
        )

    def open_ticket(
        self, blob: bytes, now: float, *, lifetime: float = TICKET_LIFETIME
    ) -> bytes | None:
        """The plaintext of a sealed ticket, or None (malformed, unknown key, forged, expired).

        Never raises. ``lifetime`` must be at least the lifetime advertised to clients.
        """
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            return None
        blob = bytes(blob)
        if len(blob) < 2 + _NONCE_LEN + 8 + _TAG_LEN or blob[0] != _TICKET_KIND:
            return None
        key = self._keys.get(blob[1])
        if key is None:
            return None
        try:
            body = key.ticket_aead.decrypt(blob[2:14], blob[14:], blob[:2])
        except InvalidTag:
            return None
        (issued_ms,) = struct.unpack_from("!Q", body)
        if _check_age(issued_ms, now, lifetime) is not None:
            return None
        return body[8:]


def _write_private(name: str, text: str) -> str:
    """Write ``text`` to a new mode-0600 file next to ``name``; returns its path."""
    directory, base = os.path.split(os.path.abspath(name))
    suffix = binascii.hexlify(os.urandom(6)).decode()
    tmp = os.path.join(directory, f".{base}.{suffix}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        # The umask may only remove bits, but be explicit: the file must be 0600 exactly.
        os.fchmod(fd, 0o600)
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


# --------------------------------------------------------------------------------------------
# Stateless reset packets
# --------------------------------------------------------------------------------------------

MIN_STATELESS_RESET = 21  # 1 + 4 bytes (>= 38 unpredictable bits) + 16-byte token
# RFC 9000 section 10.3: answer triggers of up to 43 bytes with one byte less; above that, pick a
# size in [43, 64] at random, a plausible short packet that reveals nothing about the trigger.
_SMALL_TRIGGER = 43
_MAX_RESET = 64


def build_stateless_reset(token: bytes, trigger_len: int, rand: RandomSource) -> bytes | None:
    """A Stateless Reset answering a ``trigger_len``-byte datagram, or None if it is too small.

    The packet looks like a short-header packet (header form 0, fixed bit 1, random rest),
    ends with ``token`` and is strictly smaller than the trigger (RFC 9000 section 10.3.3), so a
    reset never amplifies; it is at least 21 bytes, so triggers of 21 bytes or less get None.
    """
    if not isinstance(token, (bytes, bytearray)) or len(token) != RESET_TOKEN_LENGTH:
        raise ValueError(f"token must be {RESET_TOKEN_LENGTH} bytes")
    if not _is_int(trigger_len) or trigger_len - 1 < MIN_STATELESS_RESET:
        return None
    if trigger_len <= _SMALL_TRIGGER + 1:
        length = trigger_len - 1
    else:
        high = min(trigger_len - 1, _MAX_RESET)
        length = _SMALL_TRIGGER + rand(1)[0] % (high - _SMALL_TRIGGER + 1)
    noise = rand(length - RESET_TOKEN_LENGTH)
    if len(noise) != length - RESET_TOKEN_LENGTH:
        raise ValueError("rand returned the wrong number of bytes")
    return bytes((0x40 | (noise[0] & 0x3F),)) + noise[1:] + bytes(token)


# --------------------------------------------------------------------------------------------
# aioquic SessionTicket serialization
# --------------------------------------------------------------------------------------------

_TICKET_FORMAT = 1
_HAS_EARLY_DATA = 0x01
_HAS_SERVER_NAME = 0x02
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _us(when: datetime.datetime) -> int:
    if when.tzinfo is None:  # aioquic uses aware UTC datetimes; treat naive ones as UTC
        when = when.replace(tzinfo=datetime.UTC)
    return (when - _EPOCH) // datetime.timedelta(microseconds=1)


def serialize_session_ticket(ticket: SessionTicket) -> bytes:
    """aioquic 1.7.2's `tls.SessionTicket` as bytes (length-prefixed, big-endian)::

        format(1)=1 | flags(1) | age_add(4) | cipher_suite(2) | not_valid_before_us(8, signed)
        | not_valid_after_us(8, signed) | [max_early_data_size(4) if flags & 1]
        | secret_len(1) | resumption_secret | [name_len(2) | server_name utf-8 if flags & 2]
        | ticket_len(2) | ticket | ext_count(2) | (ext_type(2) | ext_len(2) | ext_data)*

    ``server_name`` may be None on the server side (no SNI); it is then omitted.
    """
    try:
        return _serialize_session_ticket(ticket)
    except (struct.error, TypeError, AttributeError, UnicodeEncodeError) as e:
        raise ValueError(f"not a serializable SessionTicket: {e}") from None


def _serialize_session_ticket(ticket: SessionTicket) -> bytes:
    flags = 0
    tail = b""
    if ticket.max_early_data_size is not None:
        flags |= _HAS_EARLY_DATA
        tail = struct.pack("!I", ticket.max_early_data_size)
    out = [
        b"",
        struct.pack(
            "!IHqq",
            ticket.age_add,
            int(ticket.cipher_suite),
            _us(ticket.not_valid_before),
            _us(ticket.not_valid_after),
        ),
        tail,
    ]
    secret = ticket.resumption_secret
    if len(secret) > 0xFF:
        raise ValueError("resumption_secret longer than 255 bytes")
    out.append(bytes((len(secret),)) + secret)
    if ticket.server_name is not None:
        flags |= _HAS_SERVER_NAME
        name = ticket.server_name.encode("utf-8")
        out.append(struct.pack("!H", len(name)) + name)
    out.append(struct.pack("!H", len(ticket.ticket)) + ticket.ticket)
    out.append(struct.pack("!H", len(ticket.other_extensions)))
    for ext_type, data in ticket.other_extensions:
        out.append(struct.pack("!HH", ext_type, len(data)) + data)
    out[0] = bytes((_TICKET_FORMAT, flags))
    return b"".join(out)


class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise TicketFormatError("truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def done(self) -> bool:
        return self._pos == len(self._data)


def deserialize_session_ticket(data: bytes) -> SessionTicket:
    """Inverse of `serialize_session_ticket`; TicketFormatError on anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TicketFormatError("not bytes")
    r = _Reader(bytes(data))
    version, flags = r.unpack("!BB")
    if version != _TICKET_FORMAT:
        raise TicketFormatError(f"unknown ticket format {version}")
    if flags & ~(_HAS_EARLY_DATA | _HAS_SERVER_NAME):
        raise TicketFormatError(f"unknown flags {flags:#x}")
    age_add, suite, before_us, after_us = r.unpack("!IHqq")
    try:
        cipher_suite = CipherSuite(suite)
        not_valid_before = _EPOCH + datetime.timedelta(microseconds=before_us)
        not_valid_after = _EPOCH + datetime.timedelta(microseconds=after_us)
    except (ValueError, OverflowError):
        raise TicketFormatError("bad cipher suite or timestamp") from None
    max_early = r.unpack("!I")[0] if flags & _HAS_EARLY_DATA else None
    secret = r.take(r.unpack("!B")[0])
    server_name: str | None = None
    if flags & _HAS_SERVER_NAME:
        try:
            server_name = r.take(r.unpack("!H")[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise TicketFormatError("server_name is not UTF-8") from None
    ticket_id = r.take(r.unpack("!H")[0])
    extensions: list[tuple[int, bytes]] = []
    for _ in range(r.unpack("!H")[0]):
        ext_type, ext_len = r.unpack("!HH")
        extensions.append((ext_type, r.take(ext_len)))
    if not r.done():
        raise TicketFormatError("trailing bytes")
    return SessionTicket(
        age_add=age_add,
        cipher_suite=cipher_suite,
        not_valid_after=not_valid_after,
        not_valid_before=not_valid_before,
        resumption_secret=secret,
        server_name=server_name,  # type: ignore[arg-type]  # aioquic stores None without SNI
        ticket=ticket_id,
        max_early_data_size=max_early,
        other_extensions=extensions,
    )


# --------------------------------------------------------------------------------------------
# Replay filter
# --------------------------------------------------------------------------------------------


class ReplayVerdict(StrEnum):
    FRESH = "fresh"  # first sighting in the window: accept (and it is now recorded)
    REPLAYED = "replayed"  # seen within the window: reject
    SATURATED = "saturated"  # the filter is full: reject (fail closed, see ReplayFilter)


class ReplayFilter:
    """A bounded, time-windowed set of ids seen at this PoP (ticket ids, early-data ids,
    NEW_TOKEN token ids).

    Each id is remembered for ``window`` seconds after it is first seen; ``window`` must cover
    the time during which the id could be accepted again (the token or ticket lifetime, or the
    0-RTT freshness window if ticket age is checked). At ``max_entries`` live ids the filter
    fails closed: new ids are `ReplayVerdict.SATURATED`, never evicted early, because eviction
    would re-open replay of the evicted ids. Rejection is always safe here: the client falls
    back to a full handshake or to an unvalidated address (a Retry). Anything but FRESH means
    reject. See the module docstring for why this protects one PoP only.
    """

    __slots__ = ("_expiry", "_max_entries", "_order", "_window")

    def __init__(self, window: float, max_entries: int = 100_000) -> None:
        if not window > 0:
            raise ValueError(f"window must be > 0, got {window!r}")
        if not _is_int(max_entries) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self._window = float(window)
        self._max_entries = max_entries
        self._expiry: dict[bytes, float] = {}
        # Insertion order equals expiry order while time does not go backwards.
        self._order: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._expiry)

    def _expire(self, now: float) -> None:
        order, expiry = self._order, self._expiry
        while order and order[0][0] <= now:
            when, item = order.popleft()
            if expiry.get(item) == when:
                del expiry[item]

    def check_and_add(self, item: bytes, now: float) -> ReplayVerdict:
        """Record ``item`` if it is new; say whether it was."""
        self._expire(now)
        item = bytes(item)
        if item in self._expiry:
            return ReplayVerdict.REPLAYED
        if len(self._expiry) >= self._max_entries:
            return ReplayVerdict.SATURATED
        when = now + self._window
        self._expiry[item] = when
        self._order.append((when, item))
        return ReplayVerdict.FRESH

    def __contains__(self, item: object) -> bool:
        # Without a clock, expired-but-unpruned ids still count: callers use check_and_add.
        return item in self._expiry
