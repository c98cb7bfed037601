"""Redis clients from `DRIFTLINE_REDIS_URL`: one Redis node, or a Redis Cluster.

    redis://[[user]:password@]host:port/0                       one node
    redis+cluster://[[user]:password@]host:port[,host:port...]  a Redis Cluster, found from these
                                                                seed nodes (any of its nodes will do)
    rediss://...  rediss+cluster://...                          the same over TLS

    client = connect(settings.redis_url)          # redis.Redis or redis.cluster.RedisCluster
    aclient = connect_async(settings.redis_url)   # their redis.asyncio counterparts
    for group in slot_groups(client, keys): ...   # multi-key commands and scripts, per hash slot

In a cluster a multi-key command or a Lua script may only touch keys of one hash slot: `keys.py`
tags every key so that what changes together shares a slot, and `slot_groups` splits a batch
(one script call over a thousand snapshots, say) into one call per slot. On one node nothing is
split: one node is driven exactly as before. A script is sent with EVAL inside a cluster's
pipeline (`eval_script`): after a failover or a slot migration the node that answers may never
have seen its SHA, and a pipeline does not reload it.

Worker clients (`deps.redis_client`) wait out an outage on both kinds: on one node through
redis-py's retry, on a cluster by re-running a command or a whole pipeline (every worker write
is idempotent) until a node serves its slot again -- a failover, a migration, a restart. On a
cluster their pipelines also wait (`WAIT`) until a replica of each primary they wrote to has the
writes, so a primary that dies right after does not take with it what the worker went on from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.backoff import ExponentialWithJitterBackoff
from redis._parsers.encoders import Encoder
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# What a caller treats as "Redis does not answer" (a 503, a retry): a cluster without a node for a
# slot raises RedisClusterException subclasses, which are not RedisError.
UNAVAILABLE = (redis.RedisError, SlotNotCoveredError, RedisClusterUnreachableError)
# What a worker's cluster client waits out: a node or the whole cluster away, a failover or a
# migration in progress.
CLUSTER_OUTAGE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
                  SlotNotCoveredError, RedisClusterUnreachableError)
# A write acknowledged by a primary is on a replica within this (on a healthy cluster, well under
# a millisecond); a replica that does not acknowledge in time is not waited for again for a while.
REPLICA_ACK_TIMEOUT_MS = 500
UNREPLICATED_RECHECK_S = 5.0


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, parsed from a URL (credentials stay in `node_url`)."""

    cluster: bool
    node_url: str  # a redis:// or rediss:// URL of the first node (with credentials, db, options)
    seeds: tuple[tuple[str, int], ...]  # every host:port named

    @property
    def host_port(self) -> tuple[str, int]:
        return self.seeds[0]

    @property
    def password(self) -> str | None:
        password = urlsplit(self.node_url).password
        return unquote(password) if password else None


