"""RFC 9111 shared-cache policy for the edge: keys, storability, freshness, ages, Vary and 304 merges.

Pure functions over `RequestHead`/`ResponseHead`; no I/O and no clock: every function that needs the
time takes `now` (seconds since the epoch). The pipeline decides *what* to do with an answer (serve,
revalidate, fetch, 504); this module only says what RFC 9111 (and RFC 5861 for the stale-*
extensions) allows for a cache shared by every client of the PoP.

Malformed input never raises: invalid arguments are read the conservative way RFC 9111 asks for
(invalid freshness => stale, invalid Expires => already expired, invalid Age => ignored).
"""

from __future__ import annotations

import calendar
import datetime
import email.utils
import enum
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgeproxy.http.messages import (
    Headers,
    RequestHead,
    ResponseHead,
    header_all,
    header_get,
    header_list,
)

__all__ = [
    "ERROR_STATUSES",
    "HEURISTIC_STATUSES",
    "HOP_BY_HOP",
    "MAX_DELTA",
    "UNDERSTOOD_STATUSES",
    "CachedResponse",
    "Freshness",
    "cache_key",
    "conditional_headers",
    "current_age",
    "evaluate",
    "evaluate_directives",
    "format_http_date",
    "invalidates",
    "invalidation_keys",
    "make_entry",
    "merge_304",
    "only_if_cached",
    "parse_cache_control",
    "parse_http_date",
    "request_cacheable",
    "response_headers",
    "secondary_key",
    "select",
    "storable",
    "usable_if_error",
]

# RFC 9111 section 1.2.2: delta-seconds too large to represent are sent/treated as 2^31.
MAX_DELTA = 2**31

HEURISTIC_LIMIT = 86400.0  # cap on heuristic freshness (one day)
HEURISTIC_FRACTION = 0.1  # of (Date - Last-Modified), RFC 9111 section 4.2.2

# Heuristically cacheable status codes (RFC 9110 section 15.1), minus 206: no partial content yet.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Final statuses whose caching semantics this cache implements (RFC 9111 section 3: "understood");
# others are never stored, even with explicit freshness. 206 and 304 are deliberately absent.
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | frozenset(
    {302, 303, 307, 400, 403, 451, 500, 502, 503, 504}
)
# What counts as an "error" for stale-if-error (RFC 5861 section 4); the caller adds failures to
# reach the origin at all.
ERROR_STATUSES = frozenset({500, 502, 503, 504})

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

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

# Directives whose argument is delta-seconds. A conflicting duplicate of one of these is recorded as
# an invalid argument, which every consumer reads the restrictive way (stale / no allowance).
_DELTA_DIRECTIVES = frozenset(
    {"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error", "min-fresh", "max-stale"}
)
CONFLICT = ""  # the invalid argument a conflicting duplicate becomes

# Vary normalisation: only these request headers are case-insensitive by definition; lowercasing
# e.g. Cookie or Authorization would merge different users' variants into one.
_CASE_INSENSITIVE_VARY = frozenset(
    {b"accept", b"accept-encoding", b"accept-language", b"accept-charset"}
)
# Items whose order carries no meaning (q-values decide), so sorting raises the hit rate.
_SORTED_VARY = frozenset({b"accept-encoding"})

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+", re.ASCII)


# --------------------------------------------------------------------------------------------
# Parsing helpers


def parse_cache_control(values: list[bytes]) -> dict[str, str | None]:
    """Cache-Control field lines -> {directive: argument or None}.

    Names are lowercased; quoted-string arguments are unquoted (backslash escapes resolved).
    Names that are not tokens are dropped. For duplicates the first occurrence wins (RFC 9111
    section 4.2.1), except for delta-seconds directives (max-age, s-maxage, stale-*, min-fresh,
    max-stale): a duplicate with a *different* argument turns the argument into `CONFLICT` (""),
    an invalid value, so the response is treated as stale / the allowance as zero.
    Never raises, whatever the bytes.
    """
    out: dict[str, str | None] = {}
    for raw in values:
        s = raw.decode("latin-1")
        i, n = 0, len(s)
        while i < n:
            while i < n and s[i] in ", \t":
                i += 1
            if i >= n:
                break
            start = i
            while i < n and s[i] not in ",=":
                i += 1
            name = s[start:i].strip().lower()
            arg: str | None = None
            if i < n and s[i] == "=":
                i += 1
                while i < n and s[i] in " \t":
                    i += 1
                if i < n and s[i] == '"':
                    i += 1
                    buf: list[str] = []
                    while i < n and s[i] != '"':
                        if s[i] == "\\" and i + 1 < n:
                            i += 1
                        buf.append(s[i])
                        i += 1
                    arg = "".join(buf)
                    # skip the closing quote and anything up to the next comma
                    while i < n and s[i] != ",":
                        i += 1
                else:
                    start = i
                    while i < n and s[i] != ",":
                        i += 1
                    arg = s[start:i].strip()
            if not _TOKEN_RE.fullmatch(name):
                continue
            if name not in out:
                out[name] = arg
            elif name in _DELTA_DIRECTIVES and out[name] != arg:
                out[name] = CONFLICT
    return out


