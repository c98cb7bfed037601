"""Fixtures: a real Kafka broker and a real Redis for the whole test session, on free loopback
ports, started by driftline's own infra code and stopped at the end.

Each test gets its own `settings`: a fresh namespace (its own topics, consumer groups and Redis
keys), its own service ports and home folder, so tests never see each other's messages.

Every test that uses the live stack (the `infra` fixture, directly or through `settings`,
`run_service`, ...) is marked `live` when collected, so `pytest -m "not live"` (`make test-unit`)
runs the rest: no broker, no Redis, nothing started. With TEST_NOTHING_STARTS=1 (set by
`make test-unit`) a test that would start a broker or Redis anyway fails at once and says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from driftline.infra import stack
from driftline.shared.kafka import ensure_topics
from driftline.shared.settings import Ports, Settings, ensure_local_secrets, settings_env


LIVE_FIXTURES = frozenset({"infra", "infra_settings", "own_stack", "schema_registry"})


def pytest_collection_modifyitems(config, items):
    """Mark what needs the live stack: any test whose fixtures (transitively) include one of
    LIVE_FIXTURES, and any test already marked e2e."""
    for item in items:
        if LIVE_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.live)


@pytest.fixture(scope="session", autouse=True)
def nothing_starts():
    """Under `make test-unit`: starting a broker or Redis is a test that is not a unit test."""
    if os.environ.get("TEST_NOTHING_STARTS") != "1":
        yield
        return

    def refuse(*_args, **_kwargs):
        raise RuntimeError("a unit test tried to start a broker or Redis: mark it live (use the infra fixture)")

    saved = stack.Component._spawn  # how Kafka, Redis and Prometheus are started
    stack.Component._spawn = refuse
    yield
    stack.Component._spawn = saved


@pytest.fixture(scope="session")
def infra_settings(tmp_path_factory) -> Settings:
    """Settings of the session's own Kafka and Redis (free ports, a private home), with a random
    model key and admin token generated into that home, as `driftline infra up` does."""
    home = tmp_path_factory.mktemp("infra")
    return ensure_local_secrets(Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
        redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        home=home,
    ))


@pytest.fixture(scope="session")
def infra(infra_settings):
    """The real broker and Redis, up for the whole session."""
    stack.up(infra_settings, create_topics=False)
    yield infra_settings
    # Thrown away with the session: no clean shutdown to wait for (the broker's took ~20 s).
    stack.down(infra_settings, timeout=0.0)


@pytest.fixture(scope="session")
def schema_registry(infra_settings):
    """A real schema registry (Apicurio, in memory) for the session, on a free loopback port:
    `.url` is its Confluent-compatible API. Started only by the tests that ask for it."""
    from driftline.infra.apicurio import ApicurioRegistry

    registry = ApicurioRegistry(infra_settings, port=stack.free_port())
    registry.install()
    registry.start()
    try:
        registry.wait_ready()
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(infra) -> str:
    return infra.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(infra) -> str:
    return infra.redis_url


def make_settings(infra: Settings, home: Path, **overrides) -> Settings:
    """Settings for one isolated pipeline on the session's broker and Redis, signing models with
    the session's key (services refuse to start without a real one). No admin token unless a
    test gives one: admin routes stay closed."""
    ports = Ports(**{name: stack.free_port() for name in Ports.model_fields})
    base = dict(
        kafka_bootstrap=infra.kafka_bootstrap,
        redis_url=infra.redis_url,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        home=home,
        cache_dir=infra.cache_dir,
        ports=ports,
        model_key=infra.model_key,
    )
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def settings(infra, tmp_path) -> Settings:
    """A fresh namespace with every topic created, free service ports, a private home."""
    s = make_settings(infra, tmp_path)
    ensure_topics(s)
    return s


@pytest.fixture
def redis_client(settings) -> redis_lib.Redis:
    client = redis_lib.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@dataclass
class ServiceProcess:
    """A service running as `driftline serve NAME` in its own process, as in production."""

    name: str
    settings: Settings
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = field(default=0)

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port_of(self.name)}"

    def start(self, wait: bool = True, timeout: float = 60.0) -> "ServiceProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "driftline.cli", "serve", self.name],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
        )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not healthy in {timeout}s:\n{self.log_tail()}")

    def kill9(self) -> None:
        """Crash it: SIGKILL, no chance to checkpoint or commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def restart(self, wait: bool = True) -> "ServiceProcess":
        self.restarts += 1
        return self.start(wait=wait)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


SCORED_AHEAD = "scored after learning a label"  # the learner's error when it leaves the stream's order


@pytest.fixture
def run_service(settings, tmp_path, request):
    """Start services of this test's pipeline: `run_service("features", **extra_settings)`.
    Extra keyword arguments override settings for that process only. All are stopped after the test.

    Every test that runs a learner also checks, after it, that the learner never scored an event
    after learning a label that follows it (its logs, across restarts and kills): the stream's
    order is the product's promise, whatever else the test looks at. A test that gives the order
    up on purpose says so with `@pytest.mark.order_given_up(reason)`."""
    started: list[ServiceProcess] = []

    def start(name: str, wait: bool = True, settings_override: Settings | None = None, **env) -> ServiceProcess:
        s = settings_override or settings
        proc_env = {**os.environ, **settings_env(s), **{k: str(v) for k, v in env.items()}}
        sp = ServiceProcess(name, s, proc_env, tmp_path / f"{name}-{len(started)}.log")
        started.append(sp)
        return sp.start(wait=wait)

    yield start
    for sp in reversed(started):
        sp.stop()
    if request.node.get_closest_marker("order_given_up") is None:
        for path in sorted({sp.log_path for sp in started if sp.name in ("learner", "all")}):
            try:
                ahead = [line for line in path.read_text(errors="replace").splitlines() if SCORED_AHEAD in line]
            except OSError:
                continue
            assert not ahead, f"the learner scored events out of the stream's order ({path.name}):\n" + \
                "\n".join(ahead[:3])
