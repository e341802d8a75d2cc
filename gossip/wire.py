"""HashiCorp memberlist wire format (v0.2.2, as linked by Serf 0.9.4), without sockets.

Reference: ``shared/reference/gossip-memberlist-wire.md``; golden captures:
``shared/vectors/serf-0.9.4/``.

Layers, outermost first, for a UDP packet::

    [244][len][label]            (memberlist >= 0.3 only; never toward Serf 0.9.4)
    [vsn][nonce 12][ct][tag 16]  (AES-GCM, see gossip.keyring; AAD = label or nothing)
    [12][crc32 u32be]            (hasCrc, when the peer's PMax >= 5)
    [9]{Algo: 0, Buf: lzw}       (compress, only when it makes the packet smaller)
    [7][n][n x u16be][parts]     (compound; parts recurse)
    [type][msgpack body]

and for a TCP stream (one exchange per connection)::

    [244][len][label]
    [10][len u32be][vsn][nonce][ct][tag]   (AAD = those 5 header bytes + label)
    [9]{Algo, Buf}                         (always when compression is enabled)
    [6]{header}{node}xN[user state] | [8]{UserMsgLen}[payload] | [0]{ping} | [2]{ack} | [13]{err}

Encoding is conservative and matches go-msgpack 0.5.5 byte for byte: struct maps keyed by the Go
field name in byte-wise sorted order, raw strings only (fixstr/str16/str32 for both ``string`` and
``[]byte``), smallest integers, nil for nil slices. Decoding is liberal (any key order, str8/bin,
nil anywhere, unknown keys ignored, trailing bytes after a body ignored as Go does) but bounded,
and raises nothing but :class:`WireError` whose ``reason`` is one of :data:`REASONS`.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar, cast

import msgpack

from gossip import lzw

if TYPE_CHECKING:
    from gossip.keyring import Keyring

__all__ = [
    "COMPOUND_MAX_PARTS",
    "DEFAULT_VSN",
    "HAS_LABEL",
    "LABEL_MAX_SIZE",
    "LZW_ALGO",
    "MAX_INFLATED_PACKET",
    "MAX_INFLATED_STREAM",
    "MAX_NESTING",
    "MAX_PACKET_SIZE",
    "MAX_PUSH_NODES",
    "MAX_PUSH_STATE_BYTES",
    "META_MAX_SIZE",
    "REASONS",
    "SERF_PING_VERSION",
    "TAG_MAGIC_BYTE",
    "UDP_BUFFER_SIZE",
    "AckResp",
    "Alive",
    "Body",
    "Compound",
    "Compress",
    "CrcWrapped",
    "Dead",
    "ErrResp",
    "IndirectPing",
    "LamportClock",
    "MessageType",
    "NackResp",
    "NodeState",
    "Packet",
    "Ping",
    "PushNodeState",
    "PushPull",
    "PushPullHeader",
    "SerfBody",
    "SerfCoordinate",
    "SerfEvent",
    "SerfJoin",
    "SerfLeave",
    "SerfMessageType",
    "SerfOpaque",
    "SerfPushPull",
    "SerfUserEvent",
    "SerfUserEvents",
    "StreamDecoder",
    "Suspect",
    "UserMsg",
    "UserMsgHeader",
    "WireError",
    "add_crc",
    "add_label",
    "addr_to_ip",
    "check_crc",
    "compress_message",
    "decode_message",
    "decode_packet",
    "decode_push_pull",
    "decode_serf_ack_payload",
    "decode_serf_message",
    "decode_serf_push_pull",
    "decode_serf_tags",
    "decode_stream",
    "decompress_message",
    "encode",
    "encode_message",
    "encode_packet",
    "encode_push_pull",
    "encode_serf_ack_payload",
    "encode_serf_message",
    "encode_serf_tags",
    "encode_stream",
    "encode_user_stream",
    "ip_to_addr",
    "make_compound",
    "maybe_compress",
    "split_compound",
    "strip_label",
]

# ---------------------------------------------------------------------------------------------
# Constants


class MessageType(IntEnum):
    """memberlist ``messageType`` (net.go); the numeric values are the wire type bytes."""

    PING = 0
    INDIRECT_PING = 1
    ACK_RESP = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK_RESP = 11
    HAS_CRC = 12
    ERR = 13


#: Label prefix byte (memberlist >= 0.3.0 only; Serf 0.9.4 rejects it as encryption version 244).
HAS_LABEL = 244
LABEL_MAX_SIZE = 255


class NodeState(IntEnum):
    """memberlist ``NodeStateType`` as carried in ``pushNodeState.State``."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


#: ``compress.Algo``: LZW is the only algorithm.
LZW_ALGO = 0
#: memberlist ``MetaMaxSize``.
META_MAX_SIZE = 512
#: Largest UDP packet the Go receiver reads.
MAX_PACKET_SIZE = 65536
#: memberlist's UDP send budget (``UDPBufferSize``), for callers that pack gossip.
UDP_BUFFER_SIZE = 1400
#: memberlist ``maxPushStateBytes``: limit on an encrypted stream frame and on a plain stream.
MAX_PUSH_STATE_BYTES = 20 * 1024 * 1024
#: Sanity bound on ``pushPullHeader.Nodes``.
MAX_PUSH_NODES = 65536
#: Inflation caps (memberlist HEAD caps at 40 MiB; a UDP packet has no business near that).
MAX_INFLATED_PACKET = 128 * 1024
MAX_INFLATED_STREAM = lzw.DEFAULT_MAX_OUTPUT
#: A compound carries at most 255 parts (the count is one byte).
COMPOUND_MAX_PARTS = 255
#: Nesting bound for compound/compress recursion inside one packet.
MAX_NESTING = 8
#: Upper bound on msgpack items inside one value (guards huge declared array/map counts).
_MAX_MSGPACK_ITEMS = 1 << 20

#: What Serf 0.9.4 advertises: [PMin, PMax, PCur, DMin, DMax, DCur].
DEFAULT_VSN = bytes((1, 5, 2, 2, 5, 5))

#: Every ``WireError.reason`` this package raises.
REASONS = frozenset(
    {
        "empty",  # zero-length message, part, decompressed payload or plaintext
        "truncated",  # input ends before a declared length / a complete value
        "unknown_type",  # type byte not in the protocol
        "unexpected_type",  # a valid type where it is not allowed (e.g. pushPull over UDP)
        "bad_crc",
        "bad_msgpack",  # not decodable as msgpack
        "bad_field",  # decodable, but a field has the wrong type, range or size
        "oversized",  # a size bound was exceeded
        "too_many_parts",
        "too_deep",  # compound/compress nested beyond MAX_NESTING
        "bad_algo",  # compress.Algo is not LZW
        "bad_lzw",
        "bad_label",  # label missing, unexpected, malformed, or different from ours
        "not_encrypted",  # plaintext where encryption is required
        "unexpected_encryption",  # encrypted stream but no keyring
        "bad_encryption_version",
        "bad_padding",
        "decrypt_failed",
    }
)


