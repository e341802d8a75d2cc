"""The backhaul forwarding frame: a client datagram handed from the PoP that received it to the
PoP that owns its connection. Pure and sans-IO.

When BGP moves a client, its QUIC datagrams land at a PoP (B) without the connection; B decodes
the owner (A) from the QUIC-LB CID and sends A one frame per datagram. A injects the datagram as
if it had arrived from the client at the anycast address, and replies itself from the anycast
address: the client sees no address change and A sees none either (no path validation, no
congestion reset), see the reference notes, section 2.

Layout (integers big-endian)::

    off  size
    0    1     magic/version 0xE1 (magic nibble 0xE, version 1)
    1    1     flags: 0x01 ALREADY_FORWARDED, 0x02 client address is IPv6,
                      0x04 anycast address is IPv6; other bits must be 0
    2    1     key id (fleet key whose forward key made the MAC)
    3    1     sender length s (1..16)
    4    s     sender: the sending PoP's server-ID prefix (QUIC-LB server ID bytes)
    4+s  8     sequence number (per sender, strictly increasing; see `ForwardSequencer`)
    12+s 6     timestamp, ms since the unix epoch (48 bits: good until the year 10889)
    18+s 4|16  client IP, then 2 bytes client port
    ...  4|16  anycast IP the client sent to, then 2 bytes anycast port
    ...  n     the client's datagram, unchanged (n >= 1)
    end  16    HMAC-SHA256(forward key, all of the above), truncated to 16 bytes

Overhead: ``46 + s`` bytes with IPv4 addresses (47 for a 1-byte sender), ``+ 12`` per IPv6
address (71 for IPv6 client and anycast address, 1-byte sender); `frame_overhead` computes it.
The backhaul path MTU must exceed the largest client datagram (up to 1500 - 28 = 1472 bytes of
UDP payload on an Ethernet IPv4 path) plus this overhead plus the backhaul's own IP/UDP (or
tunnel) headers, or frames are fragmented or lost.

Why authentication without encryption: the datagram is already encrypted and authenticated by
QUIC, and client and anycast addresses are not secret from whoever can see the backhaul; what
must not happen is that an outsider injects frames, which would let it spoof any client address
at the owner (a reflection primitive, h2o's unauthenticated ``quic-nodes`` header is one). A
16-byte HMAC tag (128 bits) is ample and is cheaper than an AEAD over the whole datagram. The key
is the fleet key's ``"edgeproxy forward"`` HKDF sub-key; the key id byte lets frames under the
previous key verify during a rotation. Every fleet key holder is trusted: the sender field is
authenticated only as "some PoP with the fleet key".

Replay. A captured frame replayed at the owner would inject an old client datagram from the
client's address; QUIC drops duplicate packets itself, but the copy still costs decryption and
could be used for amplification toward the client. Two layers stop it: the timestamp must lie
within ``max_skew`` seconds of the receiver's clock (``stale`` otherwise), and the sequence
number must pass a per-sender 1024-wide sliding window (`ReplayWindow`, as IPsec's anti-replay,
RFC 4303 section 3.4.3), updated only after the MAC and the timestamp verified, so forged frames
cannot move it. Senders should draw sequence numbers from `ForwardSequencer`, which starts at the
current time in microseconds: a restarted sender then continues above its previous numbers
(unless its clock stepped back), instead of being rejected as ``too_old`` until it catches up.

ALREADY_FORWARDED marks a datagram that has crossed the backhaul once: the receiver must deliver
it locally or drop it and never forward it again, which rules out forwarding loops between PoPs
that disagree about ownership. `encode_forward` sets it by default.

`decode_forward` never raises on arbitrary bytes: it returns `ForwardError` with a
`ForwardErrorReason`, which the caller counts as a drop.
"""

from __future__ import annotations

import hmac
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .fleet import FleetKeys

__all__ = [
    "DEFAULT_MAX_SKEW",
    "FLAG_ALREADY_FORWARDED",
    "MAC_LENGTH",
    "MAX_SENDER_LENGTH",
    "REPLAY_WINDOW_SIZE",
    "VERSION",
    "ForwardError",
    "ForwardErrorReason",
    "ForwardSequencer",
    "Forwarded",
    "ReplayCheck",
    "ReplayWindow",
    "ReplayWindows",
    "decode_forward",
    "encode_forward",
    "frame_overhead",
]

