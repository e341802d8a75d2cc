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


def parse_advertise(value: str) -> tuple[str, int]:
    """'host', 'host:port', 'v6', '[v6]' or '[v6]:port' -> (host, port), port 0 when absent."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1], 0
    if value.startswith("[") or value.count(":") == 1:
        return parse_hostport(value)
    return value, 0


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
    """HTTP/1.1 parser of client requests and of origin responses: `httptools` (llhttp, fast) or
    `h11` (pure Python); both behind h11's state machine interface and checked against each
    other by a differential corpus."""


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
    """Seconds for a client to send a complete request head (HTTP/1.1 from its first byte, HTTP/3
    per request stream); slower gets 408."""
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
    max_idle: int = 128
    """Idle keep-alive connections kept per server (at most max_connections count). Below the
    usual number of requests in flight, connections churn: each burst closes the surplus and the
    next one reconnects."""
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
class FleetSection:
    key_file: str = ""
    """Fleet key file (TOML, mode 0600, identical on every PoP): the secrets behind QUIC-LB
    connection IDs, stateless reset tokens, session tickets and backhaul frame MACs. Empty means
    `fleet-keys.toml` in pop.state_dir, created on first start (fine for a single PoP; copy one
    file to every PoP of a fleet)."""


@dataclass
class QuicLBSection:
    enabled: bool = True
    """Issue QUIC-LB connection IDs naming this node (PoP, host, worker), so that any PoP can
    route a QUIC packet to the node that owns its connection; off means random CIDs and no
    cross-PoP routing."""
    config_id: int = 0
    """QUIC-LB config rotation codepoint 0..6 of fleet key 0, the same on every PoP: fleet key k
    issues CIDs under codepoint (config_id + k) mod 7 with a key derived from it, so every live
    fleet key has its own and a key rotation never leaves CIDs undecodable (live key ids must
    differ mod 7). With `encrypt = false`, the one codepoint used."""
    encrypt: bool = True
    """Encrypt CIDs with the fleet-derived QUIC-LB key; false uses the draft's plaintext
    algorithm (server ID visible on the wire, linkable CIDs: for labs and debugging only)."""
    pop_bits: int = 8
    """Server-ID bits for the PoP index (the first field of the server ID)."""
    host_bits: int = 4
    """Server-ID bits for the host index within the PoP."""
    worker_bits: int = 4
    """Server-ID bits for the worker (process) index on the host."""
    server_id_len: int = 0
    """Server-ID octets; 0 means the fewest that hold pop_bits + host_bits + worker_bits."""
    nonce_len: int = 5
    """Nonce octets per CID (at least 4); CIDs are 1 + server_id_len + nonce_len octets long
    (8 with the defaults)."""
    pop_index: int = 0
    """This PoP's index, unique in the fleet (below 2**pop_bits)."""
    host_index: int = 0
    """This host's index within its PoP (below 2**host_bits)."""
    retry_above: int = 1000
    """Handshakes in progress on this worker from which a client Initial without a valid
    address-validation token (Retry or NEW_TOKEN, minted by any PoP) is answered with a Retry
    instead of creating a connection, so spoofed Initials cannot cost handshakes; 0 = always."""
    retry_token_lifetime: float = 10.0
    """Seconds a Retry token is accepted after it was issued (any PoP, 2 s clock skew allowed)."""


@dataclass
class BackhaulPeerSection:
    name: str = ""
    """The peer PoP's pop.id (its name in the flow table)."""
    pop_index: int = 0
    """The peer's quic_lb.pop_index."""
    host_index: int = 0
    """The peer's quic_lb.host_index."""
    address: str = ""
    """The peer's backhaul.listen address, host:port (worker i listens on port + i)."""


@dataclass
class BackhaulSection:
    listen: str = ""
    """UDP address (host:port) for QUIC datagrams and session tickets exchanged with other
    PoPs; worker i of this host uses port + i. Empty disables the backhaul: packets of other
    PoPs' connections are then dropped."""
    workers: int = 0
    """Worker processes `edgeproxy run` starts on this host, 0 meaning one per CPU core. They share
    the client-facing ports (SO_REUSEPORT); worker i has backhaul port + i and admin port + i, and
    datagrams the kernel hands to the wrong worker reach their owner over the backhaul. Every host
    of the fleet must use the same count."""
    max_skew: float = 5.0
    """Seconds a backhaul frame's timestamp may differ from this PoP's clock (replay bound)."""
    flow_ttl: float = 30.0
    """Seconds a published QUIC handshake (flow-table entry) is kept for other PoPs to find."""
    peers: list[BackhaulPeerSection] = field(default_factory=list)
    """The other PoPs (static membership; a PoP is alive until marked dead)."""


