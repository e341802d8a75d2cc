"""Differential tests: h11.Connection(SERVER) and h1fast.FastServerConnection must agree.

Both are driven by the same small server (`_serve`): feed the input in the given pieces, take
events until NEED_DATA / PAUSED / an error, answer each request (100 Continue when asked for,
101 or a decline for an Upgrade, a response otherwise), start the next cycle when h11 allows.
Everything observable goes into a trace (events with adjacent Data joined, error status hints,
states, the exact bytes sent, trailing data), and the two traces must be equal.

Inputs: a hand-written corpus (valid requests, framing edge cases, smuggling attempts, malformed
heads and bodies), each fed whole and one byte at a time, with and without EOF, with a large and
a tiny `max_incomplete_event_size`; plus hypothesis-generated mutations of valid requests and
generated heads. The send side is also compared on scripted responses and generated ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import h11
import pytest
from differential_helpers import (
    NASTY,
    Trace,
    bytewise,
    mutated,
    pieces,
    send_events,
    states,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeproxy.http.h1fast import FastServerConnection

Factory = Callable[[int], Any]


def _h11(max_size: int) -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=max_size)


def _fast(max_size: int) -> FastServerConnection:
    return FastServerConnection(max_incomplete_event_size=max_size)


BROWSER_GET = (
    b"GET /static/app.js?v=123 HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/120.0 Safari/537.36\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Referer: https://www.example.com/\r\n"
    b"Cookie: session=abcdef0123456789; theme=dark; _ga=GA1.2.3456789.1234567890\r\n"
    b"Sec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\n"
    b'If-None-Match: "abc123"\r\n\r\n'
)


def _req(head: bytes, body: bytes = b"") -> bytes:
    """A request from '|'-separated head lines, CRLF line endings, final blank line."""
    return b"\r\n".join(head.split(b"|")) + b"\r\n\r\n" + body


def _post_chunked(chunks: bytes, extra: bytes = b"") -> bytes:
    return _req(b"POST /up HTTP/1.1|Host: a|Transfer-Encoding: chunked" + extra) + chunks


GET = _req(b"GET / HTTP/1.1|Host: a")

# name -> raw bytes. Valid requests first (they also seed the mutation tests), then the edge
# cases and attacks. Expected verdicts are not written down: h11's are the oracle.
VALID: dict[str, bytes] = {
    "get": GET,
    "get_browser": BROWSER_GET,
    "get_query": _req(b"GET /a/b?c=d&e=%20f HTTP/1.1|Host: example.com:8080|Accept: */*"),
    "head": _req(b"HEAD /x HTTP/1.1|Host: a"),
    "post_cl": _req(
        b"POST /u HTTP/1.1|Host: a|Content-Length: 5|Content-Type: text/plain", b"hello"
    ),
    "post_cl_zero": _req(b"POST /u HTTP/1.1|Host: a|Content-Length: 0"),
    "put_cl_big": _req(
        b"PUT /u HTTP/1.1|Host: a|Content-Length: 300", bytes(range(256)) + b"x" * 44
    ),
    "chunked": _post_chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    "chunked_ext": _post_chunked(b'5;name=val\r\nhello\r\n3;x;y="q"\r\nabc\r\n0;last\r\n\r\n'),
    "chunked_trailers": _post_chunked(b"3\r\nabc\r\n0\r\nX-Checksum: 1234\r\nX-Other: v\r\n\r\n"),
    "chunked_hex": _post_chunked(b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n"),
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "http10_host_body": _req(b"POST / HTTP/1.0|Host: a|Content-Length: 3", b"abc"),
    "http10_keepalive": _req(b"GET / HTTP/1.0|Host: a|Connection: keep-alive"),
    "conn_close": _req(b"GET / HTTP/1.1|Host: a|Connection: close"),
    "conn_close_list": _req(b"GET / HTTP/1.1|Host: a|Connection: Keep-Alive, Close"),
    "expect_continue": _req(
        b"POST / HTTP/1.1|Host: a|Content-Length: 4|Expect: 100-continue", b"data"
    ),
    "upgrade_ws": _req(
        b"GET /chat HTTP/1.1|Host: a|Upgrade: websocket|Connection: Upgrade|Sec-WebSocket-Version: 13",
        b"\x81\x05hello",
    ),
    "options_star": _req(b"OPTIONS * HTTP/1.1|Host: a"),
    "absolute_form": _req(b"GET http://a.example/x?y=1 HTTP/1.1|Host: a.example"),
    "pipelined_pair": GET + _req(b"GET /second HTTP/1.1|Host: b"),
    "pipelined_post_get": _req(b"POST /p HTTP/1.1|Host: a|Content-Length: 2", b"hi") + GET,
    "pipelined_chunked_get": _post_chunked(b"2\r\nhi\r\n0\r\n\r\n") + GET + GET,
}

EDGE: dict[str, bytes] = {
    # -- stream edges ------------------------------------------------------------------------
    "empty": b"",
    "post_cl_short": _req(b"POST /u HTTP/1.1|Host: a|Content-Length: 10", b"short"),
    "post_cl_long": _req(b"POST /u HTTP/1.1|Host: a|Content-Length: 2", b"hiEXTRA"),
    "head_incomplete": b"GET / HTTP/1.1\r\nHost: a\r\n",
    "line_incomplete": b"GET /only-a-request-line",
    "pipelined_after_close": _req(b"GET / HTTP/1.1|Host: a|Connection: close") + GET,
    "pipelined_after_http10": b"GET / HTTP/1.0\r\n\r\n" + GET,
    "pipelined_garbage": GET + b"\x00\x01garbage\r\n\r\n",
    "pipelined_three": GET * 3,
    "h2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "tls_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),
    "leading_crlf": b"\r\n" + GET,
    "leading_lf": b"\n" + GET,
    "leading_space": b" " + GET,
    "only_cr": b"\r",
    "many_headers": _req(
        b"GET / HTTP/1.1|Host: a|" + b"|".join(b"X-H%d: v%d" % (i, i) for i in range(120))
    ),
    "long_value": _req(b"GET / HTTP/1.1|Host: a|X-Long: " + b"v" * 3000),
    # -- request line ------------------------------------------------------------------------
    "two_spaces": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "trailing_space": b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    "tab_separator": b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "lowercase_method": _req(b"get / HTTP/1.1|Host: a"),
    "unknown_method": _req(b"BREW /pot HTTP/1.1|Host: a"),
    "purge_method": _req(b"PURGE /x HTTP/1.1|Host: a"),
    "bad_method_char": _req(b"GE(T / HTTP/1.1|Host: a"),
    "target_specials": _req(b'GET /{a}|b|"c"^`d HTTP/1.1|Host: a'.replace(b"|b|", b"%7Cb%7C")),
    "target_pipe_hash": b"GET /a|b#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    "target_obs_text": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "target_nul": b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
    "target_del": b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
    "lower_http": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "no_version": b"GET /\r\nHost: a\r\n\r\n",
    "version_10_digits": b"GET / HTTP/1.10\r\nHost: a\r\n\r\n",
    "version_12": _req(b"GET / HTTP/1.2|Host: a"),
    "version_20": _req(b"GET / HTTP/2.0"),
    "version_09": b"GET / HTTP/0.9\r\n\r\n",
    "version_37": _req(b"GET / HTTP/3.7|Host: a|Content-Length: 1", b"x"),
    "connect": _req(b"CONNECT a.example:443 HTTP/1.1|Host: a.example:443", b"\x16\x03\x01tls"),
    "connect_http10": b"CONNECT a:443 HTTP/1.0\r\n\r\nbytes",
    # -- Host ----------------------------------------------------------------------------------
    "missing_host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two_hosts": _req(b"GET / HTTP/1.1|Host: a|Host: b"),
    "empty_host": _req(b"GET / HTTP/1.1|Host:"),
    "host_http10_twice": _req(b"GET / HTTP/1.0|Host: a|host: a"),
    # -- field syntax ------------------------------------------------------------------------
    "space_before_colon": _req(b"GET / HTTP/1.1|Host : a"),
    "tab_before_colon": _req(b"GET / HTTP/1.1|Host\t: a"),
    "no_colon": _req(b"GET / HTTP/1.1|Host: a|NoColonHere"),
    "empty_name": _req(b"GET / HTTP/1.1|Host: a|: value"),
    "bad_name_char": _req(b"GET / HTTP/1.1|Host: a|X(y): v"),
    "name_obs_text": _req(b"GET / HTTP/1.1|Host: a|X\xe9: v"),
    "value_ows": _req(b"GET / HTTP/1.1|Host: a|X-A:  \t padded \t "),
    "value_empty": _req(b"GET / HTTP/1.1|Host: a|X-A:|X-B: "),
    "value_inner_ws": _req(b"GET / HTTP/1.1|Host: a|X-A: a \t b    c"),
    "value_colons": _req(b"GET / HTTP/1.1|Host: a|X-A: b: c::d"),
    "value_nul": _req(b"GET / HTTP/1.1|Host: a|X-A: a\x00b"),
    "value_cr": _req(b"GET / HTTP/1.1|Host: a|X-A: a\rb"),
    "value_lf": _req(b"GET / HTTP/1.1|Host: a|X-A: a\nb"),
    "value_lf_fold": _req(b"GET / HTTP/1.1|Host: a|X-A: a\n b"),
    "value_ctl": _req(b"GET / HTTP/1.1|Host: a|X-A: a\x01b\x1fc"),
    "value_del": _req(b"GET / HTTP/1.1|Host: a|X-A: a\x7fb"),
    "value_vt": _req(b"GET / HTTP/1.1|Host: a|X-A: a\x0bb"),
    "value_ff": _req(b"GET / HTTP/1.1|Host: a|X-A: \x0c"),
    "value_obs_text": _req(b"GET / HTTP/1.1|Host: a|X-A: caf\xc3\xa9 \xff\x80"),
    "obs_fold": _req(b"GET / HTTP/1.1|Host: a|X-A: first| second|\tthird"),
    "obs_fold_first": _req(b"GET / HTTP/1.1| X-A: b|Host: a"),
    "obs_fold_host": _req(b"GET / HTTP/1.1|Host:| a"),
    "bare_lf": b"GET / HTTP/1.1\nHost: a\nX-A: b\n\n",
    "bare_lf_mixed": b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\n",
    "bare_lf_body": b"POST / HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc",
    "cr_cr_lf": b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n",
    "lf_cr_lf_end": b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    # -- Content-Length ------------------------------------------------------------------------
    "cl_duplicate_same": _req(
        b"POST / HTTP/1.1|Host: a|Content-Length: 3|Content-Length: 3", b"abc"
    ),
    "cl_conflict": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 3|Content-Length: 4", b"abcd"),
    "cl_list_same": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 3, 3", b"abc"),
    "cl_list_conflict": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 3, 4", b"abcd"),
    "cl_plus": _req(b"POST / HTTP/1.1|Host: a|Content-Length: +3", b"abc"),
    "cl_minus": _req(b"POST / HTTP/1.1|Host: a|Content-Length: -3", b"abc"),
    "cl_leading_zeros": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 0003", b"abc"),
    "cl_ws": _req(b"POST / HTTP/1.1|Host: a|Content-Length:  3 \t", b"abc"),
    "cl_inner_space": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 1 2", b"abc"),
    "cl_hex": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 0x3", b"abc"),
    "cl_empty": _req(b"POST / HTTP/1.1|Host: a|Content-Length:", b"abc"),
    "cl_20_digits": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 00000000000000000003", b"abc"),
    "cl_21_digits": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 000000000000000000003", b"abc"),
    "cl_huge": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 99999999999999999999", b"abc"),
    "cl_comma_only": _req(b"POST / HTTP/1.1|Host: a|Content-Length: ,", b"abc"),
    # -- Transfer-Encoding ---------------------------------------------------------------------
    "cl_and_te": _req(
        b"POST / HTTP/1.1|Host: a|Content-Length: 3|Transfer-Encoding: chunked",
        b"3\r\nabc\r\n0\r\n\r\n",
    ),
    "te_and_cl": _req(
        b"POST / HTTP/1.1|Host: a|Transfer-Encoding: chunked|Content-Length: 30",
        b"3\r\nabc\r\n0\r\n\r\n",
    ),
    "te_double_value": _post_chunked(b"0\r\n\r\n").replace(b"chunked", b"chunked, chunked"),
    "te_two_headers": _post_chunked(b"0\r\n\r\n", b"|Transfer-Encoding: chunked"),
    "te_gzip": _req(b"POST / HTTP/1.1|Host: a|Transfer-Encoding: gzip", b"abc"),
    "te_gzip_chunked": _req(
        b"POST / HTTP/1.1|Host: a|Transfer-Encoding: gzip, chunked", b"0\r\n\r\n"
    ),
    "te_identity": _req(b"POST / HTTP/1.1|Host: a|Transfer-Encoding: identity", b""),
    "te_capital": _post_chunked(b"0\r\n\r\n").replace(b"chunked", b"Chunked"),
    "te_upper": _post_chunked(b"0\r\n\r\n").replace(b"chunked", b"CHUNKED"),
    "te_leading_space": _post_chunked(b"0\r\n\r\n").replace(b": chunked", b":   chunked"),
    "te_trailing_space": _post_chunked(b"0\r\n\r\n").replace(b": chunked", b": chunked  "),
    "te_tab": _post_chunked(b"0\r\n\r\n").replace(b": chunked", b":\tchunked\t"),
    "te_vt": _post_chunked(b"0\r\n\r\n").replace(b": chunked", b":\x0bchunked"),
    "te_space_colon": _post_chunked(b"0\r\n\r\n").replace(
        b"Transfer-Encoding:", b"Transfer-Encoding :"
    ),
    "te_underscore": _post_chunked(b"0\r\n\r\n").replace(
        b"Transfer-Encoding", b"Transfer_Encoding"
    ),
    "te_xchunked": _post_chunked(b"0\r\n\r\n").replace(b"chunked", b"xchunked"),
    "te_comma_empty": _post_chunked(b"0\r\n\r\n").replace(b"chunked", b"chunked,"),
    "te_obs_fold": _req(b"POST / HTTP/1.1|Host: a|Transfer-Encoding:| chunked", b"0\r\n\r\n"),
    "te_http10": _req(b"POST / HTTP/1.0|Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
    # -- chunked bodies ------------------------------------------------------------------------
    "chunk_size_invalid_hex": _post_chunked(b"G\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_empty": _post_chunked(b"\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_leading_space": _post_chunked(b" 5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_trailing_ws": _post_chunked(b"5 \t\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_0x": _post_chunked(b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_plus": _post_chunked(b"+5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_20_digits": _post_chunked(b"00000000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_21_digits": _post_chunked(b"000000000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_huge": _post_chunked(b"FFFFFFFFFFFFFFFFFFFF\r\nhello"),
    "chunk_size_bare_lf": _post_chunked(b"5\nhello\r\n0\r\n\r\n"),
    "chunk_ext_space": _post_chunked(b"5 ; a = b\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_weird": _post_chunked(b"5;\x01\x7f\xff\r\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_lf": _post_chunked(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    "chunk_data_too_long": _post_chunked(b"5\r\nhelloX\r\n0\r\n\r\n"),
    "chunk_missing_crlf": _post_chunked(b"5\r\nhello0\r\n\r\n"),
    "chunk_lf_only_after_data": _post_chunked(b"5\r\nhello\n0\r\n\r\n"),
    "chunk_missing_final_crlf": _post_chunked(b"5\r\nhello\r\n0\r\n"),
    "chunk_last_lf_only": _post_chunked(b"5\r\nhello\r\n0\r\n\n"),
    "chunk_trailer_obs_fold": _post_chunked(b"0\r\nX-T: a\r\n b\r\n\r\n"),
    "chunk_trailer_fold_first": _post_chunked(b"0\r\n b\r\n\r\n"),
    "chunk_trailer_bad": _post_chunked(b"0\r\nX T: a\r\n\r\n"),
    "chunk_trailer_cl_conflict": _post_chunked(
        b"0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    ),
    "chunk_trailer_te": _post_chunked(b"0\r\nTransfer-Encoding: gzip\r\n\r\n"),
    "chunk_trailer_bare_lf": _post_chunked(b"0\r\nX-T: a\nX-U: b\n\n"),
    "chunk_trailer_hosts": _post_chunked(b"0\r\nHost: a\r\nHost: b\r\n\r\n"),
    "chunk_then_pipelined": _post_chunked(b"1\r\na\r\n0\r\n\r\n")
    + _req(b"GET /n HTTP/1.1|Host: a"),
    "chunk_lowercase_hex_big": _post_chunked(b"1f\r\n" + b"z" * 31 + b"\r\n0\r\n\r\n"),
    # -- 100-continue, Upgrade, CONNECT --------------------------------------------------------
    "expect_continue_http10": _req(
        b"POST / HTTP/1.0|Content-Length: 2|Expect: 100-continue", b"hi"
    ),
    "expect_continue_case": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 0|Expect: 100-Continue"),
    "expect_other": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 1|Expect: something", b"x"),
    "upgrade_no_connection": _req(b"GET / HTTP/1.1|Host: a|Upgrade: h2c", b"after"),
    "upgrade_empty_list": _req(b"GET / HTTP/1.1|Host: a|Upgrade: ,|Connection: upgrade") + GET,
    "upgrade_with_body": _req(
        b"POST / HTTP/1.1|Host: a|Upgrade: x|Connection: upgrade|Content-Length: 3", b"abcRAW"
    ),
    "upgrade_chunked_body": _post_chunked(
        b"3\r\nabc\r\n0\r\n\r\nRAW", b"|Upgrade: x|Connection: upgrade"
    ),
    "upgrade_close": _req(b"GET / HTTP/1.1|Host: a|Upgrade: x|Connection: upgrade, close", b"RAW"),
    "upgrade_pipelined": _req(b"GET / HTTP/1.1|Host: a|Upgrade: x|Connection: upgrade") + GET,
    "upgrade_http10": b"GET / HTTP/1.0\r\nUpgrade: x\r\n\r\nRAW",
}

CORPUS: dict[str, bytes] = {**VALID, **EDGE}


# -- the shared driver ----------------------------------------------------------------------



def _response_events(method: bytes, status: int, mode: str) -> list[Any]:
    """One response as the mini server sends it; `mode` picks the framing it asks h11 for."""
    if mode == "stream":  # no Content-Length: chunked, or close-delimited for HTTP/1.0
        head = h11.Response(status_code=status, headers=[(b"Server", b"t"), (b"X-Mode", b"stream")])
        body = [h11.Data(data=b"ab"), h11.Data(data=b""), h11.Data(data=b"cde")]
    else:
        head = h11.Response(
            status_code=status, headers=[(b"content-length", b"2"), (b"Server", b"t")], reason=b"OK"
        )
        body = [h11.Data(data=b"ok")]
    if method == b"HEAD" or status in (204, 304):
        body = []
    return [head, *body, h11.EndOfMessage()]


def _serve(
    factory: Factory,
    chunks: Sequence[bytes],
    *,
    eof: bool = True,
    max_size: int = 16384,
    mode: str = "length",
    accept_upgrade: bool = True,
    early: bool = False,
) -> list[tuple[Any, ...]]:
    """The mini server. `early`: answer as soon as the request head is in (as h1server does for
    errors and cache hits) and read the body afterwards, instead of answering after the body."""
    conn = factory(max_size)
    trace = Trace(merge_data=True)
    method = b""

    def respond() -> bool:
        status = 407 if method == b"CONNECT" else 200
        return send_events(conn, trace, _response_events(method, status, mode))

    def next_cycle() -> None:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            trace.add("next-cycle", states(conn))

    def pump() -> bool:
        """Events until more data is needed (True) or the conversation cannot go on (False)."""
        nonlocal method
        for _ in range(10_000):
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                trace.add("error", e.error_status_hint, str(e), states(conn))
                return False
            if event is h11.NEED_DATA:
                trace.add("need-data", states(conn))
                return True
            if event is h11.PAUSED:
                trace.add("paused", states(conn))
                if conn.their_state is h11.DONE and conn.our_state is h11.SEND_RESPONSE:
                    if not respond():
                        return False
                    next_cycle()
                    continue
                return False
            if isinstance(event, h11.Request):
                method = event.method
                trace.add(
                    "request",
                    bytes(event.method),
                    bytes(event.target),
                    bytes(event.http_version),
                    [(bytes(k), bytes(v)) for k, v in event.headers],
                    [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                    conn.they_are_waiting_for_100_continue,
                    states(conn),
                )
                if (
                    early
                    and not conn.they_are_waiting_for_100_continue
                    and "upgrade" not in str(event.headers).lower()
                ):
                    if not respond():
                        return False
                elif conn.they_are_waiting_for_100_continue and not send_events(
                    conn, trace, [h11.InformationalResponse(status_code=100, headers=[])]
                ):
                    return False
            elif isinstance(event, h11.Data):
                trace.add("data", bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                trace.add("eom", [(bytes(k), bytes(v)) for k, v in event.headers], states(conn))
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and accept_upgrade:
                    if method == b"CONNECT":
                        switch: Any = h11.Response(status_code=200, headers=[])
                    else:
                        switch = h11.InformationalResponse(
                            status_code=101,
                            headers=[(b"Upgrade", b"x"), (b"Connection", b"upgrade")],
                        )
                    send_events(conn, trace, [switch])
                    trace.add("switched", conn.trailing_data, states(conn))
                    return False
                if (
                    conn.our_state is h11.SEND_RESPONSE
                    and conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL
                ):
                    # Look once more before answering: PAUSED if more is buffered, NEED_DATA or
                    # ConnectionClosed if not (h11 can report the close before the response).
                    continue
                if conn.our_state is h11.SEND_RESPONSE and not respond():
                    return False
                next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                trace.add("closed", states(conn))
                if conn.our_state is h11.SEND_RESPONSE:
                    respond()
                    trace.add("after-close", states(conn))
                return False
            else:  # pragma: no cover - neither implementation produces anything else
                raise AssertionError(f"unexpected event {event!r}")
        raise AssertionError("no progress after 10000 events")

    for chunk in [*chunks, *([b""] if eof else [])]:
        conn.receive_data(chunk)
        if conn.their_state is h11.DONE and conn.our_state is h11.SEND_RESPONSE:
            if not respond():
                break
            next_cycle()
        if not pump():
            break
    else:
        if conn.their_state is h11.DONE and conn.our_state is h11.SEND_RESPONSE and respond():
            next_cycle()
    trace.add("end", conn.trailing_data, states(conn), conn.they_are_waiting_for_100_continue)
    return trace.items


def _assert_agree(chunks: Sequence[bytes], **kw: Any) -> list[tuple[Any, ...]]:
    expected = _serve(_h11, chunks, **kw)
    got = _serve(_fast, chunks, **kw)
    assert got == expected, f"h11 and h1fast disagree on {b''.join(chunks)!r} ({kw})"
    return expected


# -- the corpus ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_agrees(name: str) -> None:
    data = CORPUS[name]
    for eof in (False, True):
        for max_size in (16384, 48):
            _assert_agree([data], eof=eof, max_size=max_size)
            _assert_agree(bytewise(data), eof=eof, max_size=max_size)
    _assert_agree([data], mode="stream")
    _assert_agree([data], accept_upgrade=False)
    _assert_agree([data], early=True)
    _assert_agree(bytewise(data), early=True, mode="stream")


@pytest.mark.parametrize(
    "name", ["get", "post_cl", "chunked_trailers", "pipelined_post_get", "upgrade_ws", "obs_fold"]
)
def test_every_split_point_agrees(name: str) -> None:
    data = CORPUS[name]
    for i in range(len(data) + 1):
        _assert_agree([data[:i], data[i:]], max_size=64)


def test_corpus_verdicts_are_the_expected_ones() -> None:
    """Spot checks that the oracle says what we think, so the corpus covers what it claims."""

    def outcome(name: str) -> Any:
        trace = _serve(_h11, [CORPUS[name]])
        errors = [item[1] for item in trace if item[0] == "error"]
        return errors[0] if errors else "ok"

    for name in VALID:
        assert outcome(name) == "ok", name
    expected = {
        "te_gzip": 501,
        "te_double_value": 501,
        "te_two_headers": 501,
        "cl_conflict": 400,
        "cl_plus": 400,
        "missing_host": 400,
        "two_spaces": 400,
        "space_before_colon": 400,
        "value_nul": 400,
        "chunk_size_invalid_hex": 400,
        "leading_crlf": 400,
        "obs_fold": "ok",
        "bare_lf": "ok",
        "value_ctl": "ok",
        "unknown_method": "ok",
        "cl_list_same": "ok",
        "te_capital": "ok",
        "cl_and_te": "ok",
    }
    assert {name: outcome(name) for name in expected} == expected
    # A head that is still incomplete when it outgrows the limit is a 431.
    trace = _serve(_h11, bytewise(CORPUS["get_browser"]), max_size=48)
    assert any(t[0] == "error" and t[1] == 431 for t in trace)


def test_fast_path_taken_for_ordinary_heads() -> None:
    """The speed comes from the llhttp path: ordinary heads must not fall back to h11."""
    for name in (
        "get",
        "get_browser",
        "get_query",
        "head",
        "post_cl",
        "chunked",
        "http10",
        "conn_close",
        "expect_continue",
        "upgrade_ws",
        "options_star",
        "absolute_form",
        "purge_method",
        "value_obs_text",
        "te_capital",
        "connect",
    ):
        data = CORPUS[name]
        head = data[: data.index(b"\r\n\r\n") + 4]
        assert FastServerConnection()._fast_head(head) is not None, name


# -- generated inputs ------------------------------------------------------------------------

_SEEDS = [VALID[name] for name in sorted(VALID)]
_NASTY = [*NASTY, b"Host: x\r\n", b"HTTP/1.1"]


_FIELD_NAMES = [
    b"Host",
    b"host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"X-A",
    b"Cookie",
    b"Content-length",
    b"TRANSFER-ENCODING",
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
    b"100-continue",
    b"websocket",
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
def _generated_request(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from(
            [b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"BREW", b"get", b"G T"]
        )
    )
    target = draw(
        st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/x", b"a:443", b"/\x80", b"/a b", b""])
    )
    version = draw(
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"HTTP/1.1 "])
    )
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    fields = draw(
        st.lists(
            st.tuples(st.sampled_from(_FIELD_NAMES), st.sampled_from(_FIELD_VALUES)), max_size=6
        )
    )
    sep = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
    lines = [method + b" " + target + b" " + version] + [n + sep + v for n, v in fields]
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
    tail = draw(st.sampled_from([b"", GET, b"garbage"]))
    return eol.join(lines) + eol + eol + body + tail


_settings = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(data=st.data(), raw=mutated(_SEEDS, _NASTY))
def test_mutated_requests_agree(data: st.DataObject, raw: bytes) -> None:
    chunks = data.draw(pieces(raw))
    _assert_agree(
        chunks,
        eof=data.draw(st.booleans()),
        max_size=data.draw(st.sampled_from([16384, 200, 40])),
        mode=data.draw(st.sampled_from(["length", "stream"])),
        accept_upgrade=data.draw(st.booleans()),
        early=data.draw(st.booleans()),
    )


@_settings
@given(data=st.data(), raw=_generated_request())
def test_generated_requests_agree(data: st.DataObject, raw: bytes) -> None:
    _assert_agree(
        data.draw(pieces(raw)),
        eof=data.draw(st.booleans()),
        mode=data.draw(st.sampled_from(["length", "stream"])),
        early=data.draw(st.booleans()),
    )


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=300), eof=st.booleans())
def test_arbitrary_bytes_only_raise_protocol_errors(raw: bytes, eof: bool) -> None:
    # _serve lets any exception other than RemoteProtocolError escape, failing the test.
    _assert_agree([raw], eof=eof)
    _assert_agree(
        [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + raw], eof=eof
    )


# -- the send side ---------------------------------------------------------------------------


def _script(
    factory: Factory,
    request: bytes,
    events: Sequence[Any],
    *,
    then: bytes = b"",
    after_cycle: Sequence[Any] = (),
) -> list[tuple[Any, ...]]:
    """Reads `request` (as far as its first message), sends `events`, then, if the connection
    can be reused, sends `after_cycle` and reads `then`."""
    conn = factory(16384)
    trace = Trace(merge_data=True)
    if request:  # b"" would mean EOF
        conn.receive_data(request)
    for _ in range(100):
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            trace.add("error", e.error_status_hint, str(e), states(conn))
            break
        trace.add("event", type(event).__name__, states(conn))
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
            break
    send_events(conn, trace, events)
    trace.add(
        "after-send", states(conn), conn.trailing_data, conn.they_are_waiting_for_100_continue
    )
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        send_events(conn, trace, after_cycle)
        if then:
            conn.receive_data(then)
        try:
            trace.add("next", repr(conn.next_event()), states(conn))
        except h11.RemoteProtocolError as e:
            trace.add("error", e.error_status_hint, str(e), states(conn))
    else:
        with pytest.raises(h11.LocalProtocolError):
            conn.start_next_cycle()
    return trace.items


def _resp(
    status: int = 200, headers: list[tuple[bytes, bytes]] | None = None, **kw: Any
) -> h11.Response:
    return h11.Response(status_code=status, headers=headers or [], **kw)


def _cl(n: int, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b"Content-Length", b"%d" % n), *extra]


_DATA = h11.Data(data=b"hello")
_EOM = h11.EndOfMessage()
_HEAD = _req(b"HEAD / HTTP/1.1|Host: a")
_GET10 = b"GET / HTTP/1.0\r\n\r\n"
_UPGRADE = _req(b"GET / HTTP/1.1|Host: a|Upgrade: websocket|Connection: upgrade", b"RAWBYTES")
_CONNECT = _req(b"CONNECT a:443 HTTP/1.1|Host: a:443", b"TUNNEL")
_EXPECT = _req(b"POST / HTTP/1.1|Host: a|Content-Length: 5|Expect: 100-continue")

SEND_CASES: dict[str, tuple[bytes, list[Any]]] = {
    "content_length": (GET, [_resp(200, _cl(5, (b"Content-Type", b"text/plain"))), _DATA, _EOM]),
    "chunked": (
        GET,
        [
            _resp(200, [(b"X-A", b"1")]),
            h11.Data(data=b"ab"),
            h11.Data(data=b""),
            h11.Data(data=b"c" * 300),
            _EOM,
        ],
    ),
    "chunked_trailers": (
        GET,
        [_resp(200), _DATA, h11.EndOfMessage(headers=[(b"X-Checksum", b"1"), (b"Host", b"t")])],
    ),
    "head_with_length": (_HEAD, [_resp(200, _cl(1000)), _EOM]),
    "head_without_length": (_HEAD, [_resp(200, [(b"X-A", b"1")]), _EOM]),
    "head_with_body": (_HEAD, [_resp(200, _cl(5)), _DATA]),
    "head_http10": (b"HEAD / HTTP/1.0\r\n\r\n", [_resp(200), _EOM]),
    "no_content": (GET, [_resp(204), _EOM]),
    "no_content_with_body": (GET, [_resp(204), _DATA]),
    "no_content_with_te": (GET, [_resp(204, [(b"Transfer-Encoding", b"chunked")]), _EOM]),
    "not_modified": (GET, [_resp(304, _cl(100, (b"ETag", b'"x"'))), _EOM]),
    "http10_stream": (_GET10, [_resp(200), _DATA, _DATA, _EOM]),
    "http10_length": (_GET10, [_resp(200, _cl(5)), _DATA, _EOM]),
    "http10_keepalive": (
        _req(b"GET / HTTP/1.0|Connection: keep-alive"),
        [_resp(200, _cl(0, (b"Connection", b"Keep-Alive"))), _EOM],
    ),
    "http10_trailers": (_GET10, [_resp(200), h11.EndOfMessage(headers=[(b"X", b"1")])]),
    "http10_te": (_GET10, [_resp(200, [(b"transfer-encoding", b"chunked")]), _DATA, _EOM]),
    "client_close": (
        _req(b"GET / HTTP/1.1|Host: a|Connection: close"),
        [_resp(200, _cl(5)), _DATA, _EOM],
    ),
    "client_close_upgrade_list": (
        _req(b"GET / HTTP/1.1|Host: a|Connection: close"),
        [_resp(200, _cl(0, (b"Connection", b"Upgrade, Keep-Alive, foo"))), _EOM],
    ),
    "server_close": (GET, [_resp(200, _cl(5, (b"connection", b"close"))), _DATA, _EOM]),
    "server_close_mixed": (GET, [_resp(200, _cl(0, (b"Connection", b"x, CLOSE"))), _EOM]),
    "te_and_cl": (
        GET,
        [_resp(200, [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")]), _DATA, _EOM],
    ),
    "host_first": (
        GET,
        [_resp(200, [(b"X-A", b"1"), (b"Host", b"h"), (b"X-B", b"2"), (b"host", b"g")]), _EOM],
    ),
    "header_case_kept": (
        GET,
        [_resp(200, [(b"X-CamelCase", b"v"), (b"content-LENGTH", b"0")]), _EOM],
    ),
    "reason_custom": (GET, [_resp(404, _cl(0), reason=b"Not Here"), _EOM]),
    "reason_empty": (GET, [_resp(500, _cl(0), reason=b""), _EOM]),
    "status_enum": (GET, [_resp(HTTPStatus.IM_A_TEAPOT, _cl(0)), _EOM]),
    "too_much_data": (GET, [_resp(200, _cl(3)), _DATA]),
    "too_little_data": (GET, [_resp(200, _cl(10)), _DATA, _EOM]),
    "length_trailers": (GET, [_resp(200, _cl(0)), h11.EndOfMessage(headers=[(b"X", b"1")])]),
    "data_before_response": (GET, [_DATA]),
    "eom_before_response": (GET, [_EOM]),
    "response_twice": (GET, [_resp(200, _cl(0)), _resp(200, _cl(0))]),
    "send_after_error": (GET, [_DATA, _resp(200, _cl(0))]),
    "http_version_10": (GET, [_resp(200, _cl(0), http_version=b"1.0")]),
    "early_hints": (
        GET,
        [
            h11.InformationalResponse(
                status_code=103, headers=[(b"Link", b"</a.css>; rel=preload")]
            ),
            _resp(200, _cl(0)),
            _EOM,
        ],
    ),
    "continue": (
        _EXPECT,
        [h11.InformationalResponse(status_code=100, headers=[]), _resp(200, _cl(0)), _EOM],
    ),
    "continue_skipped": (_EXPECT, [_resp(413, _cl(0, (b"Connection", b"close"))), _EOM]),
    "upgrade_accepted": (
        _UPGRADE,
        [
            h11.InformationalResponse(
                status_code=101,
                headers=[(b"Upgrade", b"websocket"), (b"Connection", b"upgrade")],
                reason=b"Switching Protocols",
            )
        ],
    ),
    "upgrade_declined": (_UPGRADE, [_resp(200, _cl(2)), h11.Data(data=b"no"), _EOM]),
    "upgrade_declined_stream": (_req(b"GET / HTTP/1.1|Host: a|Upgrade: x"), [_resp(426), _EOM]),
    "switch_without_proposal": (GET, [h11.InformationalResponse(status_code=101, headers=[])]),
    "switch_twice": (
        _UPGRADE,
        [h11.InformationalResponse(status_code=101, headers=[]), h11.Data(data=b"x")],
    ),
    "informational_in_idle": (b"", [h11.InformationalResponse(status_code=100, headers=[])]),
    "connect_accepted": (_CONNECT, [_resp(200), _DATA]),
    "connect_refused": (_CONNECT, [_resp(407, _cl(0)), _EOM]),
    "response_before_request": (b"", [_resp(400, _cl(0)), _EOM]),
    "response_before_request_stream": (b"", [_resp(400), _DATA, _EOM]),
    "connection_closed": (GET, [_resp(200, _cl(0)), _EOM, h11.ConnectionClosed()]),
    "connection_closed_early": (b"", [h11.ConnectionClosed()]),
    "send_request_object": (
        GET,
        [h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"a")])],
    ),
    "body_unread": (
        _req(b"POST / HTTP/1.1|Host: a|Content-Length: 10", b"abc"),
        [_resp(200, _cl(0)), _EOM],
    ),
}


@pytest.mark.parametrize("name", sorted(SEND_CASES))
def test_send_side_agrees(name: str) -> None:
    request, events = SEND_CASES[name]
    then = _req(b"GET /next HTTP/1.1|Host: a")
    expected = _script(_h11, request, events, then=then)
    assert _script(_fast, request, events, then=then) == expected


@pytest.mark.parametrize("request_bytes", [_HEAD, GET, _CONNECT, _UPGRADE])
def test_response_between_cycles_agrees(request_bytes: bytes) -> None:
    """A response sent in IDLE (before the next request) is framed without a request to go by."""
    events = [_resp(200, _cl(0)), _EOM]
    later = [_resp(400), _DATA, _EOM]
    expected = _script(_h11, request_bytes, events, after_cycle=later)
    assert _script(_fast, request_bytes, events, after_cycle=later) == expected


def test_request_after_unsolicited_response() -> None:
    """The one input on which they differ: h11 0.16 crashes formatting its own error message
    (AttributeError); h1fast raises the RemoteProtocolError h11 meant to raise."""
    fast = _fast(16384)
    fast.send(_resp(400, _cl(0)))
    fast.receive_data(GET)
    with pytest.raises(h11.RemoteProtocolError) as err:
        fast.next_event()
    assert err.value.error_status_hint == 400
    assert fast.their_state is h11.ERROR
    slow = _h11(16384)
    slow.send(_resp(400, _cl(0)))
    slow.receive_data(GET)
    with pytest.raises(AttributeError):
        slow.next_event()


def test_second_switch() -> None:
    """Same h11 bug on the send side: a second 101 after switching protocols."""
    switch = h11.InformationalResponse(status_code=101, headers=[])
    fast = _fast(16384)
    fast.receive_data(_UPGRADE)
    while fast.next_event() is not h11.PAUSED:
        pass
    fast.send(switch)
    with pytest.raises(h11.LocalProtocolError):
        fast.send(switch)
    assert fast.our_state is h11.ERROR
    slow = _h11(16384)
    slow.receive_data(_UPGRADE)
    while slow.next_event() is not h11.PAUSED:
        pass
    slow.send(switch)
    with pytest.raises(AttributeError):
        slow.send(switch)


def test_llhttp_is_as_strict_as_assumed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed httptools passes the import-time probe (else every head that is not plain
    would go to h11), and with llhttp switched off the results are still h11's: plain heads are
    tokenised in C (when built), the others go to h11."""
    from edgeproxy.http import h1fast

    assert h1fast._LLHTTP_STRICT
    monkeypatch.setattr(h1fast, "_LLHTTP_STRICT", False)
    built = h1fast.plain_fields(GET) is not None
    assert (FastServerConnection()._fast_head(GET) is not None) == built
    assert FastServerConnection()._fast_head(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n") is None
    for name in (
        "get_browser",
        "chunked_trailers",
        "pipelined_pair",
        "upgrade_ws",
        "te_gzip",
        "value_ctl",
    ):
        _assert_agree([CORPUS[name]])


def test_send_side_exact_bytes() -> None:
    """A few outputs written out, so a change that breaks both the same way is still caught."""
    trace = _script(_fast, GET, [_resp(200, _cl(5)), _DATA, _EOM])
    assert [t[2] for t in trace if t[0] == "sent"] == [
        b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\n",
        b"hello",
        b"",
    ]
    trace = _script(_fast, _GET10, [_resp(200, [(b"Connection", b"keep-alive")]), _DATA, _EOM])
    assert [t[2] for t in trace if t[0] == "sent"] == [
        b"HTTP/1.1 200 \r\nConnection: close\r\n\r\n",
        b"hello",
        b"",
    ]
    trace = _script(_fast, GET, [_resp(200, [(b"X-A", b"1")]), _DATA, _EOM])
    assert [t[2] for t in trace if t[0] == "sent"] == [
        b"HTTP/1.1 200 \r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5\r\nhello\r\n",
        b"0\r\n\r\n",
    ]


_RESPONSE_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Length",
                b"Transfer-Encoding",
                b"Connection",
                b"Host",
                b"X-A",
                b"Set-Cookie",
                b"content-length",
            ]
        ),
        st.sampled_from(
            [
                b"0",
                b"5",
                b"chunked",
                b"close",
                b"keep-alive",
                b"Keep-Alive, Upgrade",
                b"v",
                b"a=b; Path=/",
            ]
        ),
    ),
    max_size=5,
)


