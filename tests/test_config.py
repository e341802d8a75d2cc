"""Config loading: defaults, the example file, and errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from edgeproxy.config import Config, ConfigError, config_from_dict, load_config, parse_hostport

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pop.toml"
MINIMAL = {"origin_groups": [{"servers": ["127.0.0.1:9000"]}]}


def _option_names(cls: type, prefix: str = "") -> list[str]:
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(inner):
            names += _option_names(inner, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            names.append(prefix + f.name)
    return names


def test_example_config_loads_and_documents_every_option() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.origin_groups[0].servers
    text = EXAMPLE.read_text()
    missing = [n for n in _option_names(Config) if f"{n.rsplit('.', 1)[-1]} =" not in text]
    assert not missing, f"options not documented in examples/pop.toml: {missing}"


def test_defaults_match_example() -> None:
    """The example states the defaults: loading it equals the built-in defaults except servers."""
    cfg = load_config(EXAMPLE)
    default = config_from_dict({"origin_groups": [{"servers": cfg.origin_groups[0].servers}]})
    assert dataclasses.asdict(cfg) | {"base_dir": ""} == dataclasses.asdict(default) | {"base_dir": ""}


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"limitz": {}}, "limitz", "unknown option"),
        ({"limits": {"idle_timeout": "x"}}, "limits.idle_timeout", "expected a number"),
        ({"limits": {"max_header_bytes": True}}, "limits.max_header_bytes", "expected an integer"),
        ({"limits": {"header_timeout": -1}}, "limits.header_timeout", "must be > 0"),
        ({"listen": {"http": ["nope"]}}, "listen.http[0]", "host:port"),
        ({"listen": {"http": ["1.2.3.4:99999"]}}, "listen.http[0]", "port must be"),
        ({"origin_groups": []}, "origin_groups", "at least one"),
        ({"origin_groups": [{"servers": []}]}, "origin_groups[0].servers", "at least one"),
        ({"origin_groups": [{"servers": ["a:1"], "policy": "random"}]}, "origin_groups[0].policy", "round_robin"),
        ({"origin_groups": [{"servers": ["a:1"], "health": {"path": "x"}}]}, "origin_groups[0].health.path", "start with"),
        ({"origin_groups": [{"servers": ["a:1"], "health": {"interval": 0}}]}, "origin_groups[0].health.interval", "> 0"),
        ({"origin_groups": [{"servers": ["a:1"]}, {"servers": ["b:1"]}]}, "origin_groups[1].name", "duplicate"),
        ({"tls": {"certificates": [{"cert": "/nonexistent.pem", "key": "/x"}]}}, "tls.certificates[0].cert", "no such file"),
        ({"pop": {"id": "a b"}}, "pop.id", "non-empty name"),
        ({"log": {"level": "loud"}}, "log.level", "debug"),
    ],
)
def test_errors_name_the_key(data: dict, key: str, fragment: str) -> None:
    merged = {**MINIMAL, **data}
    with pytest.raises(ConfigError) as info:
        config_from_dict(merged)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(key)


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[pop\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_hostport("[::1]:443") == ("::1", 443)
    assert parse_hostport(":8080") == ("0.0.0.0", 8080)
    with pytest.raises(ValueError):
        parse_hostport("[::1]443")


def test_group_for_host() -> None:
    cfg = config_from_dict(
        {"origin_groups": [{"name": "img", "servers": ["a:1"], "hosts": ["img.*"]}, {"name": "rest", "servers": ["b:1"]}]}
    )
    assert cfg.group_for_host("IMG.example.com").name == "img"  # type: ignore[union-attr]
    assert cfg.group_for_host("www.example.com").name == "rest"  # type: ignore[union-attr]


def test_check_command(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "--config", str(EXAMPLE)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[[origin_groups]]\nservers = ["x"]\n')
    res = subprocess.run([sys.executable, "-m", "edgeproxy", "check", "--config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "origin_groups[0].servers[0]" in res.stderr
