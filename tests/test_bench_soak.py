"""`driftline bench soak`, short: the five services run a steady stream while every service's
RSS and consumer lag are sampled; the summary and the plot come out (the 20-minute run is the
lead's, on a quiet machine: benchmarks are never timed in tests)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from driftline.bench import soak
from driftline.cli import app

pytestmark = pytest.mark.e2e


def test_a_short_soak_samples_every_services_memory_and_lag_and_plots_them(tmp_path, monkeypatch):
    monkeypatch.setattr(soak, "SAMPLE_S", 1.0)
    result = CliRunner().invoke(app, ["bench", "soak", "--minutes", "0.2", "--rate", "50", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "soak.json").read_text())
    assert out["events_sent"] == 50 * 12 and out["examples_learned"] == out["events_sent"]
    assert set(out["services"]) == {"ingestion", "features", "learner", "drift", "prediction"}
    assert len(out["samples"]) >= 10
    for name, s in out["services"].items():
        assert 20 < s["rss_mb_end"] < 2000, (name, s)
        assert s["lag_end"] is not None
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    # how fast the host ran Python before and after: results of other moments compare through it
    assert all(out["measured"][f"river_lr_events_per_s_{when}"] > 1_000 for when in ("before", "after"))


def test_soak_is_not_part_of_the_default_bench_run():
    from driftline.bench.cli import BENCHMARKS

    assert "soak" not in BENCHMARKS
