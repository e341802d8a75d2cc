"""PoP configuration: TOML in, typed dataclasses out, every option with a documented default.

The dataclasses below are the reference for every option (`examples/pop.toml` shows them all).
`load_config` rejects unknown keys, wrong types and bad values with a `ConfigError` that names the
key, e.g. ``origin_groups[0].health.interval: must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def parse_hostport(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' -> (host, port); ValueError with a reason otherwise."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {value!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be 0..65535, got {port!r}")
    return (host or default_host, int(port))


@dataclass
class PopSection:
    id: str = "pop1"
    """Name of this PoP: in the X-Edge-Pop response header, Via, logs and metrics."""
    state_dir: str = "/var/lib/edgeproxy"
    """Where the PoP keeps state it creates (self-signed certificates, keys)."""


@dataclass
class ListenSection:
    http: list[str] = field(default_factory=lambda: ["0.0.0.0:80"])
    """Plain HTTP/1.1 listeners, host:port."""
    https: list[str] = field(default_factory=lambda: ["0.0.0.0:443"])
    """HTTP/1.1 over TLS listeners."""
    quic: list[str] = field(default_factory=lambda: ["0.0.0.0:443"])
    """HTTP/3 over QUIC (UDP) listeners; advertised to HTTP/1.1 clients with Alt-Svc."""
    backlog: int = 1024
    """listen(2) backlog of the TCP listeners."""


@dataclass
class CertificateSection:
    cert: str = ""
    """PEM certificate chain file."""
    key: str = ""
    """PEM private key file."""
    names: list[str] = field(default_factory=list)
    """SNI names served with this certificate (`*.example.com` wildcards allowed); empty means the
    names in the certificate itself."""


@dataclass
class HTTP1Section:
    parser: str = "httptools"
    """HTTP/1.1 request parser: `httptools` (llhttp, fast) or `h11` (pure Python); both behind
    h11's state machine interface and checked against each other by a differential corpus."""


@dataclass
class TLSSection:
    certificates: list[CertificateSection] = field(default_factory=list)
    """Certificates; the first is the default for clients that send no or an unknown SNI name. With
    none, the PoP makes a self-signed one for localhost in state_dir."""
    reload_interval: float = 5.0
    """Seconds between checks of the certificate files; changed files are loaded without restart
    (also on SIGHUP)."""


@dataclass
class LimitsSection:
    max_header_bytes: int = 32768
    """Largest request head (request line and headers); larger gets 431."""
    max_body_bytes: int = 2 * 1024**3
    """Largest request body; larger gets 413 (or the stream is reset once the body has started)."""
    max_connections: int = 10000
    """Client connections per worker; beyond it new connections are closed at once."""
    header_timeout: float = 10.0
    """Seconds for a client to send a complete request head; slower gets 408."""
    idle_timeout: float = 60.0
    """Seconds a keep-alive (or QUIC) connection may idle between requests."""
    body_timeout: float = 60.0
    """Seconds a client may stall while sending a request body."""
    send_timeout: float = 60.0
    """Seconds a client may stall while reading a response."""
    max_streams: int = 128
    """Concurrent HTTP/3 request streams per connection."""


@dataclass
class HealthSection:
    enabled: bool = True
    """Active HTTP health checks of every server in the group."""
    path: str = "/"
    """Path probed with GET."""
    host: str = ""
    """Host header of the probe; empty means the server's address."""
    interval: float = 5.0
    """Seconds between probes of one server."""
    timeout: float = 2.0
    """Seconds a probe may take."""
    rise: int = 2
    """Consecutive successes that make an unhealthy server healthy."""
    fall: int = 3
    """Consecutive failures that make a healthy server unhealthy."""
    expect_status: list[int] = field(default_factory=lambda: [200, 399])
    """Inclusive [low, high] status range that counts as a success."""


@dataclass
class PassiveSection:
    consecutive_errors: int = 5
    """Consecutive failed requests (connect errors, resets, timeouts, 502-504) that eject a server."""
    eject_seconds: float = 30.0
    """How long an ejected server gets no traffic before it is tried again."""


