"""What the two HTTP/1.1 differential suites share (`test_h1_differential`: the server role,
`test_h1_client_differential`: the client role): the trace each codec writes, event sending,
and the hypothesis strategies that split and mutate inputs."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import h11
from hypothesis import strategies as st

#: Fragments both suites insert when mutating: framing bytes, delimiters, and the header lines
#: that decide body framing.
NASTY = [
    b"\r",
    b"\n",
    b"\r\n",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"\x00",
    b"\x0b",
    b"\x7f",
    b"\xff",
    b"0",
    b"9",
    b"f",
    b"G",
    b"chunked",
    b"Content-Length: 1\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"\r\n\r\n",
]


def states(conn: Any) -> tuple[str, str]:
    return (repr(conn.our_state), repr(conn.their_state))


def protocol_error(e: BaseException) -> tuple[Any, ...]:
    """An h11 error as compared: its type, message and status hint."""
    assert isinstance(e, h11.ProtocolError), repr(e)
    return (type(e).__name__, str(e), e.error_status_hint)


class Trace:
    """What a codec did, step by step; `merge_data` joins consecutive "data" items (how a body
    is cut into events may differ, the bytes may not)."""

    def __init__(self, *, merge_data: bool = False) -> None:
        self.items: list[tuple[Any, ...]] = []
        self.merge_data = merge_data

    def add(self, *item: Any) -> None:
        if self.merge_data and item[0] == "data" and self.items and self.items[-1][0] == "data":
            self.items[-1] = ("data", self.items[-1][1] + item[1])
        else:
            self.items.append(item)


def send_events(conn: Any, trace: Trace, events: Sequence[Any]) -> bool:
    """Sends events, recording bytes and states; False if one of them was refused."""
    for event in events:
        try:
            out = conn.send(event)
        except h11.LocalProtocolError as e:
            trace.add("send-error", type(event).__name__, protocol_error(e), states(conn))
            return False
        trace.add("sent", type(event).__name__, out, states(conn))
    return True


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def mutated(seeds: Sequence[bytes], nasty: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with 1-4 random edits: flipped, inserted (often a `nasty` fragment), deleted or
    duplicated bytes, or swapped case."""

    @st.composite
    def strategy(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "case"]))
            pos = draw(st.integers(0, len(data)))
            if op == "flip" and pos < len(data):
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(
                    st.one_of(st.sampled_from(nasty), st.binary(min_size=1, max_size=4))
                )
            elif op == "delete":
                del data[pos : pos + draw(st.integers(1, 8))]
            elif op == "dup":
                end = min(len(data), pos + draw(st.integers(1, 40)))
                data[end:end] = data[pos:end]
            elif op == "case" and pos < len(data):
                data[pos : pos + 8] = bytes(data[pos : pos + 8]).swapcase()
        return bytes(data)

    return strategy()


@st.composite
def pieces(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut at up to 6 random places."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(edges) if b > a]
