"""The README is the front door and docs/ the rest of the house: what they say must stay true, and
the front door must stay short."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

import driftline.shared.metrics as metrics
from driftline.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OBSERVABILITY = (ROOT / "docs" / "observability.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def defined_metrics() -> set[str]:
    names = set()
    for obj in vars(metrics).values():
        if hasattr(obj, "_name") and hasattr(obj, "_labelnames"):
            names.add(obj._name + ("_total" if type(obj).__name__ == "Counter" else ""))
    return names


def test_the_metric_table_lists_exactly_the_metrics_that_exist():
    listed = set(re.findall(r"^\| `(driftline_[a-z0-9_]+)` \|", OBSERVABILITY, flags=re.M))
    assert listed == defined_metrics()


def test_every_command_the_readme_shows_exists_in_the_cli():
    runner = CliRunner()
    shown = set(re.findall(r"^driftline ([a-z]+)", README, flags=re.M))
    assert {"infra", "serve", "replay", "demo", "retrain", "bench", "reference"} <= shown
    for command in shown:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_driftline_help_sums_up_each_command_in_one_paragraph():
    """A docstring's first paragraph is wrapped in the source; `driftline --help` must not show
    those breaks (typer keeps them in its command list)."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})  # rich reads the width there
    replay = next(line for line in result.output.splitlines() if "│ replay" in line)
    assert "wait until every label is learned, and write report.json and report.png." in replay
    infra = CliRunner().invoke(app, ["infra", "--help"], env={"COLUMNS": "200"}).output
    assert "create every topic. Without DRIFTLINE_MODEL_KEY" in next(line for line in infra.splitlines() if "│ up" in line)


def test_the_readme_is_a_front_door_not_a_notebook():
    assert len(README.splitlines()) <= 350
    assert max(len(line) for line in README.splitlines()) <= 400  # table rows, not essays


def test_every_link_of_the_readme_and_the_docs_leads_somewhere():
    for page in [ROOT / "README.md", *PAGES]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is not there"


def test_the_docs_say_how_things_are_not_how_they_came_to_be():
    narration = re.compile(r"\bissue \d+|this issue|this session|session \d+|at the start of", re.I)
    for page in [ROOT / "README.md", *PAGES]:
        found = narration.findall(page.read_text())
        assert not found, f"{page.relative_to(ROOT)}: {found}"
