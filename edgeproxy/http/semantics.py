"""Proxy header semantics (RFC 9110 section 7.6, RFC 7239), the same for HTTP/1.1 and HTTP/3.

Pure functions over `Headers`: which headers are hop-by-hop, what the edge adds on the way to the
origin (Via, X-Forwarded-*, Forwarded) and on the way back (X-Edge-Pop, X-Request-Id, Alt-Svc).
"""

from __future__ import annotations

import os

from .messages import Headers, RequestHead, header_list

# RFC 9110 section 7.6.1, plus the legacy names proxies have always treated as connection-specific.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


# What never reaches a client from an origin: hop-by-hop fields and the edge's own.
_CLIENT_DROP = HOP_BY_HOP | {b"x-edge-pop", b"x-request-id", b"x-cache", b"alt-svc"}


def strip_hop_by_hop(headers: Headers, *, keep: frozenset[bytes] = frozenset()) -> Headers:
    """Headers without hop-by-hop fields and without those the Connection header names.

    `keep` retains named fields (e.g. upgrade/connection when forwarding an Upgrade request)."""
    drop = _with_connection_named(headers, HOP_BY_HOP) - keep
    return [(k, v) for k, v in headers if k not in drop]


def _with_connection_named(headers: Headers, drop: frozenset[bytes]) -> frozenset[bytes]:
    """`drop` plus the fields the Connection header names (hop-by-hop by that naming)."""
    named = header_list(headers, b"connection")
    return drop if not named else drop | {n.lower() for n in named}


def _forwarded_node(host: str, port: int = 0) -> str:
    """An RFC 7239 node: IPv6 in brackets and quoted, ports kept only when known, names (our PoP
    id) as quoted obfuscated identifiers. `host` is a socket peer address or a PoP id, so telling
    them apart by shape is enough (no ipaddress parse on the hot path)."""
    if not host:
        return "unknown"
    if ":" in host:
        return f'"[{host}]:{port}"' if port else f'"[{host}]"'
    if host.replace(".", "").isdigit() and host.count(".") == 3:
        return f'"{host}:{port}"' if port else host
    return '"' + host.replace('"', "") + '"'



def origin_request_headers(head: RequestHead, pop_id: str, *, upgrade: bool = False) -> Headers:
    """The request headers edgeproxy sends to an origin.

    Hop-by-hop fields and Host go (the origin client writes Host from `head.authority`); Via,
    X-Forwarded-For/-Proto/-Host, Forwarded (RFC 7239) and X-Request-Id are appended to what the
    client sent, so chains of proxies stay visible."""
    headers = head.headers
    drop = _with_connection_named(headers, _ORIGIN_DROP)
    if upgrade:
        drop = drop - {b"upgrade"}
    out: Headers = []
    xff: list[bytes] = []
    for k, v in headers:
        if k in drop:
            continue
        if k == b"x-forwarded-for":
            xff.append(v)
        else:
            out.append((k, v))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    client_ip = head.client_addr[0]
    own_xff, tail = _forwarding_fields(client_ip, head.scheme, head.authority, head.http_version, pop_id)
    out.append((b"x-forwarded-for", b", ".join([*xff, own_xff]) if xff and own_xff else b", ".join(xff) if xff else own_xff))
    out += tail
    if head.request_id:
        out.append((b"x-request-id", head.request_id.encode()))
    return out


# What origin_request_headers drops from the client's fields (Connection and Upgrade included;
# X-Forwarded-For is merged, the others are the edge's to set).
_ORIGIN_DROP = HOP_BY_HOP | {b"host", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}

# (client ip, scheme, authority, version, pop id) -> the client's X-Forwarded-For element and the
# fields after X-Forwarded-For: the same for every request of a connection. Bounded.
_FORWARDING: dict[tuple[str, str, bytes, str, str], tuple[bytes, Headers]] = {}


def _forwarding_fields(client_ip: str, scheme: str, authority: bytes, http_version: str, pop_id: str) -> tuple[bytes, Headers]:
    key = (client_ip, scheme, authority, http_version, pop_id)
    got = _FORWARDING.get(key)
    if got is not None:
        return got
    tail: Headers = [(b"x-forwarded-proto", scheme.encode())]
    if authority:
        tail.append((b"x-forwarded-host", authority))
    forwarded = f"for={_forwarded_node(client_ip)};proto={scheme}"
    if authority:
        host = authority.decode("latin-1").replace('"', "")
        forwarded += f';host="{host}"'
    forwarded += f";by={_forwarded_node(pop_id)}"
    tail.append((b"forwarded", forwarded.encode("latin-1")))
    proto = "3" if http_version == "3" else http_version
    tail.append((b"via", f"{proto} {pop_id}".encode()))
    got = (client_ip.encode(), tail)
    if len(_FORWARDING) >= 4096:
        _FORWARDING.clear()
    _FORWARDING[key] = got
    return got


def edge_static_headers(
    headers: Headers, *, pop_id: str, http_version: str, alt_svc: bytes = b"", cache_status: bytes = b""
) -> Headers:
    """The part of `client_response_headers` that does not change per request (everything but
    X-Request-Id), so a cache hit can reuse it."""
    drop = _with_connection_named(headers, _CLIENT_DROP)
    out = [(k, v) for k, v in headers if k not in drop]
    proto = "3" if http_version == "3" else "1.1"
    out.append((b"via", f"{proto} {pop_id}".encode()))
    out.append((b"x-edge-pop", pop_id.encode()))
    if cache_status:
        out.append((b"x-cache", cache_status))
    if alt_svc and http_version != "3":
        out.append((b"alt-svc", alt_svc))
    return out


def client_response_headers(
    headers: Headers,
    *,
    pop_id: str,
    request_id: str,
    http_version: str,
    alt_svc: bytes = b"",
    cache_status: bytes = b"",
) -> Headers:
    """Response headers to the client: hop-by-hop removed, Via, X-Edge-Pop, X-Request-Id,
    X-Cache (HIT, MISS, STALE, ...) and Alt-Svc (advertised over HTTP/1.1 only) added."""
    out = edge_static_headers(headers, pop_id=pop_id, http_version=http_version, alt_svc=alt_svc, cache_status=cache_status)
    out.append((b"x-request-id", request_id.encode()))
    return out


def alt_svc_value(quic_port: int, max_age: int = 86400) -> bytes:
    return f'h3=":{quic_port}"; ma={max_age}'.encode()


class RequestIds:
    """Request ids: a per-process random prefix plus a counter, unique across workers and PoPs and
    cheap enough for the hot path (no uuid4 per request)."""

    def __init__(self, pop_id: str) -> None:
        self._prefix = f"{pop_id}-{os.urandom(4).hex()}-"
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n:x}"