VERSION = 0xE1
FLAG_ALREADY_FORWARDED = 0x01
_FLAG_CLIENT_V6 = 0x02
_FLAG_ANYCAST_V6 = 0x04
_KNOWN_FLAGS = FLAG_ALREADY_FORWARDED | _FLAG_CLIENT_V6 | _FLAG_ANYCAST_V6
MAC_LENGTH = 16
MAX_SENDER_LENGTH = 16
REPLAY_WINDOW_SIZE = 1024
DEFAULT_MAX_SKEW = 5.0
_MAX_SEQ = (1 << 64) - 1
_MAX_TS = (1 << 48) - 1
_FIXED = 4 + 8 + 6  # version, flags, key id, sender length; sequence; timestamp
_SEQ_TS = struct.Struct("!Q6s")


def frame_overhead(sender_len: int = 1, client_v6: bool = False, anycast_v6: bool = False) -> int:
    """Bytes a frame adds to the client datagram."""
    return _FIXED + sender_len + (18 if client_v6 else 6) + (18 if anycast_v6 else 6) + MAC_LENGTH


class ForwardErrorReason(StrEnum):
    """Why a frame was dropped (stable strings, usable as metric labels)."""

    MALFORMED = "malformed"  # not bytes, or a bad sender length
    TRUNCATED = "truncated"  # shorter than its header, MAC and a non-empty datagram
    BAD_VERSION = "bad_version"  # magic/version byte is not 0xE1
    BAD_FLAGS = "bad_flags"  # unknown flag bits set
    UNKNOWN_KEY = "unknown_key"  # key id not live here (removed, not yet added, or forged)
    BAD_MAC = "bad_mac"
    STALE = "stale"  # timestamp further than max_skew from the receiver's clock
    REPLAYED = "replayed"  # sequence number already seen from this sender
    TOO_OLD = "too_old"  # sequence number below this sender's replay window


@dataclass(frozen=True, slots=True)
class ForwardError:
    reason: ForwardErrorReason


_ERRORS = {reason: ForwardError(reason) for reason in ForwardErrorReason}


@dataclass(frozen=True, slots=True)
class Forwarded:
    sender: bytes  # the forwarding PoP's server-ID prefix
    seq: int
    timestamp_ms: int
    client_addr: tuple[str, int]  # where the datagram came from (reply to it from anycast_addr)
    anycast_addr: tuple[str, int]  # the address the client sent to
    datagram: bytes
    already_forwarded: bool  # if set, never forward this datagram again
    key_id: int


# --------------------------------------------------------------------------------------------
# Replay window
# --------------------------------------------------------------------------------------------


class ReplayCheck(StrEnum):
    FRESH = "fresh"
    DUPLICATE = "duplicate"
    TOO_OLD = "too_old"


class ReplayWindow:
    """Anti-replay for one sender's 64-bit sequence numbers: a sliding window bitmap.

    ``top`` is the highest number accepted; bit ``i`` of the bitmap records ``top - i``.
    Numbers above ``top`` are fresh and slide the window (however far ahead: the frame was
    authenticated, and a gap is just lost frames); numbers at ``top - size`` or below are too
    old to judge and rejected; the rest are fresh iff their bit is clear. `check` does not
    change state, so a caller can verify the frame's MAC in between and `update` only after.
    Sequence numbers are 64-bit and never wrap in practice, so wraparound is not handled.
    """

    __slots__ = ("_bitmap", "_mask", "_size", "_top")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self._size = size
        self._mask = (1 << size) - 1
        self._top = -1  # nothing accepted yet
        self._bitmap = 0

    @property
    def top(self) -> int:
        """The highest sequence number accepted, -1 before the first."""
        return self._top

    def check(self, seq: int) -> ReplayCheck:
        if seq > self._top:
            return ReplayCheck.FRESH
        offset = self._top - seq
        if offset >= self._size:
            return ReplayCheck.TOO_OLD
        if (self._bitmap >> offset) & 1:
            return ReplayCheck.DUPLICATE
        return ReplayCheck.FRESH

    def update(self, seq: int) -> None:
        """Record ``seq`` as seen; call only for a number `check` found FRESH."""
        if seq > self._top:
            shift = seq - self._top
            self._bitmap = 1 if shift >= self._size else ((self._bitmap << shift) | 1) & self._mask
            self._top = seq
        else:
            offset = self._top - seq
            if offset < self._size:
                self._bitmap |= 1 << offset

    def check_and_update(self, seq: int) -> ReplayCheck:
        verdict = self.check(seq)
        if verdict is ReplayCheck.FRESH:
            self.update(seq)
        return verdict