def _delta(arg: str | None) -> int | None:
    """delta-seconds (RFC 9111 section 1.2.2), capped at 2^31; None when absent or invalid."""
    if not arg or not arg.isascii() or not arg.isdigit():
        return None
    digits = arg.lstrip("0") or "0"
    # Bound the work on absurd inputs before int(): more than 10 digits is over the cap anyway.
    if len(digits) > 10:
        return MAX_DELTA
    return min(int(digits), MAX_DELTA)


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_IMF_RE = re.compile(
    r"[a-z]{3},\s*(\d{1,2})\s+([a-z]{3})\s+(\d{4})\s+(\d{2}):(\d{2}):(\d{2})\s+gmt", re.I | re.A
)
_RFC850_RE = re.compile(
    r"[a-z]{6,9},\s*(\d{1,2})-([a-z]{3})-(\d{2})\s+(\d{2}):(\d{2}):(\d{2})\s+gmt", re.I | re.A
)
_ASCTIME_RE = re.compile(
    r"[a-z]{3}\s+([a-z]{3})\s+(\d{1,2})\s+(\d{2}):(\d{2}):(\d{2})\s+(\d{4})", re.I | re.A
)


def _two_digit_year(yy: int, now: float | None) -> int:
    # RFC 9110 section 5.6.7: more than 50 years in the future means the previous century.
    # Without a reference time, fall back to the POSIX window 1970..2069.
    if now is None:
        return 2000 + yy if yy < 70 else 1900 + yy
    try:
        this_year = time.gmtime(now).tm_year
    except (OverflowError, OSError, ValueError):
        return 2000 + yy if yy < 70 else 1900 + yy
    year = this_year // 100 * 100 + yy
    if year > this_year + 50:
        year -= 100
    return year


def parse_http_date(value: bytes | None, now: float | None = None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime form) as epoch seconds, or None if invalid.

    `now` only resolves the century of RFC 850 two-digit years.
    """
    if not value:
        return None
    s = value.decode("latin-1").strip()
    if m := _IMF_RE.fullmatch(s):
        day, mon, year, hh, mm, ss = m.groups()
        y = int(year)
    elif m := _RFC850_RE.fullmatch(s):
        day, mon, year, hh, mm, ss = m.groups()
        y = _two_digit_year(int(year), now)
    elif m := _ASCTIME_RE.fullmatch(s):
        mon, day, hh, mm, ss, year = m.groups()
        y = int(year)
    else:
        return None
    month = _MONTHS.get(mon.lower())
    if month is None:
        return None
    try:
        # datetime validates day-of-month and ranges; a leap second reads as :59.
        dt = datetime.datetime(y, month, int(day), int(hh), int(mm), min(int(ss), 59))
    except ValueError:
        return None
    return float(calendar.timegm(dt.timetuple()))


def format_http_date(t: float) -> bytes:
    """IMF-fixdate for epoch seconds `t` (clamped to years 1970..9999)."""
    t = min(max(t, 0.0), 253402300799.0)
    return email.utils.formatdate(t, usegmt=True).encode("ascii")


def _authority_host(scheme: str, authority: bytes) -> bytes:
    """Lowercased host[:port] with the scheme's default port (and an empty port) removed."""
    a = authority.strip().lower()
    bracket = a.rfind(b"]")
    colon = a.rfind(b":")
    if colon > bracket:
        host, port = a[:colon], a[colon + 1 :]
        default = b"443" if scheme.lower() == "https" else b"80"
        if not port or (port.isdigit() and port.lstrip(b"0") == default):
            return host
    return a