@settings(max_examples=500, deadline=None)
@given(
    request=st.sampled_from(
        [
            GET,
            _HEAD,
            _GET10,
            _UPGRADE,
            _CONNECT,
            _EXPECT,
            CORPUS["conn_close"],
            CORPUS["http10_keepalive"],
            b"",
        ]
    ),
    status=st.sampled_from([100, 101, 103, 200, 204, 206, 304, 400, 426, 500]),
    fields=_RESPONSE_FIELDS,
    body=st.lists(st.binary(max_size=8), max_size=3),
    trailers=st.booleans(),
)
def test_generated_responses_agree(
    request: bytes,
    status: int,
    fields: list[tuple[bytes, bytes]],
    body: list[bytes],
    trailers: bool,
) -> None:
    try:
        head: Any = (
            h11.InformationalResponse(status_code=status, headers=fields)
            if status < 200
            else h11.Response(status_code=status, headers=fields)
        )
    except h11.LocalProtocolError:
        return  # h11 refuses to build it (e.g. conflicting Content-Length); nothing to send
    events = [
        head,
        *(h11.Data(data=b) for b in body),
        h11.EndOfMessage(headers=[(b"X-T", b"1")] if trailers else []),
    ]
    assert _script(_fast, request, events) == _script(_h11, request, events)


