"""The README is the front door: its metric table and its commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

import driftline.shared.metrics as metrics
from driftline.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def defined_metrics() -> set[str]:
    names = set()
    for obj in vars(metrics).values():
        if hasattr(obj, "_name") and hasattr(obj, "_labelnames"):
            names.add(obj._name + ("_total" if type(obj).__name__ == "Counter" else ""))
    return names


def test_the_readme_metric_table_lists_exactly_the_metrics_that_exist():
    listed = set(re.findall(r"^\| `(driftline_[a-z0-9_]+)` \|", README, flags=re.M))
    assert listed == defined_metrics()


def test_every_command_the_readme_shows_exists_in_the_cli():
    runner = CliRunner()
    shown = set(re.findall(r"^driftline ([a-z]+)", README, flags=re.M))
    assert {"infra", "serve", "replay", "demo", "retrain", "bench"} <= shown
    for command in shown:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
