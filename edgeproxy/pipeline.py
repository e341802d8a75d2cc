"""The request pipeline HTTP/1.1 and HTTP/3 share: route to an origin group, serve from the edge
cache, coalesce concurrent misses into one origin request, forward the rest, log and count.

Cache *policy* (what is storable, fresh, how ages and 304s work) lives in `cache.policy`; this module
only sequences it with I/O. A `_Flight` is one origin fetch whose response several clients can read
at once: it keeps the whole body while it may still be stored (up to cache.max_object_bytes), and
beyond that streams it with backpressure from the slowest reader, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .accesslog import AccessLog
from .cache import policy
from .cache.store import MemoryStore
from .config import Config
from .http.errors import error_response
from .http.handler import DirectClient
from .http.messages import (
    IDEMPOTENT_METHODS,
    Body,
    BodyError,
    BytesBody,
    EmptyBody,
    FreshResponse,
    Headers,
    HTTPError,
    RequestHead,
    ResponseHead,
    ResponseSink,
    header_get,
    header_list,
)
from .http.semantics import (
    RequestIds,
    client_response_headers,
    edge_static_headers,
    origin_request_headers,
)
from .metrics import Registry
from .origin.client import (
    OriginConnection,
    OriginError,
    OriginProtocolError,
    OriginTimeout,
    first_byte_timeout_message,
)
from .origin.group import GroupServer, OriginGroup, OriginResponse

log = logging.getLogger("edgeproxy.pipeline")

# Idempotent request bodies up to this size are buffered so a failed attempt can be retried.
REPLAY_BUFFER = 64 * 1024
# Seconds a key whose response was not storable bypasses coalescing (Varnish's default).
HIT_FOR_PASS = 120.0
# Chunks a streaming (no longer cacheable) flight may run ahead of its slowest reader.
FLIGHT_WINDOW = 16
CONDITIONAL_REQUEST_HEADERS = (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range")


# Largest body a pass answered in callbacks may have (it is written without waiting for the
# client to take it); a larger one is relayed by a task, with backpressure.
DIRECT_BODY_LIMIT = 64 * 1024


def protocol_of(head: RequestHead) -> str:
    return "h3" if head.http_version == "3" else head.scheme


# Request fields that can change how a stored response is served (conditionals, ranges, request
# cache directives, upgrades): requests without them take the memoized fast path.
FAST_PATH_BLOCKERS = frozenset(
    {b"cache-control", b"pragma", b"range", b"upgrade", b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"}
)

NOT_MODIFIED_HEADERS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified", b"age"}
)


def not_modified(req: RequestHead, entry: policy.CachedResponse) -> bool:
    """The client's own validators match the stored response (RFC 9110 section 13.2.2)."""
    if entry.status != 200:
        return False
    inm = header_list(req.headers, b"if-none-match")
    if inm:
        etag = entry.etag
        if etag is None:
            return False
        weak = etag.removeprefix(b"W/")
        return any(t == b"*" or t.removeprefix(b"W/") == weak for t in inm)
    ims = header_get(req.headers, b"if-modified-since")
    if ims is not None and entry.last_modified is not None:
        since = policy.parse_http_date(ims)
        modified = policy.parse_http_date(entry.last_modified)
        return since is not None and modified is not None and modified <= since
    return False


def stored_response(req: RequestHead, entry: policy.CachedResponse, now: float) -> tuple[ResponseHead, bytes]:
    """What a stored entry answers to `req`: the entry itself, or a 304 when the client's
    validators match; no body for HEAD."""
    headers = policy.response_headers(entry, now)
    if not_modified(req, entry):
        return ResponseHead(304, [(k, v) for k, v in headers if k in NOT_MODIFIED_HEADERS]), b""
    return ResponseHead(entry.status, headers), b"" if req.method == b"HEAD" else entry.body


def _wants_upgrade(head: RequestHead) -> bool:
    """An HTTP/1.1 protocol upgrade request (RFC 9110 section 7.8): never served from cache."""
    return (
        head.http_version == "1.1"
        and header_get(head.headers, b"upgrade") is not None
        and b"upgrade" in [t.lower() for t in header_list(head.headers, b"connection")]
    )


class _NotShared(Exception):
    """The flight's response may not be given to this reader (private, or another Vary variant)."""