# (scheme, authority) -> the key's b"scheme://host" part: a PoP sees few distinct ones, and
# every lookup, hit or miss, needs it. Bounded: authorities are client-chosen.
_KEY_PREFIXES: dict[tuple[str, bytes], bytes] = {}


def cache_key(scheme: str, authority: bytes, target: bytes) -> bytes:
    """Primary cache key, e.g. b"https://example.com/a?b=1".

    The host is lowercased and a default port dropped so equivalent URIs share an entry; the
    target is kept byte-for-byte (reordering a query could change what the origin serves).
    """
    memo = (scheme, authority)
    prefix = _KEY_PREFIXES.get(memo)
    if prefix is None:
        prefix = scheme.lower().encode("ascii", "replace") + b"://" + _authority_host(scheme, authority)
        if len(_KEY_PREFIXES) >= 4096:
            _KEY_PREFIXES.clear()
        _KEY_PREFIXES[memo] = prefix
    return prefix + target


def _connection_named(headers: Headers) -> set[bytes]:
    return {v.lower() for v in header_list(headers, b"connection")}


def _strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], extra: Iterable[bytes] = ()
) -> Headers:
    hs = list(headers)
    drop = HOP_BY_HOP | _connection_named(hs) | {b"age"} | set(extra)
    return [(k, v) for k, v in hs if k not in drop]


def _request_cc(req: RequestHead) -> dict[str, str | None]:
    values = header_all(req.headers, b"cache-control")
    if values:
        return parse_cache_control(values)
    # RFC 9111 section 5.4: Pragma: no-cache only counts when Cache-Control is absent.
    if any(p.lower() == b"no-cache" for p in header_list(req.headers, b"pragma")):
        return {"no-cache": None}
    return {}


def _vary_names(headers: Headers) -> tuple[bytes, ...] | None:
    """Sorted, de-duplicated lowercase Vary names; None for `Vary: *`."""
    names = {v.lower() for v in header_list(headers, b"vary")}
    if b"*" in names:
        return None
    return tuple(sorted(names))


def _has_query(target: bytes) -> bool:
    return b"?" in target


# --------------------------------------------------------------------------------------------
# The stored response


@dataclass(slots=True)
class CachedResponse:
    """A stored response plus everything needed to judge it later without re-parsing headers.

    `headers` are as stored: hop-by-hop fields and Age removed, Date present, Content-Length equal
    to len(body) (except 204). `vary` is the secondary key the entry was stored under and
    `vary_names` the names it covers (a name absent from the request is absent from `vary`).
    """

    status: int
    headers: Headers
    body: bytes
    request_time: float
    response_time: float
    corrected_initial_age: float
    freshness_lifetime: float
    vary_names: tuple[bytes, ...] = ()
    vary: tuple[tuple[bytes, bytes], ...] = ()
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    s_maxage: bool = False
    no_cache: bool = False  # unqualified no-cache: every reuse needs revalidation
    etag: bytes | None = None
    last_modified: bytes | None = None
    has_query: bool = False  # heuristic freshness is not applied to URIs with a query
    no_store: bool = False  # set by merge_304 when the refreshed headers forbid storing
    # Front ends memoize per-entry renderings here (e.g. the client-ready headers of a hit);
    # not part of the entry's value, dropped with it.
    rendered: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers)

    @property
    def no_stale(self) -> bool:
        """Serving this stale is forbidden (RFC 9111 sections 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10)."""
        return self.must_revalidate or self.proxy_revalidate or self.s_maxage or self.no_cache


class Freshness(enum.Enum):
    """What `evaluate` allows for a selected entry.

    FRESH: serve it now without contacting the origin (also when the client's max-stale accepts a
    stale entry). STALE_WHILE_REVALIDATE: serve it now and revalidate in the background.
    REVALIDATE: send a conditional request (`conditional_headers`) before using it.
    ONLY_IF_CACHED_MISS: the request carried only-if-cached and the entry cannot be used without
    the origin; answer 504 (RFC 9111 section 5.2.1.7).
    """

    FRESH = enum.auto()
    STALE_WHILE_REVALIDATE = enum.auto()
    REVALIDATE = enum.auto()
    ONLY_IF_CACHED_MISS = enum.auto()


# --------------------------------------------------------------------------------------------
# Storability and freshness


