"""QUIC-LB connection-ID codec (draft-ietf-quic-load-balancers-21), pure and sans-IO.

A QUIC-LB connection ID names the server that owns a connection, so that any load balancer
(in edgeproxy: any PoP, since every PoP is an LB for every other PoP) can route a packet by its
Destination CID without per-connection state::

    CID         = First Octet (8) || Plaintext Block, encrypted or not (40..152 bits)
    First Octet = config rotation (3) || CID length after the first octet, or random (5)
    Plaintext   = server ID (>= 1 octet) || nonce (>= 4 octets), together <= 19 octets

Config rotation values 0..6 name live configurations; 0b111 is reserved and always unroutable
(servers without a configuration use it, see `unroutable_cid`). Three algorithms, chosen by the
configuration alone:

* no key: plaintext, ``FO || sid || nonce``;
* key and ``sid_len + nonce_len == 16``: one AES-128-ECB block ("single pass");
* key and any other length (5..19): a four-round Feistel network whose round function is
  AES-128-ECB of ``expand(len, pass, half) = half || zeros(14 - |half|) || len || pass``
  (the draft-19+ layout; draft-14..18 put ``len || pass`` first and their vectors do not
  validate here), each AES output truncated to ``half_len = ceil(len / 2)`` octets. For odd
  lengths the middle octet is shared: the left half keeps its high nibble, the right half its
  low nibble, and the other nibble is cleared after every round.

Decoding a four-pass CID costs 3 AES operations when ``nonce_len >= sid_len`` and only the
server ID is wanted (``decode(cid, with_nonce=False)``), else 4; single pass costs 1. The AES
ECB contexts are created once per configuration and reused (a fresh ``Cipher`` per call costs
about 14 us, a block about 0.5 us). Reusing ECB contexts is sound (ECB keeps no chaining state)
but the codec is not thread-safe; edgeproxy uses it from one event loop.

Defects of the draft that this module corrects (see shared/vectors/quic-lb-draft21.txt):

* Load-balancer four-pass decode pseudocode: after computing ``right_1`` it says
  ``clear_first_bits(left_1, 4)``; the value just computed, ``right_1``, is the one whose first
  nibble must be cleared. Decoding here is implemented as the exact inverse of the encoding
  steps, which clears ``right_1``.
* Worked example: "hash_len" means ``half_len``; step 10 XORs with ``0xb334357c`` (the printed
  ``0xb3e4357c`` is a typo, its result is right). draft-19's example had a wrong ``right_1``.
* Unencrypted vector 2 prints a 9-digit nonce and a CID built from unpadded hex fields; the only
  self-consistent reading is sid ``350d28b420``, nonce ``03487d970b``, CID
  ``2a350d28b42003487d970b``.
* Encrypted vector 4 is labelled config rotation 3 but its first octet ``0x12`` is config 0;
  the body is right, with config 3 the first octet is ``0x72``.

Nonce rules (draft section "Connection ID Entropy"). Under one key a nonce MUST NOT be reused:
the same server ID and nonce give the same CID, leaking key material and, with a fleet reset
key, stateless reset tokens. With a key, ``encode`` without an explicit nonce takes the next
value of a counter that starts at a random value and counts modulo ``2**(8 * nonce_len)``; the
counter belongs to the (key, lengths) triple and survives ``remove_config``/``add_config`` of
the same configuration within this codec. When it would come back to its start (or after the
optional ``nonce_budget``), `NonceExhaustedError` is raised: the server MUST then switch to a
configuration with a new key, or issue `unroutable_cid` CIDs. Counters are per process: two
processes sharing a key MUST use different server IDs (edgeproxy puts the worker in the server
ID, see `ServerIdLayout`). Without a key the nonce is random instead, because the draft forbids
plaintext nonces with any observable relationship to earlier ones; a random N-bit nonce repeats
after about 2**(N/2) CIDs. Explicit nonces passed by the caller are the caller's responsibility.

Decoding never raises on arbitrary input: anything that is not a CID of a live configuration
comes back as `Unroutable` with a `UnroutableReason`. Whether a decoded server ID belongs to a
live server is for the caller to decide (random DCIDs decode to random server IDs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "KEY_LENGTH",
    "MAX_CID_LENGTH",
    "UNROUTABLE_CONFIG_ID",
    "CidCipher",
    "Decoded",
    "LBConfig",
    "NoCurrentConfigError",
    "NonceExhaustedError",
    "QuicLBCodec",
    "QuicLBError",
    "ServerIdLayout",
    "Unroutable",
    "UnroutableReason",
    "unroutable_cid",
]

UNROUTABLE_CONFIG_ID = 0b111
# QUIC v1 (RFC 9000 section 17.2) limits connection IDs to 20 octets.
MAX_CID_LENGTH = 20
KEY_LENGTH = 16  # AES-128
MAX_PLAINTEXT_LEN = MAX_CID_LENGTH - 1
MIN_SERVER_ID_LEN = 1
MIN_NONCE_LEN = 4
SINGLE_PASS_LEN = 16
_LENGTH_BITS = 0x1F

RandomSource = Callable[[int], bytes]


class QuicLBError(Exception):
    """Base class of the codec's run-time errors (configuration errors are ValueError)."""


