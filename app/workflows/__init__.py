"""Durable workflows: ordered steps that retry, time out and compensate, kept in the KV store."""

from __future__ import annotations

from app.workflows.definition import (
    LeaseLostError,
    RetryPolicy,
    RunState,
    RunStatus,
    Step,
    StepContext,
    StepTimeoutError,
    Workflow,
)
from app.workflows.engine import WorkflowEngine

__all__ = [
    "LeaseLostError",
    "RetryPolicy",
    "RunState",
    "RunStatus",
    "Step",
    "StepContext",
    "StepTimeoutError",
    "Workflow",
    "WorkflowEngine",
]
