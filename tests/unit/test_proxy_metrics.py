"""Metrics render from counters and from the pool snapshot at scrape time."""

from __future__ import annotations

from photostack.blocks.balancer import Backend, BackendPool
from photostack.blocks.balancer.testing import ManualClock
from photostack.blocks.proxy import ProxyMetrics


def test_render_counts_and_backend_state() -> None:
    pool = BackendPool([Backend("web-1", "h", 1), Backend("web-2", "h", 2)], clock=ManualClock())
    pool.record_failure(pool.backends[0])
    metrics = ProxyMetrics()
    metrics.watch(pool.snapshot)
    metrics.count_response(200)
    metrics.count_response(503)
    metrics.count_response(999)  # not a status class: ignored, not a crash
    metrics.on_retry("web-1", "connect")
    text = metrics.render().decode()
    assert 'photostack_edge_requests_total{status_class="2xx"} 1.0' in text
    assert 'photostack_edge_requests_total{status_class="5xx"} 1.0' in text
    assert 'photostack_edge_upstream_retries_total{reason="connect"} 1.0' in text
    assert 'photostack_edge_backend_state{backend="web-1",state="down"} 1.0' in text
    assert 'photostack_edge_backend_state{backend="web-2",state="up"} 1.0' in text
    assert 'photostack_edge_backend_markdowns_total{backend="web-1"} 1.0' in text
