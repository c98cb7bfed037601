"""`driftline demo` from nothing: its own Kafka, Redis and five services, a replay, the report, and
nothing left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from driftline.infra import stack

pytestmark = pytest.mark.e2e


def test_demo_writes_the_report_and_leaves_nothing_listening(infra_settings, tmp_path):
    ports = {name: stack.free_port() for name in ("kafka", "redis", "prediction", "ingestion", "features",
                                                  "learner", "drift")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLINE_")}
    env.update({
        "DRIFTLINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "DRIFTLINE_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "DRIFTLINE_HOME": str(tmp_path / "home"),
        "DRIFTLINE_CACHE_DIR": str(infra_settings.cache_dir),  # the broker jars, fetched once per machine
        **{f"DRIFTLINE_PORTS__{name.upper()}": str(ports[name])
           for name in ("prediction", "ingestion", "features", "learner", "drift")},
    })
    result = subprocess.run(
        [sys.executable, "-m", "driftline.cli", "demo", "elec2", "--limit", "3000", "--report", str(tmp_path / "demo")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["dataset"] == "elec2" and report["examples_learned"] == report["labels_sent"] == 3000
    assert report["model"] == "StandardScaler | LogisticRegression" and report["features"] == "default"
    assert (tmp_path / "demo" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "prequential accuracy" in result.stderr
    listening = {name: port for name, port in ports.items() if stack.port_open("127.0.0.1", port)}
    assert listening == {}, f"still listening after the demo: {listening}"
