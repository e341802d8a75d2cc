"""QUIC packet headers as the dispatcher needs them, parsed without any connection state.

Only what routing needs is decoded: the version-independent invariants of RFC 8999 (header form,
version, connection IDs) plus, for QUIC v1 (RFC 9000 section 17.2), the long packet type and the
Initial token. Nothing here is decrypted or authenticated, so every field is attacker-controlled:
the parser never raises on arbitrary bytes, it returns a `Malformed` value naming the reason,
which the dispatcher counts as a drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

QUIC_V1 = 0x00000001
VERSION_NEGOTIATION = 0x00000000
# RFC 9000 section 17.2: v1 connection IDs are at most 20 bytes. RFC 8999 allows 255 for other
# versions, which matters only because a Version Negotiation reply must echo them.
V1_MAX_CID_LENGTH = 20
MAX_CID_LENGTH = 255
# RFC 9000 section 14.1: a client's first flight, and any datagram that may elicit a Version
# Negotiation, is at least this large; smaller ones are never answered (amplification).
MIN_INITIAL_DATAGRAM_SIZE = 1200

_LONG_HEADER_BIT = 0x80
_FIXED_BIT = 0x40


class LongPacketType(IntEnum):
    """QUIC v1 long header packet types (RFC 9000 section 17.2, bits 0x30 of the first byte)."""

    INITIAL = 0
    ZERO_RTT = 1
    HANDSHAKE = 2
    RETRY = 3


@dataclass(frozen=True, slots=True)
class LongHeader:
    first_byte: int
    version: int
    dcid: bytes
    scid: bytes
    # Only meaningful for QUIC v1; other versions define their own type bits (v2 permutes them).
    packet_type: LongPacketType | None = None
    # The address-validation token of a v1 Initial (empty otherwise); kept for a later Retry.
    token: bytes = b""

    @property
    def is_version_negotiation(self) -> bool:
        return self.version == VERSION_NEGOTIATION

    @property
    def fixed_bit(self) -> bool:
        return bool(self.first_byte & _FIXED_BIT)


@dataclass(frozen=True, slots=True)
class ShortHeader:
    first_byte: int
    dcid: bytes

    @property
    def fixed_bit(self) -> bool:
        return bool(self.first_byte & _FIXED_BIT)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why a datagram could not be parsed; `reason` becomes part of a metric label value."""

    reason: str


Header = LongHeader | ShortHeader


def _pull_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """A QUIC variable-length integer (RFC 9000 section 16) at `pos`: (value, next pos) or None."""
    if pos >= len(data):
        return None
    first = data[pos]
    length = 1 << (first >> 6)
    if pos + length > len(data):
        return None
    value = first & 0x3F
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, pos + length


def parse_header(data: bytes, short_dcid_length: int) -> Header | Malformed:
    """Parse the header of the first QUIC packet in `data`.

    `short_dcid_length` is the length of the connection IDs this endpoint issues: a short header
    does not encode its DCID length, so the receiver must know it (RFC 8999 section 5.2).
    """
    n = len(data)
    if n == 0:
        return Malformed("empty")
    first = data[0]
    if not first & _LONG_HEADER_BIT:
        if n < 1 + short_dcid_length:
            return Malformed("truncated")
        return ShortHeader(first_byte=first, dcid=bytes(data[1 : 1 + short_dcid_length]))

    # Long header: 1 (first byte) + 4 (version) + 1 (DCID length) at least.
    if n < 6:
        return Malformed("truncated")
    version = int.from_bytes(data[1:5], "big")
    pos = 5
    dcid_len = data[pos]
    pos += 1
    if pos + dcid_len >= n:  # the SCID length byte must follow
        return Malformed("truncated")
    dcid = bytes(data[pos : pos + dcid_len])
    pos += dcid_len
    scid_len = data[pos]
    pos += 1
    if pos + scid_len > n:
        return Malformed("truncated")
    scid = bytes(data[pos : pos + scid_len])
    pos += scid_len

    if version != QUIC_V1:
        # Unknown versions (and Version Negotiation itself) are opaque past the invariants.
        return LongHeader(first_byte=first, version=version, dcid=dcid, scid=scid)

    if dcid_len > V1_MAX_CID_LENGTH or scid_len > V1_MAX_CID_LENGTH:
        return Malformed("cid_too_long")
    packet_type = LongPacketType((first & 0x30) >> 4)
    token = b""
    if packet_type == LongPacketType.INITIAL:
        pulled = _pull_varint(data, pos)
        if pulled is None:
            return Malformed("truncated")
        token_len, pos = pulled
        if pos + token_len > n:
            return Malformed("truncated")
        token = bytes(data[pos : pos + token_len])
    return LongHeader(
        first_byte=first,
        version=version,
        dcid=dcid,
        scid=scid,
        packet_type=packet_type,
        token=token,
    )


def build_version_negotiation(
    dcid: bytes, scid: bytes, versions: list[int] | tuple[int, ...], unused_bits: int = 0
) -> bytes:
    """A Version Negotiation packet (RFC 8999 section 6, RFC 9000 section 17.2.1).

    `dcid` must be the client's Source Connection ID and `scid` the client's Destination
    Connection ID (the server echoes them swapped). `unused_bits` fills the 7 arbitrary bits of
    the first byte; callers pass random bits. The 0x40 bit is always set so middleboxes that
    multiplex QUIC with other protocols recognise the packet (RFC 9000 section 17.2.1).
    """
    if len(dcid) > MAX_CID_LENGTH or len(scid) > MAX_CID_LENGTH:
        raise ValueError("connection ID longer than 255 bytes")
    out = bytearray()
    out.append(_LONG_HEADER_BIT | _FIXED_BIT | (unused_bits & 0x3F))
    out += VERSION_NEGOTIATION.to_bytes(4, "big")
    out.append(len(dcid))
    out += dcid
    out.append(len(scid))
    out += scid
    for v in versions:
        out += (v & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(out)


def parse_version_negotiation(data: bytes) -> tuple[bytes, bytes, list[int]] | None:
    """(dcid, scid, versions) of a Version Negotiation packet, or None. Used by tests and tools."""
    parsed = parse_header(data, 0)
    if not isinstance(parsed, LongHeader) or not parsed.is_version_negotiation:
        return None
    start = 7 + len(parsed.dcid) + len(parsed.scid)
    rest = data[start:]
    if len(rest) % 4:
        return None
    versions = [int.from_bytes(rest[i : i + 4], "big") for i in range(0, len(rest), 4)]
    return parsed.dcid, parsed.scid, versions
