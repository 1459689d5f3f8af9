"""A five-field cron matcher (minute hour day month weekday, UTC) for scheduled floors."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

# (name, lowest, highest) of each field, in cron's order.
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7))
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class CronError(ValueError):
    """An expression that is not five valid cron fields."""


@dataclass(frozen=True)
class Cron:
    """A parsed expression; `matches` answers for one minute, `last_fire` looks back."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    # Cron's rule: when both day fields are restricted, a day matching either one fires.
    day_or_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        parts = expression.split()
        if len(parts) != 5:
            raise CronError(f"{expression!r}: expected 5 fields, got {len(parts)}")
        sets = [_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])  # 7 is Sunday too
        return cls(
            expression=expression,
            minutes=sets[0],
            hours=sets[1],
            days=sets[2],
            months=sets[3],
            weekdays=weekdays,
            day_or_weekday=parts[2] != "*" and parts[4] != "*",
        )

    def matches(self, when: dt.datetime) -> bool:
        if when.minute not in self.minutes or when.hour not in self.hours:
            return False
        return when.month in self.months and self._day_matches(when)

    def last_fire(self, now_s: float, within_s: float) -> float | None:
        """The latest minute at or before `now_s` (epoch seconds) at which the expression fires,
        looking back no further than `within_s`; None if it did not fire in that span."""
        now = dt.datetime.fromtimestamp(now_s, tz=dt.UTC).replace(second=0, microsecond=0)
        earliest = now_s - within_s
        when = now
        while when.timestamp() > earliest:
            if self.matches(when):
                return when.timestamp()
            # Skip whole hours that cannot match instead of stepping through their minutes.
            if when.hour not in self.hours or not self._day_matches(when):
                when = when.replace(minute=0) - dt.timedelta(minutes=1)
            else:
                when -= dt.timedelta(minutes=1)
        return None

    def _day_matches(self, when: dt.datetime) -> bool:
        day_ok = when.day in self.days
        weekday_ok = (when.isoweekday() % 7) in self.weekdays
        return (day_ok or weekday_ok) if self.day_or_weekday else (day_ok and weekday_ok)


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        base, _, step_text = item.partition("/")
        step = _number(step_text, name) if step_text else 1
        if step < 1:
            raise CronError(f"{name}: step must be at least 1 in {item!r}")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first_text, last_text = base.split("-", 1)
            first, last = _value(first_text, name), _value(last_text, name)
        else:
            first = _value(base, name)
            last = high if step_text else first  # "5/15" means from 5 on, as in Vixie cron
        if not low <= first <= last <= high:
            raise CronError(f"{name}: {item!r} is outside {low}-{high} or reversed")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _value(text: str, name: str) -> int:
    names = {"month": _MONTHS, "weekday": _WEEKDAYS}.get(name, ())
    lowered = text.lower()
    if lowered in names:
        return names.index(lowered) + (1 if name == "month" else 0)
    return _number(text, name)


def _number(text: str, name: str) -> int:
    if not text.isdigit():
        raise CronError(f"{name}: {text!r} is not a number")
    return int(text)