def parse(url: str) -> RedisAddress:
    """Where a `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://` URL points.

        >>> a = parse("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001")
        >>> a.cluster, a.seeds, a.node_url
        (True, (('10.0.0.1', 7000), ('10.0.0.2', 7001)), 'redis://:s3cret@10.0.0.1:7000')
        >>> parse("redis://127.0.0.1:6379/0").cluster
        False
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in CLUSTER_SCHEMES:
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        return RedisAddress(False, url, ((host, port),))
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for address in filter(None, hosts.split(",")):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster URL names its nodes as host:port[,host:port...], not {address!r}")
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise ValueError("a redis+cluster:// URL names at least one node (host:port)")
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path.lstrip('/')!r}")
    host, port = seeds[0]
    netloc = f"{credentials}@" if credentials else ""
    netloc += f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    node_url = urlunsplit((CLUSTER_SCHEMES[scheme], netloc, "", parts.query, ""))
    return RedisAddress(True, node_url, tuple(seeds))


def is_cluster_url(url: str) -> bool:
    """
        >>> is_cluster_url("redis+cluster://127.0.0.1:7000"), is_cluster_url("redis://127.0.0.1:6379/0")
        (True, False)
    """
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def is_cluster(client: Any) -> bool:
    """Whether a client (or a pipeline of one) talks to a Redis Cluster."""
    return isinstance(client, (RedisCluster, redis.asyncio.cluster.RedisCluster, redis.asyncio.cluster.ClusterPipeline))


class HiredisPacker:
    r"""redis-py's command packer without its Python pass over every argument: hiredis writes
    str (UTF-8), bytes, int and float (their repr) itself, in C. redis-py encodes each argument in
    Python first (~0.6 µs each), and the workers' state writes carry hundreds per round trip.
    The bytes are the same; any other argument (a bool, a memoryview, a bytearray...) goes through
    redis-py's own packer, so its chunking and its DataError stay as they are.

        >>> HiredisPacker().pack("HSET", "k", "x", 0.5, "n", 3)
        [b'*6\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nx\r\n$3\r\n0.5\r\n$1\r\nn\r\n$1\r\n3\r\n']
        >>> HiredisPacker().pack("SET", "k", True)
        Traceback (most recent call last):
        redis.exceptions.DataError: Invalid input of type: 'bool'. Convert to a bytes, string, int or float first.
    """

    def __init__(self) -> None:
        encode = Encoder("utf-8", "strict", False).encode  # redis-py's defaults, which connect() keeps
        self.fallback = HiredisRespSerializer(PythonRespSerializer(6000, encode).pack, encode)

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]  # 'CONFIG GET' -> two arguments, as redis-py splits it
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # not str, bytes, int or float (a bool: hiredis refuses it too)
            return self.fallback.pack(*args)


def _encodes_utf8(url: str, options: dict[str, Any]) -> bool:
    """Whether a one-node client's connections encode text as UTF-8, strictly (redis-py's default,
    and what hiredis writes): not when the URL's query or the options name another encoding.

        >>> _encodes_utf8("redis://h:6379/0", {}), _encodes_utf8("redis://h:6379/0?encoding=latin-1", {})
        (True, False)
    """
    given = {**redis.connection.parse_url(url), **options}
    return given.get("encoding", "utf-8") == "utf-8" and given.get("encoding_errors", "strict") == "strict"


def connect(url: str, *, wait: "OutageWait | None" = None, **options: Any) -> redis.Redis | RedisCluster:
    """A client for `url`. `wait` (deps.WaitOutOutage): each command and pipeline waits out an
    outage instead of failing (worker loops); without it a command fails within a few retries
    (HTTP paths, tools). `options` go to every connection (socket timeouts...). On one node the
    connections pack commands with `HiredisPacker` when they encode text as it does (a cluster
    client takes no packer: redis-py's)."""
    address = parse(url)
    if not address.cluster:
        packer = {"command_packer": HiredisPacker()} if _encodes_utf8(url, options) else {}
        return redis.Redis.from_url(url, **({"retry": wait} if wait is not None else {}), **packer, **options)
    others = [ClusterNode(host, port) for host, port in address.seeds[1:]]
    if wait is None:
        return RedisCluster(url=address.node_url, startup_nodes=others, **options)
    # The cluster's own retries ride out a failover (a topology refresh, the commands that failed
    # sent again); `wait` takes over when they give up (the whole cluster away, a long election).
    retry = Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=8)
    return wait.call_with_retry(
        lambda: WaitingCluster(wait, url=address.node_url, startup_nodes=others, retry=retry, **options),
        lambda _error: None)


def connect_async(url: str, **options: Any):
    """The asyncio client for `url` (redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster);
    a cluster client finds its nodes at its first command."""
    address = parse(url)
    if not address.cluster:
        return redis.asyncio.Redis.from_url(url, **options)
    others = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in address.seeds[1:]]
    return redis.asyncio.cluster.RedisCluster.from_url(address.node_url, startup_nodes=others, **options)


