"""Backhaul forwarding frames (edgeproxy/quic/forward.py): layout, every error reason, key
rotation, staleness and the per-sender replay window."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.quic.fleet import FleetKey, FleetKeys
from edgeproxy.quic.forward import (
    FLAG_ALREADY_FORWARDED,
    MAC_LENGTH,
    REPLAY_WINDOW_SIZE,
    VERSION,
    Forwarded,
    ForwardError,
    ForwardErrorReason,
    ForwardSequencer,
    ReplayCheck,
    ReplayWindow,
    ReplayWindows,
    decode_forward,
    encode_forward,
    frame_overhead,
)

NOW = 1_767_225_600.0
SECRET_A = bytes(range(32))
SECRET_B = bytes(range(100, 132))
SENDER = b"\x2a"
CLIENT = ("198.51.100.7", 51000)
ANYCAST = ("203.0.113.1", 443)
CLIENT6 = ("2001:db8::7", 51000, 0, 0)
ANYCAST6 = ("2001:db8:ffff::1", 443, 0, 0)
DATAGRAM = bytes([0x40]) + bytes(range(256)) * 4


def keys(*secrets: bytes, primary: int = 1) -> FleetKeys:
    return FleetKeys([FleetKey(i + 1, s, 0) for i, s in enumerate(secrets or (SECRET_A,))], primary)


def frame(
    fleet: FleetKeys | None = None,
    *,
    seq: int = 1,
    now: float = NOW,
    datagram: bytes = DATAGRAM,
    **kw: Any,
) -> bytes:
    args: dict[str, Any] = {"sender": SENDER, "client_addr": CLIENT, "anycast_addr": ANYCAST}
    args.update(kw)
    return encode_forward(datagram, keys=fleet or keys(), seq=seq, now=now, **args)


def err(reason: ForwardErrorReason) -> ForwardError:
    return ForwardError(reason)


def remac(data: bytes, secret: bytes = SECRET_A) -> bytes:
    """Recompute the MAC of an edited frame, as a fleet key holder could."""
    fkey = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"edgeproxy forward").derive(secret)
    body = data[:-MAC_LENGTH]
    return body + hmac.new(fkey, body, hashlib.sha256).digest()[:MAC_LENGTH]


# --------------------------------------------------------------------------------------------
# Round trips and layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "anycast", "overhead"),
    [
        (CLIENT, ANYCAST, 47),
        (CLIENT6, ANYCAST, 59),
        (CLIENT, ANYCAST6, 59),
        (CLIENT6, ANYCAST6, 71),
    ],
)
def test_round_trip(client: tuple[Any, ...], anycast: tuple[Any, ...], overhead: int) -> None:
    data = frame(seq=12345678901234, client_addr=client, anycast_addr=anycast)
    assert len(data) == len(DATAGRAM) + overhead
    assert overhead == frame_overhead(1, len(client) == 4, len(anycast) == 4)
    got = decode_forward(data, keys(), NOW + 0.5, replay=ReplayWindows())
    assert got == Forwarded(
        sender=SENDER,
        seq=12345678901234,
        timestamp_ms=int(NOW * 1000),
        client_addr=(client[0], client[1]),
        anycast_addr=(anycast[0], anycast[1]),
        datagram=DATAGRAM,
        already_forwarded=True,
        key_id=1,
    )


def test_layout_is_as_documented() -> None:
    sender = b"\x01\x02\x03"
    data = frame(sender=sender, seq=0x0102030405060708, datagram=b"\xaa\xbb")
    assert data[:4] == bytes((VERSION, FLAG_ALREADY_FORWARDED, 1, 3))
    assert data[4:7] == sender
    assert data[7:15] == bytes.fromhex("0102030405060708")
    assert int.from_bytes(data[15:21], "big") == int(NOW * 1000)
    assert data[21:27] == bytes([198, 51, 100, 7]) + (51000).to_bytes(2, "big")
    assert data[27:33] == bytes([203, 0, 113, 1]) + (443).to_bytes(2, "big")
    assert data[33:35] == b"\xaa\xbb"
    assert len(data) == 35 + MAC_LENGTH == 2 + frame_overhead(3)
    assert remac(data) == data  # HMAC-SHA256 under the "edgeproxy forward" sub-key


def test_flags_and_scoped_addresses() -> None:
    data = frame(already_forwarded=False, client_addr=("fe80::1%eth0", 9, 0, 3))
    got = decode_forward(data, keys(), NOW)
    assert isinstance(got, Forwarded)
    assert got.already_forwarded is False
    assert got.client_addr == ("fe80::1", 9)
    assert decode_forward(bytearray(data), keys(), NOW) == got
    assert decode_forward(memoryview(data), keys(), NOW) == got


def test_encode_rejects_bad_arguments() -> None:
    bad: list[dict[str, Any]] = [
        {"datagram": b""},
        {"sender": b""},
        {"sender": bytes(17)},
        {"seq": -1},
        {"seq": 1 << 64},
        {"now": -1.0},
        {"client_addr": ("no-ip", 1)},
        {"client_addr": ("192.0.2.1", 65536)},
        {"anycast_addr": ("192.0.2.1",)},
        {"key_id": 9},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            frame(**kw)


# --------------------------------------------------------------------------------------------
# Every error reason
# --------------------------------------------------------------------------------------------


def test_error_reasons() -> None:
    fleet = keys()
    good = frame(fleet)
    cases: list[tuple[Any, ForwardErrorReason]] = [
        ("text", ForwardErrorReason.MALFORMED),
        (None, ForwardErrorReason.MALFORMED),
        (b"", ForwardErrorReason.TRUNCATED),
        (good[:3], ForwardErrorReason.TRUNCATED),
        (good[:47], ForwardErrorReason.TRUNCATED),  # header and MAC, but no datagram
        (b"\xe2" + good[1:], ForwardErrorReason.BAD_VERSION),
        (b"\x00" + good[1:], ForwardErrorReason.BAD_VERSION),
        (good[:1] + b"\x09" + good[2:], ForwardErrorReason.BAD_FLAGS),
        (good[:1] + b"\x81" + good[2:], ForwardErrorReason.BAD_FLAGS),
        (good[:2] + b"\x07" + good[3:], ForwardErrorReason.UNKNOWN_KEY),
        (good[:3] + b"\x00" + good[4:], ForwardErrorReason.MALFORMED),
        (good[:3] + b"\x11" + good[4:], ForwardErrorReason.MALFORMED),
        (good[:-1] + bytes((good[-1] ^ 1,)), ForwardErrorReason.BAD_MAC),
        (good[:40] + b"\x00" + good[41:], ForwardErrorReason.BAD_MAC),
        (frame(keys(SECRET_B)), ForwardErrorReason.BAD_MAC),  # same key id, another secret
        (frame(fleet, now=NOW - 5.01), ForwardErrorReason.STALE),
        (frame(fleet, now=NOW + 5.01), ForwardErrorReason.STALE),
    ]
    for data, reason in cases:
        assert decode_forward(data, fleet, NOW) == err(reason), (data, reason)
    for skewed in (NOW - 4.99, NOW + 4.99):
        assert isinstance(decode_forward(frame(fleet, now=skewed), fleet, NOW), Forwarded)
    assert decode_forward(frame(fleet, now=NOW - 20), fleet, NOW, max_skew=30) != err(
        ForwardErrorReason.STALE
    )


def test_flag_change_without_remac_is_bad_mac() -> None:
    good = frame(already_forwarded=True)
    cleared = good[:1] + b"\x00" + good[2:]
    assert decode_forward(cleared, keys(), NOW) == err(ForwardErrorReason.BAD_MAC)
    got = decode_forward(remac(cleared), keys(), NOW)
    assert isinstance(got, Forwarded) and not got.already_forwarded


def test_every_single_byte_change_is_rejected() -> None:
    fleet = keys(SECRET_A, SECRET_B)
    good = frame(fleet, datagram=b"\x41hello", client_addr=CLIENT6)
    for i in range(len(good)):
        for flip in (0x01, 0x80):
            data = bytearray(good)
            data[i] ^= flip
            assert isinstance(decode_forward(bytes(data), fleet, NOW), ForwardError), (i, flip)


def test_replay_reasons() -> None:
    fleet, windows = keys(), ReplayWindows()
    first = frame(fleet, seq=5000)
    assert isinstance(decode_forward(first, fleet, NOW, replay=windows), Forwarded)
    assert decode_forward(first, fleet, NOW, replay=windows) == err(ForwardErrorReason.REPLAYED)
    old = frame(fleet, seq=5000 - REPLAY_WINDOW_SIZE)
    assert decode_forward(old, fleet, NOW, replay=windows) == err(ForwardErrorReason.TOO_OLD)
    # Another sender has its own window.
    other = frame(fleet, seq=5000, sender=b"\x2b")
    assert isinstance(decode_forward(other, fleet, NOW, replay=windows), Forwarded)
    assert len(windows) == 2
    # Without a replay state, decoding is stateless.
    assert isinstance(decode_forward(first, fleet, NOW), Forwarded)


def test_replay_window_moves_only_on_valid_frames() -> None:
    fleet, windows = keys(), ReplayWindows()
    assert isinstance(decode_forward(frame(fleet, seq=10), fleet, NOW, replay=windows), Forwarded)
    forged = frame(keys(SECRET_B), seq=10**9)
    assert decode_forward(forged, fleet, NOW, replay=windows) == err(ForwardErrorReason.BAD_MAC)
    stale = frame(fleet, seq=10**9, now=NOW - 60)
    assert decode_forward(stale, fleet, NOW, replay=windows) == err(ForwardErrorReason.STALE)
    window = windows.get(SENDER)
    assert window is not None and window.top == 10
    assert isinstance(decode_forward(frame(fleet, seq=11), fleet, NOW, replay=windows), Forwarded)
    # No state is created for senders whose frames fail verification.
    bad = frame(keys(SECRET_B), seq=1, sender=b"\x77")
    assert decode_forward(bad, fleet, NOW, replay=windows) == err(ForwardErrorReason.BAD_MAC)
    assert windows.get(b"\x77") is None


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------


def test_rotation() -> None:
    sender_keys = keys(SECRET_A)
    receiver = keys(SECRET_A)
    old = frame(sender_keys, seq=1)
    # Step 1: the receiver learns key 2 first; the sender still MACs under key 1.
    receiver.add_key(2, now=NOW, secret=SECRET_B)
    assert isinstance(decode_forward(old, receiver, NOW), Forwarded)
    # Step 2: the sender switches; both keys verify at the receiver.
    sender_keys.add_key(2, now=NOW, secret=SECRET_B)
    sender_keys.set_primary(2)
    new = frame(sender_keys, seq=2)
    assert new[2] == 2
    got = decode_forward(new, receiver, NOW)
    assert isinstance(got, Forwarded) and got.key_id == 2
    assert isinstance(decode_forward(old, receiver, NOW), Forwarded)
    # A receiver without key 2 cannot verify: add keys everywhere before switching.
    assert decode_forward(new, keys(SECRET_A), NOW) == err(ForwardErrorReason.UNKNOWN_KEY)
    # Step 3: the old key is removed.
    receiver.set_primary(2)
    receiver.remove_key(1)
    assert decode_forward(old, receiver, NOW) == err(ForwardErrorReason.UNKNOWN_KEY)
    assert isinstance(decode_forward(new, receiver, NOW), Forwarded)
    # An explicit key id still works for the sender while the key is live.
    assert frame(sender_keys, key_id=1)[2] == 1


# --------------------------------------------------------------------------------------------
# Replay window
# --------------------------------------------------------------------------------------------


def test_replay_window_basics() -> None:
    w = ReplayWindow()
    assert w.top == -1
    assert w.check_and_update(0) is ReplayCheck.FRESH  # the very first number, 0 included
    assert w.check_and_update(0) is ReplayCheck.DUPLICATE
    assert w.check_and_update(5) is ReplayCheck.FRESH
    assert w.check_and_update(3) is ReplayCheck.FRESH  # late but inside the window
    assert w.check_and_update(3) is ReplayCheck.DUPLICATE
    assert w.check_and_update(4) is ReplayCheck.FRESH
    assert w.check_and_update(5) is ReplayCheck.DUPLICATE
    assert w.top == 5


def test_replay_window_edges() -> None:
    w = ReplayWindow(1024)
    w.update(2000)
    assert w.check(2000 - 1023) is ReplayCheck.FRESH  # the oldest number still in the window
    assert w.check(2000 - 1024) is ReplayCheck.TOO_OLD
    assert w.check(0) is ReplayCheck.TOO_OLD
    w.update(2000 - 1023)
    assert w.check(2000 - 1023) is ReplayCheck.DUPLICATE
    # Sliding by one pushes that number out of the window.
    w.update(2001)
    assert w.check(2000 - 1023) is ReplayCheck.TOO_OLD
    assert w.check(2000) is ReplayCheck.DUPLICATE
    assert w.check(1999) is ReplayCheck.FRESH


def test_replay_window_far_ahead_and_max() -> None:
    w = ReplayWindow()
    for seq in range(100):
        w.update(seq)
    far = 1 << 62
    assert w.check_and_update(far) is ReplayCheck.FRESH  # authenticated: a gap is just loss
    assert w.check(99) is ReplayCheck.TOO_OLD  # everything before has left the window
    assert w.check(far) is ReplayCheck.DUPLICATE
    assert w.check(far - 1) is ReplayCheck.FRESH
    top = (1 << 64) - 1
    assert w.check_and_update(top) is ReplayCheck.FRESH
    assert w.check(top) is ReplayCheck.DUPLICATE
    assert w.check(top - 1023) is ReplayCheck.FRESH
    assert w.check(far) is ReplayCheck.TOO_OLD


def test_replay_window_shift_within_window_keeps_history() -> None:
    w = ReplayWindow(8)
    for seq in (10, 8, 6):
        w.update(seq)
    w.update(13)  # shift by 3: 10 -> offset 3, 8 -> 5, 6 -> 7
    assert [w.check(s) for s in (13, 10, 8, 6)] == [ReplayCheck.DUPLICATE] * 4
    assert [w.check(s) for s in (12, 11, 9, 7)] == [ReplayCheck.FRESH] * 4
    assert w.check(5) is ReplayCheck.TOO_OLD
    w.update(14)
    assert w.check(6) is ReplayCheck.TOO_OLD


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=200))
def test_replay_window_matches_model(seqs: list[int]) -> None:
    """Against a plain set: fresh iff unseen and within 1024 of the highest accepted."""
    w, seen, top = ReplayWindow(), set(), -1
    for seq in seqs:
        if seq in seen and seq > top - 1024:
            expected = ReplayCheck.DUPLICATE
        elif seq <= top - 1024:
            expected = ReplayCheck.TOO_OLD
        else:
            expected = ReplayCheck.FRESH
        assert w.check_and_update(seq) is expected
        if expected is ReplayCheck.FRESH:
            seen.add(seq)
            top = max(top, seq)


def test_replay_windows_lru_bound() -> None:
    windows = ReplayWindows(max_senders=2)
    windows.window(b"a").update(1)
    windows.window(b"b").update(1)
    windows.window(b"a")  # a is now the most recently used
    windows.window(b"c")
    assert windows.get(b"b") is None and windows.get(b"a") is not None and len(windows) == 2
    with pytest.raises(ValueError):
        ReplayWindows(max_senders=0)
    with pytest.raises(ValueError):
        ReplayWindow(0)


def test_sequencer_is_monotonic_and_clock_based() -> None:
    seqs = ForwardSequencer()
    a = seqs.next(NOW)
    assert a == int(NOW * 1_000_000)
    assert seqs.next(NOW) == a + 1
    assert seqs.next(NOW - 100) == a + 2  # the clock going back does not repeat numbers
    assert seqs.next(NOW + 1) == a + 1_000_000
    # A restarted sender continues above its previous numbers.
    assert ForwardSequencer().next(NOW + 2) > seqs.next(NOW + 1.5)


# --------------------------------------------------------------------------------------------
# Fuzzing: decode_forward returns Forwarded or ForwardError, never raises
# --------------------------------------------------------------------------------------------

FUZZ_KEYS = keys(SECRET_A)
_SEED = frame(FUZZ_KEYS, datagram=b"\x40abcdef", client_addr=CLIENT6)


def _mutate_seed(edits: list[tuple[int, int]], cut: int, keep_mac: bool) -> bytes:
    """The seed frame cut to ``cut`` bytes with some bytes replaced, MAC redone or not."""
    data = bytearray(_SEED[: max(cut, 1)])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    return remac(bytes(data)) if keep_mac and len(data) > MAC_LENGTH else bytes(data)


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.builds(lambda b: bytes((VERSION,)) + b, st.binary(max_size=120)),
        st.builds(
            lambda flags, key, slen, rest: bytes((VERSION, flags, key, slen)) + rest,
            st.integers(0, 7),
            st.integers(0, 2),
            st.integers(0, 17),
            st.binary(max_size=120),
        ),
        st.builds(
            _mutate_seed,
            st.lists(st.tuples(st.integers(0, 100), st.integers(0, 255)), max_size=3),
            st.one_of(st.just(len(_SEED)), st.integers(0, 100)),
            st.booleans(),
        ),
    ),
    st.one_of(st.just(NOW), st.floats(min_value=0, max_value=2e10)),
)
def test_fuzz_decode_forward(data: bytes, now: float) -> None:
    result = decode_forward(data, FUZZ_KEYS, now, replay=ReplayWindows())
    assert isinstance(result, (Forwarded, ForwardError))
    if isinstance(result, Forwarded):
        # Only a frame with a valid MAC decodes; re-encoding it gives the same bytes.
        again = encode_forward(
            result.datagram,
            keys=FUZZ_KEYS,
            sender=result.sender,
            seq=result.seq,
            now=result.timestamp_ms / 1000,
            client_addr=result.client_addr,
            anycast_addr=result.anycast_addr,
            already_forwarded=result.already_forwarded,
        )
        assert decode_forward(again, FUZZ_KEYS, now) == result
