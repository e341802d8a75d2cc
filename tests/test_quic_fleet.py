"""Fleet keys: key file handling, rotation, stateless resets, address-validation tokens, sealed
session tickets and the replay filter (edgeproxy/quic/fleet.py)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from aioquic.tls import CipherSuite, SessionTicket
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.quic.fleet import (
    CLOCK_SKEW,
    FleetKey,
    FleetKeyError,
    FleetKeys,
    NewTokenContents,
    ReplayFilter,
    ReplayVerdict,
    RetryTokenContents,
    TicketFormatError,
    TokenError,
    TokenErrorReason,
    TokenKind,
    build_stateless_reset,
    deserialize_session_ticket,
    serialize_session_ticket,
    token_kind,
)

NOW = 1_767_225_600.0
SECRET_A = bytes(range(32))
SECRET_B = bytes(range(100, 132))
CLIENT = ("192.0.2.10", 40000)
CLIENT6 = ("2001:db8::10", 40000, 0, 0)
ODCID = bytes.fromhex("8394c8f03e515708")
RSCID = bytes.fromhex("07c4605e4504cc4f")
NOW_MS = round(NOW * 1000).to_bytes(8, "big")


def counter_random(seed: int = 0) -> Callable[[int], bytes]:
    """Deterministic, never-repeating 'randomness' for the injected urandom."""
    state = {"n": seed}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return rand


def make_keys(*secrets: bytes, primary: int = 1) -> FleetKeys:
    keys = [FleetKey(i + 1, s, 1000 + i) for i, s in enumerate(secrets or (SECRET_A,))]
    return FleetKeys(keys, primary, urandom=counter_random())


def key_file(text: str, tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = f"""
primary = 7

[[keys]]
id = 7
secret = "{b64(SECRET_A)}"
created = 1700000000