def slot_groups(client: Any, keys: Sequence[str]) -> list[list[int]]:
    """The positions of `keys` in groups whose keys share a hash slot, in first-seen order: a
    cluster runs a multi-key command or script only on such a group. One group on one node.

        >>> slot_groups(None, ["dl:snap:{a}", "dl:snap:{b}", "dl:ent:{a}"])   # not a cluster
        [[0, 1, 2]]
        >>> slot_groups(RedisCluster.__new__(RedisCluster), ["dl:snap:{a}", "dl:snap:{b}", "dl:ent:{a}"])
        [[0, 2], [1]]
    """
    if not is_cluster(client):
        return [list(range(len(keys)))] if keys else []
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode() if isinstance(key, str) else key), []).append(i)
    return list(groups.values())


def eval_script(target: Any, script: str, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
    """Run a Lua script over keys of one slot on a client or queue it on a pipeline (one node
    or a cluster). By its text, never by SHA: no NOSCRIPT after a failover or a migration, and
    no SCRIPT EXISTS round trip that redis-py adds to a pipeline carrying a registered script."""
    return target.execute_command("EVAL", script, len(keys), *keys, *args)


class OutageWait(Protocol):
    """What `connect(wait=...)` takes: deps.WaitOutOutage (a redis-py Retry by deadline)."""

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[[Exception], Any]) -> Any: ...


