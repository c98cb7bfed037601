"""`driftline infra up --with-prometheus` runs Debian's Prometheus next to the local Kafka and
Redis, scraping the five services at the settings' ports with the alert rules loaded; `status`
shows it and `down` stops it. `driftline infra topics` (compose's one-shot step) creates the
topics on a broker that runs already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from driftline.infra import stack
from driftline.serve import SERVICES
from driftline.shared.settings import Ports, Settings, settings_env

from conftest import make_settings


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    result = subprocess.run([sys.executable, "-m", "driftline.cli", *args], env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, f"driftline {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def on_session_stack(infra, tmp_path):
    """The session's running Kafka and Redis (same home, so `up` finds them running and leaves
    them be), a fresh namespace, free service and Prometheus ports. Whatever Prometheus the test
    starts there is stopped after it (the session's `down` would stop it too)."""
    s = infra.model_copy(update={
        "namespace": f"obs{uuid.uuid4().hex[:8]}",
        "prometheus_port": stack.free_port(),
        "ports": Ports(**{name: stack.free_port() for name in Ports.model_fields}),
    })
    yield s
    stack.Prometheus(s).stop()


def _driftline_targets(url: str, timeout: float = 20.0) -> dict[str, str]:
    """service -> scrape URL, once Prometheus has loaded its targets (it does so after /-/ready)."""
    deadline = time.monotonic() + timeout
    while True:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        found = {t["labels"]["service"]: t["scrapeUrl"] for t in targets if t["labels"]["job"] == "driftline"}
        if len(found) >= len(SERVICES) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_infra_up_with_prometheus_scrapes_the_services_at_the_settings_ports(on_session_stack):
    s = on_session_stack
    out = cli(s, "infra", "up").stdout  # Prometheus is opt-in: a plain `up` does not start it
    assert "kafka: already running" in out
    assert stack.status(s)["prometheus"]["running"] is False
    assert not stack.port_open("127.0.0.1", s.prometheus_port)

    out = cli(s, "infra", "up", "--with-prometheus").stdout  # added to the running stack
    url = f"http://127.0.0.1:{s.prometheus_port}"
    assert url in out and "prometheus: ready in" in out
    status = json.loads(cli(s, "infra", "status", "--json").stdout)["components"]
    assert status["prometheus"]["running"] and status["prometheus"]["answers"]
    assert status["prometheus"]["address"] == f"127.0.0.1:{s.prometheus_port}"

    scraped = _driftline_targets(url)
    assert scraped == {name: f"http://127.0.0.1:{s.port_of(name)}/metrics" for name in SERVICES}
    groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert {"ConceptDriftDetected", "ServiceDown", "NoModelReady"} <= alerts
    assert (s.home / "prometheus" / "data").is_dir()  # its data lives under the home


@pytest.mark.live  # starts its own Prometheus
def test_infra_down_stops_prometheus(tmp_path):
    s = Settings(home=tmp_path / "home", prometheus_port=stack.free_port(),
                 kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0")
    prom = stack.Prometheus(s)
    prom.start()
    try:
        deadline = time.monotonic() + 30
        while not prom.ready():
            assert prom.running() and time.monotonic() < deadline, prom.log_tail()
            time.sleep(0.2)
        assert "prometheus" in cli(s, "infra", "down").stdout
        assert not stack.port_open("127.0.0.1", s.prometheus_port)
        assert stack.status(s)["prometheus"]["running"] is False
    finally:
        prom.stop()


def test_infra_topics_creates_every_topic_on_a_running_broker_once(infra, tmp_path):
    """What compose's one-shot `topics` step runs: against a broker it did not start."""
    from confluent_kafka.admin import AdminClient

    from driftline.shared.topics import TOPIC_SPECS, Topics

    # a fresh namespace (none of its topics exist yet) whose streams have 3 partitions, not 6
    s = make_settings(infra, tmp_path, kafka_stream_partitions=3)
    first = cli(s, "infra", "topics").stdout
    assert f"created {len(TOPIC_SPECS)}" in first
    topics = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(timeout=10).topics
    counts = {spec.name: len(topics[Topics(s.namespace).name(spec.name)].partitions) for spec in TOPIC_SPECS}
    assert counts == {spec.name: 3 if spec.partitions is None else spec.partitions for spec in TOPIC_SPECS}
    assert counts["events.valid"] == 3 and counts["outcomes"] == 1
    assert "created 0; all existed" in cli(s, "infra", "topics").stdout
