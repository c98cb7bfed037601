"""The local stack: a real single-node Kafka (KRaft) from Maven Central jars and Debian's Redis
(or a local Redis Cluster of Debian's redis-server: redis_cluster.py).

    up(settings)        # install if needed, start both, wait until they answer, create topics
    up(settings, with_prometheus=True)   # and Debian's Prometheus scraping the five services
    status(settings)    # what runs where
    down(settings)      # stop what `up` started; nothing is left listening

State, logs and pids live under `settings.home` (`.driftline/`); the broker jars are cached once
per machine under `settings.cache_dir`. `up` never touches a process it did not start: a port
taken by someone else is a clear error, not a hang.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KAFKA_POM = REPO / "infra" / "kafka" / "pom.xml"
KAFKA_TEMPLATE = REPO / "infra" / "kafka" / "server.properties.template"
KAFKA_LOG4J = REPO / "infra" / "kafka" / "log4j.properties"
REDIS_CONF = REPO / "infra" / "redis" / "redis.conf"
PROMETHEUS_CONFIG = REPO / "infra" / "prometheus" / "prometheus.yml"


class InfraError(RuntimeError):
    """Something the operator must fix (a port taken, a tool missing); the message says what."""


def kafka_version() -> str:
    """The one pinned broker version: `kafka.version` in infra/kafka/pom.xml."""
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", KAFKA_POM.read_text())
    assert match, "infra/kafka/pom.xml has no <kafka.version>"
    return match.group(1)


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's setting; its default
    where there is none to read)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


_handed_out: set[int] = set()
_pick = random.SystemRandom()  # not the random module's: a test's seed would give two processes the same ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to, below the kernel's ephemeral range, and not one this process
    gave out before. Below that range no outgoing connection takes it as its local port, so a
    server killed and started again on it (the chaos tests) can always bind it again: on an
    ephemeral port a client's connection could hold it meanwhile, even a reconnecting client's
    own, connected to itself (bind: Address already in use).

        >>> port = free_port()
        >>> 1024 <= port < ephemeral_ports()[0] or ephemeral_ports()[0] <= 11024
        True
    """
    low, _high = ephemeral_ports()
    if low > 11024:
        for port in _pick.sample(range(max(1024, low - 20000), low), 200):
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a machine with (almost) no ports below it
        s.bind((host, 0))
        return s.getsockname()[1]


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (we started it, it died) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class Component:
    """One local server process: where its files are and how to tell whether it runs."""

    name: str
    settings: Settings

    @property
    def dir(self) -> Path:
        return self.settings.home / self.name

    @property
    def pid_path(self) -> Path:
        return self.settings.home / "run" / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.settings.home / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        return pid_alive(self.pid())

    def pids(self) -> dict[str, int]:
        """Name -> pid of each of its processes that runs (one here; a cluster's nodes)."""
        pid = self.pid()
        return {self.name: pid} if pid and pid_alive(pid) else {}

    def _spawn(self, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.pid_path.write_text(str(proc.pid))
        return proc

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> bool:
        pid = self.pid()
        if not pid_alive(pid):
            self.pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        try:  # reap it if it is our child (tests start the stack in-process)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        self.pid_path.unlink(missing_ok=True)
        return True


@dataclass(frozen=True)
class ServerTls:
    """A server's TLS identity, as PEM files: its certificate (chain), its private key (PKCS#8, not
    encrypted) and the CA it trusts for the certificates of clients it asks for one."""

    cert: Path
    key: Path
    ca: Path


class Kafka(Component):
    """The broker. With `scram_users` ({name: password}) its client listener is SASL_PLAINTEXT
    with SCRAM-SHA-256 and those users (the first is the broker's own and a super user); with
    `acls` too, the StandardAuthorizer refuses whatever no ACL allows. Clients then need
    `kafka_security` (security.protocol, sasl.mechanism, sasl.username, sasl.password).

    `listeners` ({protocol: port}, the first the broker's own) replaces the one client listener:
    `{"SSL": p1, "SASL_SSL": p2}` with `tls` serves both on one broker. An SSL listener asks every
    client for a certificate signed by `tls.ca` (mutual TLS: the principal is its subject); a
    SASL_SSL one authenticates by SCRAM inside TLS. Clients need `ssl.ca.location` (and, for SSL,
    `ssl.certificate.location` and `ssl.key.location`)."""

    def __init__(self, settings: Settings, scram_users: dict[str, str] | None = None, acls: bool = False,
                 tls: ServerTls | None = None, listeners: dict[str, int] | None = None) -> None:
        super().__init__("kafka", settings)
        self.scram_users = scram_users or {}
        self.acls = acls
        self.tls = tls
        self.listeners = listeners or {
            "SASL_PLAINTEXT" if self.scram_users else "PLAINTEXT": settings.kafka_host_port[1]}
        if any(p.endswith("SSL") for p in self.listeners) and tls is None:
            raise InfraError("an SSL or SASL_SSL listener needs the broker's certificate (tls=ServerTls(...))")
        if any(p.startswith("SASL_") for p in self.listeners) and not self.scram_users:
            raise InfraError("a SASL listener needs scram_users")

    @property
    def libs(self) -> Path:
        return self.settings.cache_dir / f"kafka-{kafka_version()}" / "libs"

    def installed(self) -> bool:
        return (self.libs.parent / ".complete").exists()

    def install(self) -> None:
        """Resolve the broker jars from Maven Central once (cached per machine)."""
        if self.installed():
            return
        if shutil.which("java") is None or shutil.which("mvn") is None:
            raise InfraError("the Kafka broker needs Java 17+ and Maven on PATH (Debian: openjdk-17-jre-headless maven)")
        tmp = self.libs.parent / "libs.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise InfraError(f"could not fetch the Kafka {kafka_version()} jars:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        shutil.rmtree(self.libs, ignore_errors=True)
        tmp.rename(self.libs)
        (self.libs.parent / ".complete").write_text(kafka_version())

    def _java(self, main: str, *args: str) -> list[str]:
        # The JIT's first tier only: this broker lives for a demo, a test or a bench, and on a
        # small machine the optimising compiler cost ~45% of its CPU for minutes after each start
        # (~60 of 150 us per event, competing with the services for the cores); without it the
        # broker is at its steady cost from the first run. The serial collector for the same
        # reason: on this small heap G1's barriers and refinement cost the request handlers ~25-30
        # us per event more (two alternating rounds of 4 replays each, broker_jit_cost.py with JVM_GC); its
        # young pauses are short at 768 MB. See reports/bench/profiles/README.md.
        return [
            "java", "-Xms256m", "-Xmx768m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{KAFKA_LOG4J}", f"-Dkafka.logs.dir={self.settings.home / 'logs'}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    def start(self) -> None:
        host, port = self.settings.kafka_host_port
        config = self.dir / "server.properties"
        data = self.dir / "data"
        self.dir.mkdir(parents=True, exist_ok=True)
        controller_port = self._controller_port(host, port, config)
        config.write_text(KAFKA_TEMPLATE.read_text().format(
            host=host, port=port, controller_port=controller_port, data_dir=data.resolve())
            + self._listener_config(controller_port))
        if not (data / "meta.properties").exists():
            cluster_id = "-"
            while cluster_id.startswith("-"):  # the storage tool would read a leading '-' as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            scram = [arg for name, password in self.scram_users.items()
                     for arg in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]")]
            fmt = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config),
                                            *scram),
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise InfraError(f"formatting the KRaft storage failed:\n{fmt.stdout}{fmt.stderr}")
        self._spawn(self._java("kafka.Kafka", str(config)))

    def _listener_config(self, controller_port: int) -> str:
        """Overrides of the template (later lines win) for other listeners than one PLAINTEXT: SCRAM,
        TLS, and ACLs."""
        if set(self.listeners) == {"PLAINTEXT"}:
            return ""
        host, _ = self.settings.kafka_host_port
        names = list(self.listeners)
        served = ",".join(f"{name}://{host}:{port}" for name, port in self.listeners.items())
        lines = [
            "", "# Listeners of driftline.infra.stack.Kafka(listeners=..., scram_users=..., tls=...)",
            f"listeners={served},CONTROLLER://{host}:{controller_port}",
            f"advertised.listeners={served}",
            f"inter.broker.listener.name={names[0]}",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT," + ",".join(f"{name}:{name}" for name in names),
        ]
        if self.scram_users:
            broker, password = next(iter(self.scram_users.items()))
            lines += ["sasl.enabled.mechanisms=SCRAM-SHA-256", "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256"]
            lines += [f"listener.name.{name.lower()}.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security"
                      f'.scram.ScramLoginModule required username="{broker}" password="{password}";'
                      for name in names if name.startswith("SASL_")]
        if self.tls is not None:
            lines += ["ssl.keystore.type=PEM", f"ssl.keystore.location={self._keystore()}",
                      "ssl.truststore.type=PEM", f"ssl.truststore.location={self.tls.ca.resolve()}"]
            if "SSL" in names:
                lines.append("listener.name.ssl.ssl.client.auth=required")
        if self.acls:
            # The controller listener (loopback, broker-internal) is PLAINTEXT: its principal is ANONYMOUS.
            broker = next(iter(self.scram_users), "ANONYMOUS")
            lines += ["authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                      f"super.users=User:{broker};User:ANONYMOUS", "allow.everyone.if.no.acl.found=false"]
        return "\n".join(lines) + "\n"

    def _keystore(self) -> Path:
        """The broker's key and certificate in one private PEM file, as Kafka's PEM key store takes them."""
        assert self.tls is not None
        path = self.dir / "keystore.pem"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.tls.key.read_text() + self.tls.cert.read_text())
        return path.resolve()

    def _controller_port(self, host: str, port: int, config: Path) -> int:
        # Keep the controller port of an existing data dir (the quorum remembers it).
        if config.exists():
            match = re.search(r"CONTROLLER://[^:]+:(\d+)", config.read_text())
            if match and not port_open(host, int(match.group(1))):
                return int(match.group(1))
        # A port the kernel gives out now: port + 1 may be some outgoing connection's local port
        # (not listening, so port_open cannot tell), and the broker then dies on bind.
        return free_port(host)

    def ready(self) -> bool:
        from ..shared.kafka import admin

        host, port = self.settings.kafka_host_port
        if not port_open(host, port):
            return False
        try:
            meta = admin(self.settings).list_topics(timeout=2)
            return bool(meta.brokers)
        except Exception:
            return False


