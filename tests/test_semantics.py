"""Proxy header rules: hop-by-hop removal and forwarding headers."""

from __future__ import annotations

from edgeproxy.http.messages import RequestHead, header_all, header_get
from edgeproxy.http.semantics import (
    RequestIds,
    client_response_headers,
    origin_request_headers,
    strip_hop_by_hop,
)


def test_strip_hop_by_hop_includes_connection_named_fields() -> None:
    headers = [
        (b"connection", b"keep-alive, x-secret"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"upgrade", b"websocket"),
        (b"accept", b"*/*"),
    ]
    assert strip_hop_by_hop(headers) == [(b"accept", b"*/*")]


def test_origin_request_headers_adds_forwarding_chain() -> None:
    head = RequestHead(
        b"GET", b"/a", [(b"host", b"example.com"), (b"x-forwarded-for", b"10.1.1.1"), (b"connection", b"close"), (b"accept", b"*/*")],
        scheme="https", authority=b"example.com", http_version="1.1", client_addr=("2001:db8::1", 5555), request_id="r1",
    )
    out = origin_request_headers(head, "pop-a")
    assert header_get(out, b"host") is None  # the origin client writes Host from the authority
    assert header_get(out, b"connection") is None
    assert header_all(out, b"x-forwarded-for") == [b"10.1.1.1, 2001:db8::1"]
    assert header_get(out, b"x-forwarded-proto") == b"https"
    assert header_get(out, b"x-forwarded-host") == b"example.com"
    assert header_get(out, b"forwarded") == b'for="[2001:db8::1]";proto=https;host="example.com";by="pop-a"'
    assert header_get(out, b"via") == b"1.1 pop-a"
    assert header_get(out, b"x-request-id") == b"r1"
    assert header_get(out, b"accept") == b"*/*"


def test_origin_request_headers_for_upgrade_keeps_upgrade() -> None:
    head = RequestHead(b"GET", b"/ws", [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")], authority=b"h", client_addr=("127.0.0.1", 1))
    out = origin_request_headers(head, "p", upgrade=True)
    assert header_get(out, b"upgrade") == b"websocket"
    assert header_all(out, b"connection") == [b"upgrade"]


def test_client_response_headers() -> None:
    out = client_response_headers(
        [(b"connection", b"close"), (b"via", b"1.1 origin"), (b"x-cache", b"spoofed"), (b"content-length", b"3")],
        pop_id="p1", request_id="id1", http_version="1.1", alt_svc=b'h3=":443"', cache_status=b"HIT",
    )
    assert header_all(out, b"via") == [b"1.1 origin", b"1.1 p1"]
    assert header_all(out, b"x-cache") == [b"HIT"]
    assert header_get(out, b"alt-svc") == b'h3=":443"'
    assert header_get(out, b"connection") is None
    h3 = client_response_headers([], pop_id="p1", request_id="id1", http_version="3", alt_svc=b'h3=":443"')
    assert header_get(h3, b"alt-svc") is None


def test_request_ids_unique() -> None:
    a, b = RequestIds("p"), RequestIds("p")
    ids = {a.next() for _ in range(100)} | {b.next() for _ in range(100)}
    assert len(ids) == 200
