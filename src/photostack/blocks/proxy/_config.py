"""The edge proxy's tunables, one frozen object (sizes in bytes, times in seconds)."""

from __future__ import annotations

from dataclasses import dataclass, field

from photostack.blocks.balancer import Backend, ClientConfig

__all__ = ["ProxyConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    backends: tuple[Backend, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080  # 0 picks a free port; read it back from ProxyServer.port
    name: str = "edge"
    # Pools, health, retries and the request deadline (first try to response head).
    upstream: ClientConfig = field(default_factory=ClientConfig)
    # Longest silence allowed inside a streamed response body (SSE sends a comment every 15 s).
    stream_idle_timeout_s: float = 60.0
    # A client connection with no request in progress is closed after this long; a request
    # must also arrive whole within it (keeps slow-header clients from holding connections).
    client_timeout_s: float = 60.0
    drain_timeout_s: float = 10.0  # on close: let in-flight requests finish, then cut
    max_body_bytes: int = 12 * 1024 * 1024  # 10 MiB uploads plus multipart overhead
    max_header_bytes: int = 16 * 1024  # request line plus headers
    forwarded_proto: str = "http"  # what X-Forwarded-Proto says (TLS ends elsewhere)
    max_pipelined_requests: int = 16  # stop reading a client that queued this many