class WireError(Exception):
    """Any decoding failure. ``reason`` is a short counter-friendly token from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# msgpack helpers


def _pack(obj: Any) -> bytes:
    # use_bin_type=False: raw family only (fixstr, str16, str32), never str8 or bin.
    return msgpack.packb(obj, use_bin_type=False)


_FIXED_SIZES: dict[int, int] = {
    0xC0: 1, 0xC2: 1, 0xC3: 1,
    0xCA: 5, 0xCB: 9,
    0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9,
    0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,
    0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18,
}  # fmt: skip
# lead byte -> (size of the length field, extra header bytes after it) for length-prefixed blobs
_BLOB_SIZES: dict[int, tuple[int, int]] = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext (type byte after the length)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
}  # fmt: skip


def _skip_values(buf: bytes | bytearray, pos: int, remaining: int) -> tuple[int, int]:
    """Advance over ``remaining`` complete msgpack values starting at ``pos``.

    Returns ``(pos, remaining)``. ``remaining == 0`` means done; otherwise the input ran out and
    ``pos`` is the start of the first incomplete item, so the scan can resume there later.
    """
    n = len(buf)
    while remaining:
        if pos >= n:
            return pos, remaining
        b = buf[pos]
        children = 0
        if b <= 0x7F or b >= 0xE0:
            size = 1
        elif b <= 0x8F:
            size, children = 1, 2 * (b & 0x0F)
        elif b <= 0x9F:
            size, children = 1, b & 0x0F
        elif b <= 0xBF:
            size = 1 + (b & 0x1F)
        elif b in _FIXED_SIZES:
            size = _FIXED_SIZES[b]
        elif b in _BLOB_SIZES:
            lsize, extra = _BLOB_SIZES[b]
            if pos + 1 + lsize > n:
                return pos, remaining
            length = int.from_bytes(buf[pos + 1 : pos + 1 + lsize], "big")
            size = 1 + lsize + extra + length
        elif b in (0xDC, 0xDD, 0xDE, 0xDF):
            lsize = 2 if b in (0xDC, 0xDE) else 4
            if pos + 1 + lsize > n:
                return pos, remaining
            count = int.from_bytes(buf[pos + 1 : pos + 1 + lsize], "big")
            size, children = 1 + lsize, count * (2 if b >= 0xDE else 1)
        else:  # 0xC1 is never used
            raise WireError("bad_msgpack", f"invalid msgpack byte 0x{b:02x}")
        if pos + size > n:
            return pos, remaining
        pos += size
        remaining += children - 1
        if remaining > _MAX_MSGPACK_ITEMS:
            raise WireError("oversized", "msgpack value declares too many items")
    return pos, 0


def _unpack_one(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode exactly one msgpack value at ``pos``; returns ``(value, end)``."""
    end, remaining = _skip_values(buf, pos, 1)
    if remaining:
        raise WireError("truncated", "incomplete msgpack value")
    try:
        value = msgpack.unpackb(
            buf[pos:end], raw=True, strict_map_key=False, use_list=True, timestamp=0
        )
    except Exception as exc:  # msgpack raises a zoo of types (StackError, TypeError, ...)
        raise WireError("bad_msgpack", type(exc).__name__) from None
    return value, end


# ---------------------------------------------------------------------------------------------
# Struct <-> msgpack map, keyed by Go field names


_UINT_MAX = {"u8": 0xFF, "u16": 0xFFFF, "u32": 0xFFFFFFFF, "u64": 0xFFFFFFFFFFFFFFFF}
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class _Field:
    key: str  # Go field name = msgpack map key
    attr: str  # Python attribute
    kind: str  # str, bytes, nbytes, addr, oaddr, vsn, meta, u8..u64, int, bool, float, ...
    omitempty: bool = False


def _b2s(raw: bytes) -> str:
    # Go strings are arbitrary bytes; surrogateescape keeps them lossless.
    return raw.decode("utf-8", "surrogateescape")


def _s2b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _encode_value(kind: str, value: Any, where: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected str")
        return _s2b(value)
    if kind in ("bytes", "nbytes", "addr", "oaddr", "vsn", "meta"):
        if value is None and kind == "nbytes":
            return None
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{where}: expected bytes")
        raw = bytes(value)
        if kind == "addr" and len(raw) not in (4, 16):
            raise ValueError(f"{where}: address must be 4 or 16 bytes")
        if kind == "oaddr" and len(raw) not in (0, 4, 16):
            raise ValueError(f"{where}: address must be empty, 4 or 16 bytes")
        if kind == "vsn" and len(raw) != 6:
            raise ValueError(f"{where}: Vsn must be 6 bytes")
        if kind == "meta" and len(raw) > META_MAX_SIZE:
            raise ValueError(f"{where}: Meta exceeds {META_MAX_SIZE} bytes")
        return raw
    if kind in _UINT_MAX or kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected int")
        lo, hi = (0, _UINT_MAX[kind]) if kind in _UINT_MAX else (_INT_MIN, _INT_MAX)
        if not lo <= value <= hi:
            raise ValueError(f"{where}: {value} out of range for {kind}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected bool")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected float")
        return float(value)
    raise AssertionError(kind)


def _decode_value(kind: str, value: Any, where: str) -> Any:
    if kind == "str":
        if value is None:
            return ""
        if isinstance(value, bytes):
            return _b2s(value)
        raise WireError("bad_field", f"{where}: expected a string")
    if kind in ("bytes", "nbytes", "addr", "oaddr", "vsn", "meta"):
        if value is None:
            raw = None
        elif isinstance(value, bytes):
            raw = value
        elif kind == "vsn" and isinstance(value, list):
            # go-msgpack also decodes an array of small ints into []uint8.
            if not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in value
            ):
                raise WireError("bad_field", f"{where}: bad Vsn array")
            raw = bytes(value)
        else:
            raise WireError("bad_field", f"{where}: expected bytes")
        if raw is None:
            if kind == "nbytes":
                return None
            raw = b""
        if kind == "addr" and len(raw) not in (4, 16):
            raise WireError("bad_field", f"{where}: address of {len(raw)} bytes")
        if kind == "oaddr" and len(raw) not in (0, 4, 16):
            raise WireError("bad_field", f"{where}: address of {len(raw)} bytes")
        if kind == "vsn" and len(raw) != 6:
            # memberlist 0.2.2 indexes Vsn[0..5] and panics on a short one.
            raise WireError("bad_field", f"{where}: Vsn of {len(raw)} bytes")
        if kind == "meta" and len(raw) > META_MAX_SIZE:
            raise WireError("oversized", f"{where}: Meta of {len(raw)} bytes")
        return raw
    if kind in _UINT_MAX or kind == "int":
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError("bad_field", f"{where}: expected an integer")
        lo, hi = (0, _UINT_MAX[kind]) if kind in _UINT_MAX else (_INT_MIN, _INT_MAX)
        if not lo <= value <= hi:
            raise WireError("bad_field", f"{where}: {value} out of range")
        return value
    if kind == "bool":
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        raise WireError("bad_field", f"{where}: expected a bool")
    if kind == "float":
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError("bad_field", f"{where}: expected a float")
        return float(value)
    raise AssertionError(kind)


_S = TypeVar("_S", bound="_Struct")


