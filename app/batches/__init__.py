"""OpenAI's Files and Batch APIs on the cluster: stores, the batch workflow, the line runner
and the HTTP routes. The names a deployment wires are re-exported here."""

from app.batches.batches import BatchStatus, BatchStore
from app.batches.capacity import ActiveBatches, BatchQuota
from app.batches.concurrency import AIMDConfig, AIMDLimit
from app.batches.content import ContentStore, content_store
from app.batches.files import FileLimits, FileStore
from app.batches.http import BatchRoutes, handles
from app.batches.output import ResultStore, Tally
from app.batches.runner import ActiveQueues, LineRunner, LineSender, batch_queue
from app.batches.workflow import WORKFLOW, BatchDeps, batch_workflow, start_input

__all__ = [
    "WORKFLOW",
    "AIMDConfig",
    "AIMDLimit",
    "ActiveBatches",
    "ActiveQueues",
    "BatchDeps",
    "BatchQuota",
    "BatchRoutes",
    "BatchStatus",
    "BatchStore",
    "ContentStore",
    "FileLimits",
    "FileStore",
    "LineRunner",
    "LineSender",
    "ResultStore",
    "Tally",
    "batch_queue",
    "batch_workflow",
    "content_store",
    "handles",
    "start_input",
]