class Redis(Component):
    """Debian's redis-server on the settings' URL. With `tls` it speaks TLS alone on that port (no
    plain port), for a `rediss://` URL (whose `ssl_ca_certs` names the CA; client certificates are
    not asked for: the password authenticates)."""

    def __init__(self, settings: Settings, tls: ServerTls | None = None) -> None:
        super().__init__("redis", settings)
        self.tls = tls

    def installed(self) -> bool:
        return shutil.which("redis-server") is not None

    def install(self) -> None:
        if self.installed():
            return
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise InfraError("redis-server is missing: install Debian's package (apt-get install redis-server)")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})

    def start(self) -> None:
        host, port = self.settings.redis_host_port
        tls = self.settings.redis_url.startswith("rediss://")
        if tls != (self.tls is not None):
            raise InfraError("DRIFTLINE_REDIS_URL is rediss:// but this Redis has no certificate: use redis:// for "
                             "the local one" if tls else "a Redis with a certificate needs a rediss:// URL")
        self.dir.mkdir(parents=True, exist_ok=True)
        listen = ["--port", str(port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.tls.cert.resolve()),
            "--tls-key-file", str(self.tls.key.resolve()), "--tls-ca-cert-file", str(self.tls.ca.resolve()),
            "--tls-auth-clients", "no"]
        self._spawn([
            shutil.which("redis-server") or "redis-server", str(self._config()),
            "--bind", host, *listen, "--dir", str(self.dir.resolve()),
            "--pidfile", "",  # we keep our own pid file
        ])

    def _config(self) -> Path:
        """infra/redis/redis.conf, plus `requirepass` when DRIFTLINE_REDIS_URL carries a password
        (written to a private file under the home, never on the command line where `ps` shows it)."""
        from urllib.parse import unquote, urlparse

        password = urlparse(self.settings.redis_url).password
        if not password:
            return REDIS_CONF
        path = self.dir / "redis.conf"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"include {REDIS_CONF}\nrequirepass \"{unquote(password)}\"\n")
        return path

    def ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.settings.redis_url, socket_timeout=1).ping())
        except Exception:
            return False