@dataclass
class OriginGroupSection:
    name: str = "default"
    """Group name, used in logs and metrics."""
    servers: list[str] = field(default_factory=list)
    """Origin servers, host:port, spoken to in plain HTTP/1.1 over the backhaul."""
    hosts: list[str] = field(default_factory=lambda: ["*"])
    """Request hosts (Host or :authority, without port) routed to this group; shell-style patterns.
    The first group whose pattern matches wins."""
    policy: str = "round_robin"
    """`round_robin` over healthy servers, or `failover`: the first healthy server in order."""
    max_connections: int = 128
    """Connections per server, busy and idle; requests beyond it wait for one."""
    max_idle: int = 32
    """Idle keep-alive connections kept per server."""
    idle_timeout: float = 30.0
    """Seconds an idle pooled connection is kept."""
    connect_timeout: float = 5.0
    """Seconds to connect to a server (then failover, or 502)."""
    first_byte_timeout: float = 30.0
    """Seconds from sending the request to the response head (then 504)."""
    read_timeout: float = 60.0
    """Seconds the origin may stall within a response body."""
    retries: int = 2
    """Extra attempts on other servers for idempotent requests that failed before any response."""
    health: HealthSection = field(default_factory=HealthSection)
    passive: PassiveSection = field(default_factory=PassiveSection)


@dataclass
class CacheSection:
    enabled: bool = True
    """Shared RFC 9111 cache in front of every origin group."""
    max_bytes: int = 256 * 1024**2
    """Memory for cached responses (bodies and heads); least recently used go first."""
    max_object_bytes: int = 16 * 1024**2
    """Largest single response stored."""
    coalesce: bool = True
    """Concurrent misses for one key wait for a single origin request."""


@dataclass
class AdminSection:
    listen: str = "127.0.0.1:9901"
    """Admin endpoint (/healthz, /metrics, /cache/purge); keep it off public addresses."""


@dataclass
class LogSection:
    access_log: str = "-"
    """JSON-lines access log: a path, `-` for stdout, or empty for none."""
    level: str = "info"
    """Level of the process log on stderr: debug, info, warning, error."""