class _Struct:
    """Mixin for dataclasses encoded as go-msgpack struct maps."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = ()

    def _to_map(self) -> dict[bytes, Any]:
        out: dict[bytes, Any] = {}
        for f in sorted(self._FIELDS, key=lambda f: f.key.encode()):
            value = getattr(self, f.attr)
            if f.omitempty and not value:
                continue
            out[f.key.encode()] = _encode_value(f.kind, value, f"{type(self).__name__}.{f.key}")
        return out

    def pack(self) -> bytes:
        """The msgpack map alone (no type byte), keys sorted as go-msgpack emits them."""
        return _pack(self._to_map())

    @classmethod
    def _from_map(cls: type[_S], obj: Any) -> _S:
        name = cls.__name__
        if not isinstance(obj, dict):
            raise WireError("bad_field", f"{name}: expected a map")
        kwargs = {}
        for f in cls._FIELDS:
            kwargs[f.attr] = _decode_value(f.kind, obj.get(f.key.encode()), f"{name}.{f.key}")
        return cls(**kwargs)

    @classmethod
    def unpack(cls: type[_S], data: bytes, pos: int = 0) -> _S:
        """Decode one map at ``data[pos:]`` (trailing bytes are ignored, as Go does)."""
        obj, _ = _unpack_one(bytes(data), pos)
        return cls._from_map(obj)


# ---------------------------------------------------------------------------------------------
# memberlist message bodies (Python attribute -> Go field name noted in _FIELDS)


@dataclass(slots=True)
class Ping(_Struct):
    """``ping`` (0). ``node`` is the intended target; Source* route the ack (omitempty)."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("SeqNo", "seq_no", "u32"),
        _Field("Node", "node", "str"),
        _Field("SourceAddr", "source_addr", "oaddr", omitempty=True),
        _Field("SourcePort", "source_port", "u16", omitempty=True),
        _Field("SourceNode", "source_node", "str", omitempty=True),
    )
    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(slots=True)
class IndirectPing(_Struct):
    """``indirectPingReq`` (1): ask the receiver to probe ``target:port`` named ``node``."""

    TYPE: ClassVar[MessageType] = MessageType.INDIRECT_PING
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("SeqNo", "seq_no", "u32"),
        _Field("Target", "target", "addr"),
        _Field("Port", "port", "u16"),
        _Field("Node", "node", "str"),
        _Field("Nack", "nack", "bool"),
        _Field("SourceAddr", "source_addr", "oaddr", omitempty=True),
        _Field("SourcePort", "source_port", "u16", omitempty=True),
        _Field("SourceNode", "source_node", "str", omitempty=True),
    )
    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool = False
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""


@dataclass(slots=True)
class AckResp(_Struct):
    """``ackResp`` (2). ``payload`` None encodes as nil (``c0``), as Go's nil slice does."""

    TYPE: ClassVar[MessageType] = MessageType.ACK_RESP
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("SeqNo", "seq_no", "u32"),
        _Field("Payload", "payload", "nbytes"),
    )
    seq_no: int
    payload: bytes | None = None


@dataclass(slots=True)
class Suspect(_Struct):
    """``suspect`` (3)."""

    TYPE: ClassVar[MessageType] = MessageType.SUSPECT
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Incarnation", "incarnation", "u32"),
        _Field("Node", "node", "str"),
        _Field("From", "from_node", "str"),
    )
    incarnation: int
    node: str
    from_node: str


@dataclass(slots=True)
class Alive(_Struct):
    """``alive`` (4): join, alive or refutation. ``meta`` <= 512 B, ``vsn`` exactly 6 B."""

    TYPE: ClassVar[MessageType] = MessageType.ALIVE
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Incarnation", "incarnation", "u32"),
        _Field("Node", "node", "str"),
        _Field("Addr", "addr", "addr"),
        _Field("Port", "port", "u16"),
        _Field("Meta", "meta", "meta"),
        _Field("Vsn", "vsn", "vsn"),
    )
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes = b""
    vsn: bytes = DEFAULT_VSN


@dataclass(slots=True)
class Dead(_Struct):
    """``dead`` (5). ``from_node == node`` means a graceful leave."""

    TYPE: ClassVar[MessageType] = MessageType.DEAD
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Incarnation", "incarnation", "u32"),
        _Field("Node", "node", "str"),
        _Field("From", "from_node", "str"),
    )
    incarnation: int
    node: str
    from_node: str


@dataclass(slots=True)
class NackResp(_Struct):
    """``nackResp`` (11)."""

    TYPE: ClassVar[MessageType] = MessageType.NACK_RESP
    _FIELDS: ClassVar[tuple[_Field, ...]] = (_Field("SeqNo", "seq_no", "u32"),)
    seq_no: int


@dataclass(slots=True)
class ErrResp(_Struct):
    """``errResp`` (13), TCP only."""

    TYPE: ClassVar[MessageType] = MessageType.ERR
    _FIELDS: ClassVar[tuple[_Field, ...]] = (_Field("Error", "error", "str"),)
    error: str


@dataclass(slots=True)
class Compress(_Struct):
    """``compress`` (9): ``buf`` is Go ``compress/lzw`` output (LSB, 8-bit literals)."""

    TYPE: ClassVar[MessageType] = MessageType.COMPRESS
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Algo", "algo", "u8"),
        _Field("Buf", "buf", "bytes"),
    )
    algo: int
    buf: bytes


@dataclass(slots=True)
class PushPullHeader(_Struct):
    """``pushPullHeader``, first value of a push/pull stream."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Nodes", "nodes", "int"),
        _Field("UserStateLen", "user_state_len", "int"),
        _Field("Join", "join", "bool"),
    )
    nodes: int
    user_state_len: int
    join: bool


@dataclass(slots=True)
class PushNodeState(_Struct):
    """``pushNodeState``: one member in a push/pull."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Name", "name", "str"),
        _Field("Addr", "addr", "addr"),
        _Field("Port", "port", "u16"),
        _Field("Meta", "meta", "meta"),
        _Field("Incarnation", "incarnation", "u32"),
        _Field("State", "state", "int"),
        _Field("Vsn", "vsn", "vsn"),
    )
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: int  # NodeState; kept an int so unknown future states survive a merge
    vsn: bytes = DEFAULT_VSN


