"""Differential tests: h11.Connection(CLIENT) and h1fast_client.FastClientConnection must agree.

Both are driven by the same small client (`_drive`): send a request (whole, or only its head when
`early`, the rest after the response), feed the response bytes in the given pieces, take events
until NEED_DATA / PAUSED / an error, and when a response is complete start the next cycle and
send a plain GET (so pipelined and trailing bytes are parsed as the next response). Everything
observable goes into a trace: every event with all its fields (Data not joined: both must split
bodies at the same points), errors with their type, message and status hint, both states after
each step, the exact bytes sent, trailing data. The two traces must be equal.

Inputs: a hand-written corpus of responses (valid ones, framing edge cases, malformed heads and
bodies), each fed whole and one byte at a time, with and without EOF, with a large and a tiny
`max_incomplete_event_size`, answering several kinds of request (GET, HEAD, POST with a length
or chunked, CONNECT, Upgrade, Connection: close); hypothesis-generated mutations of the valid
responses and generated heads. The send side is compared on scripted and generated requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import h11
import pytest
from differential_helpers import (
    NASTY,
    Trace,
    bytewise,
    mutated,
    pieces,
    protocol_error,
    send_events,
    states,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.http.h1fast import plain_fields
from edgeproxy.http.h1fast_client import FastClientConnection


def _h11(max_size: int) -> Any:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=max_size)


def _fast(max_size: int) -> Any:
    return FastClientConnection(max_incomplete_event_size=max_size)


def _resp(head: bytes, body: bytes = b"") -> bytes:
    """A response from '|'-separated head lines, CRLF line endings, final blank line."""
    return b"\r\n".join(head.split(b"|")) + b"\r\n\r\n" + body


def _chunked(chunks: bytes, extra: bytes = b"") -> bytes:
    return _resp(b"HTTP/1.1 200 OK|Transfer-Encoding: chunked" + extra) + chunks


OK = _resp(b"HTTP/1.1 200 OK|Content-Length: 2", b"ok")

NGINX = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Length: 14\r\n"
    b"Last-Modified: Sun, 31 Dec 2023 10:00:00 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6590a6d8-e"\r\n'
    b"Cache-Control: public, max-age=60\r\n"
    b"Set-Cookie: a=1; Path=/; HttpOnly\r\n"
    b"Set-Cookie: b=2; Path=/; Secure\r\n"
    b"Accept-Ranges: bytes\r\n\r\n"
    b"hello, world!\n"
)

# name -> raw response bytes. Valid responses first (they also seed the mutation tests), then
# edge cases and malformed ones. Expected verdicts are not written down: h11's are the oracle.
VALID: dict[str, bytes] = {
    "cl": _resp(b"HTTP/1.1 200 OK|Content-Length: 5|Content-Type: text/plain", b"hello"),
    "cl_zero": _resp(b"HTTP/1.1 200 OK|Content-Length: 0"),
    "cl_big": _resp(b"HTTP/1.1 200 OK|Content-Length: 300", bytes(range(256)) + b"x" * 44),
    "nginx": NGINX,
    "chunked": _chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "chunked_ext": _chunked(b'5;name=val\r\nhello\r\n3;x;y="q"\r\nabc\r\n0;last\r\n\r\n'),
    "chunked_trailers": _chunked(b"3\r\nabc\r\n0\r\nX-Checksum: 1234\r\nX-Other: v\r\n\r\n"),
    "chunked_hex": _chunked(b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n"),
    "close_delimited_10": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited",
    "close_delimited_11": _resp(b"HTTP/1.1 200 OK|X-A: b", b"until the end"),
    "http10_cl": _resp(b"HTTP/1.0 200 OK|Content-Length: 3", b"abc"),
    "http10_keepalive": _resp(b"HTTP/1.0 200 OK|Connection: keep-alive|Content-Length: 3", b"abc"),
    "conn_close": _resp(b"HTTP/1.1 200 OK|Connection: close|Content-Length: 3", b"bye"),
    "conn_close_list": _resp(b"HTTP/1.1 200 OK|Connection: Keep-Alive, Close|Content-Length: 0"),
    "no_content": _resp(b"HTTP/1.1 204 No Content|Date: x"),
    "not_modified": _resp(b'HTTP/1.1 304 Not Modified|ETag: "x"'),
    "not_modified_cl": _resp(b'HTTP/1.1 304 Not Modified|ETag: "x"|Content-Length: 100'),
    "no_content_cl": _resp(b"HTTP/1.1 204 No Content|Content-Length: 5"),
    "no_content_te": _resp(b"HTTP/1.1 204 No Content|Transfer-Encoding: chunked"),
    "continue_then_ok": _resp(b"HTTP/1.1 100 Continue") + OK,
    "early_hints": _resp(b"HTTP/1.1 103 Early Hints|Link: </a.css>; rel=preload") + OK,
    "several_1xx": _resp(b"HTTP/1.1 100 Continue") + _resp(b"HTTP/1.1 102 Processing") + OK,
    "switching": _resp(
        b"HTTP/1.1 101 Switching Protocols|Upgrade: websocket|Connection: Upgrade",
        b"\x81\x05hello-raw",
    ),
    "switching_bare": _resp(b"HTTP/1.1 101 Switching Protocols", b"RAW"),
    "pipelined_two": OK + _resp(b"HTTP/1.1 404 Not Found|Content-Length: 4", b"nope"),
    "pipelined_chunked_cl": _chunked(b"2\r\nhi\r\n0\r\n\r\n") + OK + OK,
    "reason_missing": _resp(b"HTTP/1.1 200|Content-Length: 0"),
    "reason_empty": _resp(b"HTTP/1.1 200 |Content-Length: 0"),
    "reason_spaces": _resp(b"HTTP/1.1 200  OK  then \t more |Content-Length: 0"),
    "reason_obs_text": _resp(b"HTTP/1.1 200 Tr\xe8s bien|Content-Length: 0"),
    "status_999": _resp(b"HTTP/1.1 999 Weird|Content-Length: 0"),
    "status_500": _resp(b"HTTP/1.1 500 Internal Server Error|Content-Length: 5", b"error"),
    "version_20": _resp(b"HTTP/2.0 200 OK|Content-Length: 0"),
    "many_headers": _resp(
        b"HTTP/1.1 200 OK|"
        + b"|".join(b"X-H%d: v%d" % (i, i) for i in range(120))
        + b"|Content-Length: 0"
    ),
    "long_value": _resp(b"HTTP/1.1 200 OK|X-Long: " + b"v" * 3000 + b"|Content-Length: 0"),
    "value_obs_text": _resp(b"HTTP/1.1 200 OK|X-A: caf\xc3\xa9 \xff\x80|Content-Length: 0"),
    "value_ows": _resp(b"HTTP/1.1 200 OK|X-A:  \t padded \t |X-B:|X-C: |Content-Length: 0"),
    "te_capital": _chunked(b"0\r\n\r\n").replace(b"chunked", b"Chunked"),
    "cl_leading_zeros": _resp(b"HTTP/1.1 200 OK|Content-Length: 003", b"abc"),
    "lowercase_names": _resp(b"HTTP/1.1 200 OK|content-length: 3|connection: keep-alive", b"abc"),
}

EDGE: dict[str, bytes] = {
    # -- stream edges ------------------------------------------------------------------------
    "empty": b"",
    "head_incomplete": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
    "line_incomplete": b"HTTP/1.1 200 O",
    "cl_short": _resp(b"HTTP/1.1 200 OK|Content-Length: 10", b"short"),
    "cl_long": _resp(b"HTTP/1.1 200 OK|Content-Length: 2", b"okEXTRA"),
    "after_close": _resp(b"HTTP/1.1 200 OK|Connection: close|Content-Length: 0") + OK,
    "after_http10": _resp(b"HTTP/1.0 200 OK|Content-Length: 0") + OK,
    "pipelined_garbage": OK + b"\x00\x01garbage\r\n\r\n",
    "leading_crlf": b"\r\n" + OK,
    "leading_lf": b"\n" + OK,
    "leading_space": b" " + OK,
    "only_cr": b"\r",
    "tls_alert": b"\x15\x03\x01\x00\x02\x02\x28",
    "garbage": b"SPDY/9 banana\r\n\r\n",
    "html_instead": b"<html><body>hi</body></html>\r\n\r\n",
    "huge_head": _resp(
        b"HTTP/1.1 200 OK|" + b"|".join(b"X-Big-%d: %s" % (i, b"b" * 1000) for i in range(80))
    )
    + b"rest",
    # -- status line -------------------------------------------------------------------------
    "lower_http": _resp(b"http/1.1 200 OK|Content-Length: 0"),
    "two_spaces": _resp(b"HTTP/1.1  200 OK|Content-Length: 0"),
    "no_space_reason": _resp(b"HTTP/1.1 200OK|Content-Length: 0"),
    "tab_separator": _resp(b"HTTP/1.1\t200 OK|Content-Length: 0"),
    "status_2_digits": _resp(b"HTTP/1.1 20 OK|Content-Length: 0"),
    "status_4_digits": _resp(b"HTTP/1.1 2000 OK|Content-Length: 0"),
    "status_099": _resp(b"HTTP/1.1 099 Low|Content-Length: 0"),
    "status_000": _resp(b"HTTP/1.1 000 Zero"),
    "status_letters": _resp(b"HTTP/1.1 2x0 OK|Content-Length: 0"),
    "version_12": _resp(b"HTTP/1.2 200 OK|Content-Length: 0"),
    "version_09": _resp(b"HTTP/0.9 200 OK|Content-Length: 0"),
    "version_10_digits": _resp(b"HTTP/1.10 200 OK|Content-Length: 0"),
    "version_missing": _resp(b"200 OK|Content-Length: 0"),
    "reason_nul": _resp(b"HTTP/1.1 200 O\x00K|Content-Length: 0"),
    "reason_cr": _resp(b"HTTP/1.1 200 O\rK|Content-Length: 0"),
    "reason_vt": _resp(b"HTTP/1.1 200 O\x0bK|Content-Length: 0"),
    "reason_ctl": _resp(b"HTTP/1.1 200 O\x01K\x7f|Content-Length: 0"),
    "status_line_bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    # -- 1xx, 101, CONNECT ---------------------------------------------------------------------
    "continue_cl": _resp(b"HTTP/1.1 100 Continue|Content-Length: 5") + OK,
    "continue_close": _resp(b"HTTP/1.1 100 Continue|Connection: close") + OK,
    "continue_bad_cl": _resp(b"HTTP/1.1 100 Continue|Content-Length: x") + OK,
    "continue_only": _resp(b"HTTP/1.1 100 Continue"),
    "switching_then_more": _resp(b"HTTP/1.1 101 Switching|Upgrade: x") + OK,
    "switching_after_continue": _resp(b"HTTP/1.1 100 Continue")
    + _resp(b"HTTP/1.1 101 Switching|Upgrade: x", b"RAW"),
    "connect_ok_with_bytes": _resp(b"HTTP/1.1 200 Connection Established", b"\x16\x03\x01tls"),
    "connect_refused": _resp(b"HTTP/1.1 407 Proxy Auth|Content-Length: 4", b"auth") + OK,
    "connect_ok_cl": _resp(b"HTTP/1.1 200 OK|Content-Length: 5", b"hello"),
    # -- field syntax ------------------------------------------------------------------------
    "space_before_colon": _resp(b"HTTP/1.1 200 OK|Content-Length : 0"),
    "tab_before_colon": _resp(b"HTTP/1.1 200 OK|X-A\t: b|Content-Length: 0"),
    "no_colon": _resp(b"HTTP/1.1 200 OK|NoColonHere|Content-Length: 0"),
    "empty_name": _resp(b"HTTP/1.1 200 OK|: value|Content-Length: 0"),
    "bad_name_char": _resp(b"HTTP/1.1 200 OK|X(y): v|Content-Length: 0"),
    "name_obs_text": _resp(b"HTTP/1.1 200 OK|X\xe9: v|Content-Length: 0"),
    "value_inner_ws": _resp(b"HTTP/1.1 200 OK|X-A: a \t b    c|Content-Length: 0"),
    "value_colons": _resp(b"HTTP/1.1 200 OK|X-A: b: c::d|Content-Length: 0"),
    "value_nul": _resp(b"HTTP/1.1 200 OK|X-A: a\x00b|Content-Length: 0"),
    "value_cr": _resp(b"HTTP/1.1 200 OK|X-A: a\rb|Content-Length: 0"),
    "value_lf": _resp(b"HTTP/1.1 200 OK|X-A: a\nb|Content-Length: 0"),
    "value_lf_fold": _resp(b"HTTP/1.1 200 OK|X-A: a\n b|Content-Length: 0"),
    "value_ctl": _resp(b"HTTP/1.1 200 OK|X-A: a\x01b\x1fc|Content-Length: 0"),
    "value_del": _resp(b"HTTP/1.1 200 OK|X-A: a\x7fb|Content-Length: 0"),
    "value_vt": _resp(b"HTTP/1.1 200 OK|X-A: a\x0bb|Content-Length: 0"),
    "value_ff": _resp(b"HTTP/1.1 200 OK|X-A: \x0c|Content-Length: 0"),
    "obs_fold": _resp(b"HTTP/1.1 200 OK|X-A: first| second|\tthird|Content-Length: 0"),
    "obs_fold_first": _resp(b"HTTP/1.1 200 OK| X-A: b|Content-Length: 0"),
    "obs_fold_cl": _resp(b"HTTP/1.1 200 OK|Content-Length:| 3", b"abc"),
    "bare_lf": b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok",
    "bare_lf_mixed": b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-A: b\r\n\nok",
    "cr_cr_lf": b"HTTP/1.1 200 OK\r\r\nContent-Length: 0\r\n\r\n",
    "lf_cr_lf_end": b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    # -- Content-Length ------------------------------------------------------------------------
    "cl_duplicate_same": _resp(b"HTTP/1.1 200 OK|Content-Length: 3|Content-Length: 3", b"abc"),
    "cl_conflict": _resp(b"HTTP/1.1 200 OK|Content-Length: 3|Content-Length: 4", b"abcd"),
    "cl_list_same": _resp(b"HTTP/1.1 200 OK|Content-Length: 3, 3", b"abc"),
    "cl_list_conflict": _resp(b"HTTP/1.1 200 OK|Content-Length: 3, 4", b"abcd"),
    "cl_plus": _resp(b"HTTP/1.1 200 OK|Content-Length: +3", b"abc"),
    "cl_minus": _resp(b"HTTP/1.1 200 OK|Content-Length: -3", b"abc"),
    "cl_ws": _resp(b"HTTP/1.1 200 OK|Content-Length:  3 \t", b"abc"),
    "cl_inner_space": _resp(b"HTTP/1.1 200 OK|Content-Length: 1 2", b"abc"),
    "cl_hex": _resp(b"HTTP/1.1 200 OK|Content-Length: 0x3", b"abc"),
    "cl_empty": _resp(b"HTTP/1.1 200 OK|Content-Length:", b"abc"),
    "cl_20_digits": _resp(b"HTTP/1.1 200 OK|Content-Length: 00000000000000000003", b"abc"),
    "cl_21_digits": _resp(b"HTTP/1.1 200 OK|Content-Length: 000000000000000000003", b"abc"),
    "cl_huge": _resp(b"HTTP/1.1 200 OK|Content-Length: 99999999999999999999", b"abc"),
    "cl_comma_only": _resp(b"HTTP/1.1 200 OK|Content-Length: ,", b"abc"),
    "cl_unicode_digit": _resp(b"HTTP/1.1 200 OK|Content-Length: \xd9\xa3", b"abc"),
    # -- Transfer-Encoding ---------------------------------------------------------------------
    "cl_and_te": _resp(
        b"HTTP/1.1 200 OK|Content-Length: 3|Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"
    ),
    "te_and_cl": _resp(
        b"HTTP/1.1 200 OK|Transfer-Encoding: chunked|Content-Length: 30", b"3\r\nabc\r\n0\r\n\r\n"
    ),
    "te_double_value": _chunked(b"0\r\n\r\n").replace(b"chunked", b"chunked, chunked"),
    "te_two_headers": _chunked(b"0\r\n\r\n", b"|Transfer-Encoding: chunked"),
    "te_gzip": _resp(b"HTTP/1.1 200 OK|Transfer-Encoding: gzip", b"abc"),
    "te_gzip_chunked": _resp(b"HTTP/1.1 200 OK|Transfer-Encoding: gzip, chunked", b"0\r\n\r\n"),
    "te_identity": _resp(b"HTTP/1.1 200 OK|Transfer-Encoding: identity", b"abc"),
    "te_upper": _chunked(b"0\r\n\r\n").replace(b"chunked", b"CHUNKED"),
    "te_leading_space": _chunked(b"0\r\n\r\n").replace(b": chunked", b":   chunked"),
    "te_trailing_space": _chunked(b"0\r\n\r\n").replace(b": chunked", b": chunked  "),
    "te_tab": _chunked(b"0\r\n\r\n").replace(b": chunked", b":\tchunked\t"),
    "te_vt": _chunked(b"0\r\n\r\n").replace(b": chunked", b":\x0bchunked"),
    "te_space_colon": _chunked(b"0\r\n\r\n").replace(b"Transfer-Encoding:", b"Transfer-Encoding :"),
    "te_underscore": _chunked(b"0\r\n\r\n").replace(b"Transfer-Encoding", b"Transfer_Encoding"),
    "te_xchunked": _chunked(b"0\r\n\r\n").replace(b"chunked", b"xchunked"),
    "te_comma_empty": _chunked(b"0\r\n\r\n").replace(b"chunked", b"chunked,"),
    "te_obs_fold": _resp(b"HTTP/1.1 200 OK|Transfer-Encoding:| chunked", b"0\r\n\r\n"),
    "te_http10": _resp(b"HTTP/1.0 200 OK|Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
    # -- chunked bodies ------------------------------------------------------------------------
    "chunk_size_invalid_hex": _chunked(b"G\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_empty": _chunked(b"\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_leading_space": _chunked(b" 5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_trailing_ws": _chunked(b"5 \t\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_0x": _chunked(b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_plus": _chunked(b"+5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_20_digits": _chunked(b"00000000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_21_digits": _chunked(b"000000000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_huge": _chunked(b"FFFFFFFFFFFFFFFFFFFF\r\nhello"),
    "chunk_size_bare_lf": _chunked(b"5\nhello\r\n0\r\n\r\n"),
    "chunk_size_long_line": _chunked(b"5;" + b"e" * 200 + b"\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_space": _chunked(b"5 ; a = b\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_weird": _chunked(b"5;\x01\x7f\xff\r\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_cr": _chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_lf": _chunked(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    "chunk_data_too_long": _chunked(b"5\r\nhelloX\r\n0\r\n\r\n"),
    "chunk_missing_crlf": _chunked(b"5\r\nhello0\r\n\r\n"),
    "chunk_lf_only_after_data": _chunked(b"5\r\nhello\n0\r\n\r\n"),
    "chunk_cr_x_after_data": _chunked(b"5\r\nhello\rX0\r\n\r\n"),
    "chunk_missing_final_crlf": _chunked(b"5\r\nhello\r\n0\r\n"),
    "chunk_last_lf_only": _chunked(b"5\r\nhello\r\n0\r\n\n"),
    "chunk_trailer_obs_fold": _chunked(b"0\r\nX-T: a\r\n b\r\n\r\n"),
    "chunk_trailer_fold_first": _chunked(b"0\r\n b\r\n\r\n"),
    "chunk_trailer_bad": _chunked(b"0\r\nX T: a\r\n\r\n"),
    "chunk_trailer_bad_folded": _chunked(b"0\r\nX-T: a\r\n \x00\r\n\r\n"),
    "chunk_trailer_cl_conflict": _chunked(b"0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
    "chunk_trailer_te": _chunked(b"0\r\nTransfer-Encoding: gzip\r\n\r\n"),
    "chunk_trailer_bare_lf": _chunked(b"0\r\nX-T: a\nX-U: b\n\n"),
    "chunk_trailer_huge": _chunked(b"0\r\n" + b"X-T: " + b"t" * 300 + b"\r\n\r\n"),
    "chunk_then_pipelined": _chunked(b"1\r\na\r\n0\r\n\r\n") + OK,
    "chunk_lowercase_hex_big": _chunked(b"1f\r\n" + b"z" * 31 + b"\r\n0\r\n\r\n"),
    "chunk_eof_mid_data": _chunked(b"5\r\nhel"),
}

CORPUS: dict[str, bytes] = {**VALID, **EDGE}


# -- the requests the responses answer ---------------------------------------------------------


def _request(
    method: bytes = b"GET", target: bytes = b"/", *extra: tuple[bytes, bytes]
) -> h11.Request:
    return h11.Request(method=method, target=target, headers=[(b"Host", b"o.test"), *extra])


REQUESTS: dict[str, list[Any]] = {
    "get": [_request(), h11.EndOfMessage()],
    "head": [_request(b"HEAD"), h11.EndOfMessage()],
    "post_cl": [
        _request(b"POST", b"/u", (b"Content-Length", b"5")),
        h11.Data(data=b"hel"),
        h11.Data(data=b"lo"),
        h11.EndOfMessage(),
    ],
    "post_chunked": [
        _request(b"POST", b"/u", (b"Transfer-Encoding", b"chunked")),
        h11.Data(data=b"abc"),
        h11.Data(data=b""),
        h11.EndOfMessage(headers=[(b"X-Sum", b"1")]),
    ],
    "connect": [_request(b"CONNECT", b"o.test:443"), h11.EndOfMessage()],
    "upgrade": [
        _request(b"GET", b"/ws", (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")),
        h11.EndOfMessage(),
    ],
    "close": [_request(b"GET", b"/", (b"Connection", b"close")), h11.EndOfMessage()],
    "expect": [
        _request(b"POST", b"/e", (b"Content-Length", b"2"), (b"Expect", b"100-continue")),
        h11.Data(data=b"hi"),
        h11.EndOfMessage(),
    ],
}


# -- the shared driver ----------------------------------------------------------------------



def _fields(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(bytes(k), bytes(v)) for k, v in headers.raw_items()]


def _event(ev: Any) -> tuple[Any, ...]:
    """Everything about an event, with bytearrays (h11) and bytes (ours) made comparable."""
    t = type(ev)
    if t is h11.Response or t is h11.InformationalResponse:
        assert type(ev.status_code) is int
        return (
            t.__name__,
            ev.status_code,
            bytes(ev.reason),
            bytes(ev.http_version),
            [(bytes(k), bytes(v)) for k, v in ev.headers],
            _fields(ev.headers),
        )
    if t is h11.Data:
        return ("Data", bytes(ev.data), ev.chunk_start, ev.chunk_end)
    if t is h11.EndOfMessage:
        return ("EndOfMessage", _fields(ev.headers))
    if t is h11.ConnectionClosed:
        return ("ConnectionClosed",)
    raise AssertionError(f"unexpected event {ev!r}")


def _drive(
    factory: Any,
    request: Sequence[Any],
    chunks: Sequence[bytes],
    *,
    eof: bool = True,
    max_size: int = 16384,
    early: bool = False,
) -> list[tuple[Any, ...]]:
    """The mini client. `early`: send only the request head before the response arrives (as
    the origin client does while an upload is under way), the rest once the response is in."""
    conn = factory(max_size)
    trace = Trace()
    pending = list(request[1:]) if early else []
    send_events(conn, trace, request[:1] if early else request)
    cycles = 0

    def finish_request() -> None:
        if pending:
            send_events(conn, trace, pending)
            pending.clear()

    def next_cycle() -> None:
        nonlocal cycles
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE and cycles < 3:
            conn.start_next_cycle()
            cycles += 1
            trace.add("next-cycle", states(conn))
            send_events(conn, trace, REQUESTS["get"])

    def pump() -> bool:
        """Events until more data is needed (True) or the conversation cannot go on (False)."""
        for _ in range(10_000):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                trace.add("error", protocol_error(e), states(conn))
                # Once in ERROR, every later call fails the same way.
                with pytest.raises(h11.RemoteProtocolError) as again:
                    conn.next_event()
                trace.add("error-again", protocol_error(again.value), states(conn))
                return False
            if event is h11.NEED_DATA:
                trace.add("need-data", states(conn))
                return True
            if event is h11.PAUSED:
                trace.add("paused", states(conn), conn.trailing_data)
                if conn.their_state is h11.DONE and pending:
                    finish_request()
                    next_cycle()
                    if conn.their_state is h11.IDLE:
                        continue
                return False
            trace.add("event", _event(event), states(conn), conn.their_http_version)
            if isinstance(event, h11.EndOfMessage):
                finish_request()
                next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                trace.add("again", _event(conn.next_event()), states(conn))
                return False
        raise AssertionError("no progress after 10000 events")

    for chunk in [*chunks, *([b""] if eof else [])]:
        conn.receive_data(chunk)
        if not pump():
            break
    trace.add(
        "end",
        conn.trailing_data,
        states(conn),
        conn.their_http_version,
        conn.client_is_waiting_for_100_continue,
        conn.they_are_waiting_for_100_continue,
    )
    return trace.items


def _assert_agree(request: str, chunks: Sequence[bytes], **kw: Any) -> list[tuple[Any, ...]]:
    events = REQUESTS[request]
    expected = _drive(_h11, events, chunks, **kw)
    got = _drive(_fast, events, chunks, **kw)
    assert got == expected, (
        f"h11 and h1fast_client disagree on {b''.join(chunks)!r} ({request}, {kw})"
    )
    return expected


# -- the corpus ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_agrees(name: str) -> None:
    data = CORPUS[name]
    for request in REQUESTS:
        for eof in (False, True):
            _assert_agree(request, [data], eof=eof)
        _assert_agree(request, [data], max_size=48)
        _assert_agree(request, bytewise(data))
    for request in ("get", "post_cl", "post_chunked", "expect", "upgrade"):
        _assert_agree(request, [data], early=True)
        _assert_agree(request, bytewise(data), early=True, max_size=48)
    _assert_agree("get", bytewise(data), eof=False, max_size=48)


@pytest.mark.parametrize(
    "name",
    ["nginx", "chunked_trailers", "pipelined_two", "switching", "obs_fold", "close_delimited_10"],
)
def test_every_split_point_agrees(name: str) -> None:
    data = CORPUS[name]
    for i in range(len(data) + 1):
        _assert_agree("get", [data[:i], data[i:]], max_size=64)


def test_corpus_verdicts_are_the_expected_ones() -> None:
    """Spot checks that the oracle says what we think, so the corpus covers what it claims."""

    def outcome(name: str, request: str = "get", eof: bool = False) -> Any:
        trace = _drive(_h11, REQUESTS[request], [CORPUS[name]], eof=eof)
        errors = [item[1][2] for item in trace if item[0] == "error"]
        return errors[0] if errors else "ok"

    for name in VALID:
        if not name.startswith("switching"):
            assert outcome(name) == "ok", name
    assert outcome("switching", "upgrade") == "ok"
    expected = {
        "te_gzip": 501,
        "te_double_value": 501,
        "cl_conflict": 400,
        "cl_plus": 400,
        "two_spaces": 400,
        "space_before_colon": 400,
        "value_nul": 400,
        "chunk_size_invalid_hex": 400,
        "leading_crlf": 400,
        "status_099": 400,
        "switching": 400,  # a 101 nobody asked for
        "obs_fold": "ok",
        "bare_lf": "ok",
        "value_ctl": "ok",
        "cl_list_same": "ok",
        "te_capital": "ok",
        "cl_and_te": "ok",
        "version_12": "ok",
        "reason_ctl": "ok",
    }
    assert {name: outcome(name) for name in expected} == expected
    assert outcome("empty", eof=True) == 400  # EOF while waiting for the response
    # A close-delimited body ends at EOF (the driver's next request then fails: no response).
    trace = _drive(_h11, REQUESTS["get"], [CORPUS["close_delimited_11"]])
    assert ("event", ("EndOfMessage", []), ("DONE", "DONE"), b"1.1") in trace
    # A head that is still incomplete when it outgrows the limit is a 431; a complete one is not.
    trace = _drive(_h11, REQUESTS["get"], bytewise(CORPUS["huge_head"]), max_size=65536)
    assert any(t[0] == "error" and t[1][2] == 431 for t in trace)
    assert outcome("huge_head") == "ok"


def test_fast_path_taken_for_ordinary_heads() -> None:
    """The speed comes from the llhttp path: ordinary heads must not fall back to h11."""
    for name in (
        "cl",
        "nginx",
        "chunked",
        "close_delimited_10",
        "conn_close",
        "no_content",
        "not_modified_cl",
        "continue_then_ok",
        "switching",
        "reason_missing",
        "reason_empty",
        "reason_obs_text",
        "reason_ctl",
        "status_999",
        "version_20",
        "value_obs_text",
        "value_ows",
        "te_capital",
        "many_headers",
    ):
        data = CORPUS[name]
        head = data[: data.index(b"\r\n\r\n") + 4]
        assert FastClientConnection()._fast_head(head) is not None, name


def test_llhttp_is_as_strict_as_assumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed httptools passes the import-time probe (else every head that is not plain
    would go to h11), and with llhttp switched off the results are still h11's: plain heads are
    tokenised in C (when built), the others go to h11."""
    from edgeproxy.http import h1fast_client

    assert h1fast_client._LLHTTP_STRICT
    monkeypatch.setattr(h1fast_client, "_LLHTTP_STRICT", False)
    built = plain_fields(OK[:-2]) is not None
    assert (FastClientConnection()._fast_head(OK[:-2]) is not None) == built
    assert FastClientConnection()._fast_head(b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n") is None
    for name in (
        "nginx",
        "chunked_trailers",
        "pipelined_two",
        "te_gzip",
        "value_ctl",
        "status_099",
    ):
        _assert_agree("get", [CORPUS[name]])
    _assert_agree("upgrade", [CORPUS["switching"]])


def test_huge_response_head_limits() -> None:
    """The head limit applies to an incomplete head only, exactly as in h11 (both ways)."""
    data = CORPUS["huge_head"]
    for max_size in (1024, 65536, 100_000):
        _assert_agree("get", [data], max_size=max_size)
        _assert_agree("get", [data[:70_000], data[70_000:]], max_size=max_size)
        _assert_agree(
            "get", [data[i : i + 4096] for i in range(0, len(data), 4096)], max_size=max_size
        )


# -- generated inputs ------------------------------------------------------------------------

_SEEDS = [VALID[name] for name in sorted(VALID)]
_NASTY = [
    *NASTY,
    b"Connection: close\r\n",
    b"HTTP/1.1 ",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"101",
]


_FIELD_NAMES = [
    b"Content-Length",
    b"content-length",
    b"Transfer-Encoding",
    b"TRANSFER-ENCODING",
    b"Connection",
    b"Upgrade",
    b"Host",
    b"X-A",
    b"Set-Cookie",
]
_FIELD_VALUES = [
    b"a",
    b"5",
    b"0",
    b" 3 ",
    b"3, 3",
    b"3,4",
    b"chunked",
    b"Chunked",
    b"gzip, chunked",
    b"close",
    b"keep-alive",
    b"upgrade",
    b"",
    b"  ",
    b"a\tb",
    b"a\x01b",
    b"\x80\xff",
    b"+1",
    b"x\x00",
    b"a\rb",
]


@st.composite
def _generated_response(draw: st.DrawFn) -> bytes:
    version = draw(
        st.sampled_from(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"http/1.1", b"HTTP/1.1 "]
        )
    )
    status = draw(
        st.sampled_from(
            [b"200", b"204", b"304", b"100", b"101", b"103", b"404", b"999", b"099", b"20", b"2000"]
        )
    )
    reason = draw(st.sampled_from([b" OK", b"", b" ", b" Not\tFound", b" \x01", b"\t x"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    fields = draw(
        st.lists(
            st.tuples(st.sampled_from(_FIELD_NAMES), st.sampled_from(_FIELD_VALUES)), max_size=6
        )
    )
    sep = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
    lines = [version + b" " + status + reason] + [n + sep + v for n, v in fields]
    body = draw(
        st.sampled_from(
            [
                b"",
                b"abc",
                b"3\r\nabc\r\n0\r\n\r\n",
                b"0\r\n\r\n",
                b"5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
            ]
        )
    )
    tail = draw(st.sampled_from([b"", OK, b"garbage", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    return eol.join(lines) + eol + eol + body + tail


_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(data=st.data(), raw=mutated(_SEEDS, _NASTY))
def test_mutated_responses_agree(data: st.DataObject, raw: bytes) -> None:
    _assert_agree(
        data.draw(st.sampled_from(sorted(REQUESTS))),
        data.draw(pieces(raw)),
        eof=data.draw(st.booleans()),
        max_size=data.draw(st.sampled_from([16384, 200, 40])),
        early=data.draw(st.booleans()),
    )


@_settings
@given(data=st.data(), raw=_generated_response())
def test_generated_responses_agree(data: st.DataObject, raw: bytes) -> None:
    _assert_agree(
        data.draw(st.sampled_from(sorted(REQUESTS))),
        data.draw(pieces(raw)),
        eof=data.draw(st.booleans()),
        early=data.draw(st.booleans()),
    )


@settings(max_examples=400, deadline=None)
@given(raw=st.binary(max_size=300), eof=st.booleans())
def test_arbitrary_bytes_only_raise_protocol_errors(raw: bytes, eof: bool) -> None:
    # _drive lets any exception other than a ProtocolError escape, failing the test.
    _assert_agree("get", [raw], eof=eof)
    _assert_agree("get", [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + raw], eof=eof)
    _assert_agree("get", [b"HTTP/1.1 200 OK\r\n" + raw], eof=eof)


# -- the send side ---------------------------------------------------------------------------


def _script(
    factory: Any, events: Sequence[Any], *, response: bytes = b"", then: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Sends `events`, reads `response` (if any) to its end, then, if the connection can be
    reused, starts the next cycle and sends `then`."""
    conn = factory(16384)
    trace = Trace()
    send_events(conn, trace, events)
    if response:
        conn.receive_data(response)
        for _ in range(100):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                trace.add("error", protocol_error(e), states(conn))
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                trace.add(repr(event), states(conn))
                break
            trace.add("event", _event(event), states(conn))
            if isinstance(event, h11.EndOfMessage):
                break
    trace.add(
        "after-send", states(conn), conn.trailing_data, conn.client_is_waiting_for_100_continue
    )
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        trace.add("next-cycle", states(conn))
        send_events(conn, trace, then)
    else:
        with pytest.raises(h11.LocalProtocolError) as err:
            conn.start_next_cycle()
        trace.add("no-next-cycle", protocol_error(err.value))
    return trace.items


_EOM = h11.EndOfMessage()
_GET = REQUESTS["get"]

SEND_CASES: dict[str, tuple[list[Any], bytes]] = {
    "get": (_GET, OK),
    "host_first": (
        [
            h11.Request(
                method=b"GET",
                target=b"/a?b=c",
                headers=[(b"X-A", b"1"), (b"Host", b"h"), (b"X-B", b"2")],
            ),
            _EOM,
        ],
        OK,
    ),
    "header_case_kept": (
        [_request(b"GET", b"/", (b"X-CamelCase", b"v"), (b"content-LENGTH", b"0")), _EOM],
        OK,
    ),
    "post_cl": (REQUESTS["post_cl"], OK),
    "post_chunked_trailers": (REQUESTS["post_chunked"], OK),
    "post_chunked_no_trailers": (
        [
            _request(b"POST", b"/", (b"Transfer-Encoding", b"chunked")),
            h11.Data(data=b"x" * 300),
            _EOM,
        ],
        OK,
    ),
    "te_and_cl": (
        [
            _request(b"POST", b"/", (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")),
            h11.Data(data=b"hello"),
            _EOM,
        ],
        OK,
    ),
    "cl_list": (
        [_request(b"PUT", b"/", (b"Content-Length", b"2, 2")), h11.Data(data=b"ab"), _EOM],
        OK,
    ),
    "too_much_data": (
        [_request(b"POST", b"/", (b"Content-Length", b"3")), h11.Data(data=b"abcd")],
        b"",
    ),
    "too_little_data": (
        [_request(b"POST", b"/", (b"Content-Length", b"3")), h11.Data(data=b"ab"), _EOM],
        b"",
    ),
    "cl_trailers": (
        [
            _request(b"POST", b"/", (b"Content-Length", b"0")),
            h11.EndOfMessage(headers=[(b"X", b"1")]),
        ],
        b"",
    ),
    "no_framing_data": ([_request(b"POST"), h11.Data(data=b"x")], b""),
    "http10_request": (
        [h11.Request(method=b"GET", target=b"/", headers=[], http_version=b"1.0")],
        OK,
    ),
    "request_twice": ([_request(), _request()], b""),
    "request_after_done": ([_request(), _EOM, _request()], OK),
    "data_before_request": ([h11.Data(data=b"x")], b""),
    "eom_before_request": ([_EOM], b""),
    "send_after_error": ([h11.Data(data=b"x"), _request()], b""),
    "closed_in_idle": ([h11.ConnectionClosed()], b""),
    "closed_after_done": ([_request(), _EOM], OK + b""),
    "closed_mid_body": (
        [_request(b"POST", b"/", (b"Content-Length", b"3")), h11.ConnectionClosed()],
        b"",
    ),
    "response_from_client": ([h11.Response(status_code=200, headers=[])], b""),
    "informational_from_client": ([h11.InformationalResponse(status_code=100, headers=[])], b""),
    "upgrade_response_from_client": (
        [
            _request(b"GET", b"/", (b"Upgrade", b"x")),
            _EOM,
            h11.Response(status_code=200, headers=[]),
        ],
        _resp(b"HTTP/1.1 101 Switching|Upgrade: x"),
    ),
    "connect": (REQUESTS["connect"], _resp(b"HTTP/1.1 200 OK", b"tunnel")),
    "connect_refused": (REQUESTS["connect"], _resp(b"HTTP/1.1 403 No|Content-Length: 0")),
    "upgrade_accepted": (REQUESTS["upgrade"], CORPUS["switching"]),
    "upgrade_declined": (REQUESTS["upgrade"], OK),
    "upgrade_empty_list": ([_request(b"GET", b"/", (b"Upgrade", b",")), _EOM], OK),
    "connect_and_upgrade": (
        [_request(b"CONNECT", b"a:1", (b"Upgrade", b"x")), _EOM],
        _resp(b"HTTP/1.1 101 S"),
    ),
    "close": (REQUESTS["close"], OK),
    "close_mixed_case": ([_request(b"GET", b"/", (b"Connection", b"x, CLOSE")), _EOM], OK),
    "expect": (REQUESTS["expect"], _resp(b"HTTP/1.1 100 Continue") + OK),
    "expect_head_only": (REQUESTS["expect"][:1], _resp(b"HTTP/1.1 100 Continue") + OK),
    "expect_http10_never": (
        [
            h11.Request(
                method=b"POST",
                target=b"/",
                headers=[(b"Expect", b"100-continue"), (b"Content-Length", b"0")],
                http_version=b"1.0",
            )
        ],
        b"",
    ),
    "head_response_with_length": (
        [_request(b"HEAD"), _EOM],
        _resp(b"HTTP/1.1 200 OK|Content-Length: 99"),
    ),
    "close_delimited_then_done": (_GET, b"HTTP/1.0 200 OK\r\n\r\nbody"),
}


@pytest.mark.parametrize("name", sorted(SEND_CASES))
def test_send_side_agrees(name: str) -> None:
    events, response = SEND_CASES[name]
    expected = _script(_h11, events, response=response, then=_GET)
    assert _script(_fast, events, response=response, then=_GET) == expected


def test_send_side_exact_bytes() -> None:
    """A few outputs written out, so a change that breaks both the same way is still caught."""
    trace = _script(_fast, REQUESTS["post_cl"])
    assert [t[2] for t in trace if t[0] == "sent"] == [
        b"POST /u HTTP/1.1\r\nHost: o.test\r\nContent-Length: 5\r\n\r\n",
        b"hel",
        b"lo",
        b"",
    ]
    trace = _script(_fast, REQUESTS["post_chunked"])
    assert [t[2] for t in trace if t[0] == "sent"] == [
        b"POST /u HTTP/1.1\r\nHost: o.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n",
        b"",
        b"0\r\nX-Sum: 1\r\n\r\n",
    ]
    trace = _script(_fast, SEND_CASES["host_first"][0])
    assert trace[0][2] == b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: 2\r\n\r\n"


def test_request_after_unsolicited_response() -> None:
    """The one input on which they differ: h11 0.16 crashes formatting its own error message
    (AttributeError); FastClientConnection raises the LocalProtocolError h11 meant to raise."""
    early = _resp(b"HTTP/1.1 408 Request Timeout|Content-Length: 0")
    fast = _fast(16384)
    fast.receive_data(early)
    assert isinstance(fast.next_event(), h11.Response)
    with pytest.raises(h11.LocalProtocolError):
        fast.send(_request())
    assert fast.our_state is h11.ERROR
    slow = _h11(16384)
    slow.receive_data(early)
    assert isinstance(slow.next_event(), h11.Response)
    with pytest.raises(AttributeError):
        slow.send(_request())
    assert slow.our_state is h11.ERROR


def test_unsolicited_response_in_idle_agrees() -> None:
    """A response before any request (an origin's 408 on an idle connection) is read by both."""
    for data in (OK, CORPUS["continue_then_ok"], CORPUS["chunked"], CORPUS["close_delimited_10"]):
        expected = _script(_h11, [], response=data)
        assert _script(_fast, [], response=data) == expected


_REQUEST_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Length",
                b"Transfer-Encoding",
                b"Connection",
                b"Host",
                b"Upgrade",
                b"Expect",
                b"X-A",
                b"content-length",
            ]
        ),
        st.sampled_from(
            [
                b"0",
                b"3",
                b"3, 3",
                b"chunked",
                b"close",
                b"keep-alive",
                b"Upgrade, close",
                b"websocket",
                b"100-continue",
                b"v",
            ]
        ),
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", b"OPTIONS", b"PURGE"]),
    version=st.sampled_from([b"1.1", b"1.1", b"1.0"]),
    fields=_REQUEST_FIELDS,
    body=st.lists(st.binary(max_size=8), max_size=3),
    trailers=st.booleans(),
    response=st.sampled_from(
        [
            OK,
            CORPUS["continue_then_ok"],
            CORPUS["switching"],
            CORPUS["conn_close"],
            CORPUS["chunked"],
            CORPUS["close_delimited_11"],
            _resp(b"HTTP/1.1 200 OK", b"tunnel"),
            b"",
        ]
    ),
)
def test_generated_requests_agree(
    method: bytes,
    version: bytes,
    fields: list[tuple[bytes, bytes]],
    body: list[bytes],
    trailers: bool,
    response: bytes,
) -> None:
    try:
        request = h11.Request(method=method, target=b"/", headers=fields, http_version=version)
    except h11.LocalProtocolError:
        return  # h11 refuses to build it (e.g. no Host); nothing to send
    events = [
        request,
        *(h11.Data(data=b) for b in body),
        h11.EndOfMessage(headers=[(b"X-T", b"1")] if trailers else []),
    ]
    expected = _script(_h11, events, response=response, then=_GET)
    assert _script(_fast, events, response=response, then=_GET) == expected


def test_send_failed_and_states_agree() -> None:
    for events in ([], _GET[:1], _GET, [h11.ConnectionClosed()]):
        traces = []
        for factory in (_h11, _fast):
            conn = factory(16384)
            trace = Trace()
            send_events(conn, trace, events)
            conn.send_failed()
            trace.add("failed", conn.states, states(conn))
            send_events(conn, trace, [h11.Data(data=b"x")])
            send_events(conn, trace, [None])
            traces.append(trace.items)
        assert traces[1] == traces[0]


# -- receive_whole: one whole response in one call ------------------------------------------

WHOLE_REQUESTS = ("get", "head", "close", "post_cl", "post_chunked", "upgrade", "connect")


def _after_whole(conn: Any, event: Any, body: bytes) -> tuple[Any, ...]:
    """What a caller can observe once a response was taken, including the next cycle."""
    out: list[Any] = [_event(event), body, states(conn), conn.their_http_version, conn.trailing_data]
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        out.append(states(conn))
    return tuple(out)


def _fast_whole(request: str, data: bytes) -> tuple[Any, ...] | None:
    conn = _fast(16384)
    send_events(conn, Trace(), REQUESTS[request])
    before = (states(conn), conn.trailing_data, conn.their_http_version)
    got = conn.receive_whole(data)
    if got is None:
        assert (states(conn), conn.trailing_data, conn.their_http_version) == before
        return None
    return _after_whole(conn, *got)


def _h11_whole(request: str, data: bytes) -> tuple[Any, ...]:
    conn = _h11(16384)
    send_events(conn, Trace(), REQUESTS[request])
    conn.receive_data(data)
    head = conn.next_event()
    body = b""
    while True:
        event = conn.next_event()
        if type(event) is h11.Data:
            body += bytes(event.data)
            continue
        assert type(event) is h11.EndOfMessage, event
        return _after_whole(conn, head, body)


def _assert_whole_agrees(request: str, data: bytes) -> bool:
    """receive_whole either declines, changing nothing, or gives exactly what h11 gives for the
    same bytes fed at once (Response, the Data joined, EndOfMessage) and leaves the same states."""
    got = _fast_whole(request, data)
    if got is None:
        return False
    assert got == _h11_whole(request, data), f"receive_whole disagrees with h11 on {data!r} ({request})"
    return True


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_receive_whole_agrees_on_the_corpus(name: str) -> None:
    for request in WHOLE_REQUESTS:
        _assert_whole_agrees(request, CORPUS[name])
        _assert_whole_agrees(request, CORPUS[name] + b"HTTP/1.1 200 OK\r\n\r\n")  # never taken


def test_receive_whole_takes_the_common_responses_only() -> None:
    for data in (VALID["cl"], VALID["cl_zero"], NGINX, _resp(b"HTTP/1.1 204 No Content"), _resp(b"HTTP/1.1 404 Not Found|Content-Length: 3", b"nop")):
        assert _assert_whole_agrees("get", data), data
    assert _assert_whole_agrees("head", _resp(b"HTTP/1.1 200 OK|Content-Length: 99"))
    for data in (
        VALID["cl"][:-1],  # body not all there
        VALID["cl"] + b"x",  # more than one response
        _chunked(b"3\r\nabc\r\n0\r\n\r\n"),
        _resp(b"HTTP/1.1 200 OK"),  # close-delimited
        _resp(b"HTTP/1.1 200 OK|Content-Length: 2|Connection: close", b"ok"),
        _resp(b"HTTP/1.0 200 OK|Content-Length: 2", b"ok"),
        _resp(b"HTTP/1.1 100 Continue") + VALID["cl"],
    ):
        assert not _assert_whole_agrees("get", data), data
    assert not _assert_whole_agrees("upgrade", _resp(b"HTTP/1.1 200 OK|Content-Length: 2", b"ok"))
    fast = _fast(16384)  # nothing was asked: nothing is taken
    assert fast.receive_whole(VALID["cl"]) is None


@_settings
@given(data=st.data(), raw=mutated(_SEEDS, _NASTY))
def test_receive_whole_agrees_on_mutated_responses(data: st.DataObject, raw: bytes) -> None:
    _assert_whole_agrees(data.draw(st.sampled_from(WHOLE_REQUESTS)), raw)


@_settings
@given(data=st.data(), raw=_generated_response())
def test_receive_whole_agrees_on_generated_responses(data: st.DataObject, raw: bytes) -> None:
    _assert_whole_agrees(data.draw(st.sampled_from(WHOLE_REQUESTS)), raw)


# -- send_bodiless: a bodiless request in one call ------------------------------------------

_REQ_NAMES = [b"Host", b"Accept", b"X-A", b"Connection", b"Upgrade", b"Expect", b"Content-Length", b"Transfer-Encoding", b"User-Agent"]
_REQ_VALUES = [b"a", b"close", b"keep-alive", b"websocket", b"100-continue", b"0", b"5", b"chunked", b""]


def _bodiless_agrees(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], *, second_cycle: bool) -> bool:
    items = [(raw, raw.lower(), value) for raw, value in fields]
    fast = _fast(16384)
    slow = _h11(16384)
    if second_cycle:  # the usual case: a keep-alive connection that served a response before
        for conn in (fast, slow):
            send_events(conn, Trace(), REQUESTS["get"])
            conn.receive_data(OK)
            while conn.next_event() is not h11.PAUSED and conn.their_state is not h11.DONE:
                pass
            conn.start_next_cycle()
    before = states(fast)
    out = fast.send_bodiless(method, target, items)
    if out is None:
        assert states(fast) == before
        return False
    expected = slow.send(h11.Request(method=method, target=target, headers=fields))
    expected = (expected or b"") + (slow.send(h11.EndOfMessage()) or b"")
    assert out == expected
    assert states(fast) == states(slow)
    assert fast.client_is_waiting_for_100_continue == slow.client_is_waiting_for_100_continue
    # Both then read the same response the same way.
    fast.receive_data(VALID["cl"])
    slow.receive_data(VALID["cl"])
    assert _event(fast.next_event()) == _event(slow.next_event())
    return True


def test_send_bodiless_takes_the_common_requests_only() -> None:
    assert _bodiless_agrees(b"GET", b"/a?b=1", [(b"Host", b"o.test"), (b"Accept", b"*/*")], second_cycle=True)
    assert _bodiless_agrees(b"HEAD", b"/", [(b"host", b"o.test")], second_cycle=False)
    assert not _bodiless_agrees(b"GET", b"/", [(b"Host", b"o"), (b"Connection", b"close")], second_cycle=False)
    assert not _bodiless_agrees(b"POST", b"/", [(b"Host", b"o"), (b"Content-Length", b"0")], second_cycle=False)
    assert not _bodiless_agrees(b"CONNECT", b"o:443", [(b"Host", b"o")], second_cycle=False)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"POST", b"CONNECT"]),
    target=st.sampled_from([b"/", b"/a?b=1", b"*", b"o.test:443"]),
    fields=st.lists(st.tuples(st.sampled_from(_REQ_NAMES), st.sampled_from(_REQ_VALUES)), max_size=5),
    second_cycle=st.booleans(),
)
def test_send_bodiless_agrees_with_h11(method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], second_cycle: bool) -> None:
    fields = [(b"Host", b"o.test"), *fields]
    try:
        h11.Request(method=method, target=target, headers=fields)
    except h11.LocalProtocolError:
        return  # not a request h11 would send at all
    _bodiless_agrees(method, target, fields, second_cycle=second_cycle)
