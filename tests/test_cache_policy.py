"""Tests for edgeproxy.cache.policy: RFC 9111 shared-cache rules, one behaviour per test."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeproxy.cache.policy import (
    MAX_DELTA,
    CachedResponse,
    Freshness,
    cache_key,
    conditional_headers,
    current_age,
    evaluate,
    format_http_date,
    invalidates,
    invalidation_keys,
    make_entry,
    merge_304,
    only_if_cached,
    parse_cache_control,
    parse_http_date,
    request_cacheable,
    response_headers,
    secondary_key,
    select,
    storable,
    usable_if_error,
)
from edgeproxy.http.messages import RequestHead, ResponseHead, header_all, header_get

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
H = Sequence[tuple[bytes, bytes]]


def rq(
    headers: H = (),
    *,
    method: bytes = b"GET",
    target: bytes = b"/a",
    scheme: str = "https",
    authority: bytes = b"example.com",
) -> RequestHead:
    return RequestHead(method, target, list(headers), scheme=scheme, authority=authority)


def rs(headers: H = (), status: int = 200) -> ResponseHead:
    return ResponseHead(status, list(headers))


def cc(value: str) -> tuple[bytes, bytes]:
    return (b"cache-control", value.encode())


def date(t: float = T0) -> tuple[bytes, bytes]:
    return (b"date", format_http_date(t))


def entry(
    resp_headers: H,
    req_headers: H = (),
    *,
    status: int = 200,
    body: bytes = b"hello",
    target: bytes = b"/a",
    request_time: float = T0,
    response_time: float = T0,
) -> CachedResponse:
    return make_entry(
        rq(req_headers, target=target), rs(resp_headers, status), body, request_time, response_time
    )


def fresh_at(e: CachedResponse, now: float, req_headers: H = ()) -> Freshness:
    return evaluate(e, rq(req_headers), now)


# ---------------------------------------------------------------------------------------------
# cache_key


def test_cache_key_lowercases_host_and_strips_default_ports() -> None:
    assert cache_key("https", b"Example.COM:443", b"/p?q=1") == b"https://example.com/p?q=1"
    assert cache_key("http", b"example.com:80", b"/") == b"http://example.com/"
    assert cache_key("HTTPS", b"example.com", b"/") == b"https://example.com/"
    assert cache_key("https", b"example.com:", b"/") == b"https://example.com/"


def test_cache_key_keeps_non_default_ports_and_query_order() -> None:
    assert cache_key("https", b"example.com:80", b"/") == b"https://example.com:80/"
    assert cache_key("http", b"example.com:8080", b"/") == b"http://example.com:8080/"
    assert cache_key("https", b"h", b"/p?b=2&a=1") == b"https://h/p?b=2&a=1"
    assert cache_key("https", b"h", b"/p?b=2&a=1") != cache_key("https", b"h", b"/p?a=1&b=2")


def test_cache_key_ipv6_authority() -> None:
    assert cache_key("https", b"[2001:DB8::1]:443", b"/") == b"https://[2001:db8::1]/"
    assert cache_key("https", b"[2001:db8::1]:8443", b"/") == b"https://[2001:db8::1]:8443/"
    assert cache_key("https", b"[2001:db8::1]", b"/") == b"https://[2001:db8::1]/"


# ---------------------------------------------------------------------------------------------
# parse_cache_control


def test_parse_cache_control_names_values_and_quotes() -> None:
    d = parse_cache_control(
        [b'Max-Age=60, PUBLIC, no-cache="set-cookie, x-a"', b'private="a\\"b" ,s-maxage = 5']
    )
    assert d == {
        "max-age": "60",
        "public": None,
        "no-cache": "set-cookie, x-a",
        "private": 'a"b',
        "s-maxage": "5",
    }


def test_parse_cache_control_duplicates_first_wins_and_conflicts_invalidate() -> None:
    assert parse_cache_control([b"no-cache=a, no-cache=b"]) == {"no-cache": "a"}
    assert parse_cache_control([b"max-age=5", b"max-age=5"]) == {"max-age": "5"}
    # A conflicting freshness directive becomes an invalid argument (read as stale).
    assert parse_cache_control([b"max-age=5", b"max-age=10"]) == {"max-age": ""}
    assert parse_cache_control([b"max-stale, max-stale=3"]) == {"max-stale": ""}


def test_parse_cache_control_garbage_is_dropped() -> None:
    assert parse_cache_control([b",,, ,", b"=5", b"\xff\xfe=1, max age=3"]) == {}
    assert parse_cache_control([b'no-cache="unterminated']) == {"no-cache": "unterminated"}
    assert parse_cache_control([]) == {}


# ---------------------------------------------------------------------------------------------
# HTTP dates


def test_parse_http_date_three_formats() -> None:
    expected = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", T0) == expected
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == expected
    assert parse_http_date(format_http_date(T0)) == T0


def test_parse_http_date_two_digit_year_window() -> None:
    # 2023 + 50 = 2073: "30" is 2030 but "94" would be 2094 > 2073, hence 1994.
    assert parse_http_date(b"Wednesday, 01-Jan-30 00:00:00 GMT", T0) == 1893456000.0


@pytest.mark.parametrize(
    "raw",
    [b"", b"0", b"-1", b"tomorrow", b"Sun, 31 Feb 2023 00:00:00 GMT", b"Sun, 06 Nov 1994 25:00:00 GMT",
     b"Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 GMT\u00e9".encode("latin-1"),
     b"Sun, 06 Nov 1994 08:49:37 PST"],
)  # fmt: skip
def test_parse_http_date_invalid(raw: bytes) -> None:
    assert parse_http_date(raw, T0) is None


# ---------------------------------------------------------------------------------------------
# request_cacheable


def test_request_cacheable_methods_range_and_no_store() -> None:
    assert request_cacheable(rq())
    assert request_cacheable(rq(method=b"HEAD"))
    assert not request_cacheable(rq(method=b"POST"))
    assert not request_cacheable(rq(method=b"get"))
    assert not request_cacheable(rq([(b"range", b"bytes=0-10")]))
    assert not request_cacheable(rq([cc("no-store")]))
    assert request_cacheable(rq([cc("no-cache")]))


# ---------------------------------------------------------------------------------------------
# storable


def test_storable_explicit_max_age() -> None:
    assert storable(rq(), rs([cc("max-age=60")]), T0)


def test_storable_only_get_responses() -> None:
    # A HEAD response has no body: storing it would serve empty GETs.
    assert not storable(rq(method=b"HEAD"), rs([cc("max-age=60")]), T0)
    assert not storable(rq(method=b"POST"), rs([cc("max-age=60")]), T0)


def test_storable_no_store_response_and_request() -> None:
    assert not storable(rq(), rs([cc("max-age=60, no-store")]), T0)
    assert not storable(rq([cc("no-store")]), rs([cc("max-age=60")]), T0)


def test_storable_must_understand_overrides_no_store_for_understood_status() -> None:
    assert storable(rq(), rs([cc("max-age=60, no-store, must-understand")]), T0)
    assert not storable(rq(), rs([cc("max-age=60, no-store, must-understand")], 299), T0)


def test_storable_private_never_in_shared_cache() -> None:
    assert not storable(rq(), rs([cc("max-age=60, private")]), T0)
    assert not storable(rq(), rs([cc('max-age=60, private="x-user"')]), T0)


def test_storable_public_alone_is_not_enough() -> None:
    assert not storable(rq(), rs([cc("public")]), T0)
    assert storable(rq(), rs([cc("public, max-age=5")]), T0)


def test_storable_authorization_needs_public_s_maxage_or_must_revalidate() -> None:
    auth = [(b"authorization", b"Bearer t")]
    assert not storable(rq(auth), rs([cc("max-age=60")]), T0)
    assert storable(rq(auth), rs([cc("max-age=60, public")]), T0)
    assert storable(rq(auth), rs([cc("s-maxage=60")]), T0)
    assert storable(rq(auth), rs([cc("max-age=60, must-revalidate")]), T0)


def test_storable_set_cookie_needs_explicit_shared_permission() -> None:
    cookie = (b"set-cookie", b"sid=secret")
    assert not storable(rq(), rs([cc("max-age=60"), cookie]), T0)
    assert storable(rq(), rs([cc("max-age=60, public"), cookie]), T0)
    assert storable(rq(), rs([cc("s-maxage=60"), cookie]), T0)


def test_set_cookie_named_in_qualified_no_cache_is_stripped_not_blocking() -> None:
    headers = [cc('max-age=60, no-cache="Set-Cookie"'), (b"set-cookie", b"sid=x"), date()]
    assert storable(rq(), rs(headers), T0)
    e = entry(headers)
    assert header_get(e.headers, b"set-cookie") is None
    assert not e.no_cache  # qualified no-cache does not force revalidation
    assert fresh_at(e, T0 + 10) is Freshness.FRESH


def test_storable_vary_star() -> None:
    assert not storable(rq(), rs([cc("max-age=60"), (b"vary", b"accept, *")]), T0)
    assert storable(rq(), rs([cc("max-age=60"), (b"vary", b"accept")]), T0)


@pytest.mark.parametrize("status", [100, 206, 299, 304, 600])
def test_storable_rejects_status_not_understood(status: int) -> None:
    assert not storable(rq(), rs([cc("max-age=60")], status), T0)


def test_storable_non_heuristic_status_needs_explicit_freshness() -> None:
    lm = (b"last-modified", format_http_date(T0 - 1000))
    assert storable(rq(), rs([cc("max-age=60")], 302), T0)
    assert not storable(rq(), rs([lm, date()], 302), T0)
    assert storable(rq(), rs([lm, date()], 404), T0)


def test_storable_heuristic_requires_last_modified_and_no_query() -> None:
    lm = (b"last-modified", format_http_date(T0 - 1000))
    assert storable(rq(), rs([lm, date()]), T0)
    assert not storable(rq(), rs([date(), (b"etag", b'"x"')]), T0)
    assert not storable(rq(target=b"/a?x=1"), rs([lm, date()]), T0)
    assert storable(rq(target=b"/a?x=1"), rs([lm, date(), cc("public")]), T0)


def test_storable_no_cache_needs_validator() -> None:
    assert storable(rq(), rs([cc("no-cache"), (b"etag", b'"v1"')]), T0)
    assert storable(rq(), rs([cc("no-cache"), (b"last-modified", format_http_date(T0))]), T0)
    assert not storable(rq(), rs([cc("no-cache")]), T0)
    assert not storable(rq(), rs([cc("no-cache, max-age=60")]), T0)


def test_storable_expires_variants() -> None:
    assert storable(rq(), rs([date(), (b"expires", format_http_date(T0 + 60))]), T0)
    # Past or invalid Expires: stale on arrival, only worth keeping with a validator.
    assert not storable(rq(), rs([date(), (b"expires", format_http_date(T0 - 60))]), T0)
    assert not storable(rq(), rs([date(), (b"expires", b"0")]), T0)
    assert storable(rq(), rs([date(), (b"expires", b"0"), (b"etag", b'"v"')]), T0)


def test_storable_zero_lifetime_needs_validator_or_stale_grant() -> None:
    assert not storable(rq(), rs([cc("max-age=0")]), T0)
    assert storable(rq(), rs([cc("max-age=0"), (b"etag", b'"v"')]), T0)
    assert storable(rq(), rs([cc("max-age=0, stale-if-error=60")]), T0)
    assert storable(rq(), rs([cc("max-age=0, stale-while-revalidate=60")]), T0)
    assert not storable(rq(), rs([cc("s-maxage=0, stale-if-error=60")]), T0)
    assert not storable(rq(), rs([cc("max-age=0, must-revalidate, stale-if-error=60")]), T0)


# ---------------------------------------------------------------------------------------------
# Freshness lifetime


def test_lifetime_s_maxage_beats_max_age_beats_expires() -> None:
    exp = (b"expires", format_http_date(T0 + 500))
    assert entry([cc("max-age=60, s-maxage=120"), exp, date()]).freshness_lifetime == 120
    assert entry([cc("max-age=60"), exp, date()]).freshness_lifetime == 60
    assert entry([exp, date()]).freshness_lifetime == 500


def test_lifetime_expires_relative_to_date_not_receipt() -> None:
    # The origin clock says Date = T0 - 100; lifetime is Expires - Date, whatever our clock says.
    e = entry([date(T0 - 100), (b"expires", format_http_date(T0 + 100))])
    assert e.freshness_lifetime == 200


def test_lifetime_expires_past_invalid_and_conflicting() -> None:
    assert entry([date(), (b"expires", format_http_date(T0 - 60))]).freshness_lifetime == 0
    assert entry([date(), (b"expires", b"-1")]).freshness_lifetime == 0
    two = [date(), (b"expires", format_http_date(T0 + 60)), (b"expires", format_http_date(T0 + 99))]
    assert entry(two).freshness_lifetime == 0


@pytest.mark.parametrize("arg", ["-1", "abc", "1.5", "", "+5", "\u0663", "60s"])
def test_lifetime_invalid_delta_seconds_means_stale(arg: str) -> None:
    e = make_entry(rq(), rs([(b"cache-control", f"max-age={arg}".encode())]), b"", T0, T0)
    assert e.freshness_lifetime == 0
    assert fresh_at(e, T0) is Freshness.REVALIDATE


def test_lifetime_huge_and_quoted_delta_seconds() -> None:
    assert entry([cc("max-age=99999999999999999999")]).freshness_lifetime == MAX_DELTA
    assert entry([cc("max-age=9999999999")]).freshness_lifetime == MAX_DELTA
    assert entry([cc("max-age=2147483647")]).freshness_lifetime == MAX_DELTA - 1
    e = entry([date(), (b"age", b"99999999999999999999"), cc("max-age=60")])
    assert header_get(response_headers(e, T0 + 5), b"age") == str(MAX_DELTA).encode()
    assert entry([cc("max-age=000000000000060")]).freshness_lifetime == 60
    assert entry([cc('max-age="60"')]).freshness_lifetime == 60


def test_lifetime_conflicting_max_age_is_stale() -> None:
    assert entry([cc("max-age=60"), cc("max-age=3600")]).freshness_lifetime == 0


def test_lifetime_heuristic_ten_percent_capped_at_one_day() -> None:
    lm = (b"last-modified", format_http_date(T0 - 1000))
    assert entry([lm, date()]).freshness_lifetime == pytest.approx(100)
    old = (b"last-modified", format_http_date(T0 - 10_000_000))
    assert entry([old, date()]).freshness_lifetime == 86400
    future = (b"last-modified", format_http_date(T0 + 1000))
    assert entry([future, date()]).freshness_lifetime == 0
    assert entry([lm, date()], target=b"/a?q").freshness_lifetime == 0


# ---------------------------------------------------------------------------------------------
# Age


def test_missing_date_is_added_and_age_starts_at_zero() -> None:
    e = entry([cc("max-age=60")], response_time=T0 + 0.5, request_time=T0 + 0.5)
    assert parse_http_date(header_get(e.headers, b"date")) == T0
    assert e.corrected_initial_age == 0
    assert header_get(response_headers(e, T0 + 10.9), b"age") == b"10"


def test_invalid_date_is_replaced() -> None:
    e = entry([(b"date", b"yesterday"), cc("max-age=60")])
    assert header_all(e.headers, b"date") == [format_http_date(T0)]


def test_upstream_age_header_counts() -> None:
    e = entry([date(), cc("max-age=120"), (b"age", b"100")])
    assert e.corrected_initial_age == 100
    assert header_get(e.headers, b"age") is None  # never stored, recomputed on the way out
    assert fresh_at(e, T0 + 10) is Freshness.FRESH
    assert fresh_at(e, T0 + 30) is Freshness.REVALIDATE
    assert header_get(response_headers(e, T0 + 15), b"age") == b"115"


def test_age_apparent_age_and_response_delay() -> None:
    # Date 50 s behind our clock: apparent age 50 wins over Age + delay.
    e = entry([date(T0 - 50), (b"age", b"10"), cc("max-age=60")], request_time=T0 - 2)
    assert e.corrected_initial_age == 50
    # Age 10 plus the 2 s the request took upstream beats a zero apparent age.
    e = entry([date(T0), (b"age", b"10"), cc("max-age=60")], request_time=T0 - 2)
    assert e.corrected_initial_age == 12
    assert current_age(e, T0 + 8) == 20


def test_age_header_invalid_ignored_and_list_uses_first() -> None:
    assert entry([date(), (b"age", b"-5")]).corrected_initial_age == 0
    assert entry([date(), (b"age", b"abc")]).corrected_initial_age == 0
    assert entry([date(), (b"age", b"7, 9")]).corrected_initial_age == 7


def test_response_headers_age_is_integer_never_negative() -> None:
    e = entry([date(), cc("max-age=60")])
    assert header_all(response_headers(e, T0 - 100), b"age") == [b"0"]
    assert header_all(response_headers(e, T0 + 59.99), b"age") == [b"59"]
    assert response_headers(e, T0)[:-1] == e.headers


# ---------------------------------------------------------------------------------------------
# Stored headers


def test_make_entry_strips_hop_by_hop_and_connection_named_fields() -> None:
    e = entry(
        [
            date(),
            cc("max-age=60"),
            (b"connection", b"keep-alive, X-Secret"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"x-secret", b"1"),
            (b"proxy-authenticate", b"Basic"),
            (b"upgrade", b"h2c"),
            (b"content-type", b"text/plain"),
        ],
        body=b"12345",
    )
    names = [k for k, _ in e.headers]
    for gone in (b"connection", b"keep-alive", b"transfer-encoding", b"x-secret", b"upgrade"):
        assert gone not in names
    assert header_get(e.headers, b"content-type") == b"text/plain"
    assert header_all(e.headers, b"content-length") == [b"5"]
    assert e.size == 5 + sum(len(k) + len(v) for k, v in e.headers)


def test_204_gets_no_content_length() -> None:
    e = entry([date(), cc("max-age=60")], status=204, body=b"")
    assert header_get(e.headers, b"content-length") is None


# ---------------------------------------------------------------------------------------------
# Vary


AE = b"accept-encoding"


def test_vary_match_and_mismatch() -> None:
    e = entry([date(), cc("max-age=60"), (b"vary", b"Accept-Encoding")], [(AE, b"gzip")])
    assert e.vary_names == (AE,)
    assert e.vary == ((AE, b"gzip"),)
    assert select([e], rq([(AE, b"gzip")])) is e
    assert select([e], rq([(AE, b"br")])) is None
    assert select([e], rq()) is None  # absent only matches absent


def test_vary_absent_differs_from_empty() -> None:
    e = entry([date(), cc("max-age=60"), (b"vary", b"accept-encoding")])
    assert e.vary == ()
    assert select([e], rq()) is e
    assert select([e], rq([(AE, b"")])) is None


def test_vary_normalises_whitespace_case_and_accept_encoding_order() -> None:
    key = secondary_key(rq([(AE, b"gzip, br")]), [b"Accept-Encoding"])
    assert key == secondary_key(rq([(AE, b"BR,gzip")]), [AE])
    assert key == secondary_key(rq([(AE, b" br ,  GZIP ")]), [AE])
    assert key == secondary_key(rq([(AE, b"br"), (AE, b"gzip")]), [AE])
    assert secondary_key(rq([(AE, b"gzip ; q=1")]), [AE]) == ((AE, b"gzip;q=1"),)
    # Order of Accept-Language matters to the origin; only case and whitespace normalise.
    al = b"accept-language"
    assert secondary_key(rq([(al, b"EN-us,  fr")]), [al]) == ((al, b"en-us,fr"),)
    assert secondary_key(rq([(al, b"fr,en")]), [al]) != secondary_key(rq([(al, b"en,fr")]), [al])


def test_vary_keeps_case_of_case_sensitive_headers() -> None:
    a = secondary_key(rq([(b"cookie", b"sid=ABC")]), [b"cookie"])
    b = secondary_key(rq([(b"cookie", b"sid=abc")]), [b"cookie"])
    assert a != b


def test_vary_names_across_lines_are_order_insensitive() -> None:
    req_headers = [(AE, b"gzip"), (b"accept", b"text/html")]
    e1 = entry([date(), cc("max-age=60"), (b"vary", b"Accept, accept-encoding")], req_headers)
    e2 = entry(
        [date(), cc("max-age=60"), (b"vary", b"accept-encoding"), (b"vary", b"ACCEPT")], req_headers
    )
    assert e1.vary_names == e2.vary_names == (b"accept", AE)
    assert e1.vary == e2.vary


def test_select_returns_most_recent_match() -> None:
    older = entry([date(), cc("max-age=60")], response_time=T0)
    newer = entry([date(), cc("max-age=60")], response_time=T0 + 5)
    other = entry([date(), cc("max-age=60"), (b"vary", b"accept")], [(b"accept", b"x")])
    assert select([newer, older, other], rq()) is newer
    assert select([older, newer], rq()) is newer
    assert select([], rq()) is None


def test_head_is_answered_from_get_entry() -> None:
    e = entry([date(), cc("max-age=60"), (b"vary", b"accept-encoding")], [(AE, b"gzip")])
    head = rq([(AE, b"gzip")], method=b"HEAD")
    assert request_cacheable(head)
    assert select([e], head) is e
    assert evaluate(e, head, T0 + 1) is Freshness.FRESH
    assert header_get(response_headers(e, T0 + 1), b"content-length") == b"5"


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_fresh_then_stale() -> None:
    e = entry([date(), cc("max-age=60")])
    assert fresh_at(e, T0 + 59) is Freshness.FRESH
    assert fresh_at(e, T0 + 60) is Freshness.REVALIDATE


def test_evaluate_response_no_cache_always_revalidates() -> None:
    e = entry([date(), cc("no-cache, max-age=600"), (b"etag", b'"v"')])
    assert e.no_cache
    assert fresh_at(e, T0 + 1) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 1, [cc("max-stale")]) is Freshness.REVALIDATE


def test_evaluate_request_no_cache_and_pragma() -> None:
    e = entry([date(), cc("max-age=600")])
    assert fresh_at(e, T0 + 1, [cc("no-cache")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 1, [(b"pragma", b"no-cache")]) is Freshness.REVALIDATE
    # Pragma is ignored once Cache-Control is present (RFC 9111 section 5.4).
    assert fresh_at(e, T0 + 1, [(b"pragma", b"no-cache"), cc("max-stale=1")]) is Freshness.FRESH


def test_evaluate_request_max_age() -> None:
    e = entry([date(), cc("max-age=600")])
    assert fresh_at(e, T0 + 30, [cc("max-age=60")]) is Freshness.FRESH
    assert fresh_at(e, T0 + 30, [cc("max-age=10")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 30, [cc("max-age=0")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 30, [cc("max-age=x")]) is Freshness.REVALIDATE


def test_evaluate_min_fresh() -> None:
    e = entry([date(), cc("max-age=100")])
    assert fresh_at(e, T0 + 30, [cc("min-fresh=50")]) is Freshness.FRESH
    assert fresh_at(e, T0 + 30, [cc("min-fresh=80")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 30, [cc("min-fresh=-1")]) is Freshness.REVALIDATE
    # Conflicting demands: the most restrictive wins (RFC 9111 section 4.2.1).
    assert fresh_at(e, T0 + 30, [cc("min-fresh=80, max-stale")]) is Freshness.REVALIDATE


def test_evaluate_max_stale_with_and_without_value() -> None:
    e = entry([date(), cc("max-age=60")])
    assert fresh_at(e, T0 + 10_000, [cc("max-stale")]) is Freshness.FRESH
    assert fresh_at(e, T0 + 65, [cc("max-stale=10")]) is Freshness.FRESH
    assert fresh_at(e, T0 + 80, [cc("max-stale=10")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 65, [cc("max-stale=ten")]) is Freshness.REVALIDATE
    # max-stale relaxes staleness, not the client's own age bound.
    assert fresh_at(e, T0 + 65, [cc("max-stale, max-age=30")]) is Freshness.REVALIDATE


@pytest.mark.parametrize(
    "directives", ["max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60"]
)
def test_evaluate_revalidate_directives_forbid_stale(directives: str) -> None:
    e = entry([date(), cc(directives + ", stale-while-revalidate=100, stale-if-error=100")])
    assert fresh_at(e, T0 + 30) is Freshness.FRESH
    assert fresh_at(e, T0 + 70) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 70, [cc("max-stale")]) is Freshness.REVALIDATE
    assert not usable_if_error(e, T0 + 70)
    assert not usable_if_error(e, T0 + 70, rq([cc("stale-if-error=100")]))


def test_evaluate_stale_while_revalidate() -> None:
    e = entry([date(), cc("max-age=60, stale-while-revalidate=30")])
    assert fresh_at(e, T0 + 30) is Freshness.FRESH
    assert fresh_at(e, T0 + 75) is Freshness.STALE_WHILE_REVALIDATE
    assert fresh_at(e, T0 + 95) is Freshness.REVALIDATE
    # A client demanding a young response (reload) is not served stale.
    assert fresh_at(e, T0 + 75, [cc("max-age=0")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 75, [cc("min-fresh=1")]) is Freshness.REVALIDATE
    assert fresh_at(e, T0 + 75, [cc("no-cache")]) is Freshness.REVALIDATE


def test_evaluate_only_if_cached() -> None:
    e = entry([date(), cc("max-age=60, stale-while-revalidate=30")])
    oic = [cc("only-if-cached")]
    assert only_if_cached(rq(oic))
    assert not only_if_cached(rq())
    assert fresh_at(e, T0 + 10, oic) is Freshness.FRESH
    assert fresh_at(e, T0 + 70, oic) is Freshness.STALE_WHILE_REVALIDATE
    assert fresh_at(e, T0 + 200, oic) is Freshness.ONLY_IF_CACHED_MISS
    assert fresh_at(e, T0 + 200, [cc("only-if-cached, max-stale")]) is Freshness.FRESH
    assert fresh_at(e, T0 + 10, [cc("only-if-cached, no-cache")]) is Freshness.ONLY_IF_CACHED_MISS


# ---------------------------------------------------------------------------------------------
# stale-if-error


def test_usable_if_error_response_directive() -> None:
    e = entry([date(), cc("max-age=60, stale-if-error=60")])
    assert usable_if_error(e, T0 + 90)
    assert usable_if_error(e, T0 + 120)
    assert not usable_if_error(e, T0 + 121)


def test_usable_if_error_request_directive_and_absent() -> None:
    e = entry([date(), cc("max-age=60")])
    assert not usable_if_error(e, T0 + 90)
    assert usable_if_error(e, T0 + 90, rq([cc("stale-if-error=60")]))
    assert not usable_if_error(e, T0 + 200, rq([cc("stale-if-error=60")]))
    assert not usable_if_error(e, T0 + 90, rq([cc("stale-if-error=abc")]))


def test_usable_if_error_not_for_no_cache() -> None:
    e = entry([date(), cc("no-cache, stale-if-error=600"), (b"etag", b'"v"')])
    assert not usable_if_error(e, T0 + 10)


# ---------------------------------------------------------------------------------------------
# Validation and 304


def test_conditional_headers() -> None:
    lm = format_http_date(T0 - 1000)
    e = entry([date(), cc("max-age=0"), (b"etag", b'W/"v1"'), (b"last-modified", lm)])
    assert conditional_headers(e) == [(b"if-none-match", b'W/"v1"'), (b"if-modified-since", lm)]
    assert conditional_headers(entry([date(), cc("max-age=5")])) == []
    bad = entry([date(), cc("max-age=5"), (b"last-modified", b"last tuesday")])
    assert conditional_headers(bad) == []


def test_merge_304_updates_headers_extends_freshness_keeps_body() -> None:
    e = entry(
        [date(), cc("max-age=60"), (b"etag", b'"v1"'), (b"x-old", b"1"), (b"content-type", b"a/b")],
        body=b"payload",
    )
    assert fresh_at(e, T0 + 100) is Freshness.REVALIDATE
    r304 = rs(
        [
            date(T0 + 100),
            cc("max-age=300"),
            (b"etag", b'"v1"'),
            (b"x-old", b"2"),
            (b"content-length", b"0"),
            (b"connection", b"close"),
            (b"age", b"3"),
        ],
        304,
    )
    m = merge_304(e, r304, T0 + 99, T0 + 100)
    assert m.body == b"payload"
    assert m.status == 200
    assert header_all(m.headers, b"x-old") == [b"2"]
    assert header_all(m.headers, b"content-type") == [b"a/b"]
    assert header_all(m.headers, b"content-length") == [b"7"]
    assert header_all(m.headers, b"date") == [format_http_date(T0 + 100)]
    assert header_get(m.headers, b"connection") is None
    assert header_get(m.headers, b"age") is None
    assert m.freshness_lifetime == 300
    assert m.corrected_initial_age == 4  # Age 3 + 1 s response delay
    assert fresh_at(m, T0 + 300) is Freshness.FRESH
    assert fresh_at(m, T0 + 397) is Freshness.REVALIDATE
    assert not m.no_store
    # The original entry is untouched.
    assert e.freshness_lifetime == 60 and header_all(e.headers, b"x-old") == [b"1"]


def test_merge_304_without_date_uses_receipt_time() -> None:
    e = entry([date(), cc("max-age=60"), (b"etag", b'"v1"')])
    m = merge_304(e, rs([], 304), T0 + 500, T0 + 500)
    assert header_all(m.headers, b"date") == [format_http_date(T0 + 500)]
    assert m.freshness_lifetime == 60
    assert fresh_at(m, T0 + 530) is Freshness.FRESH


def test_merge_304_that_forbids_storing_is_flagged() -> None:
    e = entry([date(), cc("max-age=60"), (b"etag", b'"v1"')])
    assert not e.no_store
    m = merge_304(e, rs([date(T0 + 100), cc("no-store")], 304), T0 + 100, T0 + 100)
    assert m.no_store


# ---------------------------------------------------------------------------------------------
# Invalidation


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"FROBNICATE"])
@pytest.mark.parametrize("status", [200, 201, 204, 301, 303])
def test_unsafe_methods_with_success_invalidate(method: bytes, status: int) -> None:
    assert invalidates(method, status)


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"GET", 200), (b"HEAD", 200), (b"OPTIONS", 204), (b"TRACE", 200), (b"POST", 404),
     (b"DELETE", 500), (b"PUT", 100)],
)  # fmt: skip
def test_safe_methods_and_errors_do_not_invalidate(method: bytes, status: int) -> None:
    assert not invalidates(method, status)


def test_invalidation_keys_target_location_content_location() -> None:
    req = rq(method=b"POST", target=b"/items/7?x=1", authority=b"Example.com:443")
    resp = rs(
        [(b"location", b"/items/8"), (b"content-location", b"https://EXAMPLE.com/items/7/view")]
    )
    assert invalidation_keys(req, resp) == [
        b"https://example.com/items/7?x=1",
        b"https://example.com/items/8",
        b"https://example.com/items/7/view",
    ]


def test_invalidation_keys_relative_and_other_hosts() -> None:
    req = rq(method=b"PUT", target=b"/a/b", scheme="http", authority=b"example.com")
    assert invalidation_keys(req, rs([(b"location", b"c?d=1#frag")]), "http") == [
        b"http://example.com/a/b",
        b"http://example.com/a/c?d=1",
    ]
    for loc in (b"https://evil.com/a", b"//evil.com/a", b"http://user@example.com/a",
                b"http://example.com:8080/a", b"http://[bad/", b"ftp://example.com/a"):  # fmt: skip
        assert invalidation_keys(req, rs([(b"location", loc)])) == [b"http://example.com/a/b"]
    # Non-ASCII is a (malformed) relative reference on the same host: resolved, never raises.
    keys = invalidation_keys(req, rs([(b"location", b"\xff\xfe")]))
    assert keys == [b"http://example.com/a/b", b"http://example.com/a/\xff\xfe"]


def test_invalidation_keys_empty_when_not_invalidating() -> None:
    assert invalidation_keys(rq(), rs([(b"location", b"/x")])) == []
    assert invalidation_keys(rq(method=b"POST"), rs([], 500)) == []


# ---------------------------------------------------------------------------------------------
# Robustness (property tests)

header_names = st.sampled_from(
    [b"cache-control", b"expires", b"date", b"age", b"last-modified", b"etag", b"vary",
     b"set-cookie", b"connection", b"location", b"content-location", b"pragma", b"authorization",
     b"accept-encoding", b"range", b"content-length", b"x-junk"]
)  # fmt: skip
junk_headers = st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=8)
times = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=4))
def test_parse_cache_control_never_raises(values: list[bytes]) -> None:
    d = parse_cache_control(values)
    for name, arg in d.items():
        assert name == name.lower() and name
        assert arg is None or isinstance(arg, str)


@settings(max_examples=150, deadline=None)
@given(junk_headers, junk_headers, st.integers(0, 999), times, times, times)
def test_policy_never_raises_on_garbage(
    req_h: list[tuple[bytes, bytes]],
    resp_h: list[tuple[bytes, bytes]],
    status: int,
    t_req: float,
    t_resp: float,
    now: float,
) -> None:
    req = rq(req_h, target=b"/p?q", authority=b"Ex.com:443")
    resp = rs(resp_h, status)
    request_cacheable(req)
    storable(req, resp, t_resp)
    e = make_entry(req, resp, b"body", t_req, t_resp)
    assert e.freshness_lifetime >= 0
    select([e], req)
    evaluate(e, req, now)
    usable_if_error(e, now, req)
    conditional_headers(e)
    assert header_get(response_headers(e, now), b"age") is not None
    merge_304(e, rs(resp_h, 304), t_req, t_resp)
    invalidation_keys(rq(req_h, method=b"POST"), rs(resp_h, 200))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.none(), st.integers(0, 2**40).map(lambda n: str(n).encode()), st.binary(max_size=8)
    ),
    st.floats(-1e6, 1e6),
    st.floats(0, 1e3),
    st.floats(0, 1e7),
    st.floats(0, 1e7),
)
def test_current_age_is_monotonic_in_now(
    age: bytes | None, date_offset: float, delay: float, d1: float, d2: float
) -> None:
    headers = [date(T0 + date_offset)]
    if age is not None:
        headers.append((b"age", age))
    e = entry(headers, request_time=T0 - delay, response_time=T0)
    lo, hi = sorted((T0 + d1, T0 + d2))
    assert current_age(e, lo) <= current_age(e, hi)
    assert current_age(e, T0) >= 0
    a_lo = int(header_get(response_headers(e, lo), b"age") or b"")
    a_hi = int(header_get(response_headers(e, hi), b"age") or b"")
    assert a_lo <= a_hi