@dataclass(slots=True)
class UserMsgHeader(_Struct):
    """``userMsgHeader``: precedes a user message on a stream."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = (_Field("UserMsgLen", "user_msg_len", "int"),)
    user_msg_len: int


@dataclass(slots=True)
class UserMsg:
    """``user`` (8): an opaque delegate payload (all Serf messages ride here)."""

    TYPE: ClassVar[MessageType] = MessageType.USER
    payload: bytes


@dataclass(slots=True)
class Compound:
    """``compound`` (7). ``truncated`` counts trailing parts missing from the input."""

    TYPE: ClassVar[MessageType] = MessageType.COMPOUND
    parts: list[bytes]
    truncated: int = 0


@dataclass(slots=True)
class CrcWrapped:
    """``hasCrc`` (12) after verification: ``payload`` is the wrapped message."""

    TYPE: ClassVar[MessageType] = MessageType.HAS_CRC
    crc: int
    payload: bytes


@dataclass(slots=True)
class PushPull:
    """A whole push/pull exchange (type 6): header, node states and delegate (Serf) state."""

    TYPE: ClassVar[MessageType] = MessageType.PUSH_PULL
    join: bool
    nodes: list[PushNodeState]
    user_state: bytes = b""


Body: TypeAlias = (
    Ping
    | IndirectPing
    | AckResp
    | Suspect
    | Alive
    | Dead
    | NackResp
    | ErrResp
    | Compress
    | UserMsg
    | Compound
    | CrcWrapped
    | PushPull
)

_STRUCT_TYPES: dict[int, type[_Struct]] = {
    MessageType.PING: Ping,
    MessageType.INDIRECT_PING: IndirectPing,
    MessageType.ACK_RESP: AckResp,
    MessageType.SUSPECT: Suspect,
    MessageType.ALIVE: Alive,
    MessageType.DEAD: Dead,
    MessageType.NACK_RESP: NackResp,
    MessageType.ERR: ErrResp,
    MessageType.COMPRESS: Compress,
}
_BODY_TYPES: dict[int, type] = {
    **_STRUCT_TYPES,
    MessageType.USER: UserMsg,
    MessageType.COMPOUND: Compound,
    MessageType.HAS_CRC: CrcWrapped,
    MessageType.PUSH_PULL: PushPull,
}
# Leaf messages memberlist's handleCommand dispatches from a UDP packet.
_PACKET_LEAVES = frozenset(
    {
        MessageType.PING,
        MessageType.INDIRECT_PING,
        MessageType.ACK_RESP,
        MessageType.SUSPECT,
        MessageType.ALIVE,
        MessageType.DEAD,
        MessageType.USER,
        MessageType.NACK_RESP,
    }
)
# Messages handleConn / the stream readers accept after decryption and decompression.
_STREAM_TYPES = frozenset(
    {MessageType.PING, MessageType.ACK_RESP, MessageType.PUSH_PULL, MessageType.USER,
     MessageType.ERR}
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Single messages


def encode_message(msg_type: MessageType | int, body: Body) -> bytes:
    """``[type][msgpack body]`` (or the framing of compound/user/hasCrc/pushPull).

    Raises ``TypeError``/``ValueError`` for a body that does not match ``msg_type`` or holds
    out-of-range values: encoding errors are programming errors, not wire errors.
    """
    t = MessageType(msg_type)
    expected = _BODY_TYPES.get(t)
    if expected is None or not isinstance(body, expected):
        raise TypeError(f"cannot encode {type(body).__name__} as {t.name}")
    if isinstance(body, _Struct):
        return bytes((t,)) + body.pack()
    if isinstance(body, UserMsg):
        return bytes((t,)) + bytes(body.payload)
    if isinstance(body, Compound):
        return make_compound(body.parts)
    if isinstance(body, CrcWrapped):
        return add_crc(body.payload)
    if isinstance(body, PushPull):
        return encode_push_pull(body)
    raise TypeError(f"cannot encode {type(body).__name__}")  # pragma: no cover


def encode(body: Body) -> bytes:
    """:func:`encode_message` with the type taken from the body class."""
    return encode_message(body.TYPE, body)


def decode_message(data: bytes | bytearray | memoryview) -> tuple[MessageType, Body]:
    """Decode one message (type byte + body); wrappers are returned, not unwrapped.

    ``compress`` yields :class:`Compress` (see :func:`decompress_message`), ``compound``
    :class:`Compound`, ``hasCrc`` :class:`CrcWrapped` after checking the CRC, ``user`` the UDP
    form :class:`UserMsg`, ``pushPull`` a whole :class:`PushPull`. ``encrypt`` needs a keyring
    (:func:`decode_stream`).
    """
    buf = bytes(data)
    if not buf:
        raise WireError("empty", "empty message")
    try:
        t = MessageType(buf[0])
    except ValueError:
        raise WireError("unknown_type", f"type byte {buf[0]}") from None
    struct_cls = _STRUCT_TYPES.get(t)
    if struct_cls is not None:
        return t, cast(Body, struct_cls.unpack(buf, 1))
    if t is MessageType.USER:
        return t, UserMsg(buf[1:])
    if t is MessageType.COMPOUND:
        parts, truncated = split_compound(buf)
        return t, Compound(parts, truncated)
    if t is MessageType.HAS_CRC:
        return t, CrcWrapped(int.from_bytes(buf[1:5], "big"), check_crc(buf))
    if t is MessageType.PUSH_PULL:
        return t, decode_push_pull(buf)
    raise WireError("unexpected_type", f"{t.name} needs a keyring and a stream")


# ---------------------------------------------------------------------------------------------
# Compound, CRC, compression, labels


def make_compound(parts: Sequence[bytes]) -> bytes:
    """``[7][n u8][n x u16be length][parts]``. 1..255 non-empty parts of <= 65535 bytes."""
    if not 1 <= len(parts) <= COMPOUND_MAX_PARTS:
        raise ValueError(f"a compound needs 1..{COMPOUND_MAX_PARTS} parts, got {len(parts)}")
    out = bytearray((MessageType.COMPOUND, len(parts)))
    for p in parts:
        if not 1 <= len(p) <= 0xFFFF:
            # A zero-length part panics a memberlist 0.2.2 receiver.
            raise ValueError(f"compound part of {len(p)} bytes")
        out += struct.pack(">H", len(p))
    for p in parts:
        out += p
    return bytes(out)


def split_compound(data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
    """Split a compound message (starting with its type byte 7).

    Returns ``(parts, truncated)``: like memberlist, parts whose bytes are missing are counted,
    not raised; trailing bytes after the last part are ignored. A missing count or length table
    raises ``truncated``.
    """
    buf = bytes(data)
    if not buf or buf[0] != MessageType.COMPOUND:
        raise WireError("unexpected_type", "not a compound message")
    if len(buf) < 2:
        raise WireError("truncated", "missing compound length byte")
    count = buf[1]
    pos = 2 + 2 * count
    if len(buf) < pos:
        raise WireError("truncated", "truncated compound length table")
    lengths = struct.unpack_from(f">{count}H", buf, 2)
    parts: list[bytes] = []
    for idx, length in enumerate(lengths):
        if len(buf) - pos < length:
            return parts, count - idx
        parts.append(buf[pos : pos + length])
        pos += length
    return parts, 0


def add_crc(msg: bytes) -> bytes:
    """``[12][crc32-IEEE(msg) u32be][msg]``."""
    return bytes((MessageType.HAS_CRC,)) + struct.pack(">I", zlib.crc32(msg)) + bytes(msg)


def check_crc(data: bytes | bytearray | memoryview) -> bytes:
    """Verify a ``hasCrc`` message and return the wrapped bytes."""
    buf = bytes(data)
    if not buf or buf[0] != MessageType.HAS_CRC:
        raise WireError("unexpected_type", "not a hasCrc message")
    if len(buf) < 5:
        raise WireError("truncated", "truncated CRC header")
    expected = int.from_bytes(buf[1:5], "big")
    if zlib.crc32(buf[5:]) != expected:
        raise WireError("bad_crc", f"expected {expected:08x}")
    return buf[5:]


def compress_message(msg: bytes) -> bytes:
    """``[9]{Algo: 0, Buf: lzw(msg)}``, exactly as memberlist's ``compressPayload``."""
    return encode(Compress(LZW_ALGO, lzw.compress(msg)))


