"""memberlist's AES-GCM gossip encryption and keyring (``security.go``, ``keyring.go``).

Sealed format: ``[vsn][nonce 12][ciphertext][tag 16]``.

* version 0: the plaintext is PKCS#7-padded to 16 bytes before sealing (a whole block when
  already aligned): overhead 45 bytes at most;
* version 1: no padding, overhead 29 bytes. memberlist speaking protocol >= 2 (Serf 0.9.4 does)
  sends version 1; both are accepted on receive, anything above 1 is rejected.

The associated data is empty for UDP packets in memberlist 0.2.2 (the label in >= 0.3.0) and the
5-byte ``[10][len u32be]`` stream header (+ label) for streams; the caller passes it as ``aad``.

The first key of a keyring is the primary and encrypts; decryption tries every key, so keys can
be rotated without a restart: ``add_key(new)`` everywhere, ``use_key(new)``, then
``remove_key(old)``. Serf's ``-keyring-file`` (a JSON array of base64 keys, first = primary) loads
with :meth:`Keyring.from_file`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gossip.wire import WireError

__all__ = [
    "KEY_SIZES",
    "MAX_ENCRYPTION_VERSION",
    "NONCE_SIZE",
    "TAG_SIZE",
    "Keyring",
    "validate_key",
]

KEY_SIZES = (16, 24, 32)
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_SIZE = 16
MIN_ENCRYPTION_VERSION = 0
MAX_ENCRYPTION_VERSION = 1


def validate_key(key: bytes) -> bytes:
    """Return ``key`` as bytes if it is an AES-128/192/256 key, else raise ``ValueError``."""
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError("key must be bytes")
    raw = bytes(key)
    if len(raw) not in KEY_SIZES:
        raise ValueError(f"key size must be 16, 24 or 32 bytes, not {len(raw)}")
    return raw


class Keyring:
    """An ordered set of AES keys; ``keys[0]`` is the primary.

    Mutations replace an immutable snapshot in one assignment, so concurrent ``decrypt`` calls
    (from another thread or task) always see a consistent keyring.
    """

    def __init__(self, primary: bytes, extra: Iterable[bytes] = ()) -> None:
        keys = [validate_key(primary)]
        for k in extra:
            raw = validate_key(k)
            if raw not in keys:
                keys.append(raw)
        self._install(keys)

    def _install(self, keys: Sequence[bytes]) -> None:
        self._snapshot: tuple[tuple[bytes, AESGCM], ...] = tuple((k, AESGCM(k)) for k in keys)

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def from_base64(cls, keys: Sequence[str]) -> Keyring:
        """Build from base64 strings (``serf keygen`` output); the first is the primary."""
        if not keys:
            raise ValueError("a keyring needs at least one key")
        decoded = []
        for k in keys:
            if not isinstance(k, str):
                raise ValueError("keys must be base64 strings")
            try:
                decoded.append(base64.b64decode(k, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"invalid base64 key: {exc}") from None
        return cls(decoded[0], decoded[1:])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load a Serf keyring file: a JSON array of base64 keys, the first being the primary."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of base64 keys")
        return cls.from_base64(data)

    def to_base64(self) -> list[str]:
        """The keys as a Serf keyring file's JSON array (primary first)."""
        return [base64.b64encode(k).decode("ascii") for k in self.keys]

    # --- management -----------------------------------------------------------------------

    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(k for k, _ in self._snapshot)

    @property
    def primary_key(self) -> bytes:
        return self._snapshot[0][0]

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """Replace every key at once, ``keys[0]`` becoming the primary (a reloaded keyring
        file). Validated before anything changes."""
        raw: list[bytes] = []
        for k in keys:
            v = validate_key(k)
            if v not in raw:
                raw.append(v)
        if not raw:
            raise ValueError("a keyring needs at least one key")
        self._install(raw)

    def reload_file(self, path: str | os.PathLike[str]) -> bool:
        """Install the keys of a Serf keyring file (see :meth:`from_file`); True if they
        changed. On any error (ValueError, OSError) the installed keys stay."""
        keys = Keyring.from_file(path).keys
        if keys == self.keys:
            return False
        self.set_keys(keys)
        return True

    def add_key(self, key: bytes) -> None:
        """Install a secondary key (no-op if already installed)."""
        raw = validate_key(key)
        keys = list(self.keys)
        if raw not in keys:
            self._install([*keys, raw])

    def use_key(self, key: bytes) -> None:
        """Make an installed key the primary."""
        raw = validate_key(key)
        keys = list(self.keys)
        if raw not in keys:
            raise ValueError("requested key is not in the keyring")
        keys.remove(raw)
        self._install([raw, *keys])

    def remove_key(self, key: bytes) -> None:
        """Drop a secondary key (no-op if absent); the primary cannot be removed."""
        raw = validate_key(key)
        keys = list(self.keys)
        if raw == keys[0]:
            raise ValueError("removing the primary key is not allowed")
        if raw in keys:
            keys.remove(raw)
            self._install(keys)

    # --- sealing --------------------------------------------------------------------------

    @staticmethod
    def sealed_size(plaintext_len: int, version: int = 1) -> int:
        """memberlist ``encryptedLength``: the sealed size of a plaintext."""
        if version == 0:
            padding = BLOCK_SIZE - plaintext_len % BLOCK_SIZE
            return 1 + NONCE_SIZE + plaintext_len + padding + TAG_SIZE
        if version == 1:
            return 1 + NONCE_SIZE + plaintext_len + TAG_SIZE
        raise ValueError(f"unsupported encryption version {version}")

    @staticmethod
    def overhead(version: int = 1) -> int:
        """memberlist ``encryptOverhead``: worst-case bytes added (45 for v0, 29 for v1)."""
        if version == 0:
            return 1 + NONCE_SIZE + BLOCK_SIZE + TAG_SIZE
        return Keyring.sealed_size(0, version)

    def encrypt(
        self,
        plaintext: bytes,
        aad: bytes = b"",
        *,
        version: int = 1,
        nonce: bytes | None = None,
    ) -> bytes:
        """Seal with the primary key: ``[version][nonce][ciphertext][tag]``.

        ``nonce`` is random unless given (tests re-seal captures with their nonce).
        """
        if version not in (0, 1):
            raise ValueError(f"unsupported encryption version {version}")
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        elif len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        data = bytes(plaintext)
        if version == 0:
            pad = BLOCK_SIZE - len(data) % BLOCK_SIZE
            data += bytes((pad,)) * pad
        sealed = self._snapshot[0][1].encrypt(bytes(nonce), data, bytes(aad))
        return bytes((version,)) + bytes(nonce) + sealed

    def decrypt(self, data: bytes | bytearray | memoryview, aad: bytes = b"") -> bytes:
        """Open with any installed key. Raises :class:`WireError` (``truncated``,
        ``bad_encryption_version``, ``decrypt_failed`` or ``bad_padding``)."""
        buf = bytes(data)
        if not buf:
            raise WireError("truncated", "cannot decrypt an empty payload")
        version = buf[0]
        if version > MAX_ENCRYPTION_VERSION:
            raise WireError("bad_encryption_version", f"encryption version {version}")
        if len(buf) < self.sealed_size(0, version):
            raise WireError("truncated", f"payload of {len(buf)} bytes is too small to decrypt")
        nonce = buf[1 : 1 + NONCE_SIZE]
        sealed = buf[1 + NONCE_SIZE :]
        for _, aead in self._snapshot:
            try:
                plain = aead.decrypt(nonce, sealed, bytes(aad))
            except InvalidTag:
                continue
            if version == 0:
                if not plain or not 1 <= plain[-1] <= BLOCK_SIZE or plain[-1] > len(plain):
                    raise WireError("bad_padding", "invalid PKCS#7 padding")
                plain = plain[: -plain[-1]]
            return plain
        raise WireError("decrypt_failed", "no installed key could decrypt the message")