class _Flight:
    def __init__(self, keep_limit: int) -> None:
        self.head_ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head: ResponseHead | None = None
        self.cache_status = b"MISS"
        self.shareable = False
        self.vary_names: list[bytes] = []
        self.vary_key: tuple[Any, ...] = ()
        self.error: BaseException | None = None
        self.chunks: list[bytes] = []
        self.base = 0  # absolute index of chunks[0]
        self.size = 0
        self.keep_limit = keep_limit
        self.keeping = True  # every chunk is kept: the body may still be stored, readers may join
        self.complete = False
        self.readers: dict[int, int] = {}  # reader id -> absolute index of its next chunk
        self._wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.origin = ""  # the origin server that answered, for logs
        self.stored_entry: policy.CachedResponse | None = None  # set when serving a stored entry

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def set_head(self, head: ResponseHead, cache_status: bytes) -> None:
        self.head = head
        self.cache_status = cache_status
        if not self.head_ready.done():
            self.head_ready.set_result(None)

    def fail(self, error: BaseException) -> None:
        self.error = error
        if not self.head_ready.done():
            self.head_ready.set_result(None)
        self._notify()

    async def publish(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        if self.keeping and self.size > self.keep_limit:
            self.keeping = False
        self._notify()
        if not self.keeping:
            # Wait until the slowest reader is within the window, then forget what all have read.
            while self.readers and min(self.readers.values()) < self.base + len(self.chunks) - FLIGHT_WINDOW:
                await self._wake.wait()
            low = min(self.readers.values(), default=self.base + len(self.chunks))
            drop = low - self.base
            if drop > 0:
                del self.chunks[:drop]
                self.base = low

    def finish(self) -> None:
        self.complete = True
        self._notify()

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def join(self, reader: int) -> None:
        if not self.keeping:
            raise _NotShared("response is streaming past the cache size limit")
        self.readers[reader] = self.base

    def leave(self, reader: int) -> None:
        if self.readers.pop(reader, None) is not None:
            self._notify()

    async def read(self, reader: int) -> bytes:
        while True:
            pos = self.readers[reader]
            if pos < self.base + len(self.chunks):
                self.readers[reader] = pos + 1
                if not self.keeping:
                    self._notify()  # the publisher may be waiting for this reader
                return self.chunks[pos - self.base]
            if self.error is not None:
                raise BodyError(str(self.error))
            if self.complete:
                return b""
            await self._wake.wait()


class Pipeline:
    """Implements `http.handler.RequestHandler` for every front end of a PoP worker."""

    def __init__(
        self,
        config: Config,
        metrics: Registry,
        groups: dict[str, OriginGroup],
        *,
        access_log: AccessLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.pop_id = config.pop.id
        self.groups = groups
        self.clock = clock
        self.access_log = access_log
        self._ids = RequestIds(self.pop_id)
        self.cache: MemoryStore | None = (
            MemoryStore(config.cache.max_bytes, config.cache.max_object_bytes) if config.cache.enabled else None
        )
        self._flights: dict[bytes, _Flight] = {}
        self._host_groups: dict[bytes, OriginGroup] = {}  # authority -> group, memoized
        self._passes: dict[bytes, float] = {}  # key -> until when it is passed (hit-for-pass)
        self._background: set[asyncio.Task[None]] = set()
        self._reader_ids = 0
        self.alt_svc = b""  # set by the PoP once its QUIC listener is bound
        self.m_requests = metrics.counter("edgeproxy_requests_total", "Responses by protocol and status.", ["protocol", "status"])
        self.m_duration = metrics.histogram("edgeproxy_request_duration_seconds", "Time from request head to the end of the response.", ["protocol"])
        self.m_cache = metrics.counter("edgeproxy_cache_requests_total", "Cacheable requests by result (hit, miss, stale, revalidated, expired, coalesced, pass, bypass).", ["result"])
        self.m_cache_bytes = metrics.gauge("edgeproxy_cache_bytes", "Bytes held by the edge cache.")
        self.m_cache_entries = metrics.gauge("edgeproxy_cache_entries", "Responses held by the edge cache.")
        self.m_body_bytes = metrics.counter("edgeproxy_response_body_bytes_total", "Response body bytes sent to clients.", ["protocol"])

    # -- RequestHandler ---------------------------------------------------------------------

    def new_request_id(self) -> str:
        return self._ids.next()

    def reject(
        self,
        protocol: str,
        status: int,
        detail: str,
        head: RequestHead | None,
        client_addr: tuple[str, int],
        request_id: str,
    ) -> tuple[ResponseHead, bytes]:
        self.m_requests.inc(protocol, str(status))
        self._log(protocol, head, client_addr, request_id, status, 0, 0.0, b"", "", detail)
        rhead, body = error_response(status, detail, pop_id=self.pop_id, request_id=request_id, close=True)
        rhead.headers = client_response_headers(rhead.headers, pop_id=self.pop_id, request_id=request_id, http_version="1.1")
        return rhead, body

    def respond_fresh(self, head: RequestHead) -> FreshResponse | None:
        """The synchronous fast path: a fresh cache hit answered without a task (counted and
        logged here). None means the request needs `handle`."""
        cache = self.cache
        if cache is None or head.method not in (b"GET", b"HEAD"):
            return None
        started = time.monotonic()
        # Most requests carry none of the fields that change how a hit is served; for them the
        # entry's memoized client headers are reused as they are.
        plain = not any(k in FAST_PATH_BLOCKERS for k, _ in head.headers)
        if not plain and (not policy.request_cacheable(head) or _wants_upgrade(head)):
            return None
        try:
            self._group_for(head)
        except HTTPError:
            return None
        now = self.clock()
        entry = policy.select(cache.get(policy.cache_key(head.scheme, head.authority, head.target)), head)
        if entry is None:
            return None
        # A plain request has neither Cache-Control nor Pragma: no directives to parse.
        fresh = policy.evaluate_directives(entry, {}, now) if plain else policy.evaluate(entry, head, now)
        if fresh is not policy.Freshness.FRESH:
            return None
        self.m_cache.inc("hit")
        if plain:
            memo_key = (head.http_version == "3", self.alt_svc)
            memo = entry.rendered.get(memo_key)
            if isinstance(memo, ResponseHead):
                rhead = memo
            else:
                static = edge_static_headers(
                    entry.headers, pop_id=self.pop_id, http_version=head.http_version, alt_svc=self.alt_svc, cache_status=b"HIT"
                )
                rhead = entry.rendered[memo_key] = ResponseHead(entry.status, static, memo={})
            extra = [policy.age_header(entry, now), (b"x-request-id", head.request_id.encode())]
            body = b"" if head.method == b"HEAD" else entry.body
        else:
            rhead, body = stored_response(head, entry, now)
            rhead.headers = client_response_headers(
                rhead.headers, pop_id=self.pop_id, request_id=head.request_id, http_version=head.http_version, alt_svc=self.alt_svc, cache_status=b"HIT"
            )
            extra = []
        self._account(head, started, rhead.status, len(body), b"HIT", "", "")
        return FreshResponse(rhead, extra, body)

    def forward_now(self, head: RequestHead, client: DirectClient) -> _DirectForward | None:
        """The synchronous start of a pass (a bodiless GET or HEAD whose response is not stored:
        cache off, a request the cache does not serve, or a key in hit-for-pass) when an idle
        origin connection is ready: the request is sent and the response will be answered from
        the origin connection's callbacks, without a task. None: the front end calls `handle`.
        The front end calls `cancel()` on the result if its client goes away first."""
        if head.method not in (b"GET", b"HEAD"):
            return None
        for k, _ in head.headers:
            if k in FAST_PATH_BLOCKERS:
                return None  # conditionals, cache directives, ranges, upgrades: the general path
        try:
            group = self._group_for(head)
        except HTTPError:
            return None
        cache = self.cache
        if cache is not None and policy.request_cacheable(head):
            key = policy.cache_key(head.scheme, head.authority, head.target)
            if self._passes.get(key, 0.0) <= self.clock() or policy.select(cache.get(key), head) is not None:
                return None  # may be storable, or a stored entry to serve or revalidate
        ready = group.take_ready()
        if ready is None:
            return None
        srv, conn = ready
        try:
            conn.send_bodiless(self._origin_head(head))
        except (HTTPError, OriginError):
            srv.pool.release(conn)  # closed: the general path starts over and words any error
            return None
        if cache is not None:
            self.m_cache.inc("pass")
        direct = _DirectForward(self, head, client, group, srv, conn)
        conn.watch(direct.on_origin, direct.sent_at + group.section.first_byte_timeout)
        return direct

    async def handle(
        self,
        head: RequestHead,
        body: Body,
        sink: ResponseSink,
        *,
        resume: Callable[[_Exchange], Awaitable[None]] | None = None,
        started: float = 0.0,
    ) -> None:
        """`resume` (with the monotonic time the request `started`) finishes a request that
        `forward_now` began."""
        if not started:
            started = time.monotonic()
        ex = _Exchange(self, head, sink)
        try:
            if resume is None:
                await self._dispatch(head, body, ex)
            else:
                await resume(ex)
        except HTTPError as e:
            await ex.error(e)
        except BodyError as err:
            ex.detail = f"aborted: {err}"
            sink.abort()
        except (ConnectionError, OSError) as gone:
            ex.detail = f"client gone: {gone}"
            sink.abort()
        finally:
            # 499: the client went away before a response (nginx's code)
            self._account(head, started, ex.status or 499, ex.bytes_out, ex.cache_status, ex.origin, ex.detail)

    # -- internals --------------------------------------------------------------------------

    def _account(
        self, head: RequestHead, started: float, status: int, bytes_out: int, cache_status: bytes, origin: str, detail: str
    ) -> None:
        """Counts and logs a finished request (`started`: its monotonic start)."""
        proto = protocol_of(head)
        self.m_requests.inc(proto, str(status))
        duration = time.monotonic() - started
        self.m_duration.observe(duration, proto)
        self.m_body_bytes.inc(proto, amount=bytes_out)
        self._log(proto, head, head.client_addr, head.request_id, status, bytes_out, duration, cache_status, origin, detail)

    def _log(
        self,
        protocol: str,
        head: RequestHead | None,
        client: tuple[str, int],
        request_id: str,
        status: int,
        bytes_out: int,
        duration: float,
        cache_status: bytes,
        origin: str,
        detail: str,
    ) -> None:
        if self.access_log is None or not self.access_log.enabled:
            return
        record: dict[str, Any] = {
            "time": round(time.time(), 3),
            "request_id": request_id,
            "client": client[0],
            "protocol": protocol,
            "status": status,
            "bytes": bytes_out,
            "duration_ms": round(duration * 1000, 3),
        }
        if head is not None:
            record["method"] = head.method.decode("latin-1")
            record["host"] = head.authority.decode("latin-1")
            record["path"] = head.target.decode("latin-1")
        if cache_status:
            record["cache"] = cache_status.decode()
        if origin:
            record["origin"] = origin
        if detail:
            record["detail"] = detail
        self.access_log.write(record)

    def _group_for(self, head: RequestHead) -> OriginGroup:
        group = self._host_groups.get(head.authority)
        if group is not None:
            return group
        host = head.authority.decode("latin-1").lower()
        if host.startswith("["):
            host = host[1:].split("]", 1)[0]
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        section = self.config.group_for_host(host)
        if section is None:
            raise HTTPError(404, f"no origin is configured for host {host!r}")
        if len(self._host_groups) >= 4096:  # bounded: hosts are client-chosen
            self._host_groups.clear()
        group = self._host_groups[head.authority] = self.groups[section.name]
        return group

    async def _dispatch(self, head: RequestHead, body: Body, ex: _Exchange) -> None:
        group = self._group_for(head)
        if self.cache is not None and policy.request_cacheable(head) and not _wants_upgrade(head):
            await self._cached(head, group, ex)
            return
        if self.cache is not None:
            self.m_cache.inc("pass")
        await self._forward(head, body, group, ex)

    async def _forward(
        self,
        head: RequestHead,
        body: Body,
        group: OriginGroup,
        ex: _Exchange,
        prior: tuple[GroupServer, OriginError] | None = None,
    ) -> None:
        length = body.length
        upgrade = hasattr(ex.sink, "tunnel") and _wants_upgrade(head)
        if head.method in IDEMPOTENT_METHODS and length is not None and 0 < length <= REPLAY_BUFFER:
            data = bytearray()
            while chunk := await body.read():
                data += chunk
            body = BytesBody(bytes(data))
        elif length == 0:
            body = EmptyBody()
        if length == 0 and head.method in (b"POST", b"PUT", b"PATCH") and header_get(head.headers, b"content-length") is None:
            head.headers.append((b"content-length", b"0"))
        resp = await group.fetch(
            self._origin_head(head, upgrade=upgrade),
            body,
            length,
            prior=prior,
        )
        await self._relay(head, resp, ex, upgrade, [])

    def _origin_head(self, head: RequestHead, *, upgrade: bool = False) -> RequestHead:
        """The request as it goes to the origin (see semantics.origin_request_headers)."""
        headers = origin_request_headers(head, self.pop_id, upgrade=upgrade)
        return RequestHead(head.method, head.target, headers, head.scheme, head.authority, head.http_version, head.client_addr, head.request_id)

    async def _relay(self, head: RequestHead, resp: OriginResponse, ex: _Exchange, upgrade: bool, first: list[bytes]) -> None:
        """The origin's response to the client; `first`: body chunks already taken from it."""
        ex.origin = resp.server
        try:
            if resp.head.status == 101 and upgrade:
                await ex.start(resp.head, b"")
                await ex.sink.tunnel(resp.detach())  # type: ignore[attr-defined]
                return
            await ex.start(resp.head, b"")
            for chunk in first:
                await ex.write(chunk)
            while chunk := await resp.read():
                await ex.write(chunk)
            await ex.end()
            resp.release()
        finally:
            resp.close()
        if policy.invalidates(head.method, resp.head.status) and self.cache is not None:
            for key in policy.invalidation_keys(head, resp.head, head.scheme):
                self.cache.delete(key)
            self._update_cache_gauges()

    async def _cached(self, head: RequestHead, group: OriginGroup, ex: _Exchange) -> None:
        assert self.cache is not None
        key = policy.cache_key(head.scheme, head.authority, head.target)
        now = self.clock()
        entry = policy.select(self.cache.get(key), head)
        if entry is not None:
            fresh = policy.evaluate(entry, head, now)
            if fresh is policy.Freshness.FRESH:
                self.m_cache.inc("hit")
                await ex.serve_entry(entry, now, b"HIT")
                return
            if fresh is policy.Freshness.STALE_WHILE_REVALIDATE:
                self.m_cache.inc("stale")
                self._revalidate_in_background(key, head, group, entry)
                await ex.serve_entry(entry, now, b"STALE")
                return
            if fresh is policy.Freshness.ONLY_IF_CACHED_MISS:
                self.m_cache.inc("miss")
                raise HTTPError(504, "only-if-cached and the stored response needs revalidation")
        if policy.only_if_cached(head):
            self.m_cache.inc("miss")
            raise HTTPError(504, "only-if-cached and no usable stored response")
        if entry is None and self._passes.get(key, 0.0) > now:
            # Recently uncacheable: no waiting on a flight whose answer could not be shared.
            self.m_cache.inc("pass")
            await self._forward(head, EmptyBody(), group, ex)
            return
        flight = self._flights.get(key) if self.config.cache.coalesce else None
        coalesced = flight is not None and flight.keeping
        if flight is None or not flight.keeping:
            flight = self._start_flight(key, head, group, entry)
        else:
            self.m_cache.inc("coalesced")
        await self._serve_flight(flight, head, group, ex, coalesced)

    def _remember_pass(self, key: bytes, now: float) -> None:
        """Hit-for-pass (as Varnish calls it): for HIT_FOR_PASS seconds requests for a key whose
        response was not storable skip coalescing, instead of queueing behind a flight only to
        fetch again themselves. Cleared when a storable response arrives."""
        if len(self._passes) >= 65536:  # bounded: keys are client-chosen
            self._passes = {k: t for k, t in self._passes.items() if t > now}
            if len(self._passes) >= 65536:
                self._passes.clear()
        self._passes[key] = now + HIT_FOR_PASS

    def _start_flight(
        self, key: bytes, head: RequestHead, group: OriginGroup, stale: policy.CachedResponse | None
    ) -> _Flight:
        assert self.cache is not None
        flight = _Flight(self.cache.max_object_bytes)
        if self.config.cache.coalesce:
            self._flights[key] = flight
        flight.task = asyncio.get_running_loop().create_task(self._fly(flight, key, head, group, stale))
        self._background.add(flight.task)
        flight.task.add_done_callback(self._background.discard)
        return flight

    async def _fly(
        self, flight: _Flight, key: bytes, head: RequestHead, group: OriginGroup, stale: policy.CachedResponse | None
    ) -> None:
        """One origin fetch for a cache key: a GET (HEAD requests are filled with GET too), made
        conditional when a stale entry has validators."""
        assert self.cache is not None
        headers = [(k, v) for k, v in head.headers if k not in CONDITIONAL_REQUEST_HEADERS]
        fill = RequestHead(b"GET", head.target, headers, head.scheme, head.authority, head.http_version, head.client_addr, head.request_id)
        out_headers = origin_request_headers(fill, self.pop_id)
        if stale is not None:
            out_headers += policy.conditional_headers(stale)
        request_time = self.clock()
        resp: OriginResponse | None = None
        try:
            try:
                resp = await group.fetch(
                    RequestHead(b"GET", head.target, out_headers, head.scheme, head.authority, head.http_version, head.client_addr, head.request_id),
                    EmptyBody(),
                    0,
                )
            except HTTPError as e:
                if stale is not None and policy.usable_if_error(stale, self.clock(), head):
                    self._publish_entry(flight, stale, b"STALE")
                    self.m_cache.inc("stale")
                    return
                flight.fail(e)
                return
            response_time = self.clock()
            flight.origin = resp.server
            if stale is not None and resp.head.status == 304:
                merged = policy.merge_304(stale, resp.head, request_time, response_time)
                resp.release()
                if merged.no_store:  # the 304 withdrew permission to store: serve once, forget
                    self.cache.delete(key)
                else:
                    self.cache.put(key, merged)
                self._update_cache_gauges()
                self.m_cache.inc("revalidated")
                self._publish_entry(flight, merged, b"REVALIDATED")
                return
            if stale is not None and resp.head.status >= 500 and policy.usable_if_error(stale, response_time, head):
                resp.close()
                self.m_cache.inc("stale")
                self._publish_entry(flight, stale, b"STALE")
                return
            storable = policy.storable(fill, resp.head, response_time)
            private = b"private" in [t.lower().split(b"=")[0] for t in header_list(resp.head.headers, b"cache-control")]
            flight.shareable = storable or (resp.head.status >= 500 and not private)
            if not storable and resp.head.status < 500:
                self._remember_pass(key, response_time)
            flight.vary_names = [v.lower() for v in header_list(resp.head.headers, b"vary")]
            flight.vary_key = policy.secondary_key(fill, flight.vary_names)
            self.m_cache.inc("expired" if stale is not None else "miss")
            flight.set_head(resp.head, b"EXPIRED" if stale is not None else b"MISS")
            length = header_get(resp.head.headers, b"content-length")
            if length is not None and length.isdigit() and int(length) > self.cache.max_object_bytes:
                flight.keeping = False
            while chunk := await resp.read():
                await flight.publish(chunk)
                if not flight.keeping and not flight.readers:
                    resp.close()  # nobody is reading and it cannot be stored: stop fetching
                    flight.fail(BodyError("no readers left"))
                    return
            resp.release()
            if storable:
                self._passes.pop(key, None)
            if storable and flight.keeping:
                entry = policy.make_entry(fill, resp.head, flight.body(), request_time, response_time)
                if self.cache.put(key, entry):
                    self._update_cache_gauges()
            flight.finish()
        except BodyError as err:
            flight.fail(err)
        except asyncio.CancelledError:
            flight.fail(BodyError("edge shutting down"))
            raise
        except Exception as exc:  # a bug must not leave waiters hanging
            log.exception("cache fill for %r failed", key)
            flight.fail(HTTPError(502, f"cache fill failed: {exc}"))
        finally:
            if resp is not None:
                resp.close()
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _publish_entry(self, flight: _Flight, entry: policy.CachedResponse, cache_status: bytes) -> None:
        flight.shareable = True
        flight.vary_names = list(entry.vary_names)
        flight.vary_key = entry.vary
        flight.stored_entry = entry
        flight.set_head(ResponseHead(entry.status, policy.response_headers(entry, self.clock())), cache_status)
        flight.chunks = [entry.body] if entry.body else []
        flight.size = len(entry.body)
        flight.finish()

    async def _serve_flight(self, flight: _Flight, head: RequestHead, group: OriginGroup, ex: _Exchange, coalesced: bool) -> None:
        self._reader_ids += 1
        reader = self._reader_ids
        flight.join(reader)
        try:
            await asyncio.shield(flight.head_ready)
            if flight.error is not None and flight.head is None:
                if isinstance(flight.error, HTTPError):
                    raise HTTPError(flight.error.status, flight.error.detail)
                raise HTTPError(502, str(flight.error))
            assert flight.head is not None
            if coalesced and not (flight.shareable and policy.secondary_key(head, flight.vary_names) == flight.vary_key):
                flight.leave(reader)
                self.m_cache.inc("pass")
                await self._forward(head, EmptyBody(), group, ex)
                return
            ex.origin = flight.origin
            status = b"COALESCED" if coalesced and flight.cache_status == b"MISS" else flight.cache_status
            stored = flight.stored_entry
            if stored is not None:
                await ex.serve_entry(stored, self.clock(), status)
                return
            await ex.start(flight.head, status)
            while chunk := await flight.read(reader):
                await ex.write(chunk)
            await ex.end()
        finally:
            flight.leave(reader)

    def _revalidate_in_background(self, key: bytes, head: RequestHead, group: OriginGroup, entry: policy.CachedResponse) -> None:
        if key in self._flights:
            return
        flight = self._start_flight(key, head, group, entry)
        # Nobody reads a background revalidation; its readers dict stays empty, so it only keeps
        # the body for the store.
        del flight

    def _update_cache_gauges(self) -> None:
        if self.cache is not None:
            self.m_cache_bytes.set(value=self.cache.bytes_used)
            self.m_cache_entries.set(value=len(self.cache))

    def purge(self, url: bytes, prefix: bool = False) -> int:
        """Purges by URL (`https://host/path`, or `//host/path` / `host/path` for both schemes)."""
        if self.cache is None:
            return 0
        if b"://" in url:
            keys = [url]
        else:
            rest = url.lstrip(b"/")
            keys = [b"http://" + rest, b"https://" + rest]
        removed = 0
        for key in keys:
            if prefix:
                removed += self.cache.purge_prefix(key)
            else:
                scheme, _, rest = key.partition(b"://")
                host, slash, path = rest.partition(b"/")
                removed += self.cache.purge(policy.cache_key(scheme.decode(), host, slash + path if slash else b"/"))
        self._update_cache_gauges()
        return removed

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


class _DirectForward:
    """A pass answered in callbacks (see `Pipeline.forward_now`), from request sent to response
    written. The common case (the head and the whole body arrive together) costs no task, future
    or coroutine. Anything else continues in a task through the general path, before anything
    reached the client: a failure before the response head (the general path retries it, this
    attempt counting as its first) and a body still on its way (relayed with backpressure)."""

    def __init__(
        self,
        pipeline: Pipeline,
        head: RequestHead,
        client: DirectClient,
        group: OriginGroup,
        srv: GroupServer,
        conn: OriginConnection,
    ) -> None:
        self.p = pipeline
        self.head = head
        self.client = client
        self.group = group
        self.srv = srv
        self.conn = conn
        self.started = time.monotonic()
        self.sent_at = conn.now()
        self.done = False

    def on_origin(self) -> None:
        """The origin connection's callback: data, EOF, loss, or the first-byte deadline."""
        if self.done:
            return
        try:
            self._on_origin()
        except Exception:  # a bug must neither leave the client waiting nor reach the loop
            log.exception("request %s: direct forward failed", self.head.request_id)
            if not self.done:
                self._failed(OriginProtocolError(f"internal error with the response of {self.srv.name}"))
            else:
                self.client.direct_abort()

    def _on_origin(self) -> None:
        conn = self.conn
        chunks: list[bytes] = []
        whole = conn.whole_response_nowait()
        if whole is not None:  # the usual case: head and body in one read
            rhead, body = whole
            if body:
                chunks.append(body)
            complete = True
        else:
            try:
                head = conn.head_nowait()
            except OriginError as e:
                self._failed(e)
                return
            if head is None:
                if conn.timed_out:
                    self._failed(OriginTimeout(first_byte_timeout_message(self.srv.name, self.group.section.first_byte_timeout)))
                elif conn.closed:
                    self._failed(OriginProtocolError(f"{self.srv.name} closed the connection mid-head"))
                return
            rhead = head
            try:
                complete = conn.body_nowait(chunks)
            except BodyError:
                complete = False  # the relay reads the same error and breaks the response off
        self.done = True
        conn.watch(None)
        self.group.attempt_succeeded(self.srv, rhead.status, conn.now() - self.sent_at)
        if complete and sum(len(c) for c in chunks) <= DIRECT_BODY_LIMIT:
            self.srv.pool.release(conn)
            self._respond(rhead, chunks)
            return
        self._relay_rest(rhead, chunks, complete)

    def _relay_rest(self, rhead: ResponseHead, chunks: list[bytes], complete: bool) -> None:
        """The response continues in a task: `chunks` of its body are in, `complete` if all."""
        conn = self.conn
        resp = OriginResponse(
            conn, rhead, read_timeout=self.group.section.read_timeout, on_done=self.srv.pool.release, method=self.head.method, complete=complete
        )
        if complete:
            resp.release()  # the connection goes back now; the relay only writes `chunks`
        self._continue(lambda ex: self.p._relay(self.head, resp, ex, False, chunks))

    def _failed(self, error: OriginError) -> None:
        self.done = True
        conn = self.conn
        self.group.attempt_failed(self.srv, error)
        conn.close()
        self.srv.pool.release(conn)
        prior = (self.srv, error)
        self._continue(lambda ex: self.p._forward(self.head, EmptyBody(), self.group, ex, prior))

    def _continue(self, resume: Callable[[_Exchange], Awaitable[None]]) -> None:
        p = self.p
        started = self.started
        head = self.head

        def run(body: Body, sink: ResponseSink) -> Awaitable[None]:
            return p.handle(head, body, sink, resume=resume, started=started)

        self.client.direct_continue(head, run)

    def _respond(self, rhead: ResponseHead, chunks: list[bytes]) -> None:
        p = self.p
        head = self.head
        status = rhead.status
        headers = client_response_headers(
            rhead.headers, pop_id=p.pop_id, request_id=head.request_id, http_version=head.http_version, alt_svc=p.alt_svc
        )
        body = b"" if head.method == b"HEAD" or not chunks else chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.client.direct_respond(ResponseHead(status, headers, rhead.reason), body)
        p._account(head, self.started, status, len(body), b"", self.srv.name, "")

    def cancel(self) -> None:
        """The client went away before the response: drop the origin connection (a response
        half read cannot be reused) and account for the request as `handle` would (499)."""
        if self.done:
            return
        self.done = True
        self.conn.close()
        self.srv.pool.release(self.conn)
        self.p._account(self.head, self.started, 499, 0, b"", self.srv.name, "client gone")


class _Exchange:
    """One request's response side: header rewriting, byte counting, edge error responses."""

    def __init__(self, pipeline: Pipeline, head: RequestHead, sink: ResponseSink) -> None:
        self.p = pipeline
        self.head = head
        self.sink = sink
        self.status = 0
        self.bytes_out = 0
        self.cache_status = b""
        self.origin = ""
        self.detail = ""
        self.is_head = head.method == b"HEAD"

    def _client_headers(self, headers: Headers, cache_status: bytes) -> Headers:
        return client_response_headers(
            headers,
            pop_id=self.p.pop_id,
            request_id=self.head.request_id,
            http_version=self.head.http_version,
            alt_svc=self.p.alt_svc,
            cache_status=cache_status,
        )

    async def start(self, head: ResponseHead, cache_status: bytes) -> None:
        self.status = head.status
        self.cache_status = cache_status
        headers = head.headers if head.status == 101 else self._client_headers(head.headers, cache_status)
        await self.sink.start(ResponseHead(head.status, headers, head.reason))

    async def write(self, data: bytes) -> None:
        if self.is_head:
            return
        self.bytes_out += len(data)
        await self.sink.write(data)

    async def end(self) -> None:
        await self.sink.end()

    async def serve_entry(self, entry: policy.CachedResponse, now: float, cache_status: bytes) -> None:
        rhead, body = stored_response(self.head, entry, now)
        await self.start(rhead, cache_status)
        if body:
            await self.write(body)
        await self.end()

    async def error(self, e: HTTPError) -> None:
        self.detail = e.detail
        if self.sink.started:
            self.sink.abort()
            return
        rhead, body = error_response(e.status, e.detail, pop_id=self.p.pop_id, request_id=self.head.request_id)
        await self.start(rhead, self.cache_status)
        await self.write(body)
        await self.end()
