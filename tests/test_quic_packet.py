"""QUIC invariant header parsing (RFC 8999 / RFC 9000 section 17) and Version Negotiation."""

from __future__ import annotations

import os

from aioquic.buffer import Buffer
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.quic.packet import (
    QUIC_V1,
    LongHeader,
    LongPacketType,
    Malformed,
    ShortHeader,
    build_version_negotiation,
    parse_header,
    parse_version_negotiation,
)


def long_header(first: int, version: int, dcid: bytes, scid: bytes, rest: bytes = b"") -> bytes:
    return (
        bytes([first])
        + version.to_bytes(4, "big")
        + bytes([len(dcid)])
        + dcid
        + bytes([len(scid)])
        + scid
        + rest
    )


def real_initial(dcid: bytes, scid: bytes, token: bytes = b"") -> bytes:
    """A client Initial built by aioquic, padded to 1200 bytes."""
    crypto = CryptoPair()
    crypto.setup_initial(dcid, is_client=True, version=QUIC_V1)
    builder = QuicPacketBuilder(
        host_cid=scid,
        peer_cid=dcid,
        version=QUIC_V1,
        is_client=True,
        peer_token=token,
        max_datagram_size=1200,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(0x06)  # CRYPTO
    buf.push_bytes(b"\x00\x00\x10" + b"\x00" * 16)
    datagrams, _ = builder.flush()
    return datagrams[0]


def test_parses_a_real_v1_initial() -> None:
    dcid, scid = os.urandom(8), os.urandom(5)
    data = real_initial(dcid, scid, token=b"tok")
    assert len(data) >= 1200
    h = parse_header(data, 8)
    assert isinstance(h, LongHeader)
    assert h.version == QUIC_V1
    assert (h.dcid, h.scid) == (dcid, scid)
    assert h.packet_type == LongPacketType.INITIAL
    assert h.token == b"tok"
    assert h.fixed_bit
    # agrees with aioquic's own parser
    ref = pull_quic_header(Buffer(data=data), host_cid_length=8)
    assert (ref.destination_cid, ref.source_cid, ref.token) == (h.dcid, h.scid, h.token)


def test_v1_long_packet_types() -> None:
    for bits, kind in [
        (0x00, LongPacketType.INITIAL),
        (0x10, LongPacketType.ZERO_RTT),
        (0x20, LongPacketType.HANDSHAKE),
        (0x30, LongPacketType.RETRY),
    ]:
        h = parse_header(long_header(0xC0 | bits, QUIC_V1, b"d" * 8, b"s" * 8, b"\x00" * 20), 8)
        assert isinstance(h, LongHeader) and h.packet_type == kind


def test_short_header_uses_the_given_dcid_length() -> None:
    cid = os.urandom(8)
    h = parse_header(bytes([0x40]) + cid + b"payload", 8)
    assert h == ShortHeader(first_byte=0x40, dcid=cid)
    assert isinstance(parse_header(bytes([0x40]) + cid[:5], 8), Malformed)
    assert parse_header(bytes([0x40]) + cid, 4) == ShortHeader(first_byte=0x40, dcid=cid[:4])


def test_unknown_version_allows_long_cids_but_v1_does_not() -> None:
    long_cid = b"x" * 200
    h = parse_header(long_header(0xC0, 0x1A2A3A4A, long_cid, b"y" * 255), 8)
    assert isinstance(h, LongHeader)
    assert h.version == 0x1A2A3A4A and h.dcid == long_cid and len(h.scid) == 255
    assert h.packet_type is None
    bad = parse_header(long_header(0xC0, QUIC_V1, b"x" * 21, b"", b"\x00" * 10), 8)
    assert bad == Malformed("cid_too_long")


def test_truncations_are_reasons_not_exceptions() -> None:
    assert parse_header(b"", 8) == Malformed("empty")
    full = long_header(0xC0, QUIC_V1, b"d" * 8, b"s" * 8, b"\x00")
    for n in range(1, len(full)):
        assert isinstance(parse_header(full[:n], 8), Malformed), n
    # Initial whose token length runs past the end
    assert parse_header(
        long_header(0xC0, QUIC_V1, b"d" * 8, b"s" * 8, b"\x44\x00"), 8
    ) == Malformed("truncated")


def test_version_negotiation_round_trip() -> None:
    dcid, scid = b"client-scid", b"client-dcid-xyz"
    vn = build_version_negotiation(dcid, scid, [QUIC_V1, 0x6B3343CF], unused_bits=0x15)
    assert vn[0] & 0xC0 == 0xC0  # long header, 0x40 set for demultiplexers
    assert vn[1:5] == b"\x00\x00\x00\x00"
    assert parse_version_negotiation(vn) == (dcid, scid, [QUIC_V1, 0x6B3343CF])
    h = parse_header(vn, 8)
    assert isinstance(h, LongHeader) and h.is_version_negotiation
    # aioquic's parser understands it too
    ref = pull_quic_header(Buffer(data=vn))
    assert ref.packet_type == QuicPacketType.VERSION_NEGOTIATION
    assert ref.supported_versions == [QUIC_V1, 0x6B3343CF]


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=1500), cid_len=st.integers(min_value=0, max_value=20))
def test_fuzz_never_raises(data: bytes, cid_len: int) -> None:
    result = parse_header(data, cid_len)
    assert isinstance(result, LongHeader | ShortHeader | Malformed)
    if isinstance(result, LongHeader) and result.version == QUIC_V1:
        assert len(result.dcid) <= 20 and len(result.scid) <= 20
    parse_version_negotiation(data)


@settings(max_examples=500, deadline=None)
@given(
    first=st.integers(min_value=0x80, max_value=0xFF),
    version=st.integers(min_value=0, max_value=2**32 - 1),
    dcid=st.binary(max_size=255),
    scid=st.binary(max_size=255),
    rest=st.binary(max_size=64),
)
def test_fuzz_structured_long_headers(
    first: int, version: int, dcid: bytes, scid: bytes, rest: bytes
) -> None:
    data = long_header(first, version, dcid, scid, rest)
    result = parse_header(data, 8)
    if version != QUIC_V1:
        assert result == LongHeader(first_byte=first, version=version, dcid=dcid, scid=scid)
    else:
        assert isinstance(result, LongHeader | Malformed)
