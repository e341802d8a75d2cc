"""The contract between the HTTP front ends (HTTP/1.1, HTTP/3) and the request pipeline.

A front end parses and validates requests, then hands each one to `RequestHandler.handle` with a
streamed `Body` and a `ResponseSink`. Errors the front end detects itself (malformed request
400, 413, 431, 501 ...) never reach `handle`: the front end asks `reject` for the response, so
counting, logging and the error page stay in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from .messages import Body, FreshResponse, RequestHead, ResponseHead, ResponseSink


class DirectClient(Protocol):
    """What a front end offers a response driven in callbacks (`RequestHandler.forward_now`)."""

    def direct_respond(self, head: ResponseHead, body: bytes) -> None:
        """Send the whole response, then go on with the connection's next request."""
        ...

    def direct_continue(self, head: RequestHead, run: Callable[[Body, ResponseSink], Awaitable[None]]) -> None:
        """Nothing was sent yet: finish the request in a task, as `run(body, sink)`."""
        ...

    def direct_abort(self) -> None:
        """Break the connection off (a bug left the response unfinished)."""
        ...


class DirectExchange(Protocol):
    def cancel(self) -> None:
        """The client went away: stop, and account for the request."""
        ...


class RequestHandler(Protocol):
    pop_id: str

    def new_request_id(self) -> str:
        """A fresh request id for a request (also for ones rejected before `handle`)."""
        ...

    def respond_fresh(self, head: RequestHead) -> FreshResponse | None:
        """Synchronous fast path for a request without a body: the whole response when the cache
        can answer at once (counted and logged), else None and the front end calls `handle`."""
        ...

    def forward_now(self, head: RequestHead, client: DirectClient) -> DirectExchange | None:
        """Synchronous start of a request without a body whose response the handler can answer
        from callbacks (a pass over a ready origin connection): it then answers through
        `client`, and the front end calls `cancel()` if the client goes away first. None: the
        front end calls `handle`."""
        ...

    async def handle(self, head: RequestHead, body: Body, sink: ResponseSink) -> None:
        """Produce the whole response via `sink`, including the pipeline's own 502/504 errors.

        May raise only on bugs.
        """
        ...

    def reject(
        self,
        protocol: str,
        status: int,
        detail: str,
        head: RequestHead | None,
        client_addr: tuple[str, int],
        request_id: str,
    ) -> tuple[ResponseHead, bytes]:
        """Count and log an error the front end detected itself; return the response to send.

        `protocol` is "h1" or "h3"; `head` is None when the request could not be parsed.
        """
        ...