class ReplayWindows:
    """One `ReplayWindow` per sender, at most ``max_senders`` (least recently used evicted).

    Windows are created only for frames whose MAC verified, so only fleet key holders can make
    entries; ``max_senders`` should be well above the number of PoPs (and workers) that send.
    An evicted sender's next frames are judged by a fresh window, i.e. by the timestamp alone.
    """

    __slots__ = ("_max_senders", "_size", "_windows")

    def __init__(self, max_senders: int = 4096, size: int = REPLAY_WINDOW_SIZE) -> None:
        if not isinstance(max_senders, int) or max_senders < 1:
            raise ValueError(f"max_senders must be an int >= 1, got {max_senders!r}")
        self._max_senders = max_senders
        self._size = size
        self._windows: OrderedDict[bytes, ReplayWindow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def get(self, sender: bytes) -> ReplayWindow | None:
        return self._windows.get(sender)

    def window(self, sender: bytes) -> ReplayWindow:
        """The sender's window, created (and the LRU one evicted if full) when missing."""
        window = self._windows.get(sender)
        if window is None:
            if len(self._windows) >= self._max_senders:
                self._windows.popitem(last=False)
            window = self._windows[sender] = ReplayWindow(self._size)
        else:
            self._windows.move_to_end(sender)
        return window


class ForwardSequencer:
    """Sequence numbers for one sender: strictly increasing, starting from the clock.

    ``next(now)`` returns ``max(previous + 1, now in microseconds)``, so numbers stay ahead of
    those of a previous run of the same sender (receivers keep its replay window) as long as it
    sent fewer than a million frames per second on average and its clock did not step back.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = -1

    def next(self, now: float) -> int:
        seq = max(self._last + 1, int(now * 1_000_000))
        if seq > _MAX_SEQ:
            raise OverflowError("forward sequence numbers exhausted")
        self._last = seq
        return seq


# --------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------


def _pack_addr(addr: Any, what: str) -> tuple[bool, bytes]:
    """(is_ipv6, ip bytes + port) of a socket address (host, port[, flowinfo, scope_id])."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise ValueError(f"{what} must be a (host, port) tuple, got {addr!r}")
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{what} must be a (host, port) tuple, got {addr!r}")
    host = host.split("%", 1)[0]  # the scope of a link-local address does not cross PoPs
    v6 = ":" in host
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, host)
    except OSError:
        raise ValueError(f"{what} has no valid IP address: {addr!r}") from None
    return v6, packed + port.to_bytes(2, "big")


def encode_forward(
    datagram: bytes,
    *,
    keys: FleetKeys,
    sender: bytes,
    seq: int,
    now: float,
    client_addr: tuple[Any, ...],
    anycast_addr: tuple[Any, ...],
    already_forwarded: bool = True,
    key_id: int | None = None,
) -> bytes:
    """A frame carrying ``datagram`` from ``client_addr`` (sent to ``anycast_addr``) to its
    owner, MACed under the primary fleet key (or ``key_id``). ValueError on bad arguments."""
    if not isinstance(datagram, (bytes, bytearray)) or not datagram:
        raise ValueError("datagram must be non-empty bytes")
    if not isinstance(sender, bytes) or not 1 <= len(sender) <= MAX_SENDER_LENGTH:
        raise ValueError(f"sender must be 1..{MAX_SENDER_LENGTH} bytes, got {sender!r}")
    if not isinstance(seq, int) or not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"seq must be a 64-bit unsigned int, got {seq!r}")
    timestamp = round(now * 1000)
    if not 0 <= timestamp <= _MAX_TS:
        raise ValueError(f"now out of range: {now!r}")
    key = keys.primary if key_id is None else keys.get(key_id)
    if key is None:
        raise ValueError(f"key id {key_id!r} is not live")
    client_v6, client = _pack_addr(client_addr, "client_addr")
    anycast_v6, anycast = _pack_addr(anycast_addr, "anycast_addr")
    flags = (
        (FLAG_ALREADY_FORWARDED if already_forwarded else 0)
        | (_FLAG_CLIENT_V6 if client_v6 else 0)
        | (_FLAG_ANYCAST_V6 if anycast_v6 else 0)
    )
    body = b"".join(
        (
            bytes((VERSION, flags, key.key_id, len(sender))),
            sender,
            _SEQ_TS.pack(seq, timestamp.to_bytes(6, "big")),
            client,
            anycast,
            datagram,
        )
    )
    mac = key.forward_hmac()
    mac.update(body)
    return body + mac.digest()[:MAC_LENGTH]