def maybe_compress(msg: bytes) -> bytes:
    """The UDP rule: compress only if the result is smaller."""
    packed = compress_message(msg)
    return packed if len(packed) < len(msg) else bytes(msg)


def decompress_message(
    data: bytes | bytearray | memoryview, max_size: int = MAX_INFLATED_STREAM
) -> bytes:
    """Inflate a ``compress`` message (starting with type byte 9) to the wrapped message."""
    buf = bytes(data)
    if not buf or buf[0] != MessageType.COMPRESS:
        raise WireError("unexpected_type", "not a compress message")
    return _inflate(Compress.unpack(buf, 1), max_size)


def _inflate(c: Compress, max_size: int) -> bytes:
    if c.algo != LZW_ALGO:
        raise WireError("bad_algo", f"compression algorithm {c.algo}")
    try:
        out = lzw.decompress(c.buf, max_size)
    except lzw.LZWError as exc:
        raise WireError(exc.reason, exc.detail) from None
    if not out:
        # An empty inflated payload panics memberlist 0.2.2; never pass one on.
        raise WireError("empty", "empty decompressed payload")
    return out


def add_label(data: bytes, label: bytes) -> bytes:
    """Prefix ``[244][len][label]`` (memberlist >= 0.3.0). Empty label: no header."""
    if not label:
        return bytes(data)
    if len(label) > LABEL_MAX_SIZE:
        raise ValueError("label longer than 255 bytes")
    return bytes((HAS_LABEL, len(label))) + bytes(label) + bytes(data)


def strip_label(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    """Split an optional label header off; returns ``(label, rest)`` (label b"" if none)."""
    buf = bytes(data)
    if not buf or buf[0] != HAS_LABEL:
        return b"", buf
    if len(buf) < 2:
        raise WireError("truncated", "truncated label header")
    size = buf[1]
    if size < 1:
        raise WireError("bad_label", "empty label header")
    if len(buf) < 2 + size:
        raise WireError("truncated", "truncated label")
    return buf[2 : 2 + size], buf[2 + size :]


# ---------------------------------------------------------------------------------------------
# UDP packets


@dataclass(slots=True)
class Packet:
    """A decoded UDP packet: leaf messages in wire order, plus per-part problems.

    ``errors`` holds the :class:`WireError` of each compound part that was dropped (memberlist
    logs and skips those, processing the others). ``truncated`` sums truncated compound parts.
    """

    messages: list[tuple[MessageType, Body]] = field(default_factory=list)
    errors: list[WireError] = field(default_factory=list)
    truncated: int = 0
    label: bytes = b""
    encrypted: bool = False
    crc: bool = False
    compressed: bool = False


def encode_packet(
    msg: bytes,
    *,
    compress: bool = True,
    crc: bool = True,
    keyring: Keyring | None = None,
    encryption_version: int = 1,
    label: bytes = b"",
) -> bytes:
    """memberlist's ``rawSendMsgPacket``: compress-if-smaller, CRC, encrypt, label.

    ``crc`` should be set when the destination advertises PMax >= 5. ``label`` must stay empty
    toward Serf 0.9.4. Use :func:`make_compound` first to send several messages.
    """
    if not msg:
        raise ValueError("empty message")
    out = maybe_compress(msg) if compress else bytes(msg)
    if crc:
        out = add_crc(out)
    if keyring is not None:
        out = keyring.encrypt(out, aad=bytes(label), version=encryption_version)
    out = add_label(out, bytes(label))
    if len(out) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(out)} bytes exceeds {MAX_PACKET_SIZE}")
    return out


def decode_packet(
    data: bytes | bytearray | memoryview,
    keyring: Keyring | None = None,
    *,
    verify_incoming: bool = True,
    label: bytes = b"",
    max_inflated: int = MAX_INFLATED_PACKET,
) -> Packet:
    """memberlist's ``ingestPacket``: label, decrypt, CRC, then compound/compress recursion.

    Raises :class:`WireError` when the packet as a whole is unusable (size, label, decryption,
    CRC, or a malformed outermost message). Problems inside a compound are collected in
    :attr:`Packet.errors` so the remaining parts still count. With a keyring and
    ``verify_incoming=False`` an undecryptable packet is taken as plaintext, as memberlist does.
    """
    buf = bytes(data)
    if len(buf) > MAX_PACKET_SIZE:
        raise WireError("oversized", f"packet of {len(buf)} bytes")
    got_label, buf = strip_label(buf)
    if got_label != bytes(label):
        raise WireError("bad_label", "label mismatch")
    pkt = Packet(label=got_label)
    if keyring is not None:
        try:
            buf = keyring.decrypt(buf, aad=got_label)
            pkt.encrypted = True
        except WireError:
            if verify_incoming:
                raise
    if not buf:
        raise WireError("empty", "empty packet")
    if buf[0] == MessageType.HAS_CRC:
        buf = check_crc(buf)
        pkt.crc = True
        if not buf:
            raise WireError("empty", "empty message after CRC")
    _dispatch_packet(buf, pkt, 0, max_inflated, outer=True)
    return pkt


def _dispatch_packet(buf: bytes, pkt: Packet, depth: int, max_inflated: int, outer: bool) -> None:
    if depth > MAX_NESTING:
        raise WireError("too_deep", "compound/compress nested too deeply")
    if not buf:
        raise WireError("empty", "empty message")
    t = buf[0]
    if t == MessageType.COMPOUND:
        parts, truncated = split_compound(buf)
        pkt.truncated += truncated
        for part in parts:
            try:
                _dispatch_packet(part, pkt, depth + 1, max_inflated, outer=False)
            except WireError as exc:
                pkt.errors.append(exc)
        return
    if t == MessageType.COMPRESS:
        inner = decompress_message(buf, max_inflated)
        if outer:
            pkt.compressed = True
        _dispatch_packet(inner, pkt, depth + 1, max_inflated, outer=outer)
        return
    msg_type, body = decode_message(buf)
    if msg_type not in _PACKET_LEAVES:
        raise WireError("unexpected_type", f"{msg_type.name} in a packet")
    pkt.messages.append((msg_type, body))


# ---------------------------------------------------------------------------------------------
# TCP streams


def encode_push_pull(pp: PushPull) -> bytes:
    """``[6]{pushPullHeader}{pushNodeState}x N[user state]`` (plaintext, uncompressed)."""
    header = PushPullHeader(nodes=len(pp.nodes), user_state_len=len(pp.user_state), join=pp.join)
    out = bytearray((MessageType.PUSH_PULL,))
    out += header.pack()
    for node in pp.nodes:
        out += node.pack()
    out += pp.user_state
    return bytes(out)


def decode_push_pull(data: bytes | bytearray | memoryview) -> PushPull:
    """Decode a complete plaintext push/pull message (starting with type byte 6)."""
    buf = bytes(data)
    if not buf or buf[0] != MessageType.PUSH_PULL:
        raise WireError("unexpected_type", "not a push/pull message")
    obj, pos = _unpack_one(buf, 1)
    header = PushPullHeader._from_map(obj)
    _check_push_pull_header(header)
    nodes = []
    for _ in range(header.nodes):
        obj, pos = _unpack_one(buf, pos)
        nodes.append(PushNodeState._from_map(obj))
    if len(buf) - pos < header.user_state_len:
        raise WireError("truncated", "truncated push/pull user state")
    return PushPull(header.join, nodes, buf[pos : pos + header.user_state_len])