class NonceExhaustedError(QuicLBError):
    """The nonce counter of the current configuration has used up its space or budget."""


class NoCurrentConfigError(QuicLBError):
    """`QuicLBCodec.encode` was called with no current configuration."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True, repr=False)
class LBConfig:
    """One QUIC-LB configuration, identified on the wire by its config rotation bits."""

    config_id: int
    server_id_len: int
    nonce_len: int
    key: bytes | None = None  # 16 octets for AES-128; None = plaintext algorithm
    self_encode_length: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.config_id) or not 0 <= self.config_id <= 6:
            raise ValueError(
                f"config_id must be an int in 0..6 (0b111 is reserved for unroutable CIDs), "
                f"got {self.config_id!r}"
            )
        if not _is_int(self.server_id_len) or self.server_id_len < MIN_SERVER_ID_LEN:
            raise ValueError(f"server_id_len must be an int >= 1, got {self.server_id_len!r}")
        if not _is_int(self.nonce_len) or self.nonce_len < MIN_NONCE_LEN:
            raise ValueError(f"nonce_len must be an int >= 4, got {self.nonce_len!r}")
        if self.server_id_len + self.nonce_len > MAX_PLAINTEXT_LEN:
            raise ValueError(
                f"server_id_len + nonce_len must be <= {MAX_PLAINTEXT_LEN} (QUIC v1 CIDs are at "
                f"most {MAX_CID_LENGTH} octets), got {self.server_id_len} + {self.nonce_len}"
            )
        if self.key is not None and (
            not isinstance(self.key, bytes) or len(self.key) != KEY_LENGTH
        ):
            got = (
                f"{len(self.key)} bytes" if isinstance(self.key, bytes) else type(self.key).__name__
            )
            raise ValueError(
                f"key must be None (plaintext) or {KEY_LENGTH} bytes (AES-128), got {got}"
            )
        if not isinstance(self.self_encode_length, bool):
            raise ValueError(f"self_encode_length must be a bool, got {self.self_encode_length!r}")

    def __repr__(self) -> str:
        key = "None" if self.key is None else f"<{len(self.key)} bytes>"
        return (
            f"LBConfig(config_id={self.config_id}, server_id_len={self.server_id_len}, "
            f"nonce_len={self.nonce_len}, key={key}, "
            f"self_encode_length={self.self_encode_length})"
        )

    @property
    def plaintext_len(self) -> int:
        """Octets after the first octet: server ID plus nonce."""
        return self.server_id_len + self.nonce_len

    @property
    def cid_len(self) -> int:
        """Length of the CIDs this configuration produces, first octet included."""
        return 1 + self.server_id_len + self.nonce_len

    @property
    def algorithm(self) -> str:
        """``"plaintext"``, ``"single-pass"`` or ``"four-pass"``."""
        if self.key is None:
            return "plaintext"
        return "single-pass" if self.plaintext_len == SINGLE_PASS_LEN else "four-pass"


class CidCipher:
    """The keyed transform of a plaintext block (sid || nonce) for one configuration.

    Holds the AES-128-ECB contexts for the configuration's lifetime. ``encrypt``/``decrypt`` map
    ``plaintext_len`` octets to ``plaintext_len`` octets; ``server_id`` decrypts only as far as
    needed to recover the server ID.
    """

    __slots__ = (
        "_aes_decrypt",
        "_aes_encrypt",
        "_half_bits",
        "_length",
        "_lmask",
        "_odd_bits",
        "_pad_bits",
        "_rmask",
        "_sid_in_left",
        "_sid_len",
        "_single_pass",
        "_tails",
    )

    def __init__(self, config: LBConfig) -> None:
        if config.key is None:
            raise ValueError("CidCipher needs a keyed LBConfig (key is None)")
        cipher = Cipher(algorithms.AES(config.key), modes.ECB())
        # Reused ECB contexts: each update() of one 16-octet block is one AES operation.
        self._aes_encrypt: Callable[[bytes], bytes] = cipher.encryptor().update
        self._aes_decrypt: Callable[[bytes], bytes] = cipher.decryptor().update
        length = config.plaintext_len
        self._length = length
        self._sid_len = config.server_id_len
        self._single_pass = length == SINGLE_PASS_LEN
        half = (length + 1) // 2
        odd = length & 1
        # The halves are kept as ints of 8*half bits. With an odd length the left half's last
        # nibble and the right half's first nibble are always zero.
        self._half_bits = 8 * half
        self._odd_bits = 4 * odd
        self._lmask = ((1 << (8 * half)) - 1) ^ (0x0F if odd else 0)
        self._rmask = (1 << (8 * half - 4 * odd)) - 1
        # expand(len, pass, x) = x || zeros(14 - half) || len || pass, as an int: x shifted
        # left by _pad_bits, OR the constant tail. The same shift truncates the AES output.
        self._pad_bits = 8 * (16 - half)
        self._tails = tuple((length << 8) | pass_ for pass_ in range(5))  # index 0 unused
        # The server ID lies entirely in left_0 (3-pass decode) iff sid_len <= floor(len / 2),
        # i.e. iff nonce_len >= sid_len.
        self._sid_in_left = config.server_id_len <= length // 2

    def _round(self, pass_: int, half: int) -> int:
        """truncate(AES-ECB(key, expand(len, pass, half)), half_len), as an int."""
        block = ((half << self._pad_bits) | self._tails[pass_]).to_bytes(16, "big")
        return int.from_bytes(self._aes_encrypt(block), "big") >> self._pad_bits

    def _split(self, data: bytes) -> tuple[int, int]:
        value = int.from_bytes(data, "big")
        right = value & self._rmask
        left = (value >> (self._half_bits - self._odd_bits)) << self._odd_bits
        return left, right

    def _join(self, left: int, right: int) -> bytes:
        value = ((left >> self._odd_bits) << (self._half_bits - self._odd_bits)) | right
        return value.to_bytes(self._length, "big")

    def encrypt(self, plaintext: bytes) -> bytes:
        if len(plaintext) != self._length:
            raise ValueError(f"plaintext block must be {self._length} octets, got {len(plaintext)}")
        if self._single_pass:
            return self._aes_encrypt(plaintext)
        lmask, rmask = self._lmask, self._rmask
        left0, right0 = self._split(plaintext)
        right1 = (right0 ^ self._round(1, left0)) & rmask
        left1 = (left0 ^ self._round(2, right1)) & lmask
        right2 = (right1 ^ self._round(3, left1)) & rmask
        left2 = (left1 ^ self._round(4, right2)) & lmask
        return self._join(left2, right2)

    def _undo_three(self, ciphertext: bytes) -> tuple[int, int]:
        """The first three decode rounds: (left_0, right_1)."""
        lmask, rmask = self._lmask, self._rmask
        left2, right2 = self._split(ciphertext)
        left1 = (left2 ^ self._round(4, right2)) & lmask
        # The draft's pseudocode clears left_1 here; right_1 is what must be cleared.
        right1 = (right2 ^ self._round(3, left1)) & rmask
        left0 = (left1 ^ self._round(2, right1)) & lmask
        return left0, right1

    def decrypt(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self._length:
            raise ValueError(
                f"ciphertext block must be {self._length} octets, got {len(ciphertext)}"
            )
        if self._single_pass:
            return self._aes_decrypt(ciphertext)
        left0, right1 = self._undo_three(ciphertext)
        right0 = (right1 ^ self._round(1, left0)) & self._rmask
        return self._join(left0, right0)

    def server_id(self, ciphertext: bytes) -> bytes:
        """Only the server ID: 3 AES operations when it lies within left_0, else 4 (or 1)."""
        if self._single_pass or not self._sid_in_left:
            return self.decrypt(ciphertext)[: self._sid_len]
        if len(ciphertext) != self._length:
            raise ValueError(
                f"ciphertext block must be {self._length} octets, got {len(ciphertext)}"
            )
        left0, _ = self._undo_three(ciphertext)
        return (left0 >> (self._half_bits - 8 * self._sid_len)).to_bytes(self._sid_len, "big")


class UnroutableReason(StrEnum):
    """Why a CID cannot be routed by QUIC-LB (stable strings, usable as metric labels)."""

    MALFORMED = "malformed"  # not a bytes-like object
    EMPTY = "empty"  # zero-length CID
    RESERVED_CONFIG = "reserved_config"  # config rotation bits 0b111
    CONFIG_NOT_LIVE = "config_not_live"  # no live configuration with these bits
    TOO_SHORT = "too_short"  # shorter than 1 + sid_len + nonce_len
    TOO_LONG = "too_long"  # longer than the QUIC v1 maximum of 20 octets
    LENGTH_MISMATCH = "length_mismatch"  # self-encoded length differs from the actual length


@dataclass(frozen=True, slots=True)
class Decoded:
    config_id: int
    server_id: bytes
    # None exactly when decode(..., with_nonce=False) was asked for the server ID only.
    nonce: bytes | None


@dataclass(frozen=True, slots=True)
class Unroutable:
    reason: UnroutableReason


_UNROUTABLE = {reason: Unroutable(reason) for reason in UnroutableReason}


class _NonceCounter:
    """Nonces start .. start + budget - 1 modulo 2**(8*nonce_len), each handed out once."""

    __slots__ = ("_left", "_mask", "_next", "_nonce_len")

    def __init__(self, nonce_len: int, start: int, budget: int) -> None:
        self._nonce_len = nonce_len
        self._mask = (1 << (8 * nonce_len)) - 1
        self._next = start & self._mask
        self._left = budget

    @property
    def remaining(self) -> int:
        return self._left

    def take(self) -> bytes:
        if self._left <= 0:
            raise NonceExhaustedError(
                "nonce space of the current QUIC-LB configuration is exhausted: switch to a "
                "configuration with a new key, or issue unroutable (0b111) CIDs"
            )
        value = self._next
        self._next = (value + 1) & self._mask
        self._left -= 1
        return value.to_bytes(self._nonce_len, "big")


@dataclass(slots=True)
class _Live:
    config: LBConfig
    cipher: CidCipher | None
    counter: _NonceCounter | None


class QuicLBCodec:
    """Encodes CIDs under the current configuration and decodes CIDs of any live one.

    ``configs`` are added in order; ``current`` defaults to the first of them. ``nonce_budget``
    caps the number of counter nonces per key (default: the whole nonce space), e.g. to rotate
    keys long before exhaustion. ``urandom`` supplies randomness (counter starts, plaintext
    nonces, non-length first-octet bits); tests inject a deterministic one.
    """

    def __init__(
        self,
        configs: Iterable[LBConfig] = (),
        *,
        current: int | None = None,
        nonce_budget: int | None = None,
        urandom: RandomSource = os.urandom,
    ) -> None:
        if nonce_budget is not None and (not _is_int(nonce_budget) or nonce_budget < 0):
            raise ValueError(f"nonce_budget must be None or an int >= 0, got {nonce_budget!r}")
        self._nonce_budget = nonce_budget
        self._urandom = urandom
        self._live: dict[int, _Live] = {}
        self._current: _Live | None = None
        # Keyed by (key, sid_len, nonce_len): kept after remove_config so that re-adding the
        # same configuration cannot restart its counter somewhere already used.
        self._counters: dict[tuple[bytes, int, int], _NonceCounter] = {}
        for config in configs:
            self.add_config(config)
        if current is not None:
            self.set_current(current)
        elif self._live:
            self._current = next(iter(self._live.values()))

    # -- configuration -------------------------------------------------------------------------

    def add_config(self, config: LBConfig, *, make_current: bool = False) -> None:
        """Make ``config`` live for decoding (and for encoding if ``make_current``).

        A codepoint is not silently reassigned: a different configuration with the same
        config_id raises ValueError; remove the old one first, once its CIDs are gone.
        """
        if not isinstance(config, LBConfig):
            raise TypeError(f"config must be an LBConfig, got {type(config).__name__}")
        existing = self._live.get(config.config_id)
        if existing is not None and existing.config != config:
            raise ValueError(
                f"config_id {config.config_id} is live with a different configuration; "
                "remove it before reusing the codepoint"
            )
        if existing is None:
            cipher = None if config.key is None else CidCipher(config)
            counter = None
            if config.key is not None:
                slot = (config.key, config.server_id_len, config.nonce_len)
                counter = self._counters.get(slot)
                if counter is None:
                    space = 1 << (8 * config.nonce_len)
                    budget = space if self._nonce_budget is None else min(space, self._nonce_budget)
                    start = int.from_bytes(self._urandom(config.nonce_len), "big")
                    counter = _NonceCounter(config.nonce_len, start, budget)
                    self._counters[slot] = counter
            existing = _Live(config, cipher, counter)
            self._live[config.config_id] = existing
        if make_current:
            self._current = existing

    def remove_config(self, config_id: int) -> LBConfig:
        """Stop decoding (and encoding) under ``config_id``; its CIDs become unroutable."""
        live = self._live.pop(config_id, None)
        if live is None:
            raise KeyError(f"config_id {config_id!r} is not live")
        if self._current is live:
            self._current = None
        return live.config

    def set_current(self, config_id: int) -> None:
        live = self._live.get(config_id)
        if live is None:
            raise KeyError(f"config_id {config_id!r} is not live")
        self._current = live

    @property
    def current(self) -> LBConfig | None:
        return None if self._current is None else self._current.config

    @property
    def configs(self) -> Mapping[int, LBConfig]:
        """The live configurations by config_id (a read-only snapshot)."""
        return MappingProxyType({cid: live.config for cid, live in self._live.items()})

    def nonces_remaining(self, config_id: int | None = None) -> int | None:
        """Counter nonces left for a live keyed config (default: current); None if plaintext."""
        live = self._current if config_id is None else self._live.get(config_id)
        if live is None:
            raise KeyError(f"config_id {config_id!r} is not live")
        return None if live.counter is None else live.counter.remaining

    def cid_length_for(self, first_octet: int) -> int | None:
        """Length of a CID with this first octet under a live config, None if unroutable.

        For short headers, whose CID length is not on the wire.
        """
        live = self._live.get((first_octet >> 5) & 0b111)
        return None if live is None else live.config.cid_len

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, server_id: bytes, nonce: bytes | None = None) -> bytes:
        """A CID for ``server_id`` under the current configuration.

        Without ``nonce``: the next counter value (keyed configs) or random octets (plaintext).
        Raises NoCurrentConfigError, NonceExhaustedError, or ValueError for wrong lengths.
        """
        live = self._current
        if live is None:
            raise NoCurrentConfigError(
                "no current QUIC-LB configuration: set one, or issue unroutable_cid() CIDs"
            )
        config = live.config
        if not isinstance(server_id, bytes) or len(server_id) != config.server_id_len:
            raise ValueError(
                f"server_id must be {config.server_id_len} bytes for config "
                f"{config.config_id}, got {server_id!r}"
            )
        if nonce is None:
            nonce = (
                live.counter.take() if live.counter is not None else self._urandom(config.nonce_len)
            )
        elif not isinstance(nonce, bytes) or len(nonce) != config.nonce_len:
            raise ValueError(
                f"nonce must be {config.nonce_len} bytes for config {config.config_id}, "
                f"got {nonce!r}"
            )
        block = server_id + nonce
        body = block if live.cipher is None else live.cipher.encrypt(block)
        if config.self_encode_length:
            low = config.plaintext_len
        else:
            low = self._urandom(1)[0] & _LENGTH_BITS
        return bytes(((config.config_id << 5) | low,)) + body

    # -- decoding ------------------------------------------------------------------------------

    def decode(
        self, cid: bytes | bytearray | memoryview, *, with_nonce: bool = True
    ) -> Decoded | Unroutable:
        """The owner of ``cid``, or why it is unroutable. Never raises.

        Octets after ``1 + sid_len + nonce_len`` (up to 20 in all) are ignored: the draft lets
        servers append octets of their own. With ``with_nonce=False`` only the server ID is
        recovered (``nonce`` is None): a four-pass config whose nonce is at least as long as its
        server ID then decodes with 3 AES operations instead of 4.
        """
        if type(cid) is not bytes:
            if not isinstance(cid, (bytearray, memoryview)):
                return _UNROUTABLE[UnroutableReason.MALFORMED]
            try:
                cid = bytes(cid)
            except (TypeError, ValueError, BufferError):
                return _UNROUTABLE[UnroutableReason.MALFORMED]
        size = len(cid)
        if size == 0:
            return _UNROUTABLE[UnroutableReason.EMPTY]
        first = cid[0]
        config_id = first >> 5
        if config_id == UNROUTABLE_CONFIG_ID:
            return _UNROUTABLE[UnroutableReason.RESERVED_CONFIG]
        live = self._live.get(config_id)
        if live is None:
            return _UNROUTABLE[UnroutableReason.CONFIG_NOT_LIVE]
        config = live.config
        if size > MAX_CID_LENGTH:
            return _UNROUTABLE[UnroutableReason.TOO_LONG]
        length = config.plaintext_len
        if size - 1 < length:
            return _UNROUTABLE[UnroutableReason.TOO_SHORT]
        if config.self_encode_length and (first & _LENGTH_BITS) != size - 1:
            return _UNROUTABLE[UnroutableReason.LENGTH_MISMATCH]
        body = cid[1 : 1 + length]
        sid_len = config.server_id_len
        cipher = live.cipher
        if cipher is None:
            return Decoded(config_id, body[:sid_len], body[sid_len:] if with_nonce else None)
        if not with_nonce:
            return Decoded(config_id, cipher.server_id(body), None)
        block = cipher.decrypt(body)
        return Decoded(config_id, block[:sid_len], block[sid_len:])


def unroutable_cid(length: int = 8, *, urandom: RandomSource = os.urandom) -> bytes:
    """A CID for a server without a configuration: bits 0b111, self-encoded length, random rest.

    The draft requires the self-encoded length for these CIDs and recommends at least 8 octets
    (7 random ones); such a server should issue exactly one CID per connection and send
    ``disable_active_migration``.
    """
    if not _is_int(length) or not 1 <= length <= MAX_CID_LENGTH:
        raise ValueError(f"length must be an int in 1..{MAX_CID_LENGTH}, got {length!r}")
    return bytes(((UNROUTABLE_CONFIG_ID << 5) | (length - 1),)) + urandom(length - 1)


@dataclass(frozen=True, slots=True)
class ServerIdLayout:
    """Server ID = PoP id || host id || worker id, packed into ``server_id_len`` octets.

    The fields occupy the most significant bits, in that order and big-endian; unused low bits
    are zero. The PoP id is thus a prefix of the server ID, the layout the draft's "load
    balancer chains" section describes (each tier routes on a prefix). ``server_id_len=0`` means
    the fewest octets that hold all the bits. Widths may be 0 (e.g. no worker field).
    """

    pop_bits: int
    host_bits: int
    worker_bits: int
    server_id_len: int = 0

    def __post_init__(self) -> None:
        for name in ("pop_bits", "host_bits", "worker_bits"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        total = self.pop_bits + self.host_bits + self.worker_bits
        if total == 0:
            raise ValueError("pop_bits + host_bits + worker_bits must be at least 1")
        if not _is_int(self.server_id_len) or self.server_id_len < 0:
            raise ValueError(f"server_id_len must be an int >= 0, got {self.server_id_len!r}")
        if self.server_id_len == 0:
            object.__setattr__(self, "server_id_len", (total + 7) // 8)
        max_len = MAX_PLAINTEXT_LEN - MIN_NONCE_LEN
        if self.server_id_len > max_len:
            raise ValueError(
                f"server_id_len must be <= {max_len} (a nonce needs 4 of the 19 octets), "
                f"got {self.server_id_len} for {total} bits"
            )
        if total > 8 * self.server_id_len:
            raise ValueError(
                f"pop_bits + host_bits + worker_bits = {total} do not fit in "
                f"server_id_len = {self.server_id_len} octets"
            )

    @property
    def _pad_bits(self) -> int:
        return 8 * self.server_id_len - (self.pop_bits + self.host_bits + self.worker_bits)

    def pack(self, pop: int, host: int, worker: int) -> bytes:
        for name, value, bits in (
            ("pop", pop, self.pop_bits),
            ("host", host, self.host_bits),
            ("worker", worker, self.worker_bits),
        ):
            if not _is_int(value) or not 0 <= value < (1 << bits):
                raise ValueError(f"{name} must be an int in 0..{(1 << bits) - 1}, got {value!r}")
        value = (((pop << self.host_bits) | host) << self.worker_bits) | worker
        return (value << self._pad_bits).to_bytes(self.server_id_len, "big")

    def unpack(self, server_id: bytes) -> tuple[int, int, int]:
        """(pop, host, worker). ValueError on a wrong length or non-zero padding bits, which a
        server ID decoded from a forged or random CID will often have."""
        if not isinstance(server_id, (bytes, bytearray)) or len(server_id) != self.server_id_len:
            raise ValueError(f"server_id must be {self.server_id_len} bytes, got {server_id!r}")
        value = int.from_bytes(server_id, "big")
        pad = self._pad_bits
        if value & ((1 << pad) - 1):
            raise ValueError(f"server_id {server_id.hex()} has non-zero padding bits")
        value >>= pad
        worker = value & ((1 << self.worker_bits) - 1)
        value >>= self.worker_bits
        host = value & ((1 << self.host_bits) - 1)
        return value >> self.host_bits, host, worker

    def try_unpack(self, server_id: bytes) -> tuple[int, int, int] | None:
        """`unpack`, with None instead of ValueError (for attacker-controlled input)."""
        try:
            return self.unpack(server_id)
        except ValueError:
            return None