def _unpack_addr(data: bytes, v6: bool) -> tuple[str, int]:
    if v6:
        return socket.inet_ntop(socket.AF_INET6, data[:16]), int.from_bytes(data[16:18], "big")
    return socket.inet_ntop(socket.AF_INET, data[:4]), int.from_bytes(data[4:6], "big")


def decode_forward(
    frame: bytes | bytearray | memoryview,
    keys: FleetKeys,
    now: float,
    *,
    replay: ReplayWindows | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> Forwarded | ForwardError:
    """Verify and unpack a frame. Never raises.

    Checks, in order: length, version, flags, key id, MAC, timestamp within ``max_skew``
    seconds of ``now``, then (if ``replay`` is given, as it must be in production) the sender's
    replay window, which is updated only when everything else passed.
    """
    if type(frame) is not bytes:
        if not isinstance(frame, (bytearray, memoryview)):
            return _ERRORS[ForwardErrorReason.MALFORMED]
        try:
            frame = bytes(frame)
        except (TypeError, ValueError, BufferError):
            return _ERRORS[ForwardErrorReason.MALFORMED]
    size = len(frame)
    if size < 4:
        return _ERRORS[ForwardErrorReason.TRUNCATED]
    version, flags, key_id, sender_len = frame[0], frame[1], frame[2], frame[3]
    if version != VERSION:
        return _ERRORS[ForwardErrorReason.BAD_VERSION]
    if flags & ~_KNOWN_FLAGS:
        return _ERRORS[ForwardErrorReason.BAD_FLAGS]
    if not 1 <= sender_len <= MAX_SENDER_LENGTH:
        return _ERRORS[ForwardErrorReason.MALFORMED]
    client_v6 = bool(flags & _FLAG_CLIENT_V6)
    anycast_v6 = bool(flags & _FLAG_ANYCAST_V6)
    client_at = 4 + sender_len + 14
    anycast_at = client_at + (18 if client_v6 else 6)
    payload_at = anycast_at + (18 if anycast_v6 else 6)
    if size < payload_at + 1 + MAC_LENGTH:
        return _ERRORS[ForwardErrorReason.TRUNCATED]
    key = keys.get(key_id)
    if key is None:
        return _ERRORS[ForwardErrorReason.UNKNOWN_KEY]
    mac_at = size - MAC_LENGTH
    mac = key.forward_hmac()
    mac.update(frame[:mac_at])
    if not hmac.compare_digest(mac.digest()[:MAC_LENGTH], frame[mac_at:]):
        return _ERRORS[ForwardErrorReason.BAD_MAC]
    sender = frame[4 : 4 + sender_len]
    seq, ts = _SEQ_TS.unpack_from(frame, 4 + sender_len)
    timestamp_ms = int.from_bytes(ts, "big")
    # Written so that a NaN clock counts as stale rather than as fresh.
    if not abs(now * 1000 - timestamp_ms) <= max_skew * 1000:
        return _ERRORS[ForwardErrorReason.STALE]
    if replay is not None:
        window = replay.window(sender)  # the MAC verified: a fleet member, may create state
        verdict = window.check(seq)
        if verdict is ReplayCheck.DUPLICATE:
            return _ERRORS[ForwardErrorReason.REPLAYED]
        if verdict is ReplayCheck.TOO_OLD:
            return _ERRORS[ForwardErrorReason.TOO_OLD]
        window.update(seq)
    return Forwarded(
        sender=sender,
        seq=seq,
        timestamp_ms=timestamp_ms,
        client_addr=_unpack_addr(frame[client_at:anycast_at], client_v6),
        anycast_addr=_unpack_addr(frame[anycast_at:payload_at], anycast_v6),
        datagram=frame[payload_at:mac_at],
        already_forwarded=bool(flags & FLAG_ALREADY_FORWARDED),
        key_id=key_id,
    )