def _check_push_pull_header(header: PushPullHeader) -> None:
    if not 0 <= header.nodes <= MAX_PUSH_NODES:
        raise WireError(
            "oversized" if header.nodes > 0 else "bad_field", f"push/pull of {header.nodes} nodes"
        )
    if not 0 <= header.user_state_len <= MAX_PUSH_STATE_BYTES:
        raise WireError(
            "oversized" if header.user_state_len > 0 else "bad_field",
            f"push/pull user state of {header.user_state_len} bytes",
        )


def encode_user_stream(payload: bytes) -> bytes:
    """A reliable user message: ``[8]{UserMsgLen}[payload]``."""
    return bytes((MessageType.USER,)) + UserMsgHeader(len(payload)).pack() + bytes(payload)


def encode_stream(
    msg: bytes,
    *,
    compress: bool = True,
    keyring: Keyring | None = None,
    encryption_version: int = 1,
    label: bytes = b"",
) -> bytes:
    """memberlist's ``rawSendMsgStream``: compress (always, when enabled), then encrypt as
    ``[10][len u32be][sealed]`` with the 5 header bytes (+ label) as AAD, then label.

    ``msg`` is a complete stream message, e.g. from :func:`encode_push_pull`,
    :func:`encode_user_stream`, or ``encode(Ping(...))`` for the TCP fallback ping.
    """
    if not msg:
        raise ValueError("empty message")
    out = compress_message(msg) if compress else bytes(msg)
    if keyring is not None:
        size = keyring.sealed_size(len(out), encryption_version)
        header = bytes((MessageType.ENCRYPT,)) + struct.pack(">I", size)
        out = header + keyring.encrypt(out, aad=header + bytes(label), version=encryption_version)
    return add_label(out, bytes(label))


def decode_stream(
    data: bytes | bytearray | memoryview,
    keyring: Keyring | None = None,
    *,
    verify_incoming: bool = True,
    label: bytes = b"",
    max_inflated: int = MAX_INFLATED_STREAM,
) -> tuple[MessageType, Body]:
    """Decode one complete stream exchange (memberlist's ``readStream`` + the type readers).

    Returns ``(PUSH_PULL, PushPull)``, ``(USER, UserMsg)``, ``(PING, Ping)``,
    ``(ACK_RESP, AckResp)`` or ``(ERR, ErrResp)``. With a keyring and ``verify_incoming`` a
    plaintext stream raises ``not_encrypted`` (memberlist answers it with an errResp).
    """
    buf = bytes(data)
    if len(buf) > MAX_PUSH_STATE_BYTES + 2 + LABEL_MAX_SIZE + 5:
        raise WireError("oversized", f"stream of {len(buf)} bytes")
    got_label, buf = strip_label(buf)
    if got_label != bytes(label):
        raise WireError("bad_label", "label mismatch")
    if not buf:
        raise WireError("empty", "empty stream")
    if buf[0] == MessageType.ENCRYPT:
        if keyring is None:
            raise WireError("unexpected_encryption", "encrypted stream without a keyring")
        if len(buf) < 5:
            raise WireError("truncated", "truncated encrypted stream header")
        size = int.from_bytes(buf[1:5], "big")
        if size > MAX_PUSH_STATE_BYTES:
            raise WireError("oversized", f"encrypted stream of {size} bytes")
        if len(buf) - 5 < size:
            raise WireError("truncated", "truncated encrypted stream")
        buf = keyring.decrypt(buf[5 : 5 + size], aad=buf[:5] + got_label)
        if not buf:
            raise WireError("empty", "empty decrypted stream")
    elif keyring is not None and verify_incoming:
        raise WireError("not_encrypted", "remote state is not encrypted")
    if buf[0] == MessageType.COMPRESS:
        buf = decompress_message(buf, max_inflated)
    try:
        t = MessageType(buf[0])
    except ValueError:
        raise WireError("unknown_type", f"type byte {buf[0]}") from None
    if t not in _STREAM_TYPES:
        raise WireError("unexpected_type", f"{t.name} on a stream")
    if t is MessageType.USER:
        obj, pos = _unpack_one(buf, 1)
        header = UserMsgHeader._from_map(obj)
        if not 0 <= header.user_msg_len <= MAX_PUSH_STATE_BYTES:
            raise WireError("bad_field", f"user message of {header.user_msg_len} bytes")
        if len(buf) - pos < header.user_msg_len:
            raise WireError("truncated", "truncated user message")
        return t, UserMsg(buf[pos : pos + header.user_msg_len])
    return decode_message(buf)


class StreamDecoder:
    """Incremental stream parser: Go never half-closes, so a stream's end must be found from
    its content. ``feed`` bytes as they arrive; it returns ``(type, body)`` once the exchange is
    complete (then :attr:`rest` holds any bytes after it) and ``None`` while more are needed.
    Raises only :class:`WireError`, including ``oversized`` past ``max_size`` buffered bytes.
    """

    def __init__(
        self,
        keyring: Keyring | None = None,
        *,
        verify_incoming: bool = True,
        label: bytes = b"",
        max_size: int = MAX_PUSH_STATE_BYTES + 2 + LABEL_MAX_SIZE + 5,
        max_inflated: int = MAX_INFLATED_STREAM,
    ) -> None:
        self._keyring = keyring
        self._verify = verify_incoming
        self._label = bytes(label)
        self._max_size = max_size
        self._max_inflated = max_inflated
        self._buf = bytearray()
        self._start: int | None = None  # offset after the label header, once known
        self._phase = "start"
        self._pos = 0
        self._remaining = 0
        self._tail = 0  # raw bytes after the msgpack values
        self._end: int | None = None
        self._result: tuple[MessageType, Body] | None = None
        self.rest = b""

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes | bytearray | memoryview) -> tuple[MessageType, Body] | None:
        if self._result is not None:
            self.rest += bytes(data)
            return self._result
        self._buf += data
        end = self._find_end()
        if (end if end is not None else max(len(self._buf), self._end or 0)) > self._max_size:
            raise WireError("oversized", "stream exceeds the size limit")
        if end is None:
            return None
        whole, self.rest = bytes(self._buf[:end]), bytes(self._buf[end:])
        self._buf = bytearray()
        self._result = decode_stream(
            whole,
            self._keyring,
            verify_incoming=self._verify,
            label=self._label,
            max_inflated=self._max_inflated,
        )
        return self._result

    def _find_end(self) -> int | None:
        buf = self._buf
        if self._start is None:
            if not buf:
                return None
            if buf[0] != HAS_LABEL:
                self._start = 0
            else:
                if len(buf) < 2:
                    return None
                if buf[1] < 1:
                    raise WireError("bad_label", "empty label header")
                if len(buf) < 2 + buf[1]:
                    return None
                self._start = 2 + buf[1]
            self._pos = self._start
        while True:
            if self._phase == "start":
                if len(buf) <= self._start:
                    return None
                t = buf[self._start]
                if t == MessageType.ENCRYPT:
                    if len(buf) < self._start + 5:
                        return None
                    size = int.from_bytes(buf[self._start + 1 : self._start + 5], "big")
                    if size > MAX_PUSH_STATE_BYTES:
                        raise WireError("oversized", f"encrypted stream of {size} bytes")
                    self._end = self._start + 5 + size
                    self._phase = "tail"
                elif t in (MessageType.PUSH_PULL, MessageType.USER):
                    self._phase, self._pos, self._remaining = "header", self._start + 1, 1
                elif t in _STREAM_TYPES or t == MessageType.COMPRESS:
                    self._phase, self._pos, self._remaining = "values", self._start + 1, 1
                    self._tail = 0
                else:
                    # Let decode_stream produce the precise reason.
                    self._end = self._start + 1
                    self._phase = "tail"
            elif self._phase == "header":
                header_start = self._pos
                self._pos, self._remaining = _skip_values(buf, self._pos, self._remaining)
                if self._remaining:
                    self._pos = header_start
                    self._remaining = 1
                    return None
                obj, _ = _unpack_one(bytes(buf[header_start : self._pos]))
                if buf[self._start] == MessageType.PUSH_PULL:
                    header = PushPullHeader._from_map(obj)
                    _check_push_pull_header(header)
                    self._remaining, self._tail = header.nodes, header.user_state_len
                else:
                    umh = UserMsgHeader._from_map(obj)
                    if not 0 <= umh.user_msg_len <= MAX_PUSH_STATE_BYTES:
                        raise WireError("bad_field", f"user message of {umh.user_msg_len} bytes")
                    self._remaining, self._tail = 0, umh.user_msg_len
                self._phase = "values"
            elif self._phase == "values":
                self._pos, self._remaining = _skip_values(buf, self._pos, self._remaining)
                if self._remaining:
                    return None
                self._end = self._pos + self._tail
                self._phase = "tail"
            else:  # tail
                assert self._end is not None
                if len(buf) < self._end:
                    return None
                return self._end


