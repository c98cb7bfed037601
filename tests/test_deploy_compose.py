"""docker-compose.yml, run: the project's image built from its Dockerfile, the stack brought up
under podman, a stream replayed through it by `driftline replay` as a producer would, and then
every container healthy, every service ready, every label learned, the metrics in the stack's own
Prometheus, a service container killed and restarted by its policy (and learning again), and
`compose down --volumes` leaving nothing behind.

How it runs on a machine without Docker or a public registry (tests/podman_stack.py): images on a
Debian base built by debootstrap; Kafka, Redis, Prometheus (and Apicurio Registry, when the compose
file runs one) as stand-ins under the compose file's image names (Kafka 3.9.1's own jars on
Debian's Java, Debian's Redis 7.0 and Prometheus 2.42, Apicurio's release from Maven Central) where
those images are not in podman's store; Grafana (AGPL) is not run: its dashboards are
checked against Grafana's schema in tests/test_dashboards.py. The stack lives in a network
namespace of its own with only a loopback.

Slow: SLOW_TESTS=1 (`.ci/run` installs podman, runc, debootstrap and the rest when it is set).
Measured on the shared 2-core machine: a cold run (no image in podman's store: the base ~70 s, the
project's image ~70 s, the three stand-ins ~40 s, then the stack ~100 s) took 4 min 42 s; warm
runs (images cached, the project's image from podman's layer cache) took 1.5 to 3.1 minutes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

import podman_stack
from driftline.serve import SERVICES, SINKS
from driftline.shared.settings import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SLOW_TESTS"), reason="builds images and runs the compose stack: SLOW_TESTS=1"),
]

ROWS, MORE_ROWS = 3000, 600
DRIFTLINE_IMAGE = "localhost/driftline:local"  # docker-compose.yml's `driftline:local`


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@pytest.fixture
def compose_stack(tmp_path):
    missing = podman_stack.missing_tools()
    assert not missing, f"install {' '.join(missing)} (Debian packages; .ci/run does with SLOW_TESTS=1)"
    t0 = time.monotonic()
    podman_stack.ensure_driftline_image(DRIFTLINE_IMAGE, log=say)
    doc = podman_stack.yaml.safe_load(podman_stack.COMPOSE_FILE.read_text())
    for name, svc in doc["services"].items():
        if name not in podman_stack.NOT_RUN and svc["image"] != "driftline:local":
            say(f"{svc['image']}: {podman_stack.ensure_standin(svc['image'], log=say)}")
    say(f"images ready in {time.monotonic() - t0:.0f} s")
    # What an operator exports before `docker compose up` (the file refuses to start without them).
    env = {"DRIFTLINE_MODEL_KEY": secrets.token_urlsafe(48), "DRIFTLINE_ADMIN_TOKEN": secrets.token_urlsafe(24),
           "DRIFTLINE_REDIS_PASSWORD": secrets.token_urlsafe(24)}
    stack = podman_stack.Stack(podman_stack.new_project(), env, tmp_path, log=say)
    try:
        stack.create_namespace()
        yield stack
    finally:
        stack.force_remove()


def replay(stack: podman_stack.Stack, rows: int, report: Path) -> dict:
    """`driftline replay` from outside the containers, as a producer on the stack's network would."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
           "DRIFTLINE_KAFKA_BOOTSTRAP": "kafka:9092",
           "DRIFTLINE_REDIS_URL": f"redis://:{stack.env['DRIFTLINE_REDIS_PASSWORD']}@redis:6379/0",
           "DRIFTLINE_HOME": str(report.parent / "home")}
    stack.run_inside(sys.executable, "-m", "driftline.cli", "replay", "sea-abrupt", "--limit", str(rows),
                     "--label-delay", "20", "--report", str(report), "--stall-timeout", "120", env=env, timeout=600)
    return json.loads((report / "report.json").read_text())


