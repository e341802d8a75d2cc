"""`edgeproxy keys`: generate, add, promote, remove — the fleet key rotation an operator runs."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgeproxy.cli import main
from edgeproxy.quic.fleet import FleetKeys


def test_rotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "fleet.toml"
    assert main(["keys", "generate", "--file", str(f)]) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert main(["keys", "generate", "--file", str(f)]) == 1  # never overwrites
    first = FleetKeys.load(f).primary.key_id
    assert main(["keys", "add", "--file", str(f)]) == 0
    keys = FleetKeys.load(f)
    (new,) = [k for k in keys.keys if k != first]
    assert keys.primary.key_id == first  # adding does not switch: every PoP must have it first
    assert main(["keys", "remove", "--file", str(f), "--id", str(first)]) == 1  # not the primary
    assert main(["keys", "promote", "--file", str(f), "--id", str(new)]) == 0
    assert main(["keys", "remove", "--file", str(f), "--id", str(first)]) == 0
    keys = FleetKeys.load(f)
    assert list(keys.keys) == [new] and keys.primary.key_id == new
    assert main(["keys", "list", "--file", str(f)]) == 0
    assert f"key {new} (primary)" in capsys.readouterr().out
    assert main(["keys", "promote", "--file", str(f)]) == 2  # --id missing