# ---------------------------------------------------------------------------------------------
# Addresses


def ip_to_addr(ip: str) -> bytes:
    """Text IP -> memberlist ``Addr`` bytes (4 for IPv4, 16 for IPv6)."""
    return ipaddress.ip_address(ip).packed


def addr_to_ip(addr: bytes) -> str:
    """memberlist ``Addr`` bytes -> text IP (IPv4-mapped 16-byte forms become dotted quads)."""
    if len(addr) == 4:
        return str(ipaddress.IPv4Address(addr))
    if len(addr) == 16:
        v6 = ipaddress.IPv6Address(addr)
        return str(v6.ipv4_mapped or v6)
    raise WireError("bad_field", f"address of {len(addr)} bytes")


# ---------------------------------------------------------------------------------------------
# Serf layer (hashicorp/serf v0.9.4 serf/messages.go, serf.go, ping_delegate.go)

#: Meta starting with this byte is msgpack-encoded tags (Serf protocol >= 3).
TAG_MAGIC_BYTE = 0xFF
#: Serf's ack payload version byte (``PingVersion``).
SERF_PING_VERSION = 1


class SerfMessageType(IntEnum):
    """First byte of a Serf payload inside a memberlist ``user`` message."""

    LEAVE = 0
    JOIN = 1
    PUSH_PULL = 2
    USER_EVENT = 3
    QUERY = 4
    QUERY_RESPONSE = 5
    CONFLICT_RESPONSE = 6
    KEY_REQUEST = 7
    KEY_RESPONSE = 8
    RELAY = 9


def encode_serf_tags(tags: Mapping[str, str]) -> bytes:
    """Serf ``encodeTags``: ``0xFF`` + msgpack ``map[string]string`` (keys sorted here for
    determinism; Go's order is random). No tags is ``ff 80``."""
    m = {_s2b(k): _s2b(v) for k, v in sorted(tags.items())}
    return bytes((TAG_MAGIC_BYTE,)) + _pack(m)


def decode_serf_tags(meta: bytes | bytearray | memoryview) -> dict[str, str]:
    """Serf ``decodeTags``: without the magic byte, Meta is a legacy role (``{"role": meta}``)."""
    buf = bytes(meta)
    if not buf or buf[0] != TAG_MAGIC_BYTE:
        return {"role": _b2s(buf)}
    obj, _ = _unpack_one(buf, 1)
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise WireError("bad_field", "tags: expected a map")
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, bytes) or not (v is None or isinstance(v, bytes)):
            raise WireError("bad_field", "tags: expected string keys and values")
        out[_b2s(k)] = _b2s(v or b"")
    return out


@dataclass(slots=True)
class SerfLeave(_Struct):
    """``messageLeave``: the leave intent; it must precede ``dead{From == Node}``."""

    TYPE: ClassVar[SerfMessageType] = SerfMessageType.LEAVE
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("LTime", "ltime", "u64"),
        _Field("Node", "node", "str"),
        _Field("Prune", "prune", "bool"),
    )
    ltime: int
    node: str
    prune: bool = False


@dataclass(slots=True)
class SerfJoin(_Struct):
    """``messageJoin``: the (optional) join intent."""

    TYPE: ClassVar[SerfMessageType] = SerfMessageType.JOIN
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("LTime", "ltime", "u64"),
        _Field("Node", "node", "str"),
    )
    ltime: int
    node: str


@dataclass(slots=True)
class SerfUserEvent(_Struct):
    """``messageUserEvent``."""

    TYPE: ClassVar[SerfMessageType] = SerfMessageType.USER_EVENT
    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("LTime", "ltime", "u64"),
        _Field("Name", "name", "str"),
        _Field("Payload", "payload", "nbytes"),
        _Field("CC", "cc", "bool"),
    )
    ltime: int
    name: str
    payload: bytes | None = None
    cc: bool = False


@dataclass(slots=True)
class SerfEvent(_Struct):
    """``userEvent`` inside a push/pull ``Events`` slot."""

    _FIELDS: ClassVar[tuple[_Field, ...]] = (
        _Field("Name", "name", "str"),
        _Field("Payload", "payload", "nbytes"),
    )
    name: str
    payload: bytes | None = None


@dataclass(slots=True)
class SerfUserEvents:
    """``userEvents``: the events of one Lamport time."""

    ltime: int
    events: list[SerfEvent] = field(default_factory=list)