def request_cacheable(req: RequestHead) -> bool:
    """Whether the cache takes part in this request at all (lookup and possibly store).

    GET and HEAD (a HEAD is answered from a stored GET); Range requests and requests with
    `no-store` go straight to the origin.
    """
    if req.method not in (b"GET", b"HEAD"):
        return False
    if header_get(req.headers, b"range") is not None:
        return False
    return "no-store" not in _request_cc(req)


def _unqualified(cc: dict[str, str | None], name: str) -> bool:
    return name in cc and not cc[name]


def _qualified_fields(cc: dict[str, str | None], name: str) -> set[bytes]:
    arg = cc.get(name)
    if not arg:
        return set()
    return {f.strip().lower().encode("latin-1") for f in arg.split(",") if f.strip()}


def _response_storable(status: int, headers: Headers, cc: dict[str, str | None]) -> bool:
    """The rules of RFC 9111 section 3 that depend only on the response."""
    if status not in UNDERSTOOD_STATUSES:
        return False
    # must-understand with an understood status overrides no-store (section 5.2.2.3).
    if "no-store" in cc and "must-understand" not in cc:
        return False
    # Any private, even qualified: the safe reading for a cache shared by all users.
    if "private" in cc:
        return False
    if _vary_names(headers) is None:
        return False
    # Edge-safety choice, stricter than RFC 9111: a Set-Cookie usually carries one user's session,
    # and replaying it to everyone behind this PoP is a classic CDN leak. Store it only when the
    # origin explicitly says the response is meant for shared caches, or names it in
    # no-cache="set-cookie" (then it is stripped before storing).
    return (
        header_get(headers, b"set-cookie") is None
        or "public" in cc
        or "s-maxage" in cc
        or b"set-cookie" in _qualified_fields(cc, "no-cache")
    )


def _date_value(headers: Headers, response_time: float) -> float:
    d = parse_http_date(header_get(headers, b"date"), response_time)
    return response_time if d is None else d


def _freshness_lifetime(
    status: int,
    headers: Headers,
    cc: dict[str, str | None],
    response_time: float,
    has_query: bool,
) -> tuple[float, bool]:
    """(freshness lifetime, explicit?) per RFC 9111 section 4.2.1 for a shared cache."""
    if "s-maxage" in cc:
        return float(_delta(cc["s-maxage"]) or 0), True
    if "max-age" in cc:
        return float(_delta(cc["max-age"]) or 0), True
    expires_lines = header_all(headers, b"expires")
    if expires_lines:
        # Several differing Expires lines are a conflict: the restrictive reading is "stale".
        if len(set(expires_lines)) > 1:
            return 0.0, True
        expires = parse_http_date(expires_lines[0], response_time)
        if expires is None:
            return 0.0, True  # invalid Expires means already expired (section 5.3)
        date = _date_value(headers, response_time)
        return float(min(max(expires - date, 0.0), MAX_DELTA)), True
    if status in HEURISTIC_STATUSES and (not has_query or "public" in cc):
        lm = parse_http_date(header_get(headers, b"last-modified"), response_time)
        if lm is not None:
            date = _date_value(headers, response_time)
            return min(max((date - lm) * HEURISTIC_FRACTION, 0.0), HEURISTIC_LIMIT), False
    return 0.0, False


def _validators(headers: Headers, now: float) -> tuple[bytes | None, bytes | None]:
    etag = header_get(headers, b"etag")
    lm = header_get(headers, b"last-modified")
    if lm is not None and parse_http_date(lm, now) is None:
        lm = None  # an unparseable date cannot be sent as If-Modified-Since
    return etag, lm


