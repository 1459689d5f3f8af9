"""The reactive rules, one table row or test per rule, on an injected clock (`now` is passed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.decision import Decision, ReactiveRules, ReactiveState, Rule
from app.autoscaling.signals import Signals

CAP = 10  # max_ongoing_requests: at target utilisation 0.7 one replica carries 7 requests
FAST = {
    "stable_window_s": 10,
    "panic_window_s": 2,
    "upscale_cooldown_s": 5,
    "downscale_cooldown_s": 20,
}


def config(**overrides: Any) -> AutoscalingConfig:
    return AutoscalingConfig.model_validate({**FAST, **overrides})


def sig(
    t: float,
    total: float,
    queued: float = 0,
    running: int = 4,
    p95: float | None = None,
    p50: float | None = None,
) -> Signals:
    return Signals(t, running, total, queued, CAP, p50_latency_ms=p50, p95_latency_ms=p95)


def steady_then_decide(
    rules: ReactiveRules,
    state: ReactiveState,
    *,
    current: int,
    total: float,
    queued: float = 0,
    running: int | None = None,
    p95: float | None = None,
    low: int = 1,
    high: int = 50,
    ticks: int = 11,
    watched_since: float | None = -100.0,
) -> Decision:
    """The same load for `ticks` seconds (t = 0 ..), then the decision of the last tick; the
    controller has watched since `watched_since` (long enough for the down cooldown)."""
    run = current if running is None else running
    if watched_since is not None and state.observing_since_s is None:
        state.observing_since_s = watched_since
    for t in range(ticks - 1):
        rules.propose(sig(t, total, queued, run, p95), t, current, low, high, state)
    last = ticks - 1
    return rules.decide(sig(last, total, queued, run, p95), last, current, low, high, state)


# name, config overrides, current, running, total, queued, p95, (low, high), target, rule
THRESHOLDS = [
    ("utilisation at the up threshold holds", {}, 4, 4, 30.8, 0, None, (1, 50), 4, Rule.STEADY),
    (
        "utilisation over 1.1 x target scales up",
        {},
        4,
        4,
        31,
        0,
        None,
        (1, 50),
        5,
        Rule.UTILIZATION_UP,
    ),
    ("step up by what the load needs", {}, 10, 10, 130, 0, None, (1, 50), 19, Rule.UTILIZATION_UP),
    (
        "step up bounded by max_step_up",
        {"max_step_up": 3},
        10,
        10,
        130,
        0,
        None,
        (1, 50),
        13,
        Rule.UTILIZATION_UP,
    ),
    (
        "queue over the threshold adds at least one",
        {},
        4,
        4,
        20,
        9,
        None,
        (1, 50),
        5,
        Rule.QUEUE_UP,
    ),
    ("queue at the threshold holds", {}, 4, 4, 20, 8, None, (1, 50), 4, Rule.STEADY),
    (
        "queue while asked-for replicas start waits",
        {},
        4,
        2,
        20,
        9,
        None,
        (1, 50),
        4,
        Rule.UP_PENDING,
    ),
    (
        "p95 over the SLO adds one",
        {"slo_p95_ms": 500},
        4,
        4,
        20,
        0,
        800,
        (1, 50),
        5,
        Rule.LATENCY_UP,
    ),
    ("p95 within the SLO holds", {"slo_p95_ms": 500}, 4, 4, 20, 0, 400, (1, 50), 4, Rule.STEADY),
    (
        "p95 over the SLO on idle replicas does not scale up",
        {"slo_p95_ms": 500},
        4,
        4,
        10,
        0,
        800,
        (1, 50),
        2,
        Rule.UTILIZATION_DOWN,
    ),
    ("utilisation at the down threshold holds", {}, 4, 4, 14, 0, None, (1, 50), 4, Rule.STEADY),
    (
        "utilisation under 0.5 x target scales down",
        {},
        4,
        4,
        13.9,
        0,
        None,
        (1, 50),
        2,
        Rule.UTILIZATION_DOWN,
    ),
    ("a queue blocks scale-down", {}, 4, 4, 13, 1, None, (1, 50), 4, Rule.STEADY),
    (
        "step down bounded by max_step_down",
        {"max_step_down": 1},
        8,
        8,
        0,
        0,
        None,
        (1, 50),
        7,
        Rule.UTILIZATION_DOWN,
    ),
    (
        "larger step down",
        {"max_step_down": 5, "max_scale_down_rate": 10},
        8,
        8,
        0,
        0,
        None,
        (1, 50),
        3,
        Rule.UTILIZATION_DOWN,
    ),
    (
        "step down bounded by max_scale_down_rate (halves by default)",
        {"max_step_down": 10},
        8,
        8,
        0,
        0,
        None,
        (1, 50),
        4,
        Rule.UTILIZATION_DOWN,
    ),
    (
        "step down no further than the load needs",
        {"max_step_down": 10, "max_scale_down_rate": 10},
        8,
        8,
        13,
        0,
        None,
        (1, 50),
        2,
        Rule.UTILIZATION_DOWN,
    ),
    (
        "scale-down stops at min",
        {"max_step_down": 10},
        8,
        8,
        0,
        0,
        None,
        (5, 50),
        5,
        Rule.UTILIZATION_DOWN,
    ),
    ("scale-up stops at max", {}, 5, 5, 50, 0, None, (1, 6), 6, Rule.UTILIZATION_UP),
    ("scale-up at max is held by the bound", {}, 6, 6, 60, 0, None, (1, 6), 6, Rule.BOUNDS),
    ("below min moves to min", {}, 2, 2, 10, 0, None, (3, 10), 3, Rule.BOUNDS),
    ("above max moves to max", {}, 8, 8, 40, 0, None, (1, 6), 6, Rule.BOUNDS),
    ("min = max stays fixed under a burst", {}, 4, 4, 1000, 50, None, (4, 4), 4, Rule.BOUNDS),
    ("min = max stays fixed when idle", {}, 4, 4, 0, 0, None, (4, 4), 4, Rule.STEADY),
]


@pytest.mark.parametrize(
    ("overrides", "current", "running", "total", "queued", "p95", "bounds", "target", "rule"),
    [row[1:] for row in THRESHOLDS],
    ids=[row[0] for row in THRESHOLDS],
)
def test_threshold_rules(
    overrides: dict[str, Any],
    current: int,
    running: int,
    total: float,
    queued: float,
    p95: float | None,
    bounds: tuple[int, int],
    target: int,
    rule: Rule,
) -> None:
    rules = ReactiveRules(config(**overrides))
    decision = steady_then_decide(
        rules,
        rules.new_state(),
        current=current,
        total=total,
        queued=queued,
        running=running,
        p95=p95,
        low=bounds[0],
        high=bounds[1],
    )
    assert (decision.target_replicas, decision.rule) == (target, rule), decision.reason


def test_no_scale_down_before_a_full_stable_window() -> None:
    rules = ReactiveRules(config(downscale_cooldown_s=0))
    early = steady_then_decide(
        rules, rules.new_state(), current=4, total=0, ticks=10, watched_since=None
    )
    assert (early.target_replicas, early.rule) == (4, Rule.STEADY)
    full = steady_then_decide(
        rules, rules.new_state(), current=4, total=0, ticks=11, watched_since=None
    )
    assert (full.target_replicas, full.rule) == (2, Rule.UTILIZATION_DOWN)


@pytest.mark.parametrize(
    ("last_up", "last_down", "target", "rule"),
    [
        (6.0, None, 4, Rule.UP_COOLDOWN),  # 4 s after a scale-up, cooldown 5 s
        (5.0, None, 5, Rule.UTILIZATION_UP),  # exactly 5 s after
        (None, 9.0, 5, Rule.UTILIZATION_UP),  # a recent scale-down does not hold a scale-up
    ],
)
def test_upscale_cooldown(
    last_up: float | None, last_down: float | None, target: int, rule: Rule
) -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    state.last_scale_up_s, state.last_scale_down_s = last_up, last_down
    decision = steady_then_decide(rules, state, current=4, total=31)
    assert (decision.target_replicas, decision.rule) == (target, rule), decision.reason


@pytest.mark.parametrize(
    ("last_up", "last_down", "target", "rule"),
    [
        (-9.0, None, 4, Rule.DOWN_COOLDOWN),  # 19 s after a scale-up, cooldown 20 s
        (-10.0, None, 2, Rule.UTILIZATION_DOWN),
        # A scale-down starts only the shorter interval (the stable window, 10 s): another
        # step down is no flap.
        (None, -9.0, 2, Rule.UTILIZATION_DOWN),
        (None, 1.0, 4, Rule.DOWN_COOLDOWN),  # 9 s after a scale-down
        (None, 0.0, 2, Rule.UTILIZATION_DOWN),
        (-12.0, 0.0, 2, Rule.UTILIZATION_DOWN),  # both waits passed
    ],
)
def test_downscale_cooldown(
    last_up: float | None, last_down: float | None, target: int, rule: Rule
) -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    state.last_scale_up_s, state.last_scale_down_s = last_up, last_down
    decision = steady_then_decide(rules, state, current=4, total=0)
    assert (decision.target_replicas, decision.rule) == (target, rule), decision.reason


def test_decide_records_the_action_for_the_cooldowns() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    up = steady_then_decide(rules, state, current=4, total=31)
    assert up.target_replicas == 5 and state.last_scale_up_s == 10
    again = rules.decide(sig(12, 45, running=5), 12, 5, 1, 50, state)
    assert (again.target_replicas, again.rule) == (5, Rule.UP_COOLDOWN)


def burst(rules: ReactiveRules, state: ReactiveState, peak: float) -> Decision:
    """Ten quiet seconds on 2 replicas (utilisation 0.5), then `peak` requests at t = 10."""
    for t in range(10):
        rules.decide(sig(t, 10, running=2), t, 2, 1, 50, state)
    return rules.decide(sig(10, peak, running=2), 10, 2, 1, 50, state)


def test_panic_scales_to_what_the_burst_needs_at_once() -> None:
    rules = ReactiveRules(config(max_step_up=3))
    state = rules.new_state()
    state.last_scale_up_s = 9.5  # inside the up cooldown: panic ignores it
    decision = burst(rules, state, peak=100)
    # Panic window (2 s): (10 + 100) / 2 over 20 slots = 275 % >= 140 %; 100 requests / 7.
    assert (decision.target_replicas, decision.rule) == (15, Rule.PANIC), decision.reason
    assert state.last_panic_s == 10


def test_a_smaller_jump_is_not_a_panic() -> None:
    rules = ReactiveRules(config())
    decision = burst(rules, rules.new_state(), peak=25)
    # (10 + 25) / 2 = 17.5 over 20 slots = 88 %: over 77 %, under 140 %.
    assert (decision.target_replicas, decision.rule) == (3, Rule.UTILIZATION_UP)


def test_panic_does_not_chase_the_backlog_while_replicas_start() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    burst(rules, state, peak=100)
    # 15 asked for, 2 running: (100 + 400) / 2 over 150 slots is still a panic and 400
    # requests would need 58, but the queue grows only because the answer is on its way.
    decision = rules.decide(sig(11, 400, queued=380, running=2), 11, 15, 1, 50, state)
    assert (decision.target_replicas, decision.rule) == (15, Rule.PANIC)
    assert "starting" in decision.reason


def test_a_new_burst_during_an_ordinary_scale_up_is_sized_at_once() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(10):  # 4 asked for, 2 of them still starting, quiet load
        rules.decide(sig(t, 10, running=2), t, 4, 1, 50, state)
    decision = rules.decide(sig(10, 120, queued=100, running=2), 10, 4, 1, 50, state)
    # (10 + 120) / 2 over 40 slots = 163 % >= 140 %: 120 requests need 18, now.
    assert (decision.target_replicas, decision.rule) == (18, Rule.PANIC), decision.reason


@pytest.mark.parametrize(
    ("queued_now", "target", "held"),
    [(450, 72, False), (300, 15, True)],  # the queue grew from 400 / shrank from 400
)
def test_panic_sizes_on_a_growing_backlog_only(queued_now: float, target: int, held: bool) -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(10):
        rules.propose(sig(t, 550, queued=400, running=15), t, 15, 1, 100, state)
    decision = rules.decide(sig(10, 500, queued_now, running=15), 10, 15, 1, 100, state)
    # 500 requests need 72; a shrinking queue is served by the 15 already running.
    assert (decision.target_replicas, decision.rule) == (target, Rule.PANIC), decision.reason
    assert ("backlog draining" in decision.reason) is held


def test_panic_holds_scale_down_for_a_stable_window_after_it_ends() -> None:
    rules = ReactiveRules(config(downscale_cooldown_s=0, max_step_down=50, max_scale_down_rate=50))
    state = rules.new_state()
    burst(rules, state, peak=100)
    rules_seen: dict[int, Rule] = {}
    current = 15
    for t in range(11, 25):
        decision = rules.decide(sig(t, 0, running=current), t, current, 1, 50, state)
        rules_seen[t] = Rule(decision.rule)
        current = decision.target_replicas
    assert state.last_panic_s == 10
    # No scale-down while t < 10 + stable window (10 s); then at once to what the load needs.
    assert all(rules_seen[t] == Rule.PANIC_HOLD for t in range(11, 20)), rules_seen
    assert rules_seen[20] == Rule.UTILIZATION_DOWN and current == 1


def test_the_down_cooldown_counts_from_the_first_tick() -> None:
    """No scale-up on record stands in for one at the first tick: a deployment's initial size,
    or the size a restarted controller finds, was asked for by someone."""
    rules = ReactiveRules(config())  # stable window 10 s, down cooldown 20 s
    state = rules.new_state()
    decisions = [rules.decide(sig(t, 0), t, 4, 1, 50, state) for t in range(21)]
    assert decisions[10].rule == Rule.DOWN_COOLDOWN, decisions[10].reason
    assert (decisions[20].target_replicas, decisions[20].rule) == (2, Rule.UTILIZATION_DOWN)


def test_consecutive_scale_downs_are_a_stable_window_apart_and_halve() -> None:
    rules = ReactiveRules(config(max_step_down=100))
    state = rules.new_state()
    current, steps = 16, []
    for t in range(55):
        decision = rules.decide(sig(t, 0, running=current), t, current, 1, 50, state)
        if decision.changed:
            steps.append((t, decision.target_replicas))
        current = decision.target_replicas
    # The first once the down cooldown (20 s) from the first tick has passed; then one per
    # stable window (10 s), not one per cooldown; each keeps half.
    assert steps == [(20, 8), (30, 4), (40, 2), (50, 1)]


def test_a_new_panic_sizes_on_arrivals_and_the_backlog_to_clear_by_the_next_tick() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(10):  # 2 replicas at 50 %, a request takes 100 ms
        rules.decide(sig(t, 10, running=2, p50=100), t, 2, 1, 50, state)
    decision = rules.decide(sig(10, 100, queued=80, running=2, p50=100), 10, 2, 1, 50, state)
    # In flight 20 (every slot) + the queue's growth 80/s x 0.1 s = 28, and the 80 queued
    # cleared within the 1 s decision period: 8 more; 36 / 7 a replica. Counting the 80
    # queued as in flight (100 / 7) would ask for 15.
    assert (decision.target_replicas, decision.rule) == (6, Rule.PANIC), decision.reason


def test_a_held_panic_follows_the_arrivals_not_the_queue() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(10):
        rules.decide(sig(t, 10, running=2, p50=100), t, 2, 1, 50, state)
    rules.decide(sig(10, 100, queued=80, running=2, p50=100), 10, 2, 1, 50, state)
    # The queue keeps growing by 320/s while the 6 asked for start: the arrivals now keep
    # 20 + 32 = 52 in flight, 8 replicas; the 400 requests in the system would ask for 58.
    grown = rules.decide(sig(11, 420, queued=400, running=2, p50=100), 11, 6, 1, 50, state)
    assert (grown.target_replicas, grown.rule) == (8, Rule.PANIC), grown.reason
    # A queue that no longer grows is left to the head-room: no more replicas.
    flat = rules.decide(sig(12, 420, queued=400, running=2, p50=100), 12, 8, 1, 50, state)
    assert (flat.target_replicas, flat.rule) == (8, Rule.PANIC), flat.reason


def test_a_panic_holds_its_size_while_replicas_join() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(10):
        rules.decide(sig(t, 10, running=2, p50=100), t, 2, 1, 50, state)
    rules.decide(sig(10, 100, queued=80, running=2, p50=100), 10, 2, 1, 50, state)
    # 4 more running: Serve's two averages straddle the join, and their difference (400
    # in flight on 60 slots) says nothing; the size holds until the next tick.
    joined = rules.decide(sig(11, 800, queued=400, running=6, p50=100), 11, 6, 1, 50, state)
    assert (joined.target_replicas, joined.rule) == (6, Rule.PANIC)
    assert "joining" in joined.reason


def test_an_ordinary_scale_up_sizes_on_arrivals_not_a_draining_backlog() -> None:
    rules = ReactiveRules(config(max_queued_per_replica=100))
    state = rules.new_state()
    for t in range(8):  # 10 replicas at 50 %, a request takes 100 ms
        rules.decide(sig(t, 50, running=10, p50=100), t, 10, 1, 50, state)
    rules.decide(sig(8, 150, queued=100, running=10, p50=100), 8, 10, 1, 50, state)
    rules.decide(sig(9, 120, queued=70, running=10, p50=100), 9, 10, 1, 50, state)
    decision = rules.decide(sig(10, 60, queued=10, running=10, p50=100), 10, 10, 1, 50, state)
    # The 2 s panic window averages 90 requests (90 %, over 77 %), but the arrivals keep
    # about 45 in flight: the queue drains, and more replicas would be idle once it has.
    assert (decision.target_replicas, decision.rule) == (10, Rule.STEADY), decision.reason


def test_idle_replicas_scale_to_zero_after_the_idle_time() -> None:
    rules = ReactiveRules(config(scale_to_zero_after_s=15))
    state = rules.new_state()
    targets = [
        rules.decide(sig(t, 0, running=1), t, 1, 0, 5, state).target_replicas for t in range(15)
    ]
    assert targets == [1] * 15
    decision = rules.decide(sig(15, 0, running=1), 15, 1, 0, 5, state)
    assert (decision.target_replicas, decision.rule) == (0, Rule.TO_ZERO)


@pytest.mark.parametrize(
    ("overrides", "low", "zero_at"),
    [
        ({"scale_to_zero_after_s": 15}, 1, None),  # min 1: never
        ({}, 0, 20),  # no idle time set: the down cooldown (20 s)
        ({"scale_to_zero_after_s": 5}, 0, 5),
    ],
)
def test_scale_to_zero_needs_min_zero_and_the_idle_time(
    overrides: dict[str, Any], low: int, zero_at: int | None
) -> None:
    rules = ReactiveRules(config(**overrides))
    state = rules.new_state()
    first_zero = None
    for t in range(30):
        decision = rules.decide(sig(t, 0, running=1), t, 1, low, 5, state)
        if decision.target_replicas == 0:
            first_zero = t
            break
    assert first_zero == zero_at


def test_a_request_resets_the_idle_clock() -> None:
    rules = ReactiveRules(config(scale_to_zero_after_s=10))
    state = rules.new_state()
    for t in range(9):
        rules.decide(sig(t, 0, running=1), t, 1, 0, 5, state)
    rules.decide(sig(9, 1, running=1), 9, 1, 0, 5, state)
    targets = [
        rules.decide(sig(t, 0, running=1), t, 1, 0, 5, state).target_replicas for t in range(10, 20)
    ]
    assert targets == [1] * 10
    assert rules.decide(sig(20, 0, running=1), 20, 1, 0, 5, state).target_replicas == 0


@pytest.mark.parametrize(
    ("total", "queued", "high", "target", "rule"),
    [
        (1, 1, 5, 1, Rule.FROM_ZERO),  # one waiting request: one replica, at once
        (30, 30, 10, 5, Rule.FROM_ZERO),  # 30 waiting need 5 at 7 each
        (30, 30, 3, 3, Rule.FROM_ZERO),  # ... within max
        (0, 0, 5, 0, Rule.STEADY),  # nothing waiting stays at zero
    ],
)
def test_scale_from_zero(total: float, queued: float, high: int, target: int, rule: Rule) -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    state.last_scale_up_s = -0.5  # cooldowns do not delay the first replica
    decision = rules.decide(sig(0, total, queued, running=0), 0, 0, 0, high, state)
    assert (decision.target_replicas, decision.rule) == (target, rule)


def test_finished_requests_in_the_window_do_not_scale_from_zero() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    for t in range(5):
        rules.propose(sig(t, 50, running=1), t, 1, 0, 5, state)
    decision = rules.decide(sig(5, 0, running=0), 5, 0, 0, 5, state)
    assert (decision.target_replicas, decision.rule) == (0, Rule.STEADY)


def test_state_survives_a_json_round_trip() -> None:
    rules = ReactiveRules(config())
    state = rules.new_state()
    burst(rules, state, peak=100)
    restored = ReactiveState.from_dict(json.loads(json.dumps(state.to_dict())))
    a = rules.decide(sig(11, 0, running=15), 11, 15, 1, 50, state)
    b = rules.decide(sig(11, 0, running=15), 11, 15, 1, 50, restored)
    assert a == b and a.rule == Rule.PANIC_HOLD


def test_decision_records_inputs_and_reason() -> None:
    rules = ReactiveRules(config())
    decision = steady_then_decide(rules, rules.new_state(), current=4, total=31)
    assert decision.inputs["total_requests"] == 31 and decision.inputs["needed"] == 5
    assert decision.inputs["current"] == 4 and decision.changed and decision.applied
    assert "utilisation 78% > 77%" in decision.reason
    assert json.loads(json.dumps(decision.to_dict()))["rule"] == "utilization_up"
