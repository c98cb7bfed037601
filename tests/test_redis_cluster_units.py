"""What makes driftline's Redis use cluster-safe, without a cluster: every key built by `Keys`
carries a hash tag naming what it belongs to, what one script or transaction touches shares a
slot, batch scripts are split per slot only on a cluster, and the cluster URL is read right."""

from __future__ import annotations

import inspect
import re

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from driftline.shared.keys import Keys
from driftline.shared.redis_clients import (
    ReplicaAcks,
    is_cluster,
    is_cluster_url,
    parse,
    per_key,
    queue_script_per_slot,
    slot_groups,
)
from driftline.shared.settings import Settings


def slot(key: str) -> int:
    return key_slot(key.encode())


def key_builders():
    """Every public method of Keys with the arguments to call it with: each string argument a
    distinct value, so the tag can be traced back to the argument it came from."""
    keys = Keys("ns1")
    for name, method in inspect.getmembers(keys, inspect.ismethod):
        if name.startswith("_"):
            continue
        args = {}
        for i, (param, spec) in enumerate(inspect.signature(method).parameters.items()):
            args[param] = 7 + i if spec.annotation in (int, "int") else f"<{param}>"
        yield name, method, args


def test_every_key_pattern_carries_a_hash_tag_naming_what_it_belongs_to():
    builders = list(key_builders())
    assert len(builders) >= 15  # the test sees the layout (a rename must not make it vacuous)
    for name, method, args in builders:
        key = method(**args)
        assert key.startswith("dl:ns1:"), (name, key)
        tag = re.search(r"\{([^{}]*)\}", key)
        assert tag and tag.group(1), f"Keys.{name} builds {key!r}: no hash tag (see keys.py's rule)"
        assert key.index("{") == tag.start(), (name, key)  # the first brace is the tag Redis hashes
        assert slot(key) == slot(tag.group(1))
        texts = [v for v in args.values() if isinstance(v, str)]
        if texts:  # tagged by the entity, event, model or key value it belongs to, not by anything else
            assert tag.group(1) in texts or tag.group(1) == "=".join(texts), (name, key)


def test_keys_written_by_one_script_or_transaction_share_a_slot():
    keys = Keys("ns1")
    # the fenced checkpoint write: KEYS = lease, checkpoint
    assert slot(keys.lease("m")) == slot(keys.checkpoint("m"))
    # a version's artifact and lineage are written in one MULTI/EXEC
    assert slot(keys.registry_artifact("m", 3)) == slot(keys.registry_versions("m")) == slot(keys.registry_seq("m"))
    assert slot(keys.entity("e-1")) != slot(keys.entity("e-2"))  # entities spread over the cluster


def test_a_namespace_with_braces_is_refused():
    with pytest.raises(ValueError, match="braces"):
        Keys("a{b}")


def cluster_like():
    """An object `is_cluster` takes for a cluster client (no connection)."""
    return RedisCluster.__new__(RedisCluster)


class RecordingPipe:
    def __init__(self, cluster: bool) -> None:
        self.calls: list[tuple] = []
        self.cluster = cluster

    def execute_command(self, *args):
        self.calls.append(args)


def test_a_batch_script_is_one_call_on_one_node_and_one_call_per_slot_on_a_cluster():
    keys = [Keys("").snapshot(f"e{i}") for i in range(50)] + [Keys("").snapshot("e3")]
    values = [(f"v{i}",) for i in range(len(keys))]

    one = RecordingPipe(cluster=False)
    assert queue_script_per_slot(one, "LUA", keys, values, ("ttl",)) == [list(range(51))]
    assert one.calls == [("EVAL", "LUA", 51, *keys, "ttl", *(v for (v,) in values))]

    pipe = cluster_like()
    calls = []
    pipe.__dict__["execute_command"] = lambda *args: calls.append(args)
    groups = queue_script_per_slot(pipe, "LUA", keys, values, ("ttl",))
    assert sorted(i for g in groups for i in g) == list(range(51))
    assert len(calls) == len(groups) == len({slot(k) for k in keys})
    for group, call in zip(groups, calls):
        n = call[2]
        call_keys, argv = list(call[3:3 + n]), list(call[3 + n:])
        assert call_keys == [keys[i] for i in group] and len({slot(k) for k in call_keys}) == 1
        assert argv == ["ttl", *(values[i][0] for i in group)]  # each key's arguments follow it
    # The replies come back in key order.
    replies = [[f"r{i}" for i in group] for group in groups]
    assert per_key(groups, replies) == [f"r{i}" for i in range(51)]


