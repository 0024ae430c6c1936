"""Load balancing: one core for the edge proxy, the smart client and the local sidecar.

The policy is pure and clock-driven: strategies (``make_strategy``), the backend health state
machine (``BackendHealth``, ``TRANSITIONS``), slow start, the retry rule (``retry_verdict``) and
the retry budget. The asyncio adapters (``Upstream``, ``SmartClient``, ``HealthChecker``,
``AdminServer``) drive it over keep-alive HTTP/1.1 pools: ``Upstream.open`` as a coroutine
(request bodies as bytes or a streamed ``BodySource``), ``Upstream.exchange`` by callbacks
(the edge's hot path, no task or timer per request). See docs/balancing.md.
"""

from photostack.blocks.balancer._admin import AdminServer, admin_dispatch
from photostack.blocks.balancer._budget import RetryBudget, RetryBudgetConfig
from photostack.blocks.balancer._checker import HealthChecker, check_once
from photostack.blocks.balancer._client import SmartClient, UpstreamResponse
from photostack.blocks.balancer._config import (
    SETTINGS_KEYS,
    ClientConfig,
    key_function,
    parse_settings,
)
from photostack.blocks.balancer._connection import ConnState, ResponseHead
from photostack.blocks.balancer._errors import (
    BalancerConfigError,
    BalancerError,
    IllegalTransition,
    NoBackendAvailable,
    PoolTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from photostack.blocks.balancer._exchange import Exchange, ExchangeSink
from photostack.blocks.balancer._health import (
    TRANSITIONS,
    ActiveCheckConfig,
    Backend,
    BackendHealth,
    BackendState,
    HealthConfig,
    HealthEvent,
)
from photostack.blocks.balancer._metrics import BalancerMetrics
from photostack.blocks.balancer._pool import BackendPool, Clock
from photostack.blocks.balancer._response import StreamedResponse
from photostack.blocks.balancer._retry import (
    IDEMPOTENT_METHODS,
    FailureStage,
    RetryVerdict,
    failure_reason,
    is_idempotent,
    max_tries_for,
    may_retry,
    retry_verdict,
)
from photostack.blocks.balancer._slowstart import SlowStart
from photostack.blocks.balancer._strategy import (
    BoundedHash,
    Candidate,
    LeastConnections,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    Strategy,
    StrategyName,
    WeightedRandom,
    bounded_load_cap,
    make_strategy,
)
from photostack.blocks.balancer._upstream import Upstream, UpstreamHooks
from photostack.blocks.balancer._wire import BodySource, encode_head, encode_request

__all__ = [
    "IDEMPOTENT_METHODS",
    "SETTINGS_KEYS",
    "TRANSITIONS",
    "ActiveCheckConfig",
    "AdminServer",
    "Backend",
    "BackendHealth",
    "BackendPool",
    "BackendState",
    "BalancerConfigError",
    "BalancerError",
    "BalancerMetrics",
    "BodySource",
    "BoundedHash",
    "Candidate",
    "ClientConfig",
    "Clock",
    "ConnState",
    "Exchange",
    "ExchangeSink",
    "FailureStage",
    "HealthChecker",
    "HealthConfig",
    "HealthEvent",
    "IllegalTransition",
    "LeastConnections",
    "NoBackendAvailable",
    "PoolTimeout",
    "PowerOfTwo",
    "RandomChoice",
    "ResponseHead",
    "RetryBudget",
    "RetryBudgetConfig",
    "RetryVerdict",
    "RoundRobin",
    "SlowStart",
    "SmartClient",
    "Strategy",
    "StrategyName",
    "StreamedResponse",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHooks",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "WeightedRandom",
    "admin_dispatch",
    "bounded_load_cap",
    "check_once",
    "encode_head",
    "encode_request",
    "failure_reason",
    "is_idempotent",
    "key_function",
    "make_strategy",
    "max_tries_for",
    "may_retry",
    "parse_settings",
    "retry_verdict",
]
