"""`driftline bench pipeline --redis-cluster`: the throughput phase again, through a local Redis
Cluster (3 primaries + 3 replicas of redis-server in cluster mode, on free ports) instead of the
bench's one Redis node, with the one-node figure beside each.

    result["throughput_redis_cluster"]["logreg"]   # events/s, ratio to one node, CPU per event per process

Same broker (warm by then), same models, rows and label delay; the services only get a
`redis+cluster://` URL. The CPU per event is given for every process, each cluster node apart.
"""

from __future__ import annotations

import time

from ..infra.redis_cluster import RedisCluster, on_free_ports
from .pipeline import MODELS, THROUGHPUT_DELAY, console


def throughput_through_cluster(bench, rows: dict[str, int], one_node: dict[str, dict]) -> dict:
    """The throughput replays of `bench` (a pipeline.BenchStack) through a cluster started for them
    and stopped after; `one_node` is the bench's own throughput result, for the ratio."""
    own = bench.settings
    bench.settings = on_free_ports(own, nodes=6)
    cluster = RedisCluster(bench.settings)
    out: dict = {"redis": "Redis Cluster: 3 primaries + 3 replicas, one machine"}
    try:
        with console.status("starting a Redis Cluster (6 nodes)"):
            cluster.start()
            deadline = time.monotonic() + 60
            while not cluster.ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster did not come up:\n{cluster.log_tail(5)}")
                time.sleep(0.2)
        for name, spec in MODELS.items():
            console.rule(f"throughput through a Redis Cluster: {name}")
            report = bench.replay(spec, "raw", limit=rows[name], label_delay=THROUGHPUT_DELAY)
            events_per_s = report["throughput_events_per_s"]
            single = one_node.get(name, {}).get("pipeline_events_per_s")
            out[name] = {
                "model": spec, "rows": rows[name], "pipeline_events_per_s": events_per_s,
                "one_node_events_per_s": single,
                "ratio_to_one_node": round(events_per_s / single, 3) if single else None,
                "wall_s": report["wall_s"], "examples_learned": report["examples_learned"],
                "cpu_us_per_event": {process: round(seconds * 1e6 / rows[name], 1)
                                     for process, seconds in report["cpu_s"].items()},
                **report["timeline"],
            }
    finally:
        cluster.stop()
        bench.settings = own
    return out