class Prometheus(Component):
    """Debian's Prometheus scraping the local services; started only by `up --with-prometheus`.

    Its config is infra/prometheus/prometheus.yml rendered with the settings' host and service
    ports (rules from infra/prometheus/ as they are); its data lives under `<home>/prometheus/`.
    `interval` overrides the scrape and rule-evaluation interval (tests use "1s").
    """

    def __init__(self, settings: Settings, interval: str | None = None) -> None:
        super().__init__("prometheus", settings)
        self.interval = interval

    @property
    def address(self) -> tuple[str, int]:
        return self.settings.host, self.settings.prometheus_port

    @property
    def url(self) -> str:
        return f"http://{_connect_host(self.settings.host)}:{self.settings.prometheus_port}"

    def installed(self) -> bool:
        return shutil.which("prometheus") is not None

    def install(self) -> None:
        _apt_install("prometheus", self.installed)

    def render_config(self) -> Path:
        """Write the local config with this stack's targets; returns its path."""
        import yaml

        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        scrape_host = _connect_host(self.settings.host)
        if self.interval:
            config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = self.interval
        config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / rule).resolve()) for rule in config["rule_files"]]
        for job in config["scrape_configs"]:
            for target in job["static_configs"]:
                service = target.get("labels", {}).get("service")
                port = self.settings.port_of(service) if service else self.settings.prometheus_port
                target["targets"] = [f"{scrape_host}:{port}"]
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "prometheus.yml"
        path.write_text("# Rendered by driftline from infra/prometheus/prometheus.yml; edit that one.\n"
                        + yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self) -> None:
        config = self.render_config()
        host, port = self.address
        self._spawn([
            shutil.which("prometheus") or "prometheus", f"--config.file={config.resolve()}",
            f"--storage.tsdb.path={(self.dir / 'data').resolve()}", f"--web.listen-address={host}:{port}",
            "--storage.tsdb.retention.time=7d", "--web.enable-lifecycle",
        ])

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False