@dataclass(slots=True)
class SerfPushPull:
    """``messagePushPull``: Serf's push/pull user state (after its ``0x02`` type byte).

    ``events`` mirrors Serf's event ring (512 slots, mostly None); Serf accepts any length.
    ``status_ltimes`` carries every member's status Lamport time: a leave intent for a node
    must exceed its entry.
    """

    TYPE: ClassVar[SerfMessageType] = SerfMessageType.PUSH_PULL
    ltime: int
    status_ltimes: dict[str, int] = field(default_factory=dict)
    left_members: list[str] = field(default_factory=list)
    event_ltime: int = 0
    events: list[SerfUserEvents | None] = field(default_factory=list)
    query_ltime: int = 0

    def pack(self) -> bytes:
        events: list[Any] = []
        for ev in self.events:
            if ev is None:
                events.append(None)
            else:
                events.append(
                    {
                        b"Events": [e._to_map() for e in ev.events],
                        b"LTime": _encode_value("u64", ev.ltime, "userEvents.LTime"),
                    }
                )
        m = {
            b"EventLTime": _encode_value("u64", self.event_ltime, "EventLTime"),
            b"Events": events,
            b"LTime": _encode_value("u64", self.ltime, "LTime"),
            b"LeftMembers": [_s2b(n) for n in self.left_members],
            b"QueryLTime": _encode_value("u64", self.query_ltime, "QueryLTime"),
            b"StatusLTimes": {
                _s2b(k): _encode_value("u64", v, "StatusLTimes")
                for k, v in sorted(self.status_ltimes.items())
            },
        }
        return _pack(m)

    @classmethod
    def _from_map(cls, obj: Any) -> SerfPushPull:
        if not isinstance(obj, dict):
            raise WireError("bad_field", "messagePushPull: expected a map")

        def u64(value: Any, where: str) -> int:
            result: int = _decode_value("u64", value, where)
            return result

        status_raw = obj.get(b"StatusLTimes")
        status: dict[str, int] = {}
        if status_raw is not None:
            if not isinstance(status_raw, dict):
                raise WireError("bad_field", "StatusLTimes: expected a map")
            for k, v in status_raw.items():
                if not isinstance(k, bytes):
                    raise WireError("bad_field", "StatusLTimes: expected string keys")
                status[_b2s(k)] = u64(v, "StatusLTimes")
        left_raw = obj.get(b"LeftMembers")
        left: list[str] = []
        if left_raw is not None:
            if not isinstance(left_raw, list):
                raise WireError("bad_field", "LeftMembers: expected an array")
            left = [_decode_value("str", n, "LeftMembers") for n in left_raw]
        events_raw = obj.get(b"Events")
        events: list[SerfUserEvents | None] = []
        if events_raw is not None:
            if not isinstance(events_raw, list):
                raise WireError("bad_field", "Events: expected an array")
            for slot in events_raw:
                if slot is None:
                    events.append(None)
                    continue
                if not isinstance(slot, dict):
                    raise WireError("bad_field", "Events: expected maps")
                inner = slot.get(b"Events")
                if inner is not None and not isinstance(inner, list):
                    raise WireError("bad_field", "userEvents.Events: expected an array")
                events.append(
                    SerfUserEvents(
                        u64(slot.get(b"LTime"), "userEvents.LTime"),
                        [SerfEvent._from_map(e) for e in inner or []],
                    )
                )
        return cls(
            ltime=u64(obj.get(b"LTime"), "LTime"),
            status_ltimes=status,
            left_members=left,
            event_ltime=u64(obj.get(b"EventLTime"), "EventLTime"),
            events=events,
            query_ltime=u64(obj.get(b"QueryLTime"), "QueryLTime"),
        )


@dataclass(slots=True)
class SerfOpaque:
    """A Serf message type this module does not model (queries, key and relay messages)."""

    type: int
    body: bytes


SerfBody: TypeAlias = SerfLeave | SerfJoin | SerfUserEvent | SerfPushPull | SerfOpaque


def encode_serf_message(body: SerfLeave | SerfJoin | SerfUserEvent | SerfPushPull) -> bytes:
    """Serf ``encodeMessage``: ``[serf type][msgpack]``. Wrap it in ``UserMsg`` to gossip it
    (``encode(UserMsg(encode_serf_message(SerfLeave(...))))``)."""
    return bytes((body.TYPE,)) + body.pack()


def decode_serf_message(payload: bytes | bytearray | memoryview) -> tuple[int, SerfBody]:
    """Decode the payload of a memberlist ``user`` message as a Serf message."""
    buf = bytes(payload)
    if not buf:
        raise WireError("empty", "empty Serf message")
    t = buf[0]
    if t == SerfMessageType.LEAVE:
        return t, SerfLeave.unpack(buf, 1)
    if t == SerfMessageType.JOIN:
        return t, SerfJoin.unpack(buf, 1)
    if t == SerfMessageType.USER_EVENT:
        return t, SerfUserEvent.unpack(buf, 1)
    if t == SerfMessageType.PUSH_PULL:
        return t, decode_serf_push_pull(buf)
    if t <= max(SerfMessageType):
        return t, SerfOpaque(t, buf[1:])
    raise WireError("unknown_type", f"Serf message type {t}")


def decode_serf_push_pull(user_state: bytes | bytearray | memoryview) -> SerfPushPull:
    """Decode Serf's push/pull user state (``0x02`` + ``messagePushPull``)."""
    buf = bytes(user_state)
    if not buf:
        raise WireError("empty", "empty Serf push/pull state")
    if buf[0] != SerfMessageType.PUSH_PULL:
        raise WireError("unexpected_type", f"Serf state with type prefix {buf[0]}")
    obj, _ = _unpack_one(buf, 1)
    return SerfPushPull._from_map(obj)


@dataclass(slots=True)
class SerfCoordinate(_Struct):
    """Serf's Vivaldi coordinate (``coordinate.Coordinate``), carried in ack payloads."""

    vec: list[float]
    error: float
    adjustment: float
    height: float

    def _to_map(self) -> dict[bytes, Any]:
        return {
            b"Adjustment": float(self.adjustment),
            b"Error": float(self.error),
            b"Height": float(self.height),
            b"Vec": [float(x) for x in self.vec],
        }

    @classmethod
    def _from_map(cls, obj: Any) -> SerfCoordinate:
        if not isinstance(obj, dict):
            raise WireError("bad_field", "Coordinate: expected a map")
        vec = obj.get(b"Vec")
        if vec is None:
            vec = []
        if not isinstance(vec, list) or len(vec) > 64:
            raise WireError("bad_field", "Coordinate.Vec: expected a short array")
        return cls(
            vec=[_decode_value("float", x, "Coordinate.Vec") for x in vec],
            error=_decode_value("float", obj.get(b"Error"), "Coordinate.Error"),
            adjustment=_decode_value("float", obj.get(b"Adjustment"), "Coordinate.Adjustment"),
            height=_decode_value("float", obj.get(b"Height"), "Coordinate.Height"),
        )


def encode_serf_ack_payload(coord: SerfCoordinate) -> bytes:
    """Serf ``AckPayload``: ``0x01`` + msgpack coordinate."""
    return bytes((SERF_PING_VERSION,)) + coord.pack()


def decode_serf_ack_payload(payload: bytes | None) -> SerfCoordinate | None:
    """Decode a Serf ack payload; ``None`` for an empty/nil payload (Serf ignores those)."""
    if not payload:
        return None
    if payload[0] != SERF_PING_VERSION:
        raise WireError("unknown_type", f"ack payload version {payload[0]}")
    return SerfCoordinate.unpack(bytes(payload), 1)


class LamportClock:
    """Serf's Lamport clock (``lamport.go``): ``witness`` remote times, ``increment`` to send."""

    def __init__(self, start: int = 0) -> None:
        self._counter = start

    def time(self) -> int:
        return self._counter

    def increment(self) -> int:
        self._counter += 1
        return self._counter

    def witness(self, value: int) -> None:
        # Serf's Witness: ignore older values, otherwise move one past the witnessed time.
        if value >= self._counter:
            self._counter = value + 1