# -- send_whole: a whole response in one call ------------------------------------------------

WHOLE_REQUESTS = {
    "get": GET,
    "get_browser": BROWSER_GET,
    "head": _req(b"HEAD / HTTP/1.1|Host: a"),
    "http10": _req(b"GET / HTTP/1.0"),
    "close": _req(b"GET / HTTP/1.1|Host: a|Connection: close"),
    "upgrade": _req(b"GET / HTTP/1.1|Host: a|Upgrade: websocket|Connection: upgrade"),
    "post": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 2", b"hi"),
    "expect": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 2|Expect: 100-continue", b"hi"),
    "half": _req(b"POST / HTTP/1.1|Host: a|Content-Length: 4", b"hi"),  # body not all read
}


def _read_request(conn: Any, data: bytes, eof: bool) -> bool:
    """Reads what the request sends; False if that is a protocol error (no response then)."""
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return False
        if event is h11.NEED_DATA or event is h11.PAUSED or type(event) in (h11.EndOfMessage, h11.ConnectionClosed):
            return True


def _whole_agrees(request: str, status: int, reason: bytes, fields: list[tuple[bytes, bytes]], body: bytes, *, eof: bool = False) -> bool:
    fast = _fast(16384)
    slow = _h11(16384)
    if not all([_read_request(conn, WHOLE_REQUESTS[request], eof) for conn in (fast, slow)]):
        return False
    assert states(fast) == states(slow)
    before = states(fast)
    items = [(raw, raw.lower(), value) for raw, value in fields]
    out = fast.send_whole(status, reason, items, body)
    if out is None:
        assert states(fast) == before
        return False
    expected = slow.send(h11.Response(status_code=status, headers=fields, reason=reason)) or b""
    expected += slow.send(h11.Data(data=body)) or b""
    expected += slow.send(h11.EndOfMessage()) or b""
    assert out == expected
    assert states(fast) == states(slow)
    assert fast.they_are_waiting_for_100_continue == slow.they_are_waiting_for_100_continue
    if fast.our_state is h11.DONE and fast.their_state is h11.DONE:
        fast.start_next_cycle()
        slow.start_next_cycle()
        assert states(fast) == states(slow)
    return True


