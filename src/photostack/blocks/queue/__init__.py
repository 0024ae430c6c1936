"""The durable task queue: the contract, its Postgres and RabbitMQ engines, and the worker
runtime.

Producers ``enqueue`` and get a task id at once, then ask ``status(id)``; workers lease tasks,
extend the lease while running, and report the outcome; failed attempts retry with backoff and
end in a dead-letter queue that operators inspect and replay. The decisions (transition table,
backoff, lost-lease rule, length gate, delay tiers) are pure; engines apply them.
"""

from photostack.blocks.queue._backend import QueueBackend, ReapResult
from photostack.blocks.queue._errors import (
    IllegalTransition,
    LeaseLost,
    PayloadTooLarge,
    PermanentTaskError,
    QueueConfigError,
    QueueError,
    QueueFull,
    QueueUnavailable,
    TaskNotFound,
)
from photostack.blocks.queue._http import AdminHttp, create_admin_app
from photostack.blocks.queue._metrics import QueueMetrics
from photostack.blocks.queue._model import (
    TRANSITIONS,
    Json,
    Lease,
    QueueConfig,
    QueueStats,
    RetryPolicy,
    TaskInfo,
    TaskState,
    check_transition,
)
from photostack.blocks.queue._policy import (
    DELAY_TIERS_MS,
    DepthGate,
    FailureDecision,
    backoff_delay_s,
    decide_failure,
    decide_lost_lease,
    delay_tier_ms,
    heartbeat_interval_s,
)
from photostack.blocks.queue._postgres import PostgresQueue
from photostack.blocks.queue._rabbit import RabbitQueue
from photostack.blocks.queue._worker import (
    Handler,
    TaskContext,
    TaskRegistry,
    Worker,
    WorkerConfig,
    WorkerHooks,
    WorkerState,
)

__all__ = [
    "DELAY_TIERS_MS",
    "TRANSITIONS",
    "AdminHttp",
    "DepthGate",
    "FailureDecision",
    "Handler",
    "IllegalTransition",
    "Json",
    "Lease",
    "LeaseLost",
    "PayloadTooLarge",
    "PermanentTaskError",
    "PostgresQueue",
    "QueueBackend",
    "QueueConfig",
    "QueueConfigError",
    "QueueError",
    "QueueFull",
    "QueueMetrics",
    "QueueStats",
    "QueueUnavailable",
    "RabbitQueue",
    "ReapResult",
    "RetryPolicy",
    "TaskContext",
    "TaskInfo",
    "TaskNotFound",
    "TaskRegistry",
    "TaskState",
    "Worker",
    "WorkerConfig",
    "WorkerHooks",
    "WorkerState",
    "backoff_delay_s",
    "check_transition",
    "create_admin_app",
    "decide_failure",
    "decide_lost_lease",
    "delay_tier_ms",
    "heartbeat_interval_s",
]