def storable(req: RequestHead, resp: ResponseHead, now: float) -> bool:
    """Whether a response to `req` may be stored by this shared cache (RFC 9111 section 3).

    Only GET responses are stored (a HEAD response has no body to serve GETs from). Beyond the RFC
    the cache declines responses it could never reuse: no-cache or zero lifetime without validators
    (and without a stale-* allowance).
    """
    if req.method != b"GET":
        return False
    if "no-store" in _request_cc(req):
        return False
    cc = parse_cache_control(header_all(resp.headers, b"cache-control"))
    if not _response_storable(resp.status, resp.headers, cc):
        return False
    if header_get(req.headers, b"authorization") is not None and not (
        "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    ):
        return False
    lifetime, explicit = _freshness_lifetime(
        resp.status, resp.headers, cc, now, _has_query(req.target)
    )
    etag, lm = _validators(resp.headers, now)
    has_validator = etag is not None or lm is not None
    no_cache = _unqualified(cc, "no-cache")
    if not (explicit or lifetime > 0 or (no_cache and has_validator)):
        return False
    if no_cache and not has_validator:
        return False
    if lifetime > 0 or has_validator:
        return True
    # Zero lifetime and nothing to revalidate with: only a stale-* grant makes it reusable.
    if "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc:
        return False
    return bool(_delta(cc.get("stale-while-revalidate")) or _delta(cc.get("stale-if-error")))


def _age_value(headers: Headers) -> float:
    # RFC 9111 section 5.1: first member of a list-valued Age; an invalid Age is ignored.
    raw = header_get(headers, b"age")
    if raw is None:
        return 0.0
    first = raw.split(b",", 1)[0].strip().decode("latin-1")
    return float(_delta(first) or 0)


def _corrected_initial_age(
    age_value: float, date_value: float, request_time: float, response_time: float
) -> float:
    # RFC 9111 section 4.2.3.
    apparent_age = max(0.0, response_time - date_value)
    response_delay = response_time - request_time
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(entry: CachedResponse, now: float) -> float:
    """current_age = corrected_initial_age + resident_time (RFC 9111 section 4.2.3)."""
    return entry.corrected_initial_age + (now - entry.response_time)


def _finish_headers(status: int, headers: Headers, body: bytes, response_time: float) -> Headers:
    """Give stored headers a valid Date and a Content-Length that matches the stored body."""
    out = list(headers)
    if parse_http_date(header_get(out, b"date"), response_time) is None:
        # RFC 9110 section 6.6.1: a recipient with a clock adds Date when it is missing; an
        # invalid one is replaced too so downstream age calculations stay sane.
        out = [(k, v) for k, v in out if k != b"date"]
        out.append((b"date", format_http_date(response_time)))
    out = [(k, v) for k, v in out if k != b"content-length"]
    if status != 204:
        out.append((b"content-length", str(len(body)).encode("ascii")))
    return out


def _build(
    status: int,
    headers: Headers,
    body: bytes,
    request_time: float,
    response_time: float,
    age_value: float,
    date_value: float,
    vary_names: tuple[bytes, ...],
    vary: tuple[tuple[bytes, bytes], ...],
    has_query: bool,
) -> CachedResponse:
    cc = parse_cache_control(header_all(headers, b"cache-control"))
    # no-cache="field": those fields must not be reused unvalidated, so they are not kept at all.
    strip = _qualified_fields(cc, "no-cache")
    if strip:
        headers = [(k, v) for k, v in headers if k not in strip]
    lifetime, _ = _freshness_lifetime(status, headers, cc, response_time, has_query)
    etag, lm = _validators(headers, response_time)
    return CachedResponse(
        status=status,
        headers=headers,
        body=body,
        request_time=request_time,
        response_time=response_time,
        corrected_initial_age=_corrected_initial_age(
            age_value, date_value, request_time, response_time
        ),
        freshness_lifetime=lifetime,
        vary_names=vary_names,
        vary=vary,
        stale_while_revalidate=float(_delta(cc.get("stale-while-revalidate")) or 0),
        stale_if_error=float(_delta(cc.get("stale-if-error")) or 0),
        must_revalidate="must-revalidate" in cc,
        proxy_revalidate="proxy-revalidate" in cc,
        s_maxage="s-maxage" in cc,
        no_cache=_unqualified(cc, "no-cache"),
        etag=etag,
        last_modified=lm,
        has_query=has_query,
        no_store=not _response_storable(status, headers, cc),
    )


def make_entry(
    req: RequestHead, resp: ResponseHead, body: bytes, request_time: float, response_time: float
) -> CachedResponse:
    """Build the entry to store for `resp` (call `storable` first).

    `request_time`/`response_time` are when the request was sent upstream and when the response
    head arrived. `body` must be the complete body exactly as the origin encoded it.
    """
    vary_names = _vary_names(resp.headers) or ()
    headers = _strip_hop_by_hop(resp.headers)
    date_value = _date_value(resp.headers, response_time)
    headers = _finish_headers(resp.status, headers, body, response_time)
    return _build(
        resp.status,
        headers,
        body,
        request_time,
        response_time,
        _age_value(resp.headers),
        date_value,
        vary_names,
        secondary_key(req, list(vary_names)),
        _has_query(req.target),
    )


# --------------------------------------------------------------------------------------------
# Vary


_WS_AROUND_RE = re.compile(rb"\s*([;=])\s*")


def _normalise_vary_value(name: bytes, values: list[bytes]) -> bytes:
    items: list[bytes] = []
    for value in values:
        for item in value.split(b","):
            item = b" ".join(item.split())  # collapse runs of whitespace
            item = _WS_AROUND_RE.sub(rb"\1", item)
            if item:
                items.append(item.lower() if name in _CASE_INSENSITIVE_VARY else item)
    if name in _SORTED_VARY:
        items.sort()
    return b",".join(items)


def secondary_key(req: RequestHead, vary_names: list[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The request's values for `vary_names`, normalised: ((name, value), ...) sorted by name.

    A header absent from the request is left out, so it only matches requests that lack it too
    (RFC 9111 section 4.1); a present-but-empty header is (name, b"").
    """
    out: list[tuple[bytes, bytes]] = []
    for name in sorted({n.strip().lower() for n in vary_names}):
        values = header_all(req.headers, name)
        if values:
            out.append((name, _normalise_vary_value(name, values)))
    return tuple(out)


def select(variants: list[CachedResponse], req: RequestHead) -> CachedResponse | None:
    """The most recently stored variant whose secondary key matches `req`, or None."""
    best: CachedResponse | None = None
    for v in variants:
        # Without Vary every request matches: skip building a key (the common hit).
        if v.vary_names and secondary_key(req, list(v.vary_names)) != v.vary:
            continue
        if best is None or v.response_time >= best.response_time:
            best = v
    return best


# --------------------------------------------------------------------------------------------
# Reuse


def only_if_cached(req: RequestHead) -> bool:
    """The client forbids contacting the origin: on a miss the caller answers 504."""
    return "only-if-cached" in _request_cc(req)


def evaluate(entry: CachedResponse, req: RequestHead, now: float) -> Freshness:
    """How `entry` may be used for `req` at `now` (RFC 9111 section 4.2, 4.3, 5.2; RFC 5861).

    Invalid request arguments are read restrictively: max-age and min-fresh force revalidation,
    max-stale grants nothing.
    """
    rcc = _request_cc(req)
    result = evaluate_directives(entry, rcc, now)
    if result is Freshness.REVALIDATE and "only-if-cached" in rcc:
        return Freshness.ONLY_IF_CACHED_MISS
    return result


def evaluate_directives(entry: CachedResponse, rcc: dict[str, str | None], now: float) -> Freshness:
    """`evaluate` given the request's parsed Cache-Control (`{}` for a request with neither
    Cache-Control nor Pragma: the fast path knows that without parsing)."""
    if entry.no_cache or "no-cache" in rcc:
        return Freshness.REVALIDATE
    age = current_age(entry, now)
    lifetime = entry.freshness_lifetime

    max_age: float | None = None
    if "max-age" in rcc:
        max_age = float(_delta(rcc["max-age"]) or 0)
    min_fresh = 0.0
    if "min-fresh" in rcc:
        mf = _delta(rcc["min-fresh"])
        if mf is None:
            return Freshness.REVALIDATE
        min_fresh = float(mf)

    if max_age is not None and age > max_age:
        return Freshness.REVALIDATE
    if lifetime > age + min_fresh:
        return Freshness.FRESH
    if lifetime > age:
        return Freshness.REVALIDATE  # fresh, but not for as long as min-fresh asks

    staleness = age - lifetime
    if entry.no_stale:
        return Freshness.REVALIDATE
    if "max-stale" in rcc:
        arg = rcc["max-stale"]
        if arg is None:
            return Freshness.FRESH
        allowed = _delta(arg)
        if allowed is not None and staleness <= allowed:
            return Freshness.FRESH
    # The client's own freshness demands (max-age, min-fresh) outrank the origin's SWR grant.
    if (
        max_age is None
        and "min-fresh" not in rcc
        and entry.stale_while_revalidate > 0
        and staleness <= entry.stale_while_revalidate
    ):
        return Freshness.STALE_WHILE_REVALIDATE
    return Freshness.REVALIDATE


def usable_if_error(entry: CachedResponse, now: float, req: RequestHead | None = None) -> bool:
    """Whether `entry` may be served when revalidation/refetch failed (RFC 5861 stale-if-error).

    The allowance is the larger of the response's and the request's stale-if-error; never when
    the response forbids serving stale (must-revalidate, proxy-revalidate, s-maxage, no-cache).
    """
    if entry.no_stale:
        return False
    allowance = entry.stale_if_error
    if req is not None:
        allowance = max(allowance, float(_delta(_request_cc(req).get("stale-if-error")) or 0))
    if allowance <= 0:
        return False
    staleness = max(0.0, current_age(entry, now) - entry.freshness_lifetime)
    return staleness <= allowance


def conditional_headers(entry: CachedResponse) -> Headers:
    """Validators to add to the upstream request when revalidating `entry` (may be empty)."""
    out: Headers = []
    if entry.etag is not None:
        out.append((b"if-none-match", entry.etag))
    if entry.last_modified is not None:
        out.append((b"if-modified-since", entry.last_modified))
    return out


def merge_304(
    entry: CachedResponse, resp304: ResponseHead, request_time: float, response_time: float
) -> CachedResponse:
    """The entry freshened by a 304 (RFC 9111 sections 3.2 and 4.3.4); `entry` is not modified.

    Stored fields are replaced by the 304's fields of the same name, except hop-by-hop fields and
    Content-Length; the body is kept, freshness and ages are recomputed from the 304. If the
    merged headers now forbid storing (no-store, private, ...), the result has `no_store=True`:
    serve it for this request but drop it from the store.
    """
    update = _strip_hop_by_hop(resp304.headers, extra=(b"content-length",))
    if parse_http_date(header_get(update, b"date"), response_time) is None:
        update = [(k, v) for k, v in update if k != b"date"]
        update.append((b"date", format_http_date(response_time)))
    replaced = {k for k, _ in update}
    headers = [(k, v) for k, v in entry.headers if k not in replaced] + update
    headers = _finish_headers(entry.status, headers, entry.body, response_time)
    fresh = _build(
        entry.status,
        headers,
        entry.body,
        request_time,
        response_time,
        _age_value(resp304.headers),
        _date_value(update, response_time),
        entry.vary_names,
        entry.vary,
        entry.has_query,
    )
    return fresh


def age_header(entry: CachedResponse, now: float) -> tuple[bytes, bytes]:
    """The Age field for `entry` at `now` (RFC 9111 section 5.1)."""
    age = int(min(max(current_age(entry, now), 0.0), float(MAX_DELTA)))
    return (b"age", str(age).encode("ascii"))


def response_headers(entry: CachedResponse, now: float) -> Headers:
    """Headers to send with `entry` at `now`: the stored ones plus Age."""
    return [*entry.headers, age_header(entry, now)]


# --------------------------------------------------------------------------------------------
# Invalidation


def invalidates(method: bytes, status: int) -> bool:
    """An unsafe method with a non-error final response invalidates its target (section 4.4)."""
    return method not in SAFE_METHODS and 200 <= status < 400


def invalidation_keys(
    req: RequestHead, resp: ResponseHead, scheme: str | None = None
) -> list[bytes]:
    """Primary keys to purge after `resp` to `req`; [] unless `invalidates(method, status)`.

    The target URI always; Location and Content-Location only when they name the same host, so an
    origin cannot purge another site's entries (RFC 9111 section 4.4).
    """
    if not invalidates(req.method, resp.status):
        return []
    scheme = (scheme or req.scheme).lower()
    own_host = _authority_host(scheme, req.authority)
    keys = [cache_key(scheme, req.authority, req.target)]
    base = f"{scheme}://{req.authority.decode('latin-1')}{req.target.decode('latin-1')}"
    for name in (b"location", b"content-location"):
        value = header_get(resp.headers, name)
        if value is None:
            continue
        try:
            parts = urllib.parse.urlsplit(
                urllib.parse.urljoin(base, value.decode("latin-1").strip())
            )
        except ValueError:
            continue
        if parts.scheme not in ("http", "https") or "@" in parts.netloc:
            continue
        netloc = parts.netloc.encode("latin-1")
        if _authority_host(parts.scheme, netloc) != own_host:
            continue
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = cache_key(parts.scheme, netloc, target.encode("latin-1"))
        if key not in keys:
            keys.append(key)
    return keys
