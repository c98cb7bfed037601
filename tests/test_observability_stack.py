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
def own_stack(tmp_path, infra_settings):
    """A private stack on fresh ports (the CLI under test starts it), stopped whatever happens."""
    s = Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
        redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        home=tmp_path / "home",
        cache_dir=infra_settings.cache_dir,
        prometheus_port=stack.free_port(),
        ports=Ports(**{name: stack.free_port() for name in Ports.model_fields}),
    )
    yield s
    stack.down(s)


def _driftline_targets(url: str, timeout: float = 20.0) -> dict[str, str]:
    """service -> scrape URL, once Prometheus has loaded its targets (it does so after /-/ready)."""
    deadline = time.monotonic() + timeout
    while True:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        found = {t["labels"]["service"]: t["scrapeUrl"] for t in targets if t["labels"]["job"] == "driftline"}
        if len(found) >= len(SERVICES) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_infra_up_with_prometheus_scrapes_the_services_and_down_stops_it(own_stack):
    cli(own_stack, "infra", "up")  # Prometheus is opt-in: a plain `up` does not start it
    before = json.loads(cli(own_stack, "infra", "status", "--json").stdout)["components"]
    assert before["kafka"]["running"] and before["prometheus"]["running"] is False
    assert not stack.port_open("127.0.0.1", own_stack.prometheus_port)

    out = cli(own_stack, "infra", "up", "--with-prometheus").stdout  # adds it to the running stack
    url = f"http://127.0.0.1:{own_stack.prometheus_port}"
    assert url in out
    status = json.loads(cli(own_stack, "infra", "status", "--json").stdout)["components"]
    assert status["prometheus"]["running"] and status["prometheus"]["answers"]
    assert status["prometheus"]["address"] == f"127.0.0.1:{own_stack.prometheus_port}"

    scraped = _driftline_targets(url)
    assert scraped == {name: f"http://127.0.0.1:{own_stack.port_of(name)}/metrics" for name in SERVICES}
    groups = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert {"ConceptDriftDetected", "ServiceDown", "NoModelReady"} <= alerts
    assert (own_stack.home / "prometheus" / "data").is_dir()  # its data lives under the home

    assert "prometheus" in cli(own_stack, "infra", "down").stdout
    assert not stack.port_open("127.0.0.1", own_stack.prometheus_port)
    after = json.loads(cli(own_stack, "infra", "status", "--json").stdout)["components"]
    assert after["prometheus"]["running"] is False



def test_infra_topics_creates_every_topic_on_a_running_broker_once(infra, tmp_path):
    """What compose's one-shot `topics` step runs: against a broker it did not start."""
    from confluent_kafka.admin import AdminClient

    from driftline.shared.topics import TOPIC_SPECS, Topics

    s = make_settings(infra, tmp_path)  # a fresh namespace: none of its topics exist yet
    first = cli(s, "infra", "topics").stdout
    assert f"created {len(TOPIC_SPECS)}" in first
    topics = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(timeout=10).topics
    for spec in TOPIC_SPECS:
        assert len(topics[Topics(s.namespace).name(spec.name)].partitions) == spec.partitions
    assert "created 0; all existed" in cli(s, "infra", "topics").stdout