def test_slot_groups_keep_keys_of_one_tag_together():
    keys = [Keys("").entity("a"), Keys("").snapshot("b"), Keys("").seen_event("a"), Keys("").snapshot("a")]
    assert slot_groups(object(), keys) == [[0, 1, 2, 3]]
    assert slot_groups(cluster_like(), keys) == [[0, 2, 3], [1]]
    assert slot_groups(cluster_like(), []) == [] == slot_groups(object(), [])
    assert is_cluster(cluster_like()) and not is_cluster(object())


def test_cluster_urls_name_their_seed_nodes_and_keep_credentials_and_tls():
    a = parse("rediss+cluster://user:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002?ssl_cert_reqs=none")
    assert a.cluster and a.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert a.node_url == "rediss://user:p%40ss@10.0.0.1:7000?ssl_cert_reqs=none" and a.password == "p@ss"
    assert parse("redis+cluster://127.0.0.1:7000/0").seeds == (("127.0.0.1", 7000),)
    single = parse("redis://:pw@127.0.0.1:6380/2")
    assert not single.cluster and single.host_port == ("127.0.0.1", 6380) and single.node_url.endswith("/2")
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("rediss://h:1")
    for bad, why in (("redis+cluster://h1:7000/3", "database 0"), ("redis+cluster://h1", "host:port"),
                     ("redis+cluster://", "at least one node")):
        with pytest.raises(ValueError, match=why):
            parse(bad)
    assert Settings(redis_url="redis+cluster://:pw@10.1.1.1:7005,10.1.1.2:7006").redis_host_port == ("10.1.1.1", 7005)


class Node:
    def __init__(self, name: str) -> None:
        self.name = name


class SlotMap:
    def __init__(self, slots_cache) -> None:
        self.nodes_manager = type("NM", (), {"slots_cache": slots_cache})()


def test_a_pipeline_waits_for_a_replica_of_each_primary_it_wrote_to_that_has_one():
    a, a_replica, b = Node("a:1"), Node("a:2"), Node("b:1")
    k_a, k_b = Keys("").entity("x"), Keys("").entity("y")
    assert slot(k_a) != slot(k_b)
    pipe = SlotMap({slot(k_a): [a, a_replica], slot(k_b): [b]})  # b has no replica now
    acks = ReplicaAcks()
    writes = [(("HSET", k_a, "n", 1), {}), (("EVAL", "LUA", 1, k_b), {}), (("EVAL", "LUA", 1, k_a, "x"), {})]
    assert acks.nodes_to_ack(pipe, writes) == [a]
    assert acks.nodes_to_ack(pipe, [(("HGETALL", k_a), {}), (("HMGET", k_a, "f"), {})]) == []  # reads only
    # A replica that did not acknowledge is not waited for again at once (every batch would stall).
    acks.acknowledged([a], [0])
    assert acks.nodes_to_ack(pipe, writes) == []
    acks._skip_until[a.name] = 0.0  # the recheck is due
    assert acks.nodes_to_ack(pipe, writes) == [a]
    acks.acknowledged([a], [1])
    assert a.name not in acks._skip_until
    # A WAIT refused (the node turned replica: the slot map is behind) skips nothing.
    acks.acknowledged([a], [ResponseError("WAIT cannot be used with replica instances")])
    assert acks.nodes_to_ack(pipe, writes) == [a]
