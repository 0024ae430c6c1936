"""Load balancing: backend choice with passive health, the retry rule, and the upstream core.

The policy (``BackendPool``, ``BackendHealth``, ``may_retry``) is pure and clock-driven; the
asyncio adapters (``Upstream``, ``SmartClient``) drive it over keep-alive HTTP/1.1 pools.
"""

from photostack.blocks.balancer._client import SmartClient, UpstreamResponse
from photostack.blocks.balancer._connection import ConnState, ResponseHead
from photostack.blocks.balancer._errors import (
    BalancerError,
    IllegalTransition,
    NoBackendAvailable,
    PoolTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from photostack.blocks.balancer._health import (
    Backend,
    BackendHealth,
    BackendState,
    HealthConfig,
    HealthEvent,
)
from photostack.blocks.balancer._pool import BackendPool, Clock
from photostack.blocks.balancer._retry import (
    IDEMPOTENT_METHODS,
    FailureStage,
    failure_reason,
    is_idempotent,
    max_tries_for,
    may_retry,
)
from photostack.blocks.balancer._upstream import (
    ClientConfig,
    StreamedResponse,
    Upstream,
    UpstreamHooks,
    encode_request,
)

__all__ = [
    "IDEMPOTENT_METHODS",
    "Backend",
    "BackendHealth",
    "BackendPool",
    "BackendState",
    "BalancerError",
    "ClientConfig",
    "Clock",
    "ConnState",
    "FailureStage",
    "HealthConfig",
    "HealthEvent",
    "IllegalTransition",
    "NoBackendAvailable",
    "PoolTimeout",
    "ResponseHead",
    "SmartClient",
    "StreamedResponse",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamHooks",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "encode_request",
    "failure_reason",
    "is_idempotent",
    "max_tries_for",
    "may_retry",
]
