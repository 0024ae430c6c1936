"""The uploads' topology keys ([workers], [queue], [feed]), their layout, and the bench's
pure helpers."""

from __future__ import annotations

import math

import pytest

from photostack.cluster.topology import QUEUE_GROUP, Role, TopologyError, layout, parse_topology
from photostack.ops._bench_uploads import percentile, pillow_floor_ms, sample_jpeg

MINIMAL = """
[storage.users]
[storage.social]
[storage.photos]
"""


def test_defaults_two_workers_and_a_replicated_queue_laid_out_last() -> None:
    topo = parse_topology(MINIMAL)
    assert (topo.worker_count, topo.worker_concurrency, topo.queue_replicas) == (2, 4, 1)
    assert topo.feed_fanout_limit == 1000
    lay = layout(topo, 9000)
    media = (Role.MEDIA, Role.CDN)  # laid out after the workers (docs/media.md)
    names = [n.name for n in lay.nodes if n.role not in media]
    assert names[-4:] == ["queue-1-primary", "queue-1-replica-1", "worker-1", "worker-2"]
    primary, replicas = lay.shard_nodes(QUEUE_GROUP, 1)
    assert replicas[0].replica_of == primary.name
    assert [n.role for n in lay.nodes if n.role not in media][-2:] == [Role.WORKER, Role.WORKER]
    assert len({n.port for n in lay.nodes}) == len(lay.nodes)


def test_keys_are_read_and_checked() -> None:
    topo = parse_topology(
        MINIMAL + "[workers]\ncount = 3\nconcurrency = 8\nvisibility_timeout_s = 5\n"
        "[queue]\nreplicas = 0\nmax_length = 50\n[feed]\nfanout_limit = 10\n"
    )
    assert (topo.worker_count, topo.worker_concurrency) == (3, 8)
    assert topo.worker_visibility_timeout_s == 5.0
    assert (topo.queue_replicas, topo.queue_max_length, topo.feed_fanout_limit) == (0, 50, 10)
    assert [n.name for n in layout(topo, 9000).nodes if n.role not in (Role.MEDIA, Role.CDN)][
        -4:
    ] == [
        "queue-1-primary", "worker-1", "worker-2", "worker-3",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("[workers]\nthreads = 2\n", "unknown key 'threads'"),
        ("[queue]\nshards = 2\n", "unknown key 'shards'"),
        ("[feed]\nlimit = 2\n", "unknown key 'limit'"),
        ("[workers]\nconcurrency = 0\n", "outside 1..256"),
        ("[workers]\nvisibility_timeout_s = 0\n", "visibility_timeout_s"),
        ("[uploads]\n", "unknown key 'uploads'"),
    ],
)
def test_unknown_or_bad_keys_are_refused(extra: str, reason: str) -> None:
    with pytest.raises(TopologyError, match=reason):
        parse_topology(MINIMAL + extra)


def test_bench_percentiles_and_anchor() -> None:
    assert math.isnan(percentile([], 50))
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0, 99.0, 100.0,
    )  # fmt: skip
    assert sample_jpeg((64, 48), 1) != sample_jpeg((64, 48), 2)
    times = pillow_floor_ms(sample_jpeg((64, 48), 1), 32, 3)
    assert len(times) == 3
    assert all(t > 0 for t in times)
