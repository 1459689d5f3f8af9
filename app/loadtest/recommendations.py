"""Recommendations drawn from a load test's stages: one rule per concern, each a plain function
that returns a sentence or None. Pure, like the analysis they read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.loadtest.analysis import BreakingPoint, Scalability, StageStats
from app.loadtest.config import Thresholds

SATURATED_CPU = 85.0
SATURATED_GPU = 90.0
HIGH_MEMORY = 90.0
IDLE = 70.0
FLAT_INDEX = 0.5
LINEAR_INDEX = 0.8
HEADROOM = 0.7


@dataclass(frozen=True)
class Findings:
    stages: list[StageStats]
    breaking: BreakingPoint | None
    scalability: Scalability
    thresholds: Thresholds
    resources_source: str

    @property
    def ran(self) -> list[StageStats]:
        return [s for s in self.stages if s.ran]

    @property
    def focus(self) -> StageStats | None:
        """The stage the diagnosis looks at: the breaking one, else the heaviest that ran."""
        if self.breaking is not None:
            return self.stages[self.breaking.stage]
        return self.ran[-1] if self.ran else None


Rule = Callable[[Findings], str | None]


def capacity(f: Findings) -> str | None:
    bp = f.breaking
    if bp is None:
        last = f.focus
        if last is None:
            return "No stage ran: nothing to conclude (see the engine log)."
        return (
            f"No stage crossed the thresholds; the heaviest ({last.label}) had a goodput of "
            f"{last.ok_rps:.1f} req/s at p95 {_ms(last.latency_ms.p95)}. Add heavier stages to "
            "find the breaking point."
        )
    why = "; ".join(bp.reasons)
    if bp.last_good_stage is None or bp.capacity_rps is None:
        return (
            f"The first stage ({bp.label}) already broke ({why}): start lower, or give the "
            "deployment more replicas before testing."
        )
    good = f.stages[bp.last_good_stage]
    return (
        f"Capacity: about {bp.capacity_rps:.1f} req/s ({good.label}); {bp.label} broke ({why}). "
        f"Keep sustained load under about {HEADROOM * bp.capacity_rps:.1f} req/s, or let "
        "autoscaling add replicas before that."
    )


def scaling(f: Findings) -> str | None:
    for step in f.scalability.steps:
        if f.breaking is not None and step.to_stage >= f.breaking.stage:
            break  # the breaking point explains that step
        if step.index is not None and step.index < FLAT_INDEX:
            a, b = f.stages[step.from_stage], f.stages[step.to_stage]
            return (
                f"Goodput flattened from {a.label} to {b.label} (scalability index "
                f"{step.index:.2f}, 1 is linear): a limit is reached before latency breaks; "
                "look at replicas, max_ongoing_requests and batch size."
            )
    index = f.scalability.index
    if index is not None and index >= LINEAR_INDEX and f.breaking is None:
        return f"Goodput scaled near-linearly with load (scalability index {index:.2f})."
    return None


def queueing(f: Findings) -> str | None:
    first, focus = (f.ran[0], f.focus) if f.ran else (None, None)
    if first is None or focus is None or focus is first:
        return None
    ttft0, ttft = first.ttft_ms.p95, focus.ttft_ms.p95
    stream = focus.by_kind.get("stream")
    total = stream.latency_ms.p50 if stream else None
    if not (ttft0 and ttft and total and focus.ttft_ms.p50):
        return None
    if ttft >= 3 * ttft0 and focus.ttft_ms.p50 >= 0.5 * total:
        return (
            f"Time to first token dominates stream latency at {focus.label} (p95 "
            f"{_ms(ttft0)} -> {_ms(ttft)}): requests queue before prefill. Add replicas (a "
            "lower autoscaling target of ongoing requests) or batch prefills."
        )
    return None


def decoding(f: Findings) -> str | None:
    first, focus = (f.ran[0], f.focus) if f.ran else (None, None)
    if first is None or focus is None or focus is first:
        return None
    itl0, itl = first.itl_ms.p95, focus.itl_ms.p95
    if itl0 and itl and itl >= 2 * itl0 and itl - itl0 >= 1.0:
        return (
            f"Inter-token latency grew from p95 {_ms(itl0)} to {_ms(itl)} at {focus.label}: "
            "decode steps slow as more streams share a replica; cap max_ongoing_requests "
            "per replica or add replicas."
        )
    return None


_STATUS_ADVICE = {
    "429": "429: rate limits or admission refused requests; raise the key's limits for the "
    "test, or it measures the limiter rather than the model",
    "503": "503: replicas were full (admission control, max_ongoing_requests, queue length); "
    "add replicas or raise autoscaling's max_replicas",
    "timeout": "timeouts: requests outlived the read timeout; the server is overloaded or "
    "--request-timeout is too low for the output lengths",
    "connection": "connection errors: connections were refused or reset (proxy limits, "
    "file descriptors, a crashed replica)",
    "stream_error": "stream errors: streams ended with an error event or without [DONE]",
}


def errors(f: Findings) -> str | None:
    seen: dict[str, int] = {}
    for stage in f.ran:
        for status in stage.errors:
            seen.setdefault(status, stage.index)
    if not seen:
        return None
    parts = []
    for status, first in seen.items():
        advice = _STATUS_ADVICE.get(status)
        if advice is None:
            advice = f"{status}: " + (
                "server errors; read the replicas' logs (crash, out of memory)"
                if status.startswith("5")
                else "the server rejected requests; check the model ids and request shape"
            )
        parts.append(f"{advice} (from {f.stages[first].label})")
    return "Errors by status: " + "; ".join(parts) + "."


def saturation(f: Findings) -> str | None:
    focus = f.focus
    # A short stage may hold no sample: the closest earlier one stands in for it.
    measured = [s for s in f.ran if s.resources and (focus is None or s.index <= focus.index)]
    if focus is None or not measured:
        return None
    use = measured[-1].resources
    assert use is not None
    found = []
    if use.cpu_mean is not None and use.cpu_mean >= SATURATED_CPU:
        found.append(
            f"CPU at {use.cpu_mean:.0f} %: CPU bound; add nodes or spread replicas over them "
            "(more replicas on the same cores will not help)"
        )
    if use.gpu_mean is not None and use.gpu_mean >= SATURATED_GPU:
        found.append(f"GPU at {use.gpu_mean:.0f} %: GPU bound; add GPU replicas")
    if use.memory_max is not None and use.memory_max >= HIGH_MEMORY:
        found.append(f"memory at {use.memory_max:.0f} %: near out-of-memory")
    if found:
        return f"At {focus.label}: " + "; ".join(found) + "."
    cpu_idle = use.cpu_mean is None or use.cpu_mean < IDLE
    gpu_idle = use.gpu_mean is None or use.gpu_mean < IDLE
    if f.breaking is not None and cpu_idle and gpu_idle:
        return (
            f"Resources were not saturated where the deployment broke (CPU "
            f"{_pct(use.cpu_mean)}, GPU {_pct(use.gpu_mean)}): the limit is configuration "
            "(replicas, max_ongoing_requests, batch wait), not hardware."
        )
    return None


def local_resources(f: Findings) -> str | None:
    if f.resources_source == "local":
        return (
            "Resource use is this machine's (no Ray metrics endpoint answered): pass "
            "--metrics-url for the cluster's."
        )
    return None


RULES: tuple[Rule, ...] = (
    capacity,
    scaling,
    queueing,
    decoding,
    errors,
    saturation,
    local_resources,
)


def recommend(findings: Findings, rules: tuple[Rule, ...] = RULES) -> list[str]:
    return [text for rule in rules if (text := rule(findings))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _pct(value: float | None) -> str:
    return "unmeasured" if value is None else f"{value:.0f} %"