def test_send_whole_takes_the_common_responses_only() -> None:
    cl = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    assert _whole_agrees("get", 200, b"OK", cl, b"hello")
    assert _whole_agrees("get_browser", 404, b"Not Found", cl, b"nopes")
    assert _whole_agrees("post", 201, b"", [(b"content-length", b"0")], b"")
    assert _whole_agrees("get", 200, b"OK", cl, b"hello", eof=True)  # half-closed client
    assert _whole_agrees("half", 200, b"OK", cl, b"hello")  # as h11: answering before the body
    for request in ("head", "http10", "close", "upgrade"):
        assert not _whole_agrees(request, 200, b"OK", cl, b"hello"), request
    for fields in (
        [(b"Content-Length", b"4")],  # not the body's length
        [(b"Content-Length", b"5"), (b"Content-Length", b"5")],
        [(b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"5"), (b"Connection", b"keep-alive")],
        [],
    ):
        assert not _whole_agrees("get", 200, b"OK", fields, b"hello"), fields
    for status in (204, 304, 101, 100):
        assert not _whole_agrees("get", status, b"", [(b"Content-Length", b"0")], b"")


@settings(max_examples=300, deadline=None)
@given(
    request=st.sampled_from(sorted(WHOLE_REQUESTS)),
    status=st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500, 503, 599, 999]),
    reason=st.sampled_from([b"OK", b"", b"Whatever It Is"]),
    fields=st.lists(
        st.tuples(
            st.sampled_from([b"Content-Length", b"content-length", b"X-A", b"Connection", b"Transfer-Encoding", b"Host", b"Vary"]),
            st.sampled_from([b"0", b"3", b"5", b"close", b"chunked", b"a", b"3, 3"]),
        ),
        max_size=4,
    ),
    body=st.sampled_from([b"", b"abc", b"hello"]),
    eof=st.booleans(),
)
def test_send_whole_agrees_with_h11(request: str, status: int, reason: bytes, fields: list[tuple[bytes, bytes]], body: bytes, eof: bool) -> None:
    try:
        h11.Response(status_code=status, headers=fields, reason=reason)
    except h11.LocalProtocolError:
        return  # not a response h11 would send at all
    # h11 refusing the sequence (a body it would not frame) is fine: send_whole declined it.
    with contextlib.suppress(h11.LocalProtocolError):
        _whole_agrees(request, status, reason, fields, body, eof=eof)