@dataclass
class TicketsSection:
    enabled: bool = True
    """Fleet-wide TLS session tickets: a ticket issued by any PoP resumes (with 0-RTT) at any
    other, replicated over the backhaul. Off means no session resumption."""
    max_tickets: int = 100000
    """Tickets kept in memory per worker (oldest dropped first); they expire after 24 h."""
    single_use: bool = True
    """Accept each ticket once per worker (a reused ticket gets a full handshake): limits 0-RTT
    replay at this PoP; other PoPs may still accept one replay each (see docs)."""


@dataclass
class SteeringSection:
    """TCP steering (edgeproxy.steering): segments of TCP connections another PoP owns are sent
    to that PoP over the backhaul by this PoP's kernel (nft map + policy routing)."""

    enabled: bool = False
    """Publish accepted TCP connections to the flow table and steer other PoPs' flows to them.
    Needs CAP_NET_ADMIN (without it the PoP warns and runs without TCP survival)."""
    min_age: float = 1.0
    """Seconds a connection must stay open before it is published (short ones never are)."""
    linger: float = 65.0
    """Seconds a closed connection's entry is kept (covers FIN_WAIT/TIME_WAIT, 60 s on Linux)."""
    ttl: float = 30.0
    """Lifetime of a published entry; refreshed every ttl / 3 while the connection is open."""
    mark: int = 0x4550000
    """Base firewall mark: the peer PoP with index i (peers sorted by name, from 1) gets mark + i."""
    table: int = 4550
    """Base routing table id: peer i's route lives in table + i."""
    rule_pref: int = 100
    """ip rule priority of the mark rules; the local table's rule is moved to rule_pref + 1."""
    backhaul_device: str = ""
    """Interface facing the other PoPs (required when enabled)."""
    mode: str = "route"
    """`route`: plain next hop on a shared L2 backhaul; `vxlan`: a VXLAN device over it."""
    vxlan_device: str = "epvx0"
    """Name of the VXLAN device (vxlan mode)."""
    vxlan_id: int = 4550
    """VXLAN network identifier, the same on every PoP (vxlan mode)."""
    vxlan_port: int = 4789
    """VXLAN UDP port (vxlan mode)."""
    peers: dict[str, str] = field(default_factory=dict)
    """PoP id -> its IPv4 backhaul address, for every PoP of the fleet (this one may be listed:
    it is skipped, and in vxlan mode its address is the VXLAN local address)."""
    max_entries: int = 1048576
    """Size of the kernel map (steered flows this PoP can hold)."""
    batch_max: int = 20000
    """Map updates per kernel transaction."""
    inject: bool = False
    """Lab and tests only: POST /steering/inject on the admin endpoint merges entries as if
    replicated from their owners."""