def prometheus_query(stack: podman_stack.Stack, expr: str) -> list[dict]:
    from urllib.parse import quote

    body = stack.get_json(f"http://prometheus:9090/api/v1/query?query={quote(expr)}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_until(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s (last: {result!r})"
        time.sleep(every)


def test_the_compose_stack_runs_learns_restarts_a_killed_service_and_leaves_nothing(compose_stack, tmp_path):
    stack = compose_stack
    t0 = time.monotonic()
    stack.up()
    checked = [name for name, svc in stack.services.items() if "healthcheck" in svc]
    healthy = lambda: all(stack.health(name) == "healthy" for name in checked)  # noqa: E731
    wait_until("every container healthy", healthy, timeout=180)
    for name in stack.services:  # every container on the stack's own loopback, none on the machine's network
        assert stack.inspect(name)["HostConfig"]["NetworkMode"] == f"ns:/run/netns/{stack.netns}", name
    topics = stack.inspect("topics")["State"]
    assert (topics["Status"], topics["ExitCode"]) == ("exited", 0)  # the one-shot step
    say(f"stack up, {len(checked)} containers healthy, {time.monotonic() - t0:.0f} s in")

    ports = {name: Settings().port_of(name) for name in (*SERVICES, *SINKS)}  # the compose file's (see test_observability_config)
    report = replay(stack, ROWS, tmp_path / "replay")
    assert report["examples_learned"] == ROWS, report
    say(f"replayed {ROWS} rows, all learned ({report['throughput_events_per_s']} ev/s), {time.monotonic() - t0:.0f} s in")

    urls = [f"http://{name}:{port}/{path}" for name, port in ports.items() for path in ("health", "ready")]
    statuses = wait_until("every service healthy and ready", lambda: (s := stack.http_status(*urls))
                          and all(code == 200 for code in s.values()) and s, timeout=60)
    assert set(statuses.values()) == {200}

    # The stack's own Prometheus scraped the five services during the replay.
    up = wait_until("five targets up", lambda: (r := prometheus_query(stack, 'up{job="driftline"} == 1'))
                    and len(r) == len(SERVICES) and r, timeout=60)
    assert {r["metric"]["service"] for r in up} == set(SERVICES)
    def scraped_learned() -> float:
        found = prometheus_query(stack, 'sum(driftline_examples_learned_total{role="champion"})')
        return float(found[0]["value"][1]) if found else 0.0

    # The replay ends with the last label learned; the stack's Prometheus sees it at its next scrape.
    assert wait_until("the learned count scraped", lambda: scraped_learned() >= ROWS, timeout=30)
    ingested = prometheus_query(stack, 'sum(driftline_ingested_total{topic="events", outcome="valid"})')
    assert float(ingested[0]["value"][1]) >= ROWS

    # A killed service is restarted by its policy and learns again.
    before = stack.inspect("learner")
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    def restarted() -> bool:
        now = stack.inspect("learner")
        return (now["State"]["Running"] and now["State"]["Pid"] != before["State"]["Pid"]
                and now["RestartCount"] > before["RestartCount"])  # the policy's restart, not a new container

    wait_until("the learner restarted by its policy", restarted, timeout=60)
    assert stack.inspect("learner")["Id"] == before["Id"]
    wait_until("the learner healthy again", lambda: stack.http_status(f"http://learner:{ports['learner']}/health")
               == {f"http://learner:{ports['learner']}/health": 200}, timeout=90)
    more = replay(stack, MORE_ROWS, tmp_path / "replay-after-restart")
    assert more["examples_learned"] == MORE_ROWS, more
    say(f"learner killed, restarted by its policy, {MORE_ROWS} more rows learned, {time.monotonic() - t0:.0f} s in")

    stack.down()
    assert stack.leftovers() == {"containers": [], "volumes": [], "pods": [], "networks": []}
    say(f"compose down left nothing; {time.monotonic() - t0:.0f} s in all")