@dataclass
class Config:
    pop: PopSection = field(default_factory=PopSection)
    listen: ListenSection = field(default_factory=ListenSection)
    tls: TLSSection = field(default_factory=TLSSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    http1: HTTP1Section = field(default_factory=HTTP1Section)
    origin_groups: list[OriginGroupSection] = field(default_factory=list)
    cache: CacheSection = field(default_factory=CacheSection)
    admin: AdminSection = field(default_factory=AdminSection)
    log: LogSection = field(default_factory=LogSection)
    base_dir: str = field(default=".", metadata={"internal": True})
    """Directory relative paths in the file are resolved against (the config file's own)."""

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def group_for_host(self, host: str) -> OriginGroupSection | None:
        host = host.lower()
        for group in self.origin_groups:
            if any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in group.hosts):
                return group
        return None


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    return "a table"


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return _build(key, tp, value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))
    ):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def _build(prefix: str, cls: Any, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(key, f"unknown option (known here: {known})")
        tp = hints[name]
        if isinstance(tp, types.UnionType):  # no optional options today; keep errors explicit
            raise ConfigError(key, "unsupported option type")
        kwargs[name] = _convert(key, tp, value)
    return cls(**kwargs)


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def _addresses(key: str, values: list[str]) -> None:
    for i, v in enumerate(values):
        try:
            parse_hostport(v)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", str(e)) from None


def validate(cfg: Config) -> None:
    """Value checks beyond types; raises ConfigError naming the key."""
    if not cfg.pop.id or not all(c.isalnum() or c in "-_." for c in cfg.pop.id):
        raise ConfigError("pop.id", f"must be a non-empty name of letters, digits, '-', '_', '.', got {cfg.pop.id!r}")
    _addresses("listen.http", cfg.listen.http)
    _addresses("listen.https", cfg.listen.https)
    _addresses("listen.quic", cfg.listen.quic)
    _positive("listen.backlog", cfg.listen.backlog)
    for name in ("max_header_bytes", "max_body_bytes", "max_connections", "max_streams"):
        _positive(f"limits.{name}", getattr(cfg.limits, name))
    for name in ("header_timeout", "idle_timeout", "body_timeout", "send_timeout"):
        _positive(f"limits.{name}", getattr(cfg.limits, name))
    if cfg.limits.max_header_bytes < 1024:
        raise ConfigError("limits.max_header_bytes", f"must be >= 1024, got {cfg.limits.max_header_bytes}")
    if cfg.http1.parser not in ("httptools", "h11"):
        raise ConfigError("http1.parser", f"must be 'httptools' or 'h11', got {cfg.http1.parser!r}")
    _positive("tls.reload_interval", cfg.tls.reload_interval)
    for i, cert in enumerate(cfg.tls.certificates):
        for attr in ("cert", "key"):
            value = getattr(cert, attr)
            key = f"tls.certificates[{i}].{attr}"
            if not value:
                raise ConfigError(key, "is required")
            if not cfg.path(value).is_file():
                raise ConfigError(key, f"no such file: {cfg.path(value)}")
    if (cfg.listen.https or cfg.listen.quic) and cfg.tls.certificates == [] and not cfg.pop.state_dir:
        raise ConfigError("tls.certificates", "needed for https/quic listeners when pop.state_dir is empty")
    if not cfg.origin_groups:
        raise ConfigError("origin_groups", "at least one origin group is needed ([[origin_groups]] with servers)")
    names: set[str] = set()
    for i, g in enumerate(cfg.origin_groups):
        key = f"origin_groups[{i}]"
        if not g.name:
            raise ConfigError(f"{key}.name", "is required")
        if g.name in names:
            raise ConfigError(f"{key}.name", f"duplicate group name {g.name!r}")
        names.add(g.name)
        if not g.servers:
            raise ConfigError(f"{key}.servers", "needs at least one host:port")
        _addresses(f"{key}.servers", g.servers)
        if g.policy not in ("round_robin", "failover"):
            raise ConfigError(f"{key}.policy", f"must be 'round_robin' or 'failover', got {g.policy!r}")
        for name in ("max_connections", "connect_timeout", "first_byte_timeout", "read_timeout", "idle_timeout"):
            _positive(f"{key}.{name}", getattr(g, name))
        _positive(f"{key}.max_idle", g.max_idle, zero_ok=True)
        _positive(f"{key}.retries", g.retries, zero_ok=True)
        h = g.health
        for name in ("interval", "timeout", "rise", "fall"):
            _positive(f"{key}.health.{name}", getattr(h, name))
        if not h.path.startswith("/"):
            raise ConfigError(f"{key}.health.path", f"must start with '/', got {h.path!r}")
        if len(h.expect_status) != 2 or not 100 <= h.expect_status[0] <= h.expect_status[1] <= 599:
            raise ConfigError(f"{key}.health.expect_status", f"must be [low, high] within 100..599, got {h.expect_status}")
        _positive(f"{key}.passive.consecutive_errors", g.passive.consecutive_errors)
        _positive(f"{key}.passive.eject_seconds", g.passive.eject_seconds)
    _positive("cache.max_bytes", cfg.cache.max_bytes, zero_ok=True)
    _positive("cache.max_object_bytes", cfg.cache.max_object_bytes, zero_ok=True)
    try:
        parse_hostport(cfg.admin.listen, default_host="127.0.0.1")
    except ValueError as e:
        raise ConfigError("admin.listen", str(e)) from None
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"must be debug, info, warning or error, got {cfg.log.level!r}")


def config_from_dict(data: dict[str, Any], base_dir: str = ".") -> Config:
    cfg: Config = _build("", Config, data)
    cfg.base_dir = base_dir
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot read {p}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("", f"{p}: not valid TOML: {e}") from None
    return config_from_dict(data, base_dir=str(p.resolve().parent))
