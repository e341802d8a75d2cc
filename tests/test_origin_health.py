"""Pure health state and server selection (edgeproxy.origin.health): no sockets, fake time."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeproxy.origin.health import ServerHealth, choose, probe_ok


def test_probe_verdict_uses_inclusive_range() -> None:
    assert probe_ok(200, [200, 399])
    assert probe_ok(399, [200, 399])
    assert not probe_ok(400, [200, 399])
    assert not probe_ok(199, [200, 399])
    assert probe_ok(503, [503, 503])


def test_rise_and_fall_thresholds() -> None:
    h = ServerHealth(rise=2, fall=3)
    assert h.healthy  # starts healthy
    assert not h.record_probe(False)
    assert not h.record_probe(False)
    assert h.record_probe(True) is False  # success resets the failure streak
    assert not h.record_probe(False)
    assert not h.record_probe(False)
    assert h.healthy
    assert h.record_probe(False)  # third in a row
    assert not h.healthy and not h.available(0.0)
    assert not h.record_probe(True)
    assert not h.healthy
    assert not h.record_probe(False)  # breaks the success streak
    assert not h.record_probe(True)
    assert h.record_probe(True)
    assert h.healthy and h.available(0.0)


def test_passive_ejection_expiry_and_probation() -> None:
    h = ServerHealth(consecutive_errors=3, eject_seconds=10.0)
    assert not h.record_failure(0.0)
    assert not h.record_failure(1.0)
    h.record_success(2.0)  # a success resets the count
    assert not h.record_failure(3.0)
    assert not h.record_failure(4.0)
    assert h.record_failure(5.0)  # third consecutive failure ejects
    assert not h.available(5.0) and not h.available(14.99)
    assert not h.record_failure(6.0)  # late failures while ejected change nothing
    assert h.ejected_until == 15.0
    assert h.available(15.0)  # expired: tried again, on probation
    assert h.record_failure(15.5)  # one failure on probation ejects again at once
    assert not h.available(20.0) and h.available(25.5)
    h.record_success(26.0)  # success on probation restores fully
    assert h.ejected_until is None
    assert not h.record_failure(27.0)  # back to counting from zero
    assert h.available(27.0)
    assert h.ejections == 2


def test_passive_and_active_are_independent() -> None:
    h = ServerHealth(rise=1, fall=1, consecutive_errors=1, eject_seconds=10.0)
    h.record_failure(0.0)
    h.record_probe(True)  # a passing probe does not cancel an ejection
    assert not h.available(1.0)
    assert h.available(10.0)
    h.record_probe(False)
    assert not h.available(10.0)


def servers(n: int) -> list[ServerHealth]:
    return [ServerHealth(fall=1, rise=1) for _ in range(n)]


def test_round_robin_spreads_over_available_servers() -> None:
    s = servers(3)
    picks = Counter(choose(s, "round_robin", 0.0, i).index for i in range(30))
    assert picks == {0: 10, 1: 10, 2: 10}
    s[1].record_probe(False)
    picks = Counter(choose(s, "round_robin", 0.0, i).index for i in range(30))
    assert picks == {0: 15, 2: 15}


def test_failover_takes_first_available_in_order() -> None:
    s = servers(3)
    assert {choose(s, "failover", 0.0, i).index for i in range(5)} == {0}
    s[0].record_probe(False)
    assert {choose(s, "failover", 0.0, i).index for i in range(5)} == {1}
    s[0].record_probe(True)
    assert choose(s, "failover", 0.0, 7).index == 0


def test_panic_mode_uses_all_servers_when_none_is_available() -> None:
    s = servers(2)
    for h in s:
        h.record_probe(False)
    picks = [choose(s, "round_robin", 0.0, i) for i in range(4)]
    assert all(p.panic for p in picks)
    assert [p.index for p in picks] == [0, 1, 0, 1]
    assert choose(s, "failover", 0.0, 0) == choose(s, "failover", 0.0, 1)
    s[1].record_probe(True)
    assert choose(s, "round_robin", 0.0, 0).panic is False


def test_tried_servers_are_skipped_then_reused() -> None:
    s = servers(3)
    assert choose(s, "failover", 0.0, 0, tried=[0]).index == 1
    assert choose(s, "failover", 0.0, 0, tried=[0, 1]).index == 2
    assert choose(s, "failover", 0.0, 0, tried=[0, 1, 2]).index == 0  # all tried: wrap around
    one = servers(1)
    assert choose(one, "round_robin", 0.0, 5, tried=[0]).index == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        choose([], "round_robin", 0.0, 0)
    with pytest.raises(ValueError):
        choose(servers(1), "random", 0.0, 0)


@given(
    up=st.lists(st.booleans(), min_size=1, max_size=8),
    tried=st.sets(st.integers(min_value=0, max_value=7)),
    counter=st.integers(min_value=0, max_value=10_000),
    policy=st.sampled_from(["round_robin", "failover"]),
)
def test_choice_prefers_available_untried_servers(
    up: list[bool], tried: set[int], counter: int, policy: str
) -> None:
    s = servers(len(up))
    for h, ok in zip(s, up, strict=True):
        h.record_probe(ok)
    c = choose(s, policy, 0.0, counter, tried)
    assert 0 <= c.index < len(up)
    assert c.panic == (not any(up))
    available = [i for i, ok in enumerate(up) if ok]
    if available:
        assert up[c.index]  # never an unavailable server while one is available
        untried = [i for i in available if i not in tried]
        if untried:
            assert c.index in untried
            if policy == "failover":
                assert c.index == untried[0]
