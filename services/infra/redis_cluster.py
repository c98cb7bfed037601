"""A local Redis Cluster: Debian's redis-server in cluster mode, one process per node that a
`redis+cluster://` URL names, slots assigned by `redis-cli --cluster create` (one replica per
primary when the URL names six nodes or more: 3 primaries + 3 replicas for six).

    settings = on_free_ports(settings, nodes=6)   # redis_url = redis+cluster://127.0.0.1:p1,...,127.0.0.1:p6
    cluster = RedisCluster(settings)
    cluster.start()                               # then cluster.ready(): every node says cluster_state:ok
    cluster.primaries()                           # {node: its replicas} as the cluster sees it now
    cluster.stop()

`driftline infra up` starts one when DRIFTLINE_REDIS_URL is a cluster URL of this machine. Each
node keeps its config, `nodes.conf` and append-only files under `<home>/redis-cluster/<port>/`;
its cluster bus port is chosen free at its first start and kept in its config, so a node started
again rejoins (as a replica, when a failover promoted another meanwhile). Nothing is created
twice: a cluster whose nodes already hold slots is only started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from ..shared.redis_clients import parse
from ..shared.settings import Settings
from .stack import REDIS_CONF, Component, InfraError, Redis, free_port, port_open

SLOTS = 16384


class RedisClusterNode(Component):
    """One redis-server of the cluster, on the host:port the URL names."""

    def __init__(self, settings: Settings, host: str, port: int, node_timeout_ms: int) -> None:
        super().__init__(f"redis-{port}", settings)
        self.host, self.port, self.node_timeout_ms = host, port, node_timeout_ms

    @property
    def dir(self) -> Path:
        return self.settings.home / "redis-cluster" / str(self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __hash__(self) -> int:
        return hash(self.address)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._spawn([shutil.which("redis-server") or "redis-server", str(self._config())])

    def _config(self) -> Path:
        """The node's config (mode 0600: it may hold the password), written at its first start;
        later starts keep its cluster bus port."""
        path = self.dir / "node.conf"
        if path.exists():
            return path
        password = parse(self.settings.redis_url).password
        lines = [f"include {REDIS_CONF}", f"bind {self.host}", f"port {self.port}", f"dir {self.dir.resolve()}",
                 'pidfile ""', "cluster-enabled yes", "cluster-config-file nodes.conf",
                 f"cluster-port {free_port(self.host)}",  # not port + 10000: that may be taken, or past 65535
                 f"cluster-node-timeout {self.node_timeout_ms}"]
        if password:
            lines += [f'requirepass "{password}"', f'masterauth "{password}"']
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# Written by driftline (infra/redis_cluster.py) at the node's first start.\n"
                    + "\n".join(lines) + "\n")
        return path

    def client(self, timeout: float = 2.0):
        import redis

        return redis.Redis(self.host, self.port, password=parse(self.settings.redis_url).password,
                           socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True)

    def info(self) -> dict | None:
        """CLUSTER INFO, or None while the node does not answer."""
        try:
            with self.client() as c:
                return c.cluster("info")
        except Exception:
            return None

    def ready(self) -> bool:
        return self.info() is not None


class RedisCluster(Component):
    """Every node of a `redis+cluster://` URL on this machine, as one component named `redis`."""

    def __init__(self, settings: Settings, node_timeout_ms: int = 5000) -> None:
        super().__init__("redis", settings)
        address = parse(settings.redis_url)
        if not address.cluster:
            raise InfraError(f"not a redis+cluster:// URL: {settings.redis_url.split('@')[-1]}")
        if len(address.seeds) < 3:
            raise InfraError("a local Redis Cluster needs at least 3 nodes in DRIFTLINE_REDIS_URL "
                             "(6 for 3 primaries with a replica each)")
        self.nodes = [RedisClusterNode(settings, host, port, node_timeout_ms) for host, port in address.seeds]
        self.replicas = 1 if len(self.nodes) >= 6 else 0

    def installed(self) -> bool:
        return Redis(self.settings).installed() and shutil.which("redis-cli") is not None

    def install(self) -> None:
        Redis(self.settings).install()  # redis-cli comes with it (redis-tools)

    def pid(self) -> int | None:
        return next((pid for node in self.nodes if (pid := node.pid()) and node.running()), None)

    def pids(self) -> dict[str, int]:
        return {name: pid for node in self.nodes for name, pid in node.pids().items()}

    def running(self) -> bool:
        return any(node.running() for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            if node.running():
                continue
            if port_open(node.host, node.port):
                raise InfraError(f"redis cluster node {node.address} is taken by a process driftline did not start")
            node.start()
        deadline = time.monotonic() + timeout
        infos = {}
        for node in self.nodes:
            while (info := node.info()) is None:
                if not node.running() or time.monotonic() > deadline:
                    raise InfraError(f"redis cluster node {node.address} did not start:\n{node.log_tail()}")
                time.sleep(0.1)
            infos[node.address] = info
        if all(int(info["cluster_slots_assigned"]) == 0 for info in infos.values()):
            self._create()

    def _create(self) -> None:
        command = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                   *(node.address for node in self.nodes), "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        password = parse(self.settings.redis_url).password
        env = {**os.environ, **({"REDISCLI_AUTH": password} if password else {})}  # not on the command line
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            raise InfraError(f"redis-cli --cluster create failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")

    def ready(self) -> bool:
        """Every node answers, knows every other one, and says the cluster is ok."""
        for node in self.nodes:
            info = node.info()
            if (info is None or info.get("cluster_state") != "ok" or int(info["cluster_slots_ok"]) != SLOTS
                    or int(info["cluster_known_nodes"]) < len(self.nodes)):
                return False
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        stopped = [node.stop(timeout) for node in self.nodes]
        return any(stopped)

    @property
    def log_path(self) -> Path:
        return self.nodes[0].log_path  # the others' sit next to it (redis-<port>.log)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"== {node.address}\n{node.log_tail(lines)}" for node in self.nodes)

    # -- what the cluster looks like now (tests and operators) -------------------------------
    def node(self, address: str) -> RedisClusterNode:
        return next(node for node in self.nodes if node.address == address)

    def primaries(self) -> dict[RedisClusterNode, list[RedisClusterNode]]:
        """Each primary serving slots -> its replicas, as a node that answers sees the cluster."""
        for node in self.nodes:
            try:
                with node.client() as c:
                    view = c.cluster("nodes")
                break
            except Exception:
                continue
        else:
            raise InfraError("no node of the redis cluster answers")
        ids = {info["node_id"]: address.split("@")[0] for address, info in view.items()}
        out: dict[RedisClusterNode, list[RedisClusterNode]] = {}
        for address, info in view.items():
            if "master" in info["flags"] and info["slots"] and "fail" not in info["flags"]:
                out.setdefault(self.node(address.split("@")[0]), [])
        for address, info in view.items():
            if "slave" in info["flags"] and "fail" not in info["flags"]:
                primary = self.node(ids[info["master_id"]]) if info["master_id"] in ids else None
                if primary in out:
                    out[primary].append(self.node(address.split("@")[0]))
        return out


def on_free_ports(settings: Settings, nodes: int = 6, host: str = "127.0.0.1") -> Settings:
    """The settings with a `redis+cluster://` URL of `nodes` free ports on `host` (to start there)."""
    ports = []
    while len(ports) < nodes:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return settings.model_copy(update={"redis_url": "redis+cluster://" + ",".join(f"{host}:{p}" for p in ports)})