@dataclass
class GossipSection:
    """Fleet membership by gossip (edgeproxy.membership): every worker is one member of a
    Serf-compatible SWIM cluster; a member SWIM declares failed or left makes the other PoPs
    treat its PoP as dead (its QUIC connections get stateless resets), a member that joins is
    alive and its backhaul address is learnt from its tags, and the flow table replicates to the
    members over the flow channel. With an empty keyring gossip is plaintext and unauthenticated:
    anyone who can reach the gossip port can then declare a PoP dead."""

    enabled: bool = False
    """Run a gossip member in every worker (backhaul.peers then need not be listed)."""
    bind: str = "0.0.0.0:7946"
    """UDP and TCP address of the member (host:port); worker i uses port + 2*i (port 0: any)."""
    advertise: str = ""
    """Address other members reach this one at: host, or host:port (worker i: port + 2*i);
    empty means the bind address, which must then not be a wildcard."""
    join: list[str] = field(default_factory=list)
    """Seed members (host:port) to join at start, retried like Serf's retry_join until one
    answers; empty starts a new cluster (others join it)."""
    retry_interval: float = 30.0
    """Seconds between join attempts while no seed answers."""
    retry_max: int = 0
    """Join attempts before giving up (0 = never give up)."""
    keyring: str = ""
    """Serf keyring file (JSON list of base64 AES keys, the first encrypts); empty = plaintext,
    unauthenticated gossip (see above). The same keyring on every PoP. SIGHUP re-reads it, so keys
    rotate without a restart: add the new key second everywhere, then first, then drop the old."""
    profile: str = "lan"
    """memberlist timing profile: `lan` (failure detected in ~5 s), `wan` or `local`."""
    region: str = ""
    """This PoP's region (gossiped in the `region` tag), for flow_scope = "region"."""
    flow_port: int = 0
    """UDP port of the flow-table replication channel; 0 means the gossip port + 1. Worker i
    uses flow_port + 2*i (with 0: its gossip port + 1)."""
    flow_scope: str = "all"
    """Replicate flow-table writes to `all` members, or only to those of the same `region`."""


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
    fleet: FleetSection = field(default_factory=FleetSection)
    quic_lb: QuicLBSection = field(default_factory=QuicLBSection)
    backhaul: BackhaulSection = field(default_factory=BackhaulSection)
    tickets: TicketsSection = field(default_factory=TicketsSection)
    steering: SteeringSection = field(default_factory=SteeringSection)
    gossip: GossipSection = field(default_factory=GossipSection)
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
    _validate_quic_fleet(cfg)
    _validate_steering(cfg)
    _validate_gossip(cfg)


def _validate_quic_fleet(cfg: Config) -> None:
    from .quic.lb import MAX_PLAINTEXT_LEN, LBConfig, ServerIdLayout

    q = cfg.quic_lb
    for name in ("config_id", "pop_bits", "host_bits", "worker_bits", "server_id_len", "nonce_len", "pop_index", "host_index", "retry_above"):
        _positive(f"quic_lb.{name}", getattr(q, name), zero_ok=True)
    _positive("quic_lb.retry_token_lifetime", q.retry_token_lifetime)
    if q.config_id > 6:
        raise ConfigError("quic_lb.config_id", f"must be 0..6 (7 marks unroutable CIDs), got {q.config_id}")
    try:
        layout = ServerIdLayout(q.pop_bits, q.host_bits, q.worker_bits, q.server_id_len)
    except ValueError as e:
        raise ConfigError("quic_lb.server_id_len", str(e)) from None
    try:
        LBConfig(q.config_id, layout.server_id_len, q.nonce_len)
    except ValueError as e:
        raise ConfigError("quic_lb.nonce_len", f"{e} (server_id_len + nonce_len <= {MAX_PLAINTEXT_LEN})") from None
    for name, bits in (("pop_index", q.pop_bits), ("host_index", q.host_bits)):
        if getattr(q, name) >= 1 << bits:
            raise ConfigError(f"quic_lb.{name}", f"must be below 2**{name[:-6]}_bits = {1 << bits}, got {getattr(q, name)}")
    b = cfg.backhaul
    if b.listen:
        try:
            parse_hostport(b.listen)
        except ValueError as e:
            raise ConfigError("backhaul.listen", str(e)) from None
    _positive("backhaul.workers", b.workers, zero_ok=True)
    if b.workers > 1 << q.worker_bits:
        raise ConfigError("backhaul.workers", f"must be at most 2**quic_lb.worker_bits = {1 << q.worker_bits}, got {b.workers}")
    _positive("backhaul.max_skew", b.max_skew)
    _positive("backhaul.flow_ttl", b.flow_ttl)
    if b.peers and not b.listen:
        raise ConfigError("backhaul.listen", "is needed to exchange datagrams with backhaul.peers")
    seen: set[tuple[int, int]] = {(q.pop_index, q.host_index)}
    for i, peer in enumerate(b.peers):
        key = f"backhaul.peers[{i}]"
        if not peer.name or not all(c.isalnum() or c in "-_." for c in peer.name):
            raise ConfigError(f"{key}.name", f"must be the peer's pop.id, got {peer.name!r}")
        for name, bits in (("pop_index", q.pop_bits), ("host_index", q.host_bits)):
            value = getattr(peer, name)
            if not 0 <= value < 1 << bits:
                raise ConfigError(f"{key}.{name}", f"must be 0..{(1 << bits) - 1}, got {value}")
        if (peer.pop_index, peer.host_index) in seen:
            raise ConfigError(f"{key}.pop_index", f"PoP {peer.pop_index} host {peer.host_index} is listed twice (or is this PoP)")
        seen.add((peer.pop_index, peer.host_index))
        try:
            parse_hostport(peer.address)
        except ValueError as e:
            raise ConfigError(f"{key}.address", str(e)) from None
    _positive("tickets.max_tickets", cfg.tickets.max_tickets)
    if (cfg.listen.quic or b.listen) and not cfg.fleet.key_file and not cfg.pop.state_dir:
        raise ConfigError("fleet.key_file", "needed for quic/backhaul listeners when pop.state_dir is empty")


