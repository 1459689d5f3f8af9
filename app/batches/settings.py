"""BatchSettings: how the Files and Batch APIs run on a cluster (file store, limits, quotas,
the line worker's concurrency and polling), as data a fleet spec can embed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.batches.concurrency import AIMDConfig
from app.batches.content import ContentStore, content_store
from app.batches.files import FileLimits

BATCH_WORKER_APP = "batch-worker"  # the Serve application of the line workers
WORKFLOW_PREFIX = "wf"  # the workflow engine's key prefix (app.workflows.engine)


class BatchSettings(BaseModel):
    """Shared by the gateway (uploads, batch creation) and the batch workers (runs and lines):
    both sides must be given the same settings, above all the same `files_url`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files_url: str | None = Field(
        None,
        description="Where file contents live: a directory, file:// or any fsspec URL (s3://, "
        "gs://). None: $APP_FILES_URL, else ~/.local/share/app/files. Every gateway and worker "
        "replica must reach the same store, so a cluster of more than one node needs a shared "
        "mount or an object-store URL. Not under Ray's session directory: files outlive a "
        "cluster restart, as their records in the KV store do.",
    )
    file_limits: FileLimits = Field(
        default_factory=FileLimits, description="Upload size and line-count limits."
    )
    concurrency: AIMDConfig = Field(
        default_factory=AIMDConfig,
        description="Lines in flight per worker replica: grows into spare capacity, shrinks "
        "on 429/503 (`ceiling` is the most one replica ever sends at once).",
    )
    batches_per_owner: int | None = Field(
        16, ge=1, description="Batches one API key may run at once (None: no limit)."
    )
    batches_total: int | None = Field(
        None, ge=1, description="Batches the cluster runs at once (None: no limit)."
    )
    line_attempts: int = Field(
        5, ge=1, description="Tries of a line that fails with a 5xx before it is reported."
    )
    line_visibility_s: float = Field(
        60.0,
        gt=0,
        description="A line's lease; renewed while it runs, so only a dead "
        "worker's lines wait this long before another worker takes them.",
    )
    line_backoff_s: float = Field(1.0, gt=0, description="First retry delay of a failed line.")
    line_max_backoff_s: float = Field(60.0, gt=0, description="Longest retry delay of a line.")
    line_timeout_s: float | None = Field(
        900.0, gt=0, description="A line with no answer by then counts as failed (None: wait)."
    )
    poll_s: float = Field(
        2.0, gt=0, description="How often a running batch updates its request_counts."
    )
    idle_s: float = Field(0.5, gt=0, description="A worker's pause when no line is queued.")
    flush_s: float = Field(1.0, gt=0, description="How often a worker writes its line counts.")
    sweep_s: float = Field(
        5.0, gt=0, description="How often a worker looks for batch runs nobody is driving."
    )
    claim_grace_s: float = Field(
        2.0, ge=0, description="A new run is left this long to the worker its gateway nudged."
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="A batch run's lease: another worker resumes it this long "
        "after its worker died.",
    )
    max_runs: int = Field(
        64, ge=1, description="Batch runs one worker replica drives at once (a thread each)."
    )
    io_threads: int = Field(
        32, ge=4, description="Threads for a worker's KV calls (its event loop's executor)."
    )
    kv_name: str = Field("kv", min_length=1, description="The region's KV cluster.")
    kv_namespace: str = Field("app-kv", min_length=1, description="Its Ray namespace.")
    replicas: int = Field(1, ge=0, description="Batch worker replicas (0: no worker app).")
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per worker replica.")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower than normal the operating system schedules a worker "
        "replica's process, every thread of it (as nice): on a host shared with model "
        "replicas, batch lines' own work (leases, results, sending) gives way to interactive "
        "requests'. 0: no change.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BatchSettings:
        if self.line_max_backoff_s < self.line_backoff_s:
            raise ValueError("line_max_backoff_s must be >= line_backoff_s")
        if self.claim_grace_s >= self.lease_s:
            raise ValueError("claim_grace_s must be shorter than lease_s")
        return self

    def queue_options(self) -> dict[str, Any]:
        """DurableQueue keywords of every batch's line queue (the workflow, which fills and
        watches it, and the runner, which leases from it, must agree)."""
        return {
            "visibility_s": self.line_visibility_s,
            "max_attempts": self.line_attempts,
            "backoff_s": self.line_backoff_s,
            "max_backoff_s": self.line_max_backoff_s,
        }

    def content_store(self) -> ContentStore:
        return content_store(self.files_url)
