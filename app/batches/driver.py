"""RunDriver: the workflow runs one batch worker drives, each on a thread of its own, and the
sweep that finds the runs nobody drives (never claimed, or their worker died)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from app.workflows.engine import RunStatus, WorkflowEngine

logger = logging.getLogger(__name__)


class IndexKV(Protocol):
    """What the sweep reads of app.kv's KVClient (which satisfies it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]: ...


class RunDriver:
    """Why not `engine.resume_stale()` in a loop: it drives the runs it finds one after the
    other on the calling thread, and a batch run lasts as long as its lines (hours), so one
    batch would hold up the resumption of every other. Here each run gets a daemon thread
    (never the event loop's executor, which the line runner needs for its KV calls), at most
    `max_runs` at once; the engine's claim (compare-and-set) still decides which worker of
    several drives a run.

    The sweep reads the engine's index of unfinished runs (`<prefix>:active`) and the runs'
    records (one mget): a run is taken when nobody holds its lease, once it is older than
    `grace_s` if it was never claimed (its gateway nudged a worker, which is about to)."""

    def __init__(
        self,
        engine: WorkflowEngine,
        kv: IndexKV,
        *,
        prefix: str = "wf",
        max_runs: int = 64,
        grace_s: float = 2.0,
    ) -> None:
        self.engine = engine
        self.kv = kv
        self.index_key = f"{prefix}:active"
        self.max_runs = max_runs
        self.grace_s = grace_s
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def drive(self, run_id: str) -> bool:
        """Drive `run_id` on a new thread; False if this worker drives it already or is full
        (a sweep, here or on another worker, takes it later)."""
        with self._lock:
            if run_id in self._threads or len(self._threads) >= self.max_runs:
                return False
            thread = threading.Thread(
                target=self._run, args=(run_id,), name=f"batch-run-{run_id}", daemon=True
            )
            self._threads[run_id] = thread
        thread.start()
        return True

    def driving(self) -> list[str]:
        with self._lock:
            return sorted(self._threads)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the runs driven now to end (tests; shutdown); True if they all did."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout_s)
        return not any(t.is_alive() for t in threads)

    def claimable(self) -> list[str]:
        """Unfinished runs whose lease nobody holds, oldest first."""
        active: dict[str, float] = self.kv.get(self.index_key) or {}
        ids = sorted(active, key=active.__getitem__)
        records = self.kv.mget([self.engine.run_key(i) for i in ids]) if ids else []
        now = self.engine.clock()
        found = []
        for run_id, record in zip(ids, records, strict=True):
            if record is None or RunStatus(record["status"]).terminal:
                continue  # the engine's resume_stale prunes these from the index
            if record["workflow"] not in self.engine.workflows:
                continue
            if record["owner"] is None:
                if now - record["created_at"] < self.grace_s:
                    continue
            elif record["lease_until"] > now:
                continue
            found.append(run_id)
        return found

    def sweep(self) -> list[str]:
        """Start driving every claimable run not driven here; returns those started."""
        return [run_id for run_id in self.claimable() if self.drive(run_id)]

    def _run(self, run_id: str) -> None:
        try:
            state = self.engine.run(run_id)
            logger.info("workflow run %s: %s", run_id, state.status)
        except KeyError:
            logger.warning("workflow run %s does not exist", run_id)
        except Exception:  # the lease lapses and another sweep resumes it
            logger.exception("workflow run %s: driving failed", run_id)
        finally:
            with self._lock:
                self._threads.pop(run_id, None)
