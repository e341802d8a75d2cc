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
    named = {n.lower() for n in header_list(headers, b"connection")}
    drop = (HOP_BY_HOP | named) - keep
    return [(k, v) for k, v in headers if k not in drop]


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
    keep = frozenset({b"upgrade", b"connection"}) if upgrade else frozenset()
    out = [(k, v) for k, v in strip_hop_by_hop(head.headers, keep=keep) if k != b"host"]
    if upgrade:
        out = [(k, v) for k, v in out if k != b"connection"] + [(b"connection", b"upgrade")]
    client_ip = head.client_addr[0]
    proto = "HTTP/3" if head.http_version == "3" else f"HTTP/{head.http_version}"
    xff = [v for k, v in out if k == b"x-forwarded-for"]
    out = [(k, v) for k, v in out if k not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id")]
    out.append((b"x-forwarded-for", b", ".join([*xff, client_ip.encode()]) if client_ip else b", ".join(xff)))
    out.append((b"x-forwarded-proto", head.scheme.encode()))
    if head.authority:
        out.append((b"x-forwarded-host", head.authority))
    forwarded = f"for={_forwarded_node(client_ip)};proto={head.scheme}"
    if head.authority:
        host = head.authority.decode("latin-1").replace('"', "")
        forwarded += f';host="{host}"'
    forwarded += f";by={_forwarded_node(pop_id)}"
    out.append((b"forwarded", forwarded.encode("latin-1")))
    out.append((b"via", f"{proto.removeprefix('HTTP/')} {pop_id}".encode()))
    if head.request_id:
        out.append((b"x-request-id", head.request_id.encode()))
    return out


def edge_static_headers(
    headers: Headers, *, pop_id: str, http_version: str, alt_svc: bytes = b"", cache_status: bytes = b""
) -> Headers:
    """The part of `client_response_headers` that does not change per request (everything but
    X-Request-Id), so a cache hit can reuse it."""
    named = header_list(headers, b"connection")
    drop = _CLIENT_DROP if not named else _CLIENT_DROP | {n.lower() for n in named}
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