[[keys]]
id = 8
secret = "{b64(SECRET_B)}"
created = 1700000100
"""


# --------------------------------------------------------------------------------------------
# Key file
# --------------------------------------------------------------------------------------------


def test_load_good_file(tmp_path: Path) -> None:
    keys = FleetKeys.load(key_file(GOOD, tmp_path))
    assert keys.primary.key_id == 7
    assert sorted(keys.keys) == [7, 8]
    assert keys.keys[8].secret == SECRET_B
    assert keys.keys[8].created == 1700000100
    assert "secret=<32 bytes>" in repr(keys.primary)  # secrets never in reprs


def test_load_tolerates_group_read(tmp_path: Path) -> None:
    assert FleetKeys.load(key_file(GOOD, tmp_path, 0o640)).primary.key_id == 7


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606, 0o660, 0o666, 0o601])
def test_load_refuses_accessible_files(tmp_path: Path, mode: int) -> None:
    path = key_file(GOOD, tmp_path, mode)
    with pytest.raises(FleetKeyError, match=rf"mode {mode:04o}.*chmod 600"):
        FleetKeys.load(path)


def test_load_refuses_missing_and_non_regular(tmp_path: Path) -> None:
    with pytest.raises(FleetKeyError, match="cannot open"):
        FleetKeys.load(tmp_path / "absent.toml")
    with pytest.raises(FleetKeyError, match="not a regular file"):
        FleetKeys.load(tmp_path)


def test_load_follows_symlinks_but_checks_target(tmp_path: Path) -> None:
    target = key_file(GOOD, tmp_path, 0o644)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(FleetKeyError, match="mode 0644"):
        FleetKeys.load(link)
    target.chmod(0o600)
    assert FleetKeys.load(link).primary.key_id == 7


def test_load_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_bytes(b"primary = 1\n\xff\n")
    path.chmod(0o600)
    with pytest.raises(FleetKeyError, match="UTF-8"):
        FleetKeys.load(path)


def _entry(**fields: object) -> str:
    values = {"id": 1, "secret": f'"{b64(SECRET_A)}"', "created": 5} | fields
    return "[[keys]]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("primary = [", "not valid TOML"),
        ("primary = 1\n", "at least one"),
        ("primary = 1\nkeys = []\n", "at least one"),
        ("primary = 1\nkeys = [1]\n", r"keys\[0\]: must be a table"),
        ("primary = 1\nextra = 2\n" + _entry(), "unknown field.*extra"),
        (_entry(), "primary: missing"),
        ("primary = 2\n" + _entry(), "primary: 2 is not the id"),
        ('primary = "1"\n' + _entry(), "primary: '1' is not the id"),
        ("primary = 1\n" + _entry(id=None), r"keys\[0\]\.id: missing"),
        ("primary = 1\n" + _entry(secret=None), r"keys\[0\]\.secret: missing"),
        ("primary = 1\n" + _entry(created=None), r"keys\[0\]\.created: missing"),
        ("primary = 1\n" + _entry(id=256), r"keys\[0\]\.id: must be an integer 0\.\.255"),
        ("primary = 1\n" + _entry(id=-1), r"keys\[0\]\.id"),
        ("primary = 1\n" + _entry(id="true"), r"keys\[0\]\.id"),
        ("primary = 1\n" + _entry(id='"1"'), r"keys\[0\]\.id"),
        ("primary = 1\n" + _entry() + _entry(), r"keys\[1\]\.id: duplicate key id 1"),
        ("primary = 1\n" + _entry(secret=5), r"keys\[0\]\.secret: must be a base64 string"),
        ("primary = 1\n" + _entry(secret='"!!notbase64"'), r"keys\[0\]\.secret: not valid base64"),
        (
            "primary = 1\n" + _entry() + _entry(id=2, secret=f'"{b64(bytes(31))}"'),
            r"keys\[1\]\.secret: 31 bytes, at least 32",
        ),
        ("primary = 1\n" + _entry(secret='""'), r"keys\[0\]\.secret: 0 bytes"),
        (
            "primary = 1\n" + _entry(secret=f'"{b64(bytes(2000))}"'),
            r"keys\[0\]\.secret: longer than",
        ),
        ("primary = 1\n" + _entry(created=-5), r"keys\[0\]\.created: must be a unix time"),
        ("primary = 1\n" + _entry(created=1.5), r"keys\[0\]\.created"),
        ("primary = 1\n" + _entry(created='"yesterday"'), r"keys\[0\]\.created"),
        ("primary = 1\n" + _entry(colour='"red"'), r"keys\[0\]: unknown field.*colour"),
    ],
)
def test_parse_errors_name_the_field(text: str, message: str) -> None:
    with pytest.raises(FleetKeyError, match=message):
        FleetKeys.parse(text, source="fleet.toml")


def test_parse_accepts_longer_secrets_and_whitespace() -> None:
    keys = FleetKeys.parse("primary = 3\n" + _entry(id=3, secret=f'" {b64(bytes(48))}\\n"'))
    assert keys.primary.secret == bytes(48)


def test_generate_creates_private_file_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    keys = FleetKeys.generate(path, now=NOW, key_id=4, urandom=counter_random())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = FleetKeys.load(path)
    assert loaded.primary.key_id == 4
    assert loaded.primary.secret == keys.primary.secret
    assert len(loaded.primary.secret) == 32
    assert loaded.primary.created == int(NOW)
    before = path.read_bytes()
    with pytest.raises(FleetKeyError, match="refusing to overwrite"):
        FleetKeys.generate(path, now=NOW)
    assert path.read_bytes() == before
    # A dangling symlink is refused too: writing through it could land anywhere.
    link = tmp_path / "dangling.toml"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FleetKeyError, match="refusing to overwrite"):
        FleetKeys.generate(link, now=NOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.toml", "fleet.toml"]


def test_generate_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FleetKeys.generate(tmp_path / "k.toml", now=NOW)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.toml").stat().st_mode) == 0o600


def test_rotation_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    keys = FleetKeys.generate(path, now=NOW, key_id=0, urandom=counter_random())
    new = keys.add_key(now=NOW + 10)
    assert new.key_id == 1
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = FleetKeys.load(path)
    assert again.primary.key_id == 0 and sorted(again.keys) == [0, 1]
    again.set_primary(1)
    again.remove_key(0)
    again.save(path)
    final = FleetKeys.load(path)
    assert final.primary.key_id == 1
    assert final.primary.secret == new.secret
    assert list(final.keys) == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.toml"]  # no temporary files left


def test_key_operations_refuse_mistakes() -> None:
    keys = make_keys(SECRET_A)
    with pytest.raises(FleetKeyError, match="already exists"):
        keys.add_key(1, now=NOW)
    with pytest.raises(FleetKeyError, match="is the primary"):
        keys.remove_key(1)
    with pytest.raises(FleetKeyError, match="does not exist"):
        keys.remove_key(9)
    with pytest.raises(FleetKeyError, match="does not exist"):
        keys.set_primary(9)
    with pytest.raises(FleetKeyError, match=r"0\.\.255"):
        keys.add_key(256, now=NOW)
    with pytest.raises(FleetKeyError, match="secret must be"):
        keys.add_key(2, now=NOW, secret=b"short")
    with pytest.raises(FleetKeyError, match="not among"):
        FleetKeys([FleetKey(1, SECRET_A, 0)], 2)
    with pytest.raises(FleetKeyError, match="duplicate"):
        FleetKeys([FleetKey(1, SECRET_A, 0), FleetKey(1, SECRET_B, 0)], 1)
    assert keys.add_key(255, now=NOW, secret=SECRET_B).key_id == 255
    assert keys.add_key(now=NOW).key_id == 0  # wraps to the first free id


def test_subkeys_are_hkdf_with_distinct_labels() -> None:
    key = FleetKey(1, SECRET_A, 0)

    def hkdf(label: bytes, length: int) -> bytes:
        return HKDF(algorithm=SHA256(), length=length, salt=None, info=label).derive(SECRET_A)

    reset_key = hkdf(b"edgeproxy reset", 32)
    expected = hmac.new(reset_key, RSCID, hashlib.sha256).digest()[:16]
    assert key.reset_token(RSCID) == expected
    forward = key.forward_hmac()
    forward.update(b"x")
    assert forward.digest() == hmac.new(hkdf(b"edgeproxy forward", 32), b"x", "sha256").digest()
    labels = [b"reset", b"ticket", b"retry", b"token", b"forward"]
    derived = {hkdf(b"edgeproxy " + label, 32)[:16] for label in labels}
    assert len(derived) == len(labels)


# --------------------------------------------------------------------------------------------
# Stateless resets
# --------------------------------------------------------------------------------------------


def test_reset_tokens_across_pops_and_rotation() -> None:
    pop_a, pop_b = make_keys(SECRET_A), make_keys(SECRET_A)
    token = pop_a.reset_token(RSCID)
    assert len(token) == 16 and token == pop_b.reset_token(RSCID)
    assert pop_a.reset_token(ODCID) != token
    pop_a.add_key(2, now=NOW, secret=SECRET_B)
    assert pop_a.reset_tokens_for(RSCID) == [token, pop_a.reset_token(RSCID, key_id=2)]
    pop_a.set_primary(2)
    new = pop_a.reset_token(RSCID)
    assert new != token
    assert pop_a.reset_tokens_for(RSCID) == [new, token]  # primary first, old still recognised
    pop_a.remove_key(1)
    assert pop_a.reset_tokens_for(RSCID) == [new]
    with pytest.raises(FleetKeyError):
        pop_a.reset_token(RSCID, key_id=1)


def test_stateless_reset_size_rules() -> None:
    token = bytes(range(16))
    rand = counter_random()
    for trigger in range(0, 1600):
        packet = build_stateless_reset(token, trigger, rand)
        if trigger <= 21:
            assert packet is None, trigger  # never amplify, never below 21 bytes
            continue
        assert packet is not None
        assert 21 <= len(packet) < trigger
        assert packet.endswith(token)
        assert packet[0] & 0xC0 == 0x40  # short header form, fixed bit set
        if trigger <= 44:
            assert len(packet) == trigger - 1
        else:
            assert 43 <= len(packet) <= 64
    sizes = {len(build_stateless_reset(token, 1200, rand) or b"") for _ in range(300)}
    assert len(sizes) > 5  # the size does not single out resets


def test_stateless_reset_rejects_bad_tokens() -> None:
    with pytest.raises(ValueError):
        build_stateless_reset(b"short", 100, os.urandom)
    assert build_stateless_reset(bytes(16), -5, os.urandom) is None


# --------------------------------------------------------------------------------------------
# Retry tokens
# --------------------------------------------------------------------------------------------


def test_retry_token_round_trip() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    assert token[0] == TokenKind.RETRY and token[1] == 1
    assert len(token) == 2 + 12 + 11 + len(ODCID) + len(RSCID) + 16
    assert token_kind(token) is TokenKind.RETRY
    opened = make_keys().open_retry_token(token, CLIENT, NOW + 1, dcid=RSCID)  # another PoP
    assert opened == RetryTokenContents(ODCID, RSCID, NOW, 1)
    assert keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW) != token  # fresh nonce


@pytest.mark.parametrize(
    ("client", "same"),
    [
        (("::ffff:192.0.2.10", 40000, 0, 0), True),  # a dual-stack socket's view of CLIENT
        (("192.0.2.10", 40000, 0, 0), True),
        (("192.0.2.11", 40000), False),
    ],
)
def test_retry_token_ip_binding(client: tuple[object, ...], same: bool) -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    result = keys.open_retry_token(token, client, NOW)
    if same:
        assert isinstance(result, RetryTokenContents)
    else:
        assert result == TokenError(TokenErrorReason.BAD_SEAL)


def test_retry_token_ipv6_and_port_binding() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT6, ODCID, b"", now=NOW)
    assert isinstance(
        keys.open_retry_token(token, ("2001:db8::10", 40000), NOW), RetryTokenContents
    )
    assert keys.open_retry_token(token, ("2001:db8::10", 40001), NOW) == TokenError(
        TokenErrorReason.ADDRESS_MISMATCH
    )
    assert keys.open_retry_token(token, ("2001:db8::11", 40000), NOW) == TokenError(
        TokenErrorReason.BAD_SEAL
    )


def test_retry_token_expiry_and_skew() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    ok = (NOW - CLOCK_SKEW + 0.01, NOW + 10 + CLOCK_SKEW - 0.01)
    for now in ok:
        assert isinstance(keys.open_retry_token(token, CLIENT, now), RetryTokenContents), now
    assert keys.open_retry_token(token, CLIENT, NOW + 12.01) == TokenError(TokenErrorReason.EXPIRED)
    assert keys.open_retry_token(token, CLIENT, NOW - 2.01) == TokenError(
        TokenErrorReason.NOT_YET_VALID
    )
    assert isinstance(
        keys.open_retry_token(token, CLIENT, NOW + 30, lifetime=30), RetryTokenContents
    )
    assert keys.open_retry_token(token, CLIENT, NOW + 5, lifetime=1) == TokenError(
        TokenErrorReason.EXPIRED
    )


def test_retry_token_cid_and_kind_checks() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    assert keys.open_retry_token(token, CLIENT, NOW, dcid=ODCID) == TokenError(
        TokenErrorReason.CID_MISMATCH
    )
    assert keys.open_new_token(token, CLIENT, NOW) == TokenError(TokenErrorReason.WRONG_KIND)
    new = keys.make_new_token(CLIENT, now=NOW)
    assert keys.open_retry_token(new, CLIENT, NOW) == TokenError(TokenErrorReason.WRONG_KIND)
    assert keys.open_retry_token(b"\x09" + token[1:], CLIENT, NOW) == TokenError(
        TokenErrorReason.WRONG_KIND
    )
    assert token_kind(b"\x09abc") is None and token_kind(b"") is None


def test_retry_token_malformed_and_bad_address() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    malformed = TokenError(TokenErrorReason.MALFORMED)
    assert keys.open_retry_token(token[:30], CLIENT, NOW) == malformed
    assert keys.open_retry_token(token + bytes(64), CLIENT, NOW) == malformed
    assert keys.open_retry_token("text", CLIENT, NOW) == malformed  # type: ignore[arg-type]
    assert keys.open_retry_token(b"", CLIENT, NOW) == malformed
    for bad in [("not-an-ip", 1), ("192.0.2.1", 70000), ("192.0.2.1",), None]:
        assert keys.open_retry_token(token, bad, NOW) == TokenError(  # type: ignore[arg-type]
            TokenErrorReason.BAD_ADDRESS
        )
    with pytest.raises(ValueError):
        keys.make_retry_token(("nope", 1), ODCID, RSCID, now=NOW)
    with pytest.raises(ValueError):
        keys.make_retry_token(CLIENT, bytes(21), RSCID, now=NOW)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # too short for the fixed fields
        NOW_MS + b"\x9c\x40" + bytes([21]) + bytes(21),  # odcid longer than 20
        NOW_MS + b"\x9c\x40" + bytes([8]) + bytes(5),  # odcid cut short
        NOW_MS + b"\x9c\x40" + bytes([0]) + bytes(21),  # retry scid longer than 20
    ],
)
def test_retry_token_bad_inner_layout_is_malformed(body: bytes) -> None:
    """Only a key holder can produce these; they are still refused, not crashed on."""
    keys = make_keys()
    head, nonce = b"\x01\x01", bytes(12)
    ip16 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 10])
    sealed = keys.primary.retry_aead.encrypt(nonce, body, head + ip16)
    token = head + nonce + sealed
    if len(token) < 38:  # below the length check: pad the body instead
        sealed = keys.primary.retry_aead.encrypt(nonce, body + bytes(8), head + ip16)
        token = head + nonce + sealed
    result = keys.open_retry_token(token, CLIENT, NOW)
    assert result == TokenError(TokenErrorReason.MALFORMED)


def test_new_token_bad_inner_layout_is_malformed() -> None:
    keys = make_keys()
    head, nonce = b"\x02\x01", bytes(12)
    ip16 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 10])
    token = head + nonce + keys.primary.token_aead.encrypt(nonce, NOW_MS + bytes(20), head + ip16)
    assert keys.open_new_token(token, CLIENT, NOW) == TokenError(TokenErrorReason.MALFORMED)


def test_retry_token_every_byte_is_authenticated() -> None:
    keys = make_keys()
    token = keys.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    for i in range(len(token)):
        tampered = bytearray(token)
        tampered[i] ^= 0x01
        assert isinstance(keys.open_retry_token(bytes(tampered), CLIENT, NOW), TokenError), i


def test_tokens_survive_rotation_until_removal() -> None:
    pop_a = make_keys(SECRET_A)
    retry = pop_a.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    new = pop_a.make_new_token(CLIENT, now=NOW)
    pop_b = make_keys(SECRET_A)
    pop_b.add_key(2, now=NOW, secret=SECRET_B)
    pop_b.set_primary(2)
    assert isinstance(pop_b.open_retry_token(retry, CLIENT, NOW), RetryTokenContents)
    assert isinstance(pop_b.open_new_token(new, CLIENT, NOW), NewTokenContents)
    fresh = pop_b.make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    assert fresh[1] == 2
    # A PoP that has not received key 2 yet cannot open it: why keys are added everywhere first.
    assert pop_a.open_retry_token(fresh, CLIENT, NOW) == TokenError(TokenErrorReason.UNKNOWN_KEY)
    pop_b.remove_key(1)
    assert pop_b.open_retry_token(retry, CLIENT, NOW) == TokenError(TokenErrorReason.UNKNOWN_KEY)
    assert pop_b.open_new_token(new, CLIENT, NOW) == TokenError(TokenErrorReason.UNKNOWN_KEY)


def test_same_id_different_secret_is_bad_seal() -> None:
    token = make_keys(SECRET_A).make_retry_token(CLIENT, ODCID, RSCID, now=NOW)
    assert make_keys(SECRET_B).open_retry_token(token, CLIENT, NOW) == TokenError(
        TokenErrorReason.BAD_SEAL
    )


# --------------------------------------------------------------------------------------------
# NEW_TOKEN tokens
# --------------------------------------------------------------------------------------------


def test_new_token_round_trip_binds_ip_only() -> None:
    keys = make_keys()
    token = keys.make_new_token(CLIENT, now=NOW)
    assert len(token) == 54 and token_kind(token) is TokenKind.NEW_TOKEN
    opened = make_keys().open_new_token(token, ("192.0.2.10", 555), NOW + 3600)
    assert isinstance(opened, NewTokenContents)
    assert opened.issued_at == NOW and opened.key_id == 1 and len(opened.token_id) == 16
    assert keys.open_new_token(token, ("192.0.2.99", 40000), NOW) == TokenError(
        TokenErrorReason.BAD_SEAL
    )
    other = keys.make_new_token(CLIENT, now=NOW)
    opened_other = keys.open_new_token(other, CLIENT, NOW)
    assert isinstance(opened_other, NewTokenContents)
    assert opened_other.token_id != opened.token_id  # unique ids


def test_new_token_expiry() -> None:
    keys = make_keys()
    token = keys.make_new_token(CLIENT6, now=NOW)
    day = 24 * 3600
    assert isinstance(keys.open_new_token(token, CLIENT6, NOW + day + 1.9), NewTokenContents)
    assert keys.open_new_token(token, CLIENT6, NOW + day + 2.1) == TokenError(
        TokenErrorReason.EXPIRED
    )
    assert keys.open_new_token(token, CLIENT6, NOW - 3) == TokenError(
        TokenErrorReason.NOT_YET_VALID
    )
    assert keys.open_new_token(token, CLIENT6, NOW + 100, lifetime=60) == TokenError(
        TokenErrorReason.EXPIRED
    )


def test_new_token_single_use_per_pop() -> None:
    keys = make_keys()
    seen = ReplayFilter(window=24 * 3600 + 2 * CLOCK_SKEW)
    token = keys.make_new_token(CLIENT, now=NOW)
    first = keys.open_new_token(token, CLIENT, NOW)
    again = keys.open_new_token(token, CLIENT, NOW + 5)
    assert isinstance(first, NewTokenContents) and isinstance(again, NewTokenContents)
    assert seen.check_and_add(first.token_id, NOW) is ReplayVerdict.FRESH
    assert seen.check_and_add(again.token_id, NOW + 5) is ReplayVerdict.REPLAYED


# --------------------------------------------------------------------------------------------
# Session tickets
# --------------------------------------------------------------------------------------------


def test_ticket_seal_open_rotation_and_lifetime() -> None:
    pop_a = make_keys(SECRET_A)
    blob = pop_a.seal_ticket(b"session state", NOW)
    assert blob[0] == 0x03 and blob[1] == 1 and len(blob) == len(b"session state") + 38
    pop_b = make_keys(SECRET_A)
    assert pop_b.open_ticket(blob, NOW + 60) == b"session state"
    assert pop_b.open_ticket(blob, NOW + 86400 + 1) == b"session state"  # within skew
    assert pop_b.open_ticket(blob, NOW + 86400 + 3) is None
    assert pop_b.open_ticket(blob, NOW + 100, lifetime=50) is None
    assert pop_b.open_ticket(blob, NOW - 3) is None
    pop_b.add_key(2, now=NOW, secret=SECRET_B)
    pop_b.set_primary(2)
    assert pop_b.open_ticket(blob, NOW) == b"session state"
    assert pop_b.open_ticket(pop_b.seal_ticket(b"", NOW), NOW) == b""
    pop_b.remove_key(1)
    assert pop_b.open_ticket(blob, NOW) is None
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x80
        assert pop_a.open_ticket(bytes(tampered), NOW) is None, i
    assert pop_a.open_ticket(blob[:20], NOW) is None
    assert pop_a.open_ticket(None, NOW) is None  # type: ignore[arg-type]
    # Tokens are not tickets: kinds and keys differ.
    assert pop_a.open_ticket(pop_a.make_new_token(CLIENT, now=NOW), NOW) is None


def _ticket(**changes: object) -> SessionTicket:
    base = SessionTicket(
        age_add=0xDEADBEEF,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC),
        not_valid_before=datetime.datetime(2026, 1, 1, 3, 4, 5, 678901, tzinfo=datetime.UTC),
        resumption_secret=bytes(range(32)),
        server_name="edge.example",
        ticket=os.urandom(64),
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x01\x02"), (0xFFFF, b"")],
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"server_name": None, "max_early_data_size": None, "other_extensions": []},
        {"server_name": "ünïcode.example", "cipher_suite": CipherSuite.CHACHA20_POLY1305_SHA256},
        {"resumption_secret": bytes(48), "cipher_suite": CipherSuite.AES_256_GCM_SHA384},
        {"ticket": b"", "age_add": 0},
    ],
)
def test_session_ticket_round_trip(changes: dict[str, object]) -> None:
    ticket = _ticket(**changes)
    data = serialize_session_ticket(ticket)
    back = deserialize_session_ticket(data)
    assert back == ticket
    assert isinstance(back.cipher_suite, CipherSuite)
    # and through the fleet seal, as a PoP other than the issuer would see it
    keys = make_keys()
    opened = make_keys().open_ticket(keys.seal_ticket(data, NOW), NOW)
    assert opened is not None and deserialize_session_ticket(opened) == ticket


def test_session_ticket_naive_datetimes_are_utc() -> None:
    naive = _ticket(not_valid_before=datetime.datetime(2026, 1, 1))
    back = deserialize_session_ticket(serialize_session_ticket(naive))
    assert back.not_valid_before == datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_session_ticket_serialize_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        serialize_session_ticket(_ticket(age_add=1 << 32))
    with pytest.raises(ValueError):
        serialize_session_ticket(_ticket(resumption_secret=bytes(256)))
    with pytest.raises(ValueError):
        serialize_session_ticket(_ticket(other_extensions=[(70000, b"")]))


def test_session_ticket_deserialize_errors() -> None:
    good = serialize_session_ticket(_ticket())
    for bad in [b"", good[:-1], good + b"\x00", b"\x02" + good[1:], good[:1] + b"\x80" + good[2:]]:
        with pytest.raises(TicketFormatError):
            deserialize_session_ticket(bad)
    with pytest.raises(TicketFormatError, match="cipher suite"):
        deserialize_session_ticket(good[:6] + b"\x99\x99" + good[8:])


# --------------------------------------------------------------------------------------------
# Replay filter
# --------------------------------------------------------------------------------------------


def test_replay_filter_window_and_bound() -> None:
    f = ReplayFilter(window=10, max_entries=3)
    assert f.check_and_add(b"a", 0) is ReplayVerdict.FRESH
    assert f.check_and_add(b"a", 9.9) is ReplayVerdict.REPLAYED
    assert f.check_and_add(b"b", 1) is ReplayVerdict.FRESH
    assert f.check_and_add(b"c", 2) is ReplayVerdict.FRESH
    assert f.check_and_add(b"d", 3) is ReplayVerdict.SATURATED  # fails closed, nothing evicted
    assert b"a" in f and len(f) == 3
    assert f.check_and_add(b"a", 10) is ReplayVerdict.FRESH  # a expired, its slot is reused
    assert f.check_and_add(b"d", 11) is ReplayVerdict.FRESH  # b expired
    assert f.check_and_add(b"c", 11.5) is ReplayVerdict.REPLAYED
    assert f.check_and_add(b"c", 100) is ReplayVerdict.FRESH
    assert len(f) == 1
    with pytest.raises(ValueError):
        ReplayFilter(window=0)
    with pytest.raises(ValueError):
        ReplayFilter(window=1, max_entries=0)


# --------------------------------------------------------------------------------------------
# Fuzzing: the openers return their error values, never raise
# --------------------------------------------------------------------------------------------

FUZZ_KEYS = make_keys(SECRET_A)
_FUZZ_SEEDS = [
    FUZZ_KEYS.make_retry_token(CLIENT, ODCID, RSCID, now=NOW),
    FUZZ_KEYS.make_new_token(CLIENT, now=NOW),
    FUZZ_KEYS.seal_ticket(b"x" * 40, NOW),
]


def _mutations() -> st.SearchStrategy[bytes]:
    def mutate(seed: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
        data = bytearray(seed)
        for pos, value in edits:
            data[pos % len(data)] = value
        return bytes(data[: max(cut, 0)] if cut < len(data) else data)

    return st.builds(
        mutate,
        st.sampled_from(_FUZZ_SEEDS),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3),
        st.integers(0, 200),
    )


FUZZ_INPUT = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda k, b: bytes((k, 1)) + b, st.integers(1, 3), st.binary(max_size=120)),
    _mutations(),
)


@settings(max_examples=1500, deadline=None)
@given(FUZZ_INPUT, st.one_of(st.just(NOW), st.floats(min_value=0, max_value=4e9)))
def test_fuzz_token_and_ticket_openers(data: bytes, now: float) -> None:
    retry = FUZZ_KEYS.open_retry_token(data, CLIENT, now, dcid=RSCID)
    assert isinstance(retry, (TokenError, RetryTokenContents))
    new = FUZZ_KEYS.open_new_token(data, CLIENT, now)
    assert isinstance(new, (TokenError, NewTokenContents))
    ticket = FUZZ_KEYS.open_ticket(data, now)
    assert ticket is None or isinstance(ticket, bytes)
    if data not in _FUZZ_SEEDS:
        assert isinstance(retry, TokenError) and isinstance(new, TokenError) and ticket is None


_GOOD_TICKET = serialize_session_ticket(_ticket())


@settings(max_examples=1500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: b"\x01" + b, st.binary(max_size=300)),
        st.builds(
            lambda pos, v, cut: (
                _GOOD_TICKET[: pos % len(_GOOD_TICKET)]
                + bytes((v,))
                + _GOOD_TICKET[pos % len(_GOOD_TICKET) + 1 :]
            )[:cut],
            st.integers(0, 500),
            st.integers(0, 255),
            st.integers(0, 500),
        ),
    )
)
def test_fuzz_deserialize_session_ticket(data: bytes) -> None:
    try:
        ticket = deserialize_session_ticket(data)
    except TicketFormatError:
        return
    assert serialize_session_ticket(ticket) == data  # anything accepted is canonical
