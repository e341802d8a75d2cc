"""Responses the edge generates itself (400, 408, 413, 431, 501, 502, 504, ...).

One place so HTTP/1.1 and HTTP/3 answer the same failure with the same status, headers and body.
"""

from __future__ import annotations

from .messages import ResponseHead

REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    411: b"Length Required",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    425: b"Too Early",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    return REASONS.get(status, b"")


def error_response(
    status: int, detail: str, *, pop_id: str, request_id: str, close: bool = False
) -> tuple[ResponseHead, bytes]:
    """Head and body of an edge-generated error. The body names the status, the cause and the
    request id so an operator can find the log line from what a user pastes."""
    body = (
        f"{status} {reason(status).decode()}\n{detail}\npop: {pop_id}\nrequest-id: {request_id}\n"
    ).encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return ResponseHead(status, headers, reason(status)), body