class WaitingCluster(RedisCluster):
    """A RedisCluster for a worker loop: a command, or a pipeline, that meets an outage the
    cluster client gave up on is run again with backoff until the cluster answers (or the wait
    gives up); its pipelines wait for a replica's acknowledgement of their writes."""

    def __init__(self, wait: OutageWait, **kwargs: Any) -> None:
        self.outage_wait = wait
        self.replication = ReplicaAcks()
        super().__init__(**kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        run = super().execute_command
        return self.outage_wait.call_with_retry(lambda: run(*args, **kwargs), lambda _error: None)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = WaitingClusterPipeline  # redis-py builds the pipeline; it only gains behaviour
        # A MULTI/EXEC (keys of one slot) cannot hold a WAIT: it waits out an outage only.
        pipe.outage_wait, pipe.queued = self.outage_wait, []
        pipe.replication = None if transaction else self.replication
        return pipe


# Commands that write nothing: a pipeline of only these waits for no replica.
READ_ONLY = frozenset({"GET", "HGET", "HGETALL", "HMGET", "HEXISTS", "EXISTS", "TTL", "PTTL", "SMEMBERS",
                       "SISMEMBER", "SCARD", "LRANGE", "LLEN", "TYPE"})


class WaitingClusterPipeline(ClusterPipeline):
    """A worker's cluster pipeline (made by WaitingCluster.pipeline)."""

    outage_wait: OutageWait
    replication: "ReplicaAcks | None"
    queued: list

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.queued.append((args, kwargs))
        return super().execute_command(*args, **kwargs)

    def execute(self, raise_on_error: bool = True) -> list:
        queued, self.queued = self.queued, []
        if not queued:
            return []
        acks: list[ClusterNode] = []

        def attempt() -> list:
            if len(self) == 0:  # a failed attempt emptied the pipeline: the same commands again
                for args, kwargs in queued:
                    ClusterPipeline.execute_command(self, *args, **dict(kwargs))
            # asked on every attempt: the slot map may have changed since the last one
            acks[:] = self.replication.nodes_to_ack(self, queued) if self.replication else []
            for node in acks:
                ClusterPipeline.execute_command(self, "WAIT", 1, REPLICA_ACK_TIMEOUT_MS, target_nodes=node)
            replies = ClusterPipeline.execute(self, raise_on_error=False)
            # A WAIT that failed (its node turned replica since the slot map was read) is a write
            # not known to be replicated; an error of the caller's commands is the caller's.
            if raise_on_error:
                for reply in replies[:len(queued)]:
                    if isinstance(reply, Exception):
                        raise reply
            return replies

        replies = self.outage_wait.call_with_retry(attempt, lambda _error: None)
        if self.replication:
            self.replication.acknowledged(acks, replies[len(queued):])
        return replies[:len(queued)]

    def reset(self) -> None:
        self.queued = []
        super().reset()


class ReplicaAcks:
    """Which primaries a pipeline's writes must be on a replica of before it returns: those
    it wrote to that have a replica (as the cluster's slot map says), except one whose replica
    did not acknowledge lately (the wait would only stall every batch until it is back)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._skip_until: dict[str, float] = {}

    def nodes_to_ack(self, pipe: ClusterPipeline, queued: list) -> list[ClusterNode]:
        slots_cache = pipe.nodes_manager.slots_cache
        nodes: dict[str, ClusterNode] = {}
        now = time.monotonic()
        for args, _kwargs in queued:
            key = _first_key(args)
            if key is None:
                continue
            serving = slots_cache.get(key_slot(key.encode() if isinstance(key, str) else key))
            if serving and len(serving) > 1 and serving[0].name not in nodes:
                if self._skip_until.get(serving[0].name, 0.0) <= now:
                    nodes[serving[0].name] = serving[0]
        return list(nodes.values())

    def acknowledged(self, nodes: list[ClusterNode], replies: list) -> None:
        for node, acks in zip(nodes, replies):
            if isinstance(acks, Exception):  # no longer a primary: the slot map catches up (MOVED), nothing to skip
                log.debug("WAIT on %s failed: %s", node.name, acks)
                continue
            if acks >= 1:
                if self._skip_until.pop(node.name, None) is not None:
                    log.warning("redis cluster: writes on %s are acknowledged by a replica again", node.name)
                continue
            with self._lock:
                first = node.name not in self._skip_until
                self._skip_until[node.name] = time.monotonic() + UNREPLICATED_RECHECK_S
            if first:
                log.warning("redis cluster: no replica of %s acknowledged writes within %d ms: a failover of it "
                            "now may lose them; asked again every %.0f s", node.name, REPLICA_ACK_TIMEOUT_MS,
                            UNREPLICATED_RECHECK_S)


def _first_key(args: tuple) -> Any:
    """The key a queued write command is routed by; None for a read or a command without keys."""
    name = str(args[0]).upper()
    if name in READ_ONLY or len(args) < 2:
        return None
    if name in ("EVAL", "EVALSHA"):
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    return args[1]


def queue_script_per_slot(pipe: Any, script: str, keys: Sequence[str], key_args: Sequence[Sequence[Any]],
                          shared_args: Sequence[Any] = ()) -> list[list[int]]:
    """Queue `script` on `pipe` once per group of `keys` that share a slot (once on one node):
    its KEYS the group's keys, its ARGV `shared_args` then each of those keys' `key_args`, in
    order. Returns the groups, for `per_key`.

        >>> class Pipe:
        ...     def execute_command(self, *args): print(args[2:])
        >>> queue_script_per_slot(Pipe(), "...", ["k:{a}", "k:{b}"], [["x"], ["y"]], shared_args=[60])
        (2, 'k:{a}', 'k:{b}', 60, 'x', 'y')
        [[0, 1]]
    """
    groups = slot_groups(pipe, keys)
    for group in groups:
        argv = list(shared_args)
        if len(groups) == 1:  # one node: the batch as it is
            for args in key_args:
                argv.extend(args)
            eval_script(pipe, script, keys, argv)
            break
        for i in group:
            argv.extend(key_args[i])
        eval_script(pipe, script, [keys[i] for i in group], argv)
    return groups


def per_key(groups: list[list[int]], replies: Sequence[Sequence[Any]]) -> list:
    """The replies of per-slot script calls that answer one value per key, back in key order.

        >>> per_key([[0, 2], [1]], [["a", "c"], ["b"]])
        ['a', 'b', 'c']
    """
    out: list = [None] * sum(map(len, groups))
    for group, reply in zip(groups, replies):
        for i, value in zip(group, reply):
            out[i] = value
    return out


def per_key_calls(replies: Sequence[Any], *calls: list[list[int]]) -> list[list]:
    """The replies of a pipeline that queued several `queue_script_per_slot` calls in this order
    (each call's groups), each call's back in key order (`per_key`).

        >>> per_key_calls(["a", "b", ["c"]], [[0], [1]], [], [[0]])
        [['a', 'b'], [], ['c']]
    """
    replies = iter(replies)
    return [per_key(groups, [next(replies) for _ in groups]) for groups in calls]