# -- the C field tokeniser (_fields.c) ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        b"X-Bad Name: v\r\n",  # a space in a name
        b"X: a\nY: b\r\n",  # bare LF
        b"X: a\r\n b\r\n",  # obs-fold
        b"X: a\rb\r\n",  # bare CR
        b"X : a\r\n",  # whitespace before the colon
        b": a\r\n",  # empty name
        b"X\r\n",  # no colon
        b"X: a\x7fb\r\n",  # DEL: h11 takes it, the plain shape does not
        b"X: a\x00b\r\n",  # NUL
        b"X: a\x0bb\r\n",  # VT
    ],
)
def test_plain_fields_refuses_other_shapes(fields: bytes) -> None:
    from edgeproxy.http.h1fast import plain_fields

    if plain_fields(GET) is None:
        pytest.skip("built without C extensions (EDGEPROXY_PURE_PYTHON=1)")
    assert plain_fields(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n") is None
    assert plain_fields(b"GET / HTTP/1.1\r\n" + fields + b"Host: a\r\n\r\n") is None


def test_plain_fields_reads_as_h11() -> None:
    from edgeproxy.http.h1fast import plain_fields

    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long-" + b"N" * 300 + b":  a \t b\t \r\nE:\r\nUpgrade: \x80\xff\r\n\r\n"
    got = plain_fields(head)
    if got is None:
        pytest.skip("built without C extensions (EDGEPROXY_PURE_PYTHON=1)")
    items, special = got
    name = b"X-Long-" + b"N" * 300
    assert items == [(b"Host", b"host", b"a"), (name, name.lower(), b"a \t b"), (b"E", b"e", b""), (b"Upgrade", b"upgrade", b"\x80\xff")]
    assert special == [0, 3]
    assert plain_fields(b"GET / HTTP/1.1\r\n\r\n") == ([], [])
    assert plain_fields(b"GET / HTTP/1.1\r\nHost: a\r\n\r") is None  # not a whole head
    slow = h11.Connection(h11.SERVER)
    slow.receive_data(head)
    request = slow.next_event()
    assert [(bytes(r), bytes(n), bytes(v)) for r, n, v in request.headers._full_items] == items


@settings(max_examples=500, deadline=None)
@given(lines=st.lists(st.binary(max_size=12), max_size=5))
def test_plain_fields_never_disagrees_with_h11(lines: list[bytes]) -> None:
    """Whatever bytes the field lines hold: accepted means h11 reads the same fields."""
    from edgeproxy.http.h1fast import plain_fields

    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    got = plain_fields(head)
    if got is None:
        return
    slow = h11.Connection(h11.SERVER)
    slow.receive_data(head)
    try:
        request = slow.next_event()
    except h11.RemoteProtocolError:
        # h11 refuses some heads for what the fields mean (a second Host, a bad
        # Content-Length): the codec's checks after tokenising refuse those too.
        return
    assert [(bytes(r), bytes(n), bytes(v)) for r, n, v in request.headers._full_items] == got[0]