def _validate_steering(cfg: Config) -> None:
    import ipaddress

    st = cfg.steering
    for name in ("min_age", "linger"):
        _positive(f"steering.{name}", getattr(st, name), zero_ok=True)
    for name in ("ttl", "max_entries", "batch_max"):
        _positive(f"steering.{name}", getattr(st, name))
    if st.mode not in ("route", "vxlan"):
        raise ConfigError("steering.mode", f"must be 'route' or 'vxlan', got {st.mode!r}")
    if not isinstance(st.peers, dict):
        raise ConfigError("steering.peers", "expected a table of pop = \"address\"")
    for name, addr in st.peers.items():
        try:
            ipaddress.IPv4Address(addr if isinstance(addr, str) else "-")
        except ValueError:
            raise ConfigError(f"steering.peers.{name}", f"must be an IPv4 address, got {addr!r}") from None
    if not 0 < st.mark <= 0xFFFFFFFF - len(st.peers):
        raise ConfigError("steering.mark", f"must be 1..2**32 - 1 - len(peers), got {st.mark}")
    used = range(st.table + 1, st.table + len(st.peers) + 1)
    if not 0 < st.table < 0x7FFFFFFF - len(st.peers) or any(t in used for t in (253, 254, 255)):
        raise ConfigError("steering.table", f"tables table+1 .. table+len(peers) must be below 2**31 and avoid 253-255, got {st.table}")
    if not 0 < st.rule_pref < 32765:
        raise ConfigError("steering.rule_pref", f"must be 1..32764, got {st.rule_pref}")
    if not 0 <= st.vxlan_id < 1 << 24:
        raise ConfigError("steering.vxlan_id", f"must be 0..16777215, got {st.vxlan_id}")
    if not 0 < st.vxlan_port < 65536:
        raise ConfigError("steering.vxlan_port", f"must be 1..65535, got {st.vxlan_port}")
    if st.enabled and not st.backhaul_device:
        raise ConfigError("steering.backhaul_device", "is required when steering is enabled")


def _validate_gossip(cfg: Config) -> None:
    import ipaddress

    g = cfg.gossip
    try:
        bind_host, _ = parse_hostport(g.bind)
    except ValueError as e:
        raise ConfigError("gossip.bind", str(e)) from None
    adv_host = g.advertise
    if g.advertise:
        try:
            adv_host, _ = parse_advertise(g.advertise)
        except ValueError as e:
            raise ConfigError("gossip.advertise", str(e)) from None
        try:
            ipaddress.ip_address(adv_host)
        except ValueError:
            raise ConfigError("gossip.advertise", f"must be an IP address (host or host:port), got {g.advertise!r}") from None
    elif g.enabled and bind_host in ("0.0.0.0", "::", ""):
        raise ConfigError("gossip.advertise", "is required when gossip.bind is a wildcard address")
    _addresses("gossip.join", g.join)
    _positive("gossip.retry_interval", g.retry_interval)
    _positive("gossip.retry_max", g.retry_max, zero_ok=True)
    if g.profile not in ("lan", "wan", "local"):
        raise ConfigError("gossip.profile", f"must be 'lan', 'wan' or 'local', got {g.profile!r}")
    if not 0 <= g.flow_port < 65536:
        raise ConfigError("gossip.flow_port", f"must be 0..65535, got {g.flow_port}")
    if g.flow_scope not in ("all", "region"):
        raise ConfigError("gossip.flow_scope", f"must be 'all' or 'region', got {g.flow_scope!r}")
    if g.keyring and g.enabled and not cfg.path(g.keyring).is_file():
        raise ConfigError("gossip.keyring", f"no such file: {cfg.path(g.keyring)}")


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
