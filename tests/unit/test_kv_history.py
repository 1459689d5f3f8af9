"""The history checker itself: it must accept correct histories and catch broken ones."""

from __future__ import annotations

from app.kv.history import Event, History, check_durability, check_linearizable


def w(key: str, value: object, start: float, end: float | None) -> Event:
    return Event("write", key, value, start, end)  # type: ignore[arg-type]


def r(key: str, value: object, start: float, end: float) -> Event:
    return Event("read", key, value, start, end)  # type: ignore[arg-type]


def test_sequential_history_is_linearizable() -> None:
    events = [w("k", 1, 0, 1), r("k", 1, 2, 3), w("k", 2, 4, 5), r("k", 2, 6, 7)]
    assert check_linearizable(events) == []


def test_concurrent_read_may_see_either_value() -> None:
    events = [w("k", 1, 0, 1), w("k", 2, 2, 6), r("k", 1, 3, 4), r("k", 2, 4.5, 5)]
    assert check_linearizable(events) == []


def test_stale_read_after_newer_write_completed_is_caught() -> None:
    events = [w("k", 1, 0, 1), w("k", 2, 2, 3), r("k", 1, 4, 5)]
    assert check_linearizable(events)


def test_new_then_old_read_inversion_is_caught() -> None:
    # Two reads during a slow write: once the new value was seen, the old one may not return.
    events = [w("k", 1, 0, 1), w("k", 2, 2, 10), r("k", 2, 3, 4), r("k", 1, 5, 6)]
    assert check_linearizable(events)


def test_reading_a_value_before_its_write_began_is_caught() -> None:
    assert check_linearizable([r("k", 7, 0, 1), w("k", 7, 2, 3)])
    assert check_linearizable([r("k", 9, 0, 1)])


def test_initial_value_after_a_completed_write_is_caught() -> None:
    assert check_linearizable([w("k", 1, 0, 1), r("k", None, 2, 3)])
    assert check_linearizable([r("k", None, 0, 1), w("k", 1, 2, 3)]) == []


def test_indeterminate_writes_may_or_may_not_apply() -> None:
    unseen = [w("k", 1, 0, 1), w("k", 2, 2, None), r("k", 1, 5, 6)]
    assert check_linearizable(unseen) == []
    seen = [w("k", 1, 0, 1), w("k", 2, 2, None), r("k", 2, 5, 6), r("k", 2, 7, 8)]
    assert check_linearizable(seen) == []
    flip = [w("k", 1, 0, 1), w("k", 2, 2, None), r("k", 2, 5, 6), r("k", 1, 7, 8)]
    assert check_linearizable(flip)


def test_durability_flags_lost_acknowledged_writes() -> None:
    events = [w("a", 1, 0, 1), w("a", 2, 2, 3), w("b", 1, 0, 1), w("c", 5, 0, None)]
    assert check_durability(events, {"a": 2, "b": 1}) == []
    assert check_durability(events, {"a": 1, "b": 1})  # 2 was acknowledged after 1
    assert check_durability(events, {"a": 2})  # b lost
    concurrent = [w("a", 1, 0, 5), w("a", 2, 1, 6)]
    assert check_durability(concurrent, {"a": 1}) == []


def test_history_records_events() -> None:
    history = History(clock=lambda: 1.0)
    history.add("write", "k", 1, 0.0, 1.0)
    history.add("write", "k", 2, 0.0, None)
    assert [e.value for e in history.acknowledged()] == [1]
