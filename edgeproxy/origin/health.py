"""Origin server health: active-check thresholds, passive ejection and server selection.

Pure code: every function takes the current time as an argument, so the asyncio shell in
`group.py` drives it and tests run it with a fake clock.

Two independent signals decide whether a server gets traffic:

* active checks (HTTP probes) flip `healthy` after `rise` consecutive successes or `fall`
  consecutive failures; a server starts healthy so a PoP serves traffic before its first probe;
* passive ejection: `consecutive_errors` failed requests in a row eject the server until
  `now + eject_seconds`. When the ejection expires the server is on probation: the next request
  result decides, a success restores it fully, a failure ejects it again at once (without waiting
  for another `consecutive_errors` failures, which would cost that many failed requests per
  ejection period against a dead server).

The two are kept apart on purpose: a passing health probe does not cancel a passive ejection,
because a health endpoint that answers while real requests fail is exactly the case passive
ejection exists for.

Panic mode: when no server is available, `choose` picks among all servers as if all were
healthy (Envoy's "panic threshold" at its extreme). A flapping or misconfigured health check then
degrades into "traffic goes to servers that might be down" instead of a total outage in which
the edge refuses every request without even trying.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

POLICIES = ("round_robin", "failover")


def probe_ok(status: int, expect_status: Sequence[int]) -> bool:
    """Verdict of an active probe: the status lies within the inclusive [low, high] range."""
    low, high = expect_status[0], expect_status[1]
    return low <= status <= high


@dataclass
class ServerHealth:
    """Health state of one origin server (see the module docstring for the rules)."""

    rise: int = 2
    fall: int = 3
    consecutive_errors: int = 5
    eject_seconds: float = 30.0

    healthy: bool = True
    """Active-check verdict."""
    ok_streak: int = 0
    fail_streak: int = 0
    passive_failures: int = 0
    """Consecutive failed requests since the last success or ejection."""
    ejected_until: float | None = None
    """End of the current (or, once past, the last unconfirmed) passive ejection."""
    ejections: int = 0

    def record_probe(self, ok: bool) -> bool:
        """Feed one active-check result; True when `healthy` changed."""
        if ok:
            self.fail_streak = 0
            self.ok_streak += 1
            if not self.healthy and self.ok_streak >= self.rise:
                self.healthy = True
                return True
        else:
            self.ok_streak = 0
            self.fail_streak += 1
            if self.healthy and self.fail_streak >= self.fall:
                self.healthy = False
                return True
        return False

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def on_probation(self, now: float) -> bool:
        """Ejection expired but no request has succeeded since."""
        return self.ejected_until is not None and now >= self.ejected_until

    def record_success(self, now: float) -> None:
        """A request got a usable response."""
        self.passive_failures = 0
        if self.on_probation(now):
            self.ejected_until = None

    def record_failure(self, now: float) -> bool:
        """A request failed (connect error, reset, timeout, 502-504); True when this ejects."""
        if self.ejected(now):
            # Late results of requests started before the ejection, or panic-mode traffic: the
            # server is already out, extending the ejection would only delay its second chance.
            return False
        if self.on_probation(now):
            self._eject(now)
            return True
        self.passive_failures += 1
        if self.passive_failures >= self.consecutive_errors:
            self._eject(now)
            return True
        return False

    def _eject(self, now: float) -> None:
        self.ejected_until = now + self.eject_seconds
        self.passive_failures = 0
        self.ejections += 1

    def available(self, now: float) -> bool:
        return self.healthy and not self.ejected(now)


class Choice:
    """The server picked (an index), and whether no server was available so the pick is among
    all servers (panic). A plain class: compiled, it is built without interpreted code."""

    __slots__ = ("index", "panic")

    def __init__(self, index: int, panic: bool) -> None:
        self.index = index
        self.panic = panic

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Choice) and (self.index, self.panic) == (other.index, other.panic)

    def __hash__(self) -> int:
        return hash((self.index, self.panic))

    def __repr__(self) -> str:
        return f"Choice(index={self.index}, panic={self.panic})"


def choose(
    servers: Sequence[ServerHealth],
    policy: str,
    now: float,
    rr_counter: int,
    tried: Collection[int] = (),
) -> Choice:
    """Pick the server for the next attempt.

    Candidates are the available servers, or all servers in panic mode. Servers in `tried`
    (indexes already attempted for this request) are skipped while an untried candidate remains;
    once every candidate was tried they are eligible again, so a one-server group can still
    retry. `round_robin` takes candidate `rr_counter % len(candidates)` (the caller increments
    the counter per pick); `failover` takes the first candidate in configured order.
    """
    if not servers:
        raise ValueError("choose() needs at least one server")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    if not tried and all(s.available(now) for s in servers):  # the common case, without lists
        return Choice(0 if policy == "failover" else rr_counter % len(servers), False)
    up = [i for i, s in enumerate(servers) if s.available(now)]
    panic = not up
    pool = up if up else list(range(len(servers)))
    untried = [i for i in pool if i not in tried]
    candidates = untried or pool
    if policy == "failover":
        return Choice(candidates[0], panic)
    return Choice(candidates[rr_counter % len(candidates)], panic)
