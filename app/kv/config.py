"""KV store configuration: shard layout, replication, consistency defaults, limits, durability."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.kv import protocol
from app.kv.errors import UnknownConsistencyError


class WriteConcern(StrEnum):
    """How many members of a shard group must apply a write before it is acknowledged."""

    ONE = "one"
    MAJORITY = "majority"
    ALL = "all"


class WALSync(StrEnum):
    """When a member's write-ahead log is fsynced (see app.kv.wal)."""

    COMMIT = "commit"  # before the write that logged a record is acknowledged
    NONE = "none"  # never: records reach the OS only


class ReadConcern(StrEnum):
    """Which member may answer a read: the primary, any member, or one within a staleness bound."""

    STRONG = "strong"
    EVENTUAL = "eventual"
    BOUNDED = "bounded"


_WRITE_CODES: dict[Any, int] = {
    WriteConcern.ONE: protocol.WRITE_ONE,
    WriteConcern.MAJORITY: protocol.WRITE_MAJORITY,
    WriteConcern.ALL: protocol.WRITE_ALL,
}
_READ_CODES: dict[Any, int] = {
    ReadConcern.STRONG: protocol.READ_STRONG,
    ReadConcern.EVENTUAL: protocol.READ_EVENTUAL,
    ReadConcern.BOUNDED: protocol.READ_BOUNDED,
}


def write_code(concern: object) -> int:
    """Wire code of a write concern given as a WriteConcern or its string value."""
    try:
        return _WRITE_CODES[concern]
    except (KeyError, TypeError):
        raise UnknownConsistencyError(
            f"unknown write concern {concern!r}; use one of {[c.value for c in WriteConcern]}"
        ) from None


def read_code(concern: object) -> int:
    """Wire code of a read concern given as a ReadConcern or its string value."""
    try:
        return _READ_CODES[concern]
    except (KeyError, TypeError):
        raise UnknownConsistencyError(
            f"unknown read concern {concern!r}; use one of {[c.value for c in ReadConcern]}"
        ) from None


class KVConfig(BaseModel):
    """Everything a KV cluster is started with; clients read it from the coordinator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="kv", min_length=1, description="Name of the coordinator actor.")
    namespace: str = Field(
        default="app-kv", min_length=1, description="Ray namespace of the coordinator."
    )
    num_shards: int = Field(default=2, ge=1, le=1024, description="Shard groups created at start.")
    replication_factor: int = Field(
        default=3,
        ge=1,
        le=7,
        description="Members per shard group (primary + replicas), capped by nodes.",
    )
    allow_colocated_replicas: bool = Field(
        default=False,
        description="Place several members of one group on a node when there are too few nodes.",
    )
    write_concern: WriteConcern = Field(
        default=WriteConcern.MAJORITY, description="Default write concern."
    )
    read_concern: ReadConcern = Field(
        default=ReadConcern.STRONG, description="Default read concern."
    )
    max_lag_ms: float = Field(
        default=1000.0,
        gt=0,
        description="Default staleness bound of bounded reads, in milliseconds.",
    )
    large_value_bytes: int = Field(
        default=100 * 1024,
        ge=1,
        description="Values this size or larger travel through the object store.",
    )
    max_key_bytes: int = Field(
        default=1024, ge=1, le=1 << 20, description="Longest key, UTF-8 bytes."
    )
    max_value_bytes: int = Field(
        default=512 << 20,
        ge=1,
        description="Largest serialised value; also bounds a direct-transport frame (this "
        "plus app.kv.frames.FRAME_OVERHEAD): larger calls go through Ray.",
    )
    max_page_size: int = Field(
        default=1000, ge=1, description="Largest page a prefix scan may ask for."
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline of one client call, retries and failovers included.",
    )
    write_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a primary waits for replicas before answering TryAgain.",
    )
    health_check_interval_s: float = Field(
        default=0.5, gt=0, description="Period of the coordinator's liveness checks."
    )
    health_check_timeout_s: float = Field(
        default=5.0, gt=0, description="A member silent this long is treated as failed."
    )
    heartbeat_interval_ms: float = Field(
        default=200.0,
        gt=0,
        description="Idle primaries ping replicas this often (bounds measured lag).",
    )
    rebalance_high: float = Field(
        default=1.2, gt=1.0, description="Shards above this x mean give slots."
    )
    rebalance_low: float = Field(
        default=0.8, gt=0, lt=1.0, description="Shards below this x mean take."
    )
    auto_rebalance_s: float | None = Field(
        default=None, gt=0, description="Run the rebalancer this often (None: only on request)."
    )
    migration_batch_keys: int = Field(
        default=256, ge=1, description="Keys moved per migration step."
    )
    dedupe_window: int = Field(
        default=100_000,
        ge=1,
        description="Request ids remembered per shard so retried writes apply once.",
    )
    expiry_sweep_interval_s: float = Field(
        default=1.0, gt=0, description="Period of the background sweep that drops expired keys."
    )
    durable: bool = Field(
        default=False, description="Keep a write-ahead log and snapshots in data_dir."
    )
    data_dir: str | None = Field(
        default=None, description="Directory of WAL and snapshots (durable)."
    )
    wal_fsync: WALSync = Field(
        default=WALSync.COMMIT,
        description="When the WAL is fsynced (durable clusters). 'commit' (default): before "
        "a write is acknowledged (a primary before answering, a replica before reporting a "
        "batch applied; the records of one call share one fsync), so an acknowledged write "
        "survives a power cut or kernel crash. 'none': records are only handed to the OS, "
        "which survives the member's process dying but not the node; faster, opt in only. "
        "true/false are read as commit/none.",
    )
    snapshot_every_ops: int = Field(
        default=10_000, ge=1, description="Take a snapshot after this many WAL records."
    )
    detached: bool = Field(default=False, description="Outlive the job that started the cluster.")
    direct_transport: bool = Field(
        default=True,
        description="Serve synchronous clients and replication over a socket per member "
        "besides Ray actor calls (app.kv.direct); off: Ray actor calls only.",
    )
    direct_max_reply_bytes: int = Field(
        default=3 << 19,
        ge=0,
        description="Large values a direct-transport reply may carry by value (bytes); a "
        "read of more goes as a Ray call that hands over object-store refs.",
    )
    shard_num_cpus: float = Field(
        default=0.0, ge=0, description="Logical CPUs reserved per shard actor."
    )

    @field_validator("wal_fsync", mode="before")
    @classmethod
    def _fsync_from_bool(cls, value: Any) -> Any:
        # The field was a bool: true meant fsync every write, false flush only.
        if isinstance(value, bool):
            return WALSync.COMMIT if value else WALSync.NONE
        return value

    @model_validator(mode="after")
    def _durable_needs_dir(self) -> KVConfig:
        if self.durable and not self.data_dir:
            raise ValueError("data_dir: required when durable is true")
        return self