def _connect_host(host: str) -> str:
    """Where to reach a server that listens on `host` (a wildcard address means this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _apt_install(package: str, installed) -> None:
    if installed():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfraError(f"{package} is missing: install Debian's package (apt-get install {package})")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]):
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def components(settings: Settings) -> list[Component]:
    """Kafka and Redis; a local Redis Cluster (redis_cluster.py) when DRIFTLINE_REDIS_URL names one."""
    from ..shared.redis_clients import is_cluster_url

    if is_cluster_url(settings.redis_url):
        from .redis_cluster import RedisCluster

        return [Kafka(settings), RedisCluster(settings)]
    return [Kafka(settings), Redis(settings)]


def install(settings: Settings) -> None:
    """Fetch what the stack needs: the broker jars (once), redis-server and prometheus (Debian's
    packages; Prometheus runs only with `up --with-prometheus`, and in the observability tests)."""
    for component in [*components(settings), Prometheus(settings)]:
        component.install()


def wait_ready(component: Component, timeout: float) -> float:
    """Wait until a started component answers; the seconds it took (InfraError if it exits or
    does not answer in time, with the end of its log)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if component.ready():
            return time.monotonic() - started
        if not component.running():
            raise InfraError(f"{component.name} exited while starting; last lines of {component.log_path}:\n"
                             f"{component.log_tail()}")
        time.sleep(0.1)
    raise InfraError(f"{component.name} did not answer within {timeout:.0f}s; see {component.log_path}")


def up(settings: Settings, timeout: float = 90.0, create_topics: bool = True,
       with_prometheus: bool = False) -> dict[str, float]:
    """Start Kafka and Redis (each unless already ours and running), and Prometheus when asked,
    wait until they answer, and create every topic. Returns the seconds each took to become ready."""
    wanted = [*components(settings), *([Prometheus(settings)] if with_prometheus else [])]
    for component in wanted:
        component.install()
    endpoints = {"kafka": settings.kafka_host_port, "redis": settings.redis_host_port,
                 "prometheus": (_connect_host(settings.host), settings.prometheus_port)}
    settings_name = {"kafka": "KAFKA_BOOTSTRAP", "redis": "REDIS_URL", "prometheus": "PROMETHEUS_PORT"}
    started: list[Component] = []
    for component in wanted:
        host, port = endpoints[component.name]
        if component.running():
            continue
        if port_open(host, port):
            raise InfraError(f"{component.name}: {host}:{port} is already taken by a process driftline did not "
                             f"start; stop it or choose another port (DRIFTLINE_{settings_name[component.name]})")
        component.start()
        started.append(component)
    timings = {}
    for component in wanted:
        timings[component.name] = wait_ready(component, timeout) if component in started else 0.0
    if create_topics:
        from ..shared.kafka import ensure_topics

        t0 = time.monotonic()
        ensure_topics(settings)
        timings["topics"] = time.monotonic() - t0
    return timings


def down(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Stop Prometheus, Redis and Kafka (those driftline started), each given `timeout` seconds to
    shut down cleanly before it is killed. Returns what was stopped.
    (`driftline infra down` first stops the services `serve all` left: serve.stop_services.)"""
    stopped = []
    for component in [Prometheus(settings), *reversed(components(settings))]:
        if component.stop(timeout):
            stopped.append(component.name)
    return stopped


def status(settings: Settings) -> dict[str, dict]:
    out = {}
    for component, (host, port) in zip(components(settings), (settings.kafka_host_port, settings.redis_host_port)):
        out[component.name] = {
            "address": f"{host}:{port}",
            "pid": component.pid() if component.running() else None,
            "running": component.running(),
            "answers": component.ready(),
            "installed": component.installed(),
            "log": str(component.log_path),
        }
    out["kafka"]["version"] = kafka_version()
    prometheus = Prometheus(settings)
    host, port = prometheus.address
    out["prometheus"] = {
        "address": f"{host}:{port}",
        "pid": prometheus.pid() if prometheus.running() else None,
        "running": prometheus.running(),
        "answers": prometheus.running() and prometheus.ready(),
        "installed": prometheus.installed(),
        "log": str(prometheus.log_path),
    }
    return out
