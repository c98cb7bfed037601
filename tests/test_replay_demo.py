"""`driftline demo` from nothing: its own Kafka, Redis and five services, a replay, the report, and
nothing left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from driftline.infra import stack
from driftline.offline.store import OfflineStore

pytestmark = pytest.mark.e2e


def test_demo_writes_the_report_and_leaves_nothing_listening(infra_settings, tmp_path):
    ports = {name: stack.free_port() for name in ("kafka", "redis", "prediction", "ingestion", "features",
                                                  "learner", "drift", "offline")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLINE_")}
    env.update({
        "DRIFTLINE_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "DRIFTLINE_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "DRIFTLINE_HOME": str(tmp_path / "home"),
        "DRIFTLINE_CACHE_DIR": str(infra_settings.cache_dir),  # the broker jars, fetched once per machine
        **{f"DRIFTLINE_PORTS__{name.upper()}": str(ports[name])
           for name in ("prediction", "ingestion", "features", "learner", "drift", "offline")},
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
    # The demo's offline store holds every learned example (its namespace's folder under the home).
    stores = list((tmp_path / "home" / "offline").glob("demo-*"))
    assert len(stores) == 1
    rows = ds.dataset([str(p) for p in OfflineStore(stores[0]).files()], format="parquet").to_table(
        columns=["role"]).to_pylist()
    assert sum(r["role"] == "champion" for r in rows) == 3000
    listening = {name: port for name, port in ports.items() if stack.port_open("127.0.0.1", port)}
    assert listening == {}, f"still listening after the demo: {listening}"
