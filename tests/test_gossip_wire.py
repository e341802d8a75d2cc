"""memberlist/Serf wire codec: golden captures from Serf 0.9.4, round trips and fuzzing.

The captures live in ``tests/vectors/serf-0.9.4/`` (a copy of the team's shared captures; override
with ``EDGEPROXY_SERF_VECTORS``);
tests that need them are skipped when the directory is absent.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import lzw
from gossip.keyring import Keyring
from gossip.wire import (
    DEFAULT_VSN,
    REASONS,
    AckResp,
    Alive,
    Body,
    Compress,
    Dead,
    ErrResp,
    IndirectPing,
    LamportClock,
    MessageType,
    NackResp,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    SerfCoordinate,
    SerfEvent,
    SerfJoin,
    SerfLeave,
    SerfMessageType,
    SerfOpaque,
    SerfPushPull,
    SerfUserEvent,
    SerfUserEvents,
    StreamDecoder,
    Suspect,
    UserMsg,
    WireError,
    add_crc,
    add_label,
    addr_to_ip,
    check_crc,
    compress_message,
    decode_message,
    decode_packet,
    decode_push_pull,
    decode_serf_ack_payload,
    decode_serf_message,
    decode_serf_push_pull,
    decode_serf_tags,
    decode_stream,
    decompress_message,
    encode,
    encode_message,
    encode_packet,
    encode_push_pull,
    encode_serf_ack_payload,
    encode_serf_message,
    encode_serf_tags,
    encode_stream,
    encode_user_stream,
    ip_to_addr,
    make_compound,
    maybe_compress,
    split_compound,
    strip_label,
)

VECTOR_DIR = Path(os.environ.get("EDGEPROXY_SERF_VECTORS", Path(__file__).parent / "vectors" / "serf-0.9.4"))
needs_vectors = pytest.mark.skipif(
    not (VECTOR_DIR / "plain.json").exists(), reason="Serf 0.9.4 captures not available"
)

LOCALHOST = bytes((127, 0, 0, 1))
SERF1_ALIVE = Alive(1, "serf1", LOCALHOST, 7946, b"\xff\x80", DEFAULT_VSN)
PY1_META = b"\xff\x82\xa4role\xa2py\xa3pop\xa4test"  # client insertion order, not sorted
PY1_ALIVE = Alive(1, "py1", LOCALHOST, 7947, PY1_META, DEFAULT_VSN)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTOR_DIR / name).read_text())
    return data


@pytest.fixture(scope="module")
def plain() -> dict[str, Any]:
    return _load("plain.json")


@pytest.fixture(scope="module")
def aes() -> dict[str, Any]:
    return _load("aes256.json")


@pytest.fixture(scope="module")
def aes_keyring(aes: dict[str, Any]) -> Keyring:
    return Keyring.from_base64([aes["key_b64"]])


def h(x: str) -> bytes:
    return bytes.fromhex(x)


# ---------------------------------------------------------------------------------------------
# Constants


def test_message_type_codes() -> None:
    assert [(t.name, t.value) for t in MessageType] == [
        ("PING", 0), ("INDIRECT_PING", 1), ("ACK_RESP", 2), ("SUSPECT", 3), ("ALIVE", 4),
        ("DEAD", 5), ("PUSH_PULL", 6), ("COMPOUND", 7), ("USER", 8), ("COMPRESS", 9),
        ("ENCRYPT", 10), ("NACK_RESP", 11), ("HAS_CRC", 12), ("ERR", 13),
    ]  # fmt: skip
    assert [s.value for s in NodeState] == [0, 1, 2, 3]
    assert [s.value for s in SerfMessageType] == list(range(10))
    assert SerfMessageType.LEAVE == 0 and SerfMessageType.JOIN == 1
    assert bytes((1, 5, 2, 2, 5, 5)) == DEFAULT_VSN


# ---------------------------------------------------------------------------------------------
# Golden captures: plaintext run


@needs_vectors
def test_ping_request_sent_decodes(plain: dict[str, Any]) -> None:
    raw = h(plain["udp_ping_request_sent"])
    t, body = decode_message(raw)
    assert t is MessageType.PING
    assert body == Ping(42, "serf1", LOCALHOST, 7947, "py1")
    # The capture's keys are in client order; ours are go-msgpack's sorted order.
    assert encode(body) != raw and decode_message(encode(body)) == (t, body)
    assert len(encode(body)) == len(raw)


@needs_vectors
def test_ack_reply(plain: dict[str, Any]) -> None:
    raw = h(plain["udp_ack_reply"])
    pkt = decode_packet(raw)
    assert pkt.compressed and not pkt.crc and not pkt.encrypted
    assert pkt.errors == [] and pkt.truncated == 0
    (t1, ack), (t2, alive) = pkt.messages
    assert t1 is MessageType.ACK_RESP and t2 is MessageType.ALIVE
    assert isinstance(ack, AckResp) and ack.seq_no == 42
    assert ack.payload is not None and len(ack.payload) == 130
    assert alive == SERF1_ALIVE
    assert addr_to_ip(alive.addr) == "127.0.0.1"

    # Layer by layer, re-encoded byte for byte.
    t, comp = decode_message(raw)
    assert t is MessageType.COMPRESS and isinstance(comp, Compress)
    assert comp.algo == 0 and len(comp.buf) == 170
    assert raw[:12] == b"\x09\x82\xa4Algo\x00\xa3Buf" and raw[12:15] == b"\xda\x00\xaa"  # str16
    inflated = decompress_message(raw)
    assert len(inflated) == 219 and inflated[:6] == h("07020096003f")
    parts, truncated = split_compound(inflated)
    assert truncated == 0 and [len(p) for p in parts] == [0x96, 0x3F]
    assert make_compound([encode(ack), encode(alive)]) == inflated
    assert lzw.compress(inflated) == comp.buf
    assert compress_message(inflated) == raw
    # The full send pipeline: compressed because smaller, no CRC (sent by address).
    assert encode_packet(inflated, crc=False) == raw

    # The alive is exactly the 63-byte example of the reference.
    assert encode(SERF1_ALIVE) == h(
        "0486a441646472a47f000001ab496e6361726e6174696f6e01a44d657461a2ff80a44e6f6465a5736572"
        "6631a4506f7274cd1f0aa356736ea6010502020505"
    )


@needs_vectors
def test_ack_payload_is_serf_coordinate(plain: dict[str, Any]) -> None:
    pkt = decode_packet(h(plain["udp_ack_reply"]))
    ack = pkt.messages[0][1]
    assert isinstance(ack, AckResp) and ack.payload is not None
    coord = decode_serf_ack_payload(ack.payload)
    assert coord == SerfCoordinate(vec=[0.0] * 8, error=1.5, adjustment=0.0, height=1e-05)
    assert encode_serf_ack_payload(coord) == ack.payload
    assert decode_serf_ack_payload(None) is None and decode_serf_ack_payload(b"") is None


@needs_vectors
def test_gossip_packets(plain: dict[str, Any]) -> None:
    packets = [h(p) for p in plain["udp_packets_from_serf"]]
    assert len(packets) == 7
    for raw in packets[:3]:
        assert len(raw) == 152 and raw[:5] == h("0cd404c05d")
        pkt = decode_packet(raw)
        assert pkt.crc and not pkt.compressed
        assert [b for _, b in pkt.messages] == [PY1_ALIVE, SERF1_ALIVE]
        assert len(encode(PY1_ALIVE)) == 78
        compound = make_compound([encode(PY1_ALIVE), encode(SERF1_ALIVE)])
        assert compound[:6] == h("0702004e003f")
        # LZW would not shrink it, so the pipeline leaves it uncompressed, then adds the CRC.
        assert encode_packet(compound, crc=True) == raw
        assert add_crc(compound) == raw and check_crc(raw) == compound
    raw = packets[3]
    assert len(raw) == 83 and raw[:5] == h("0ca61f947e")
    pkt = decode_packet(raw)
    assert pkt.crc and pkt.messages == [(MessageType.ALIVE, PY1_ALIVE)]
    assert encode_packet(encode(PY1_ALIVE)) == raw
    # Serf re-gossips our Meta verbatim; the tags decode regardless of key order.
    assert decode_serf_tags(PY1_META) == {"role": "py", "pop": "test"}

    for seq, raw in enumerate(packets[4:], start=1):
        assert len(raw) == 65
        pkt = decode_packet(raw)
        assert not pkt.crc and not pkt.compressed
        ping = Ping(seq, "py1", LOCALHOST, 7946, "serf1")
        assert pkt.messages == [(MessageType.PING, ping)]
        assert encode(ping) == raw
        assert encode_packet(encode(ping), crc=False) == raw  # compression would not shrink it


@needs_vectors
def test_pushpull_request_sent_decodes(plain: dict[str, Any]) -> None:
    raw = h(plain["tcp_pushpull_request_sent"])
    t, pp = decode_stream(raw)  # uncompressed, client key order: Serf accepted both
    assert t is MessageType.PUSH_PULL and isinstance(pp, PushPull)
    assert pp.join is True and pp.user_state == b""
    assert pp.nodes == [PushNodeState("py1", LOCALHOST, 7947, PY1_META, 1, 0, DEFAULT_VSN)]
    assert decode_push_pull(raw) == pp
    assert len(encode_push_pull(pp)) == len(raw)


@needs_vectors
def test_pushpull_reply(plain: dict[str, Any]) -> None:
    raw = h(plain["tcp_pushpull_reply"])
    assert len(raw) == 218
    t, pp = decode_stream(raw)
    assert t is MessageType.PUSH_PULL and isinstance(pp, PushPull)
    assert pp.join is True
    assert pp.nodes == [
        PushNodeState("serf1", LOCALHOST, 7946, b"\xff\x80", 1, NodeState.ALIVE, DEFAULT_VSN)
    ]
    assert len(pp.user_state) == 589

    inflated = decompress_message(raw)
    assert len(inflated) == 689
    assert inflated.startswith(h("0683a44a6f696ec3a54e6f64657301ac5573657253746174654c656ecd024d"))
    assert encode_push_pull(pp) == inflated
    assert encode_stream(encode_push_pull(pp)) == raw  # streams are always compressed

    serf = decode_serf_push_pull(pp.user_state)
    assert serf == SerfPushPull(
        ltime=1,
        status_ltimes={"serf1": 0},
        left_members=[],
        event_ltime=1,
        events=[None] * 512,
        query_ltime=1,
    )
    assert encode_serf_message(serf) == pp.user_state
    t2, serf2 = decode_serf_message(pp.user_state)
    assert t2 == SerfMessageType.PUSH_PULL and serf2 == serf


@needs_vectors
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_stream_decoder_incremental(plain: dict[str, Any], chunk: int) -> None:
    for key in ("tcp_pushpull_request_sent", "tcp_pushpull_reply"):
        raw = h(plain[key])
        trailer = b"\x06garbage-after-the-exchange"
        data = raw + trailer
        dec = StreamDecoder()
        result = None
        fed = 0
        while result is None:
            assert fed < len(data), "decoder never completed"
            result = dec.feed(data[fed : fed + chunk])
            fed += chunk
            if result is None:
                assert fed < len(raw)  # not complete before all the bytes arrived
        assert result == decode_stream(raw)
        assert dec.done
        assert (dec.rest + data[fed:]) == trailer


# ---------------------------------------------------------------------------------------------
# Golden captures: AES-256-GCM run


@needs_vectors
def test_aes_packets_decrypt_to_plain(
    plain: dict[str, Any], aes: dict[str, Any], aes_keyring: Keyring
) -> None:
    pairs = [(plain["udp_ack_reply"], aes["udp_ack_reply"])]
    pairs += list(zip(plain["udp_packets_from_serf"], aes["udp_packets_from_serf"], strict=True))
    sizes = [len(h(a)) for _, a in pairs]
    assert sizes == [214, 181, 181, 181, 112, 94, 94, 94]
    for p_hex, a_hex in pairs:
        p_raw, a_raw = h(p_hex), h(a_hex)
        assert a_raw[0] == 1  # encryption version 1 (no padding), no label
        assert len(a_raw) == len(p_raw) + Keyring.overhead(1) == Keyring.sealed_size(len(p_raw))
        assert aes_keyring.decrypt(a_raw) == p_raw  # no AAD on UDP
        nonce = a_raw[1:13]
        assert aes_keyring.encrypt(p_raw, nonce=nonce) == a_raw
        enc_pkt, plain_pkt = decode_packet(a_raw, aes_keyring), decode_packet(p_raw)
        assert enc_pkt.encrypted and enc_pkt.messages == plain_pkt.messages
        # Without the key the sealed bytes are junk; with a wrong key they are refused.
        with pytest.raises(WireError) as err:
            decode_packet(a_raw, Keyring(bytes(32)))
        assert err.value.reason == "decrypt_failed"


@needs_vectors
def test_aes_stream(plain: dict[str, Any], aes: dict[str, Any], aes_keyring: Keyring) -> None:
    p_raw, a_raw = h(plain["tcp_pushpull_reply"]), h(aes["tcp_pushpull_reply"])
    assert a_raw[:6] == h("0a000000f701")
    header = a_raw[:5]
    assert struct.unpack(">I", header[1:])[0] == len(a_raw) - 5 == len(p_raw) + 29
    assert aes_keyring.decrypt(a_raw[5:], aad=header) == p_raw
    with pytest.raises(WireError):
        aes_keyring.decrypt(a_raw[5:])  # the header is authenticated
    assert header + aes_keyring.encrypt(p_raw, aad=header, nonce=a_raw[6:18]) == a_raw

    assert decode_stream(a_raw, aes_keyring) == decode_stream(p_raw)
    dec = StreamDecoder(aes_keyring)
    for i in range(0, len(a_raw), 10):
        out = dec.feed(a_raw[i : i + 10])
    assert out == decode_stream(p_raw)

    # The encode path produces a frame that decodes back (fresh nonce, so not byte-equal).
    _, pp = decode_stream(p_raw)
    assert isinstance(pp, PushPull)
    frame = encode_stream(encode_push_pull(pp), keyring=aes_keyring)
    assert len(frame) == len(a_raw) and frame[:6] == a_raw[:6]
    assert decode_stream(frame, aes_keyring) == (MessageType.PUSH_PULL, pp)

    # Encryption configured, plaintext stream: refused (memberlist replies with an errResp).
    with pytest.raises(WireError) as err:
        decode_stream(p_raw, aes_keyring)
    assert err.value.reason == "not_encrypted"
    assert decode_stream(p_raw, aes_keyring, verify_incoming=False)[0] is MessageType.PUSH_PULL
    with pytest.raises(WireError) as err:
        decode_stream(a_raw)
    assert err.value.reason == "unexpected_encryption"


@needs_vectors
def test_rotated_keyring_decrypts_capture(aes: dict[str, Any]) -> None:
    key = Keyring.from_base64([aes["key_b64"]]).primary_key
    raw = h(aes["udp_packets_from_serf"][3])
    kr = Keyring(os.urandom(16), [os.urandom(24)])
    with pytest.raises(WireError):
        kr.decrypt(raw)
    kr.add_key(key)
    assert decode_packet(raw, kr).messages == [(MessageType.ALIVE, PY1_ALIVE)]
    kr.use_key(key)
    assert kr.primary_key == key and len(kr.keys) == 3


# ---------------------------------------------------------------------------------------------
# Encoding conventions


def test_struct_maps_sorted_raw_strings() -> None:
    enc = encode(IndirectPing(7, LOCALHOST, 7946, "n" * 40, True, LOCALHOST, 7947, "me"))
    obj = msgpack.unpackb(enc[1:], raw=True)
    assert list(obj) == sorted(obj)
    assert list(obj) == [b"Nack", b"Node", b"Port", b"SeqNo", b"SourceAddr", b"SourceNode",
                         b"SourcePort", b"Target"]  # fmt: skip
    assert b"\xd9" not in enc and b"\xc4" not in enc  # no str8, no bin
    assert b"\xda\x00\x28" + b"n" * 40 in enc  # a 40-byte string is str16, like go-msgpack

    # omitempty Source* fields; nil vs empty payloads.
    assert msgpack.unpackb(encode(Ping(1, "x"))[1:], raw=True) == {b"Node": b"x", b"SeqNo": 1}
    assert encode(AckResp(5)) == b"\x02\x82\xa7Payload\xc0\xa5SeqNo\x05"
    assert encode(AckResp(5, b"")) == b"\x02\x82\xa7Payload\xa0\xa5SeqNo\x05"
    assert encode(Suspect(3, "a", "b")) == b"\x03\x83\xa4From\xa1b\xabIncarnation\x03\xa4Node\xa1a"
    assert encode(Dead(3, "a", "a"))[0] == MessageType.DEAD
    assert encode(NackResp(9)) == b"\x0b\x81\xa5SeqNo\x09"
    assert encode(ErrResp("boom")) == b"\x0d\x81\xa5Error\xa4boom"
    assert encode(UserMsg(b"\x80hi")) == b"\x08\x80hi"
    assert encode_user_stream(b"abc") == b"\x08\x81\xaaUserMsgLen\x03abc"


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(TypeError):
        encode_message(MessageType.PING, Alive(1, "x", LOCALHOST, 1))
    with pytest.raises(ValueError):
        encode(Alive(1, "x", LOCALHOST, 70000))
    with pytest.raises(ValueError):
        encode(Alive(1, "x", b"\x01\x02", 1))
    with pytest.raises(ValueError):
        encode(Alive(1, "x", LOCALHOST, 1, b"m" * 513))
    with pytest.raises(ValueError):
        encode(Alive(1, "x", LOCALHOST, 1, b"", b"\x01\x05"))
    with pytest.raises(ValueError):
        encode(Ping(-1, "x"))


def test_all_bodies_round_trip() -> None:
    v6 = ip_to_addr("2001:db8::1")
    bodies: list[Body] = [
        Ping(1, "n"),
        Ping(2**32 - 1, "n", v6, 65535, "me"),
        IndirectPing(3, LOCALHOST, 7946, "t", True, LOCALHOST, 7947, "me"),
        AckResp(4, b"\x01payload"),
        AckResp(4),
        Suspect(5, "a", "b"),
        Alive(6, "ü-node", v6, 1, encode_serf_tags({"a": "b"}), DEFAULT_VSN),
        Dead(7, "a", "a"),
        NackResp(8),
        ErrResp("x"),
        UserMsg(b"\x00payload"),
    ]
    for body in bodies:
        assert decode_message(encode(body)) == (body.TYPE, body)
    assert addr_to_ip(v6) == "2001:db8::1"
    assert addr_to_ip(b"\x00" * 10 + b"\xff\xff" + LOCALHOST) == "127.0.0.1"


def test_liberal_decoding() -> None:
    # str8/bin, unknown keys, missing keys, Vsn as an array, trailing bytes: all accepted.
    body = msgpack.packb(
        {
            "Vsn": [1, 5, 2, 2, 5, 5],
            "Node": "n" * 33,
            "Addr": LOCALHOST,
            "Port": 1,
            "Extra": [1, 2],
        },
        use_bin_type=True,
    )
    t, alive = decode_message(b"\x04" + body + b"trailing")
    assert t is MessageType.ALIVE
    assert alive == Alive(0, "n" * 33, LOCALHOST, 1, b"", DEFAULT_VSN)
    # nil everywhere decodes as zero values.
    t, ack = decode_message(b"\x02" + msgpack.packb({"SeqNo": None, "Payload": None}))
    assert ack == AckResp(0, None)
    # Non-UTF-8 names survive a round trip.
    raw = b"\x03" + msgpack.packb({b"Node": b"\xff\xfe", b"From": b"x", b"Incarnation": 1})
    t, sus = decode_message(raw)
    assert isinstance(sus, Suspect) and decode_message(encode(sus)) == (t, sus)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x63", "unknown_type"),
        (b"\xf4\x01x", "unknown_type"),  # a label where a message should be
        (b"\x00", "truncated"),
        (b"\x00\x82\xa4Node", "truncated"),
        (b"\x00\xc1", "bad_msgpack"),
        (b"\x00\x93\x01\x02\x03", "bad_field"),
        (b"\x04" + msgpack.packb({"Addr": b"\x01\x02\x03", "Vsn": DEFAULT_VSN}), "bad_field"),
        (b"\x04" + msgpack.packb({"Addr": LOCALHOST, "Vsn": b"\x01\x05"}), "bad_field"),
        (b"\x04" + msgpack.packb({"Addr": LOCALHOST, "Vsn": DEFAULT_VSN, "Port": -1}), "bad_field"),
        (
            b"\x04" + msgpack.packb({"Addr": LOCALHOST, "Vsn": DEFAULT_VSN, "Meta": b"m" * 600}),
            "oversized",
        ),
        (b"\x00" + msgpack.packb({"SeqNo": 2**32}), "bad_field"),
        (b"\x00" + msgpack.packb({"Node": 5}), "bad_field"),
        (b"\x0b" + b"\xdd\xff\xff\xff\xff", "oversized"),
        (b"\x0a\x00\x00\x00\x01", "unexpected_type"),
        (b"\x0c\x00\x00\x00\x00\x00", "bad_crc"),
        (b"\x0c\x00", "truncated"),
        (b"\x07", "truncated"),
        (b"\x07\x02\x00\x01", "truncated"),
    ],
)
def test_decode_message_errors(data: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_message(data)
    assert err.value.reason == reason
    assert reason in REASONS


# ---------------------------------------------------------------------------------------------
# Compound, CRC, compression, labels, packets


def test_compound_split_join() -> None:
    parts = [encode(Ping(i, f"n{i}")) for i in range(5)]
    msg = make_compound(parts)
    assert msg[:2] == b"\x07\x05" and split_compound(msg) == (parts, 0)
    # Cut inside the third part: two complete, three truncated.
    cut = msg[: 2 + 10 + len(parts[0]) + len(parts[1]) + 3]
    assert split_compound(cut) == (parts[:2], 3)
    pkt = decode_packet(cut)
    assert pkt.truncated == 3 and len(pkt.messages) == 2
    assert split_compound(make_compound([b"x"] * 255))[0] == [b"x"] * 255
    with pytest.raises(ValueError):
        make_compound([b"x"] * 256)
    with pytest.raises(ValueError):
        make_compound([])
    with pytest.raises(ValueError):
        make_compound([b"x", b""])  # a zero-length part panics memberlist 0.2.2


def test_compound_bad_part_does_not_sink_the_others() -> None:
    good = encode(Suspect(1, "a", "b"))
    msg = make_compound([good, b"\x63junk", b"\x06\x80", good])
    pkt = decode_packet(msg)
    assert [t for t, _ in pkt.messages] == [MessageType.SUSPECT, MessageType.SUSPECT]
    assert [e.reason for e in pkt.errors] == ["unknown_type", "unexpected_type"]
    # Nested compound in compress in compound.
    nested = make_compound([compress_message(make_compound([good, good])), good])
    assert len(decode_packet(nested).messages) == 3


def test_nesting_bound() -> None:
    msg = encode(NackResp(1))
    for _ in range(12):
        msg = make_compound([msg])
    pkt = decode_packet(msg)
    assert pkt.messages == [] and [e.reason for e in pkt.errors] == ["too_deep"]


def test_crc() -> None:
    msg = encode(Dead(2, "x", "x"))
    wrapped = add_crc(msg)
    assert wrapped[0] == 12 and wrapped[1:5] == struct.pack(">I", zlib.crc32(msg))
    assert check_crc(wrapped) == msg
    t, body = decode_message(wrapped)
    assert t is MessageType.HAS_CRC and body.payload == msg  # type: ignore[union-attr]
    bad = bytearray(wrapped)
    bad[-1] ^= 1
    with pytest.raises(WireError) as err:
        decode_packet(bytes(bad))
    assert err.value.reason == "bad_crc"


def test_compression_rules() -> None:
    small = encode(NackResp(1))
    assert maybe_compress(small) == small  # LZW would grow it
    big = make_compound([encode(Alive(i, "node", LOCALHOST, 7946)) for i in range(20)])
    packed = maybe_compress(big)
    assert packed[0] == MessageType.COMPRESS and len(packed) < len(big)
    assert decompress_message(packed) == big
    pkt = decode_packet(packed)
    assert pkt.compressed and len(pkt.messages) == 20
    with pytest.raises(WireError) as err:
        decompress_message(encode(Compress(1, lzw.compress(big))))
    assert err.value.reason == "bad_algo"
    # An empty inflated payload is refused (it panics memberlist 0.2.2).
    empty = encode(Compress(0, lzw.compress(b"")))
    with pytest.raises(WireError) as err:
        decompress_message(empty)
    assert err.value.reason == "empty"


def test_packet_pipeline_with_encryption_and_label() -> None:
    kr = Keyring(os.urandom(32))
    msg = make_compound([encode(Alive(i, f"pop-{i}", LOCALHOST, 7946)) for i in range(10)])
    for version in (0, 1):
        raw = encode_packet(msg, keyring=kr, encryption_version=version)
        assert raw[0] == version
        pkt = decode_packet(raw, kr)
        assert pkt.encrypted and pkt.crc and pkt.compressed and len(pkt.messages) == 10
    labelled = encode_packet(msg, keyring=kr, label=b"edge")
    assert labelled[:7] == b"\xf4\x04edge\x01"
    assert decode_packet(labelled, kr, label=b"edge").label == b"edge"
    for kwargs in ({}, {"label": b"other"}):
        with pytest.raises(WireError) as err:
            decode_packet(labelled, kr, **kwargs)  # type: ignore[arg-type]
        assert err.value.reason == "bad_label"
    # The label is authenticated: moving the sealed bytes under another label fails.
    forged = add_label(strip_label(labelled)[1], b"evil")
    with pytest.raises(WireError) as err:
        decode_packet(forged, kr, label=b"evil")
    assert err.value.reason == "decrypt_failed"
    # A plaintext packet to an encrypting node: dropped, unless verify_incoming is off.
    clear = encode_packet(msg)
    with pytest.raises(WireError):
        decode_packet(clear, kr)
    assert len(decode_packet(clear, kr, verify_incoming=False).messages) == 10
    with pytest.raises(WireError) as err:
        decode_packet(b"\x00" * 70000)
    assert err.value.reason == "oversized"


def test_streams_round_trip() -> None:
    kr = Keyring(os.urandom(16))
    nodes = [
        PushNodeState(f"pop-{i}", LOCALHOST, 7946 + i, encode_serf_tags({"pop": str(i)}), i, i % 4)
        for i in range(50)
    ]
    pp = PushPull(False, nodes, b"\x02" + SerfPushPull(5).pack())
    for keyring in (None, kr):
        for compress in (True, False):
            for label in (b"", b"lbl"):
                raw = encode_stream(encode_push_pull(pp), compress=compress, keyring=keyring,
                                    label=label)  # fmt: skip
                assert decode_stream(raw, keyring, label=label) == (MessageType.PUSH_PULL, pp)
                dec = StreamDecoder(keyring, label=label)
                results = [dec.feed(raw[i : i + 97]) for i in range(0, len(raw), 97)]
                assert results[-1] == (MessageType.PUSH_PULL, pp)
                assert all(r is None for r in results[:-1])
    user = encode_stream(encode_user_stream(b"\x80hello"), compress=False)
    assert decode_stream(user) == (MessageType.USER, UserMsg(b"\x80hello"))
    assert StreamDecoder().feed(user) == (MessageType.USER, UserMsg(b"\x80hello"))
    ping = encode_stream(encode(Ping(9, "x")))
    assert StreamDecoder().feed(ping) == (MessageType.PING, Ping(9, "x"))
    err = encode_stream(encode(ErrResp("Encryption is configured but remote state is not "
                                       "encrypted")), keyring=kr)  # fmt: skip
    assert decode_stream(err, kr)[0] is MessageType.ERR
    for bad, reason in [
        (encode_stream(encode(Suspect(1, "a", "b"))), "unexpected_type"),
        (b"\x06" + msgpack.packb({"Nodes": 2, "UserStateLen": 0}), "truncated"),
        (b"\x06" + msgpack.packb({"Nodes": 10**7}), "oversized"),
        (b"\x06" + msgpack.packb({"Nodes": -1}), "bad_field"),
        (b"\x0a\x7f\xff\xff\xff", "unexpected_encryption"),
    ]:
        with pytest.raises(WireError) as exc:
            decode_stream(bad)
        assert exc.value.reason == reason
    with pytest.raises(WireError) as exc:
        StreamDecoder(kr).feed(b"\x0a\x7f\xff\xff\xff")
    assert exc.value.reason == "oversized"
    with pytest.raises(WireError) as exc:
        StreamDecoder(max_size=1000).feed(
            b"\x06" + msgpack.packb({"Nodes": 0, "UserStateLen": 5000})
        )
    assert exc.value.reason == "oversized"


# ---------------------------------------------------------------------------------------------
# LZW


def test_lzw_go_reference_stream() -> None:
    # Go's compress/lzw reader test "tobe;LSB;8" (an older writer: no leading clear code).
    data = bytes.fromhex("549e0829f2448a9327540412 34b8b0e0c1840101".replace(" ", ""))
    assert lzw.decompress(data) == b"TOBEORNOTTOBEORTOBEORNOT"
    # Go's writer: clear, then codes; empty input is clear + EOF.
    assert lzw.compress(b"") == b"\x00\x03\x02"
    assert lzw.compress(b"TOBEORNOTTOBEORTOBEORNOT")[:2] == b"\x00\xa9"  # 256, then 'T'


def test_lzw_round_trip_with_table_resets() -> None:
    rng = random.Random(1234)
    samples = [
        b"a",
        b"ab" * 3000,
        bytes(rng.randrange(256) for _ in range(30000)),  # several 4095-code resets
        bytes(rng.choice(b"abcd") for _ in range(60000)),
        b"\x00" * 100000,
    ]
    for s in samples:
        packed = lzw.compress(s)
        assert lzw.decompress(packed) == s
        assert lzw.decompress(packed + b"trailing") == s  # bytes after EOF are ignored


def test_lzw_errors() -> None:
    with pytest.raises(lzw.LZWError) as err:
        lzw.decompress(lzw.compress(b"x" * 10000), max_output=100)
    assert err.value.reason == "oversized"
    with pytest.raises(lzw.LZWError) as err:
        lzw.decompress(lzw.compress(b"hello")[:-2])
    assert err.value.reason == "bad_lzw"
    with pytest.raises(lzw.LZWError) as err:
        lzw.decompress(b"\xff\xff")  # code 511 before the table has it
    assert err.value.reason == "bad_lzw"
    bomb = encode(Compress(0, lzw.compress(b"\x07" * 300_000)))
    with pytest.raises(WireError) as werr:
        decode_packet(bomb)
    assert werr.value.reason == "oversized"


@FUZZ
@given(st.binary(max_size=3000))
def test_lzw_round_trip_fuzz(data: bytes) -> None:
    assert lzw.decompress(lzw.compress(data)) == data


@FUZZ
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=2000))
def test_lzw_decompress_fuzz(data: bytes, cut: int) -> None:
    # Arbitrary codes, and Go-produced streams with corrupted tails.
    for blob in (data, lzw.compress(data[:cut])[: cut // 3] + data):
        try:
            lzw.decompress(blob, max_output=1 << 16)
        except lzw.LZWError as exc:
            assert exc.reason in ("bad_lzw", "oversized")


# ---------------------------------------------------------------------------------------------
# Keyring


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("version", [0, 1])
def test_encryption_round_trip(size: int, version: int) -> None:
    kr = Keyring(os.urandom(size))
    for n in (0, 1, 15, 16, 17, 1400):
        pt = os.urandom(n)
        sealed = kr.encrypt(pt, version=version)
        assert sealed[0] == version and len(sealed) == Keyring.sealed_size(n, version)
        assert kr.decrypt(sealed) == pt
        assert kr.decrypt(kr.encrypt(pt, b"aad", version=version), b"aad") == pt
    if version == 0:
        assert len(kr.encrypt(b"x" * 16, version=0)) == 16 + Keyring.overhead(0) == 61


def test_keyring_rotation() -> None:
    k1, k2, k3 = os.urandom(32), os.urandom(16), os.urandom(24)
    old = Keyring(k1)
    sealed_by_k1 = old.encrypt(b"hello")
    kr = Keyring(k1, [k2])
    assert kr.keys == (k1, k2) and kr.primary_key == k1
    kr.add_key(k3)
    kr.add_key(k3)
    assert kr.keys == (k1, k2, k3)
    kr.use_key(k3)
    assert kr.primary_key == k3 and set(kr.keys) == {k1, k2, k3}
    sealed_by_k3 = kr.encrypt(b"world")
    assert kr.decrypt(sealed_by_k1) == b"hello"  # old senders still understood
    with pytest.raises(WireError) as err:
        old.decrypt(sealed_by_k3)
    assert err.value.reason == "decrypt_failed"
    with pytest.raises(ValueError):
        kr.remove_key(k3)  # the primary
    kr.remove_key(k1)
    kr.remove_key(k1)  # absent: no-op
    assert kr.keys == (k3, k2)
    with pytest.raises(WireError):
        kr.decrypt(sealed_by_k1)
    with pytest.raises(ValueError):
        kr.use_key(k1)
    with pytest.raises(ValueError):
        Keyring(b"short")
    with pytest.raises(ValueError):
        kr.encrypt(b"x", version=2)


def test_keyring_errors() -> None:
    kr = Keyring(os.urandom(16))
    for data, reason in [
        (b"", "truncated"),
        (b"\x02" + bytes(40), "bad_encryption_version"),
        (b"\xf4\x04edge", "bad_encryption_version"),  # what Serf 0.9.4 says about labels
        (b"\x01" + bytes(27), "truncated"),
        (b"\x00" + bytes(40), "truncated"),
        (b"\x01" + bytes(40), "decrypt_failed"),
    ]:
        with pytest.raises(WireError) as err:
            kr.decrypt(data)
        assert err.value.reason == reason


def test_keyring_file(tmp_path: Path) -> None:
    keys = [os.urandom(32), os.urandom(16)]
    kr = Keyring(keys[0], keys[1:])
    path = tmp_path / "keyring.json"
    path.write_text(json.dumps(kr.to_base64()))
    loaded = Keyring.from_file(path)
    assert loaded.keys == tuple(keys)
    for bad in ("{}", "[]", '["not base64!"]', '["AAAA"]', "nope"):
        path.write_text(bad)
        with pytest.raises(ValueError):
            Keyring.from_file(path)


# ---------------------------------------------------------------------------------------------
# Serf layer


def test_serf_tags() -> None:
    assert encode_serf_tags({}) == b"\xff\x80"
    tags = {"role": "edge", "pop": "fra1", "dc": "eu"}
    meta = encode_serf_tags(tags)
    assert meta[0] == 0xFF and decode_serf_tags(meta) == tags
    assert meta == b"\xff\x83\xa2dc\xa2eu\xa3pop\xa4fra1\xa4role\xa4edge"  # sorted
    assert decode_serf_tags(b"web") == {"role": "web"}  # pre-protocol-3 role
    assert decode_serf_tags(b"") == {"role": ""}
    assert decode_serf_tags(b"\xff\xc0") == {}
    with pytest.raises(WireError):
        decode_serf_tags(b"\xff\x81\x01\x02")


def test_serf_leave_and_join_intents() -> None:
    leave = SerfLeave(ltime=2, node="py1")
    payload = encode_serf_message(leave)
    assert payload == b"\x00\x83\xa5LTime\x02\xa4Node\xa3py1\xa5Prune\xc2"
    packet = encode(UserMsg(payload))
    assert packet[:2] == b"\x08\x00"
    pkt = decode_packet(encode_packet(packet))
    ((t, body),) = pkt.messages
    assert t is MessageType.USER and isinstance(body, UserMsg)
    assert decode_serf_message(body.payload) == (SerfMessageType.LEAVE, leave)
    assert decode_serf_message(encode_serf_message(SerfLeave(2**64 - 1, "x", True)))[
        1
    ] == SerfLeave(2**64 - 1, "x", True)

    join = SerfJoin(ltime=7, node="pop-a")
    assert encode_serf_message(join) == b"\x01\x82\xa5LTime\x07\xa4Node\xa5pop-a"
    assert decode_serf_message(encode_serf_message(join)) == (SerfMessageType.JOIN, join)

    ev = SerfUserEvent(3, "deploy", b"v2", True)
    assert decode_serf_message(encode_serf_message(ev)) == (SerfMessageType.USER_EVENT, ev)
    assert decode_serf_message(b"\x04\x80") == (4, SerfOpaque(4, b"\x80"))
    for bad, reason in [(b"", "empty"), (b"\x80x", "unknown_type"), (b"\x00\x01", "bad_field")]:
        with pytest.raises(WireError) as err:
            decode_serf_message(bad)
        assert err.value.reason == reason


def test_serf_push_pull_and_lamport() -> None:
    state = SerfPushPull(
        ltime=10,
        status_ltimes={"b": 3, "a": 9},
        left_members=["gone"],
        event_ltime=4,
        events=[None, SerfUserEvents(3, [SerfEvent("deploy", b"v1")]), None],
        query_ltime=2,
    )
    raw = encode_serf_message(state)
    assert decode_serf_push_pull(raw) == state
    obj = msgpack.unpackb(raw[1:], raw=True)
    assert list(obj) == [b"EventLTime", b"Events", b"LTime", b"LeftMembers", b"QueryLTime",
                         b"StatusLTimes"]  # fmt: skip
    with pytest.raises(WireError) as err:
        decode_serf_push_pull(b"\x00\x80")
    assert err.value.reason == "unexpected_type"

    clock = LamportClock()
    clock.witness(max(state.status_ltimes.values()))
    assert clock.time() == 10
    assert clock.increment() == 11
    clock.witness(3)
    assert clock.time() == 11


# ---------------------------------------------------------------------------------------------
# Fuzzing: decoders raise WireError and nothing else

_FUZZ_KEYRING = Keyring(bytes(range(32)), [bytes(16)])


def _only_wire_errors(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except WireError as exc:
        assert exc.reason in REASONS, exc.reason


def _all_decoders(data: bytes) -> None:
    _only_wire_errors(decode_message, data)
    _only_wire_errors(decode_packet, data)
    _only_wire_errors(decode_packet, data, _FUZZ_KEYRING)
    _only_wire_errors(decode_packet, data, _FUZZ_KEYRING, verify_incoming=False)
    _only_wire_errors(decode_packet, data, label=b"lbl")
    _only_wire_errors(decode_stream, data)
    _only_wire_errors(decode_stream, data, _FUZZ_KEYRING, verify_incoming=False)
    _only_wire_errors(decode_push_pull, data)
    _only_wire_errors(split_compound, data)
    _only_wire_errors(check_crc, data)
    _only_wire_errors(decompress_message, data, 100_000)
    _only_wire_errors(strip_label, data)
    _only_wire_errors(decode_serf_message, data)
    _only_wire_errors(decode_serf_tags, data)
    _only_wire_errors(decode_serf_push_pull, data)
    _only_wire_errors(decode_serf_ack_payload, data)
    _only_wire_errors(_FUZZ_KEYRING.decrypt, data)
    _only_wire_errors(addr_to_ip, data)
    dec = StreamDecoder(max_size=50_000)
    try:
        for i in range(0, len(data), 5):
            if dec.feed(data[i : i + 5]) is not None:
                break
    except WireError as exc:
        assert exc.reason in REASONS


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _all_decoders(data)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.binary(max_size=20) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(
        st.sampled_from(["Node", "SeqNo", "Addr", "Port", "Vsn", "Meta", "Nodes", "UserStateLen",
                         "Join", "Incarnation", "Payload", "Buf", "Algo", "LTime", "Events",
                         "StatusLTimes", "LeftMembers", "Vec", "UserMsgLen", "Name", "State"])
        | st.binary(max_size=5),
        children,
        max_size=6,
    ),
    max_leaves=20,
)  # fmt: skip


@FUZZ
@given(st.integers(min_value=0, max_value=14), st.lists(_msgpack_values, min_size=1, max_size=4),
       st.binary(max_size=30))  # fmt: skip
def test_fuzz_structured(type_byte: int, values: list[Any], tail: bytes) -> None:
    body = b"".join(msgpack.packb(v, use_bin_type=bool(type_byte % 2)) for v in values)
    data = bytes((type_byte,)) + body + tail
    _all_decoders(data)
    _all_decoders(b"\x09" + msgpack.packb({"Algo": 0, "Buf": lzw.compress(data)}))
    _all_decoders(make_compound([data, data[: len(data) // 2 or 1]]))
    _all_decoders(bytes((type_byte % 10,)) + body)


@needs_vectors
@FUZZ
@given(st.data())
def test_fuzz_mutated_captures(plain: dict[str, Any], aes: dict[str, Any], data: Any) -> None:
    hexes = [plain["udp_ack_reply"], plain["tcp_pushpull_reply"],
             plain["tcp_pushpull_request_sent"], *plain["udp_packets_from_serf"],
             aes["tcp_pushpull_reply"]]  # fmt: skip
    raw = bytearray(h(data.draw(st.sampled_from(hexes))))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    _all_decoders(bytes(raw))
    inflated = h(plain["tcp_pushpull_reply"])
    _only_wire_errors(decode_stream, bytes(raw))
    _only_wire_errors(decompress_message, inflated[:20] + bytes(raw))
