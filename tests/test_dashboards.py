"""The Grafana dashboards, read by tools Grafana wrote: every dashboard valid against Grafana's own
schema (@grafana/schema's types as JSON Schema, tests/deploy/validate-dashboards.cjs), and every
panel that only makes sense for one task (classification, regression) in a row that Grafana
repeats once per model of that task, so that no panel asks for a metric its model cannot export.

Grafana itself (AGPL) is not run. node and npm come from Debian (`.ci/run` installs them); the
npm packages are installed once under ~/.cache/driftline/grafana-schema (~10 s), the schemas
generated from them are cached beside them (~8 s the first time, then ~1 s per run).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest

from driftline.learner.champion import Roles, Slot
from driftline.learner.prequential import Prequential
from driftline.learner.spec import parse_model
from driftline.learner.telemetry import Telemetry
from driftline.shared import metrics
from podman_stack import CACHE, DEPLOY
from test_observability_config import DASHBOARDS, metric_names, panel_tasks, variable_task

PACKAGES = CACHE / "grafana-schema"
# @grafana/schema of the Grafana that docker-compose.yml runs; the generator's last release for node 20.
NPM_PACKAGES = {"@grafana/schema": "11.2.0", "ts-json-schema-generator": "2.4.0", "ajv": "8.17.1"}
TASK_METRICS = {task: {gauge._name for gauge in gauges} for task, gauges in metrics.TASK_GAUGES.items()}


@pytest.fixture(scope="module")
def grafana_schema():
    """A function: dashboard files -> {file: [schema errors]}."""
    for tool in ("node", "npm"):
        assert shutil.which(tool), f"{tool} missing: Debian's nodejs and npm (.ci/run installs them)"
    manifest = {"private": True, "dependencies": NPM_PACKAGES}
    PACKAGES.mkdir(parents=True, exist_ok=True)
    if not (PACKAGES / "package.json").exists() or json.loads((PACKAGES / "package.json").read_text()) != manifest:
        (PACKAGES / "package.json").write_text(json.dumps(manifest))
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PACKAGES, check=True,
                       capture_output=True, timeout=600)

    def validate(*files) -> dict[str, list[str]]:
        result = subprocess.run(["node", str(DEPLOY / "validate-dashboards.cjs"), str(PACKAGES),
                                 str(PACKAGES / "generated"), *map(str, files)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads(result.stdout)
        assert out["schema"] == f"@grafana/schema {NPM_PACKAGES['@grafana/schema']}"
        return out["results"]

    return validate


def test_every_dashboard_is_valid_against_grafanas_schema(grafana_schema):
    results = grafana_schema(*DASHBOARDS)
    assert set(results) == {str(p) for p in DASHBOARDS}
    assert not any(results.values()), json.dumps(results, indent=1)


def test_the_schema_check_rejects_a_misspelt_key_a_wrong_type_and_an_unknown_panel(grafana_schema, tmp_path):
    board = json.loads(next(p for p in DASHBOARDS if p.stem == "pipeline").read_text())
    broken = copy.deepcopy(board)
    broken["refreshh"] = "10s"
    broken["panels"][1]["gridPos"]["w"] = "twelve"
    broken["panels"][1]["options"]["legend"]["placement"] = "middle"
    broken["panels"][2]["type"] = "no-such-panel"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    errors = " | ".join(grafana_schema(path)[str(path)])
    assert "must NOT have additional properties: refreshh" in errors
    assert "/panels/1/gridPos/w must be number" in errors
    assert "options/legend/placement must be equal to one of the allowed values" in errors
    assert 'no panel plugin "no-such-panel"' in errors


def test_every_task_has_its_rows_and_every_panel_reads_only_metrics_its_task_exports():
    """A panel outside a task's row reads no task's figures; one inside reads only its task's."""
    seen = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        tasks = panel_tasks(board)
        variables = {var["name"]: var for var in board["templating"]["list"]}
        for panel in board["panels"]:
            task = tasks[panel["id"]]
            seen.add(task)
            others = set().union(*(names for t, names in TASK_METRICS.items() if t != task))
            for target in panel.get("targets", []):
                wrong = metric_names(target["expr"]) & others
                assert not wrong, f"{path.name}: {panel['title']!r} ({task or 'any task'}) reads {sorted(wrong)}"
            if panel["type"] == "row" and task:
                assert variables[panel["repeat"]]["hide"] == 2, "the task's model list is not for the operator to pick"
                assert f"${panel['repeat']}" in panel["title"]
                for inner in (p for p in board["panels"] if tasks[p["id"]] == task and "targets" in p):
                    for target in inner["targets"]:  # each copy of the row shows its own model
                        assert f'model=~"${panel["repeat"]}"' in target["expr"], (inner["title"], target["expr"])
        for var in variables.values():
            if var["type"] == "query" and variable_task(var):
                assert var["query"]["query"].endswith(", model)"), var["name"]
    assert seen >= set(TASK_METRICS) | {None}


@pytest.mark.parametrize("task, spec", [("classification", "linear_model.LogisticRegression()"),
                                        ("regression", "linear_model.LinearRegression()")])
def test_a_learner_exports_its_tasks_figures_and_no_others(task, spec):
    """What the row split rests on: metrics.TASK_GAUGES is what the learner's telemetry exports."""
    model = f"dash-{task}"
    slot = Slot("champion", 1, parse_model(spec), Prequential())
    telemetry = Telemetry(model)
    telemetry.export(Roles(slot))
    exported = {gauge._name for gauges in metrics.TASK_GAUGES.values() for gauge in gauges
                if any(s.labels.get("model") == model for family in gauge.collect() for s in family.samples)}
    assert exported == TASK_METRICS[task]
    telemetry.retire(slot)
