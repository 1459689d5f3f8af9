"""The five-field cron matcher behind scheduled floors."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.cron import Cron, CronError


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("expression", "when", "matches"),
    [
        ("* * * * *", "2026-03-04 05:06", True),
        ("0 9 * * *", "2026-03-04 09:00", True),
        ("0 9 * * *", "2026-03-04 09:01", False),
        ("*/15 * * * *", "2026-03-04 10:45", True),
        ("*/15 * * * *", "2026-03-04 10:50", False),
        ("5/20 * * * *", "2026-03-04 10:45", True),
        ("0 9-17/4 * * *", "2026-03-04 13:00", True),
        ("0 9-17/4 * * *", "2026-03-04 15:00", False),
        ("0 9 * * 1-5", "2026-03-06 09:00", True),  # a Friday
        ("0 9 * * mon-fri", "2026-03-07 09:00", False),  # a Saturday
        ("0 0 * * 7", "2026-03-08 00:00", True),  # 7 is Sunday
        ("0 0 * * sun", "2026-03-08 00:00", True),
        ("0 0 1 jan *", "2026-01-01 00:00", True),
        ("0 0 1,15 * *", "2026-03-15 00:00", True),
        # Both day fields restricted: either one matching fires (cron's rule).
        ("0 0 13 * 5", "2026-03-13 00:00", True),
        ("0 0 13 * 5", "2026-03-06 00:00", True),  # a Friday, not the 13th
        ("0 0 13 * 5", "2026-03-05 00:00", False),
    ],
)
def test_matches(expression: str, when: str, matches: bool) -> None:
    assert Cron.parse(expression).matches(at(when)) is matches


@pytest.mark.parametrize(
    "expression",
    [
        "* * * *",
        "60 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * * 13 *",
        "5-1 * * * *",
        "*/0 * * * *",
        "x * * * *",
    ],
)
def test_invalid_expressions_are_refused(expression: str) -> None:
    with pytest.raises(CronError):
        Cron.parse(expression)


def test_a_bad_schedule_fails_config_loading_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"schedules\.0\.cron"):
        AutoscalingConfig.model_validate(
            {"schedules": [{"cron": "0 25 * * *", "duration_s": 60, "min_replicas": 1}]}
        )


@pytest.mark.parametrize(
    ("now", "within_s", "fired"),
    [
        ("2026-03-04 09:00:30", 3600, "2026-03-04 09:00"),
        ("2026-03-04 09:59:59", 3600, "2026-03-04 09:00"),
        ("2026-03-04 10:00:00", 3600, None),  # exactly one duration later: closed
        ("2026-03-04 08:59:59", 3600, None),
        ("2026-03-05 08:00:00", 86400, "2026-03-04 09:00"),
    ],
)
def test_last_fire_looks_back_within_a_span(now: str, within_s: float, fired: str | None) -> None:
    cron = Cron.parse("0 9 * * *")
    result = cron.last_fire(at(now).timestamp(), within_s)
    assert result == (None if fired is None else at(fired).timestamp())
