"""The observability and container files say what the code does: Prometheus configs and alert
rules pass promtool, every dashboard and alert query names only metrics of
services/shared/metrics.py, and docker-compose.yml runs the same stack as the local one (CLI
commands that exist, DRIFTLINE_* names that are settings, DESIGN.md's ports, the pinned broker).

No Docker engine here: the compose file is checked as data. The live check (a real Prometheus
scraping the real services during a replay) is tests/test_observability_live.py, which reuses
the query helpers below.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from prometheus_client import Counter, Gauge, Histogram

from driftline.cli import app as cli_app
from driftline.infra import stack
from driftline.serve import SERVICES, SINKS
from driftline.shared import metrics
from driftline.shared.settings import Settings, settings_env

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "infra" / "prometheus"
GRAFANA_DIR = REPO / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
COMPOSE = REPO / "docker-compose.yml"
DATASOURCE_UID = "driftline-prometheus"
REQUIRED_ALERTS = {"ConceptDriftDetected", "ModelAccuracyLow", "ConsumerLagGrowing", "DeadLetterRateHigh",
                   "NoModelReady", "ServiceDown"}


# -- helpers (also used by test_observability_live.py) --------------------------------------
def defined_series_names() -> set[str]:
    """Every series name /metrics can expose for the objects in metrics.py, plus Prometheus' `up`."""
    names = {"up"}
    for obj in vars(metrics).values():
        if isinstance(obj, Counter):
            names |= {f"{obj._name}_total", f"{obj._name}_created"}
        elif isinstance(obj, Histogram):
            names |= {f"{obj._name}_bucket", f"{obj._name}_sum", f"{obj._name}_count", f"{obj._name}_created"}
        elif isinstance(obj, Gauge):
            names.add(obj._name)
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and numbers left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?(ms|[smhdwy])?\b", " ", s)  # numbers, offset durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or an operator
        names.add(m.group(0))
    return names


def dashboard_queries(tasks: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(dashboard file, what, PromQL) for every panel target, annotation and variable query; with
    `tasks`, without the panels and variables of the other tasks (those a model of such a task
    would never fill: see panel_tasks)."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        task_of = panel_tasks(board)
        variables = {var["name"]: var for var in board["templating"]["list"]}
        for panel in board["panels"]:
            if tasks is not None and task_of[panel["id"]] not in tasks | {None}:
                continue
            for target in panel.get("targets", []):
                out.append((path.name, f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
        for ann in board["annotations"]["list"]:
            if "expr" in ann:
                out.append((path.name, f"annotation {ann['name']!r}", ann["expr"]))
        for name, var in variables.items():
            if var["type"] == "query" and (tasks is None or variable_task(var) in tasks | {None}):
                out.append((path.name, f"variable {name!r}", variable_selector(var)))
    return out


def variable_selector(var: dict) -> str:
    """The series selector of a `label_values(SELECTOR, label)` variable query."""
    return re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"]).group(1)


def variable_task(var: dict) -> str | None:
    """The task whose models a variable lists: the one whose metric it selects (metrics.TASK_GAUGES)."""
    names = metric_names(variable_selector(var))
    return next((task for task, gauges in metrics.TASK_GAUGES.items() if names & {g._name for g in gauges}), None)


def panel_tasks(board: dict) -> dict[int, str | None]:
    """panel id -> the task of the row it sits in (a row repeated over a task's variable), or None."""
    variables = {var["name"]: var for var in board["templating"]["list"]}
    out, task = {}, None
    for panel in board["panels"]:
        if panel["type"] == "row":
            repeat = panel.get("repeat")
            task = variable_task(variables[repeat]) if repeat else None
        out[panel["id"]] = task
    return out


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def as_prometheus_query(expr: str) -> str:
    """A dashboard query as Prometheus evaluates it: Grafana's variables filled in
    ($__rate_interval as a scrape-independent window; the dashboards' own variables, all of which
    list models, as every model)."""
    expr = expr.replace("$__rate_interval", "15s")
    return re.sub(r"\$\{?(?!__)\w+\}?", ".*", expr)


def without_threshold(expr: str) -> str:
    """An alert expression whose comparisons with a number keep every series (`> bool 0`): it
    returns data exactly when the metrics the alert watches exist, firing or not."""
    return re.sub(r"(==|!=|>=|<=|>|<)\s*(-?\d+(?:\.\d+)?)", r"\1 bool \2", expr)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def driftline_services(doc: dict) -> dict[str, dict]:
    """The compose services that run the driftline image."""
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == "driftline:local"}


# -- Prometheus ---------------------------------------------------------------------------
def promtool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which("promtool"), "promtool missing: `driftline infra install` installs Debian's prometheus"
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_accepts_the_prometheus_config_and_its_rules(config):
    result = promtool("check", "config", str(PROMETHEUS_DIR / config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The promtool checks above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "rules.yml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - alert: Broken\n    expr: sum(rate(up[5m])\n")
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_the_rendered_local_config_targets_the_settings_ports_and_passes_promtool(tmp_path):
    settings = Settings(home=tmp_path, host="0.0.0.0", prometheus_port=19190,
                        ports={"prediction": 18000, "ingestion": 18001, "features": 18002,
                               "learner": 18003, "drift": 18004})
    path = stack.Prometheus(settings, interval="1s").render_config()
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "1s"
    targets = {t["labels"]["service"]: t["targets"] for t in _job(config, "driftline")["static_configs"]}
    assert targets == {name: [f"127.0.0.1:{settings.port_of(name)}"] for name in SERVICES}
    assert _job(config, "prometheus")["static_configs"][0]["targets"] == ["127.0.0.1:19190"]


def test_every_required_alert_exists_with_summary_description_and_runbook():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']} has no {key}"
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, rule["alert"]
    drift = next(r for r in rules if r["alert"] == "ConceptDriftDetected")
    assert 'driftline_drift_events_total{kind="concept", level="drift"}' in drift["expr"]
    assert "for" not in drift, "a drift alarm is an event: it must fire at the next evaluation"


def test_both_configs_scrape_the_five_services_at_design_ports():
    design = design_ports()
    local = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    in_compose = yaml.safe_load((PROMETHEUS_DIR / "prometheus.compose.yml").read_text())
    for config, host_of in ((local, lambda name: "127.0.0.1"), (in_compose, lambda name: name)):
        job = _job(config, "driftline")
        assert job["honor_labels"] is True  # the metrics' own `service` label is kept
        targets = {t["labels"]["service"]: t["targets"] for t in job["static_configs"]}
        assert targets == {name: [f"{host_of(name)}:{port}"] for name, port in design.items()}
        assert config["rule_files"] == ["rules.yml"]
    # The compose names are the compose file's services.
    assert set(design) <= set(compose()["services"])


def _job(config: dict, name: str) -> dict:
    return next(job for job in config["scrape_configs"] if job["job_name"] == name)


# -- dashboards and queries ---------------------------------------------------------------
def test_metric_names_are_parsed_out_of_promql():
    expr = ('histogram_quantile(0.95, sum by (service, le) (rate(driftline_processing_seconds_bucket'
            '{service=~"a|b"}[$__rate_interval]))) / on (service) group_left up offset 10m > bool 0.5 '
            'or sum without (x) (foo:bar) unless vector(0)')
    assert metric_names(expr) == {"driftline_processing_seconds_bucket", "up", "foo:bar"}


def test_every_dashboard_and_alert_query_uses_only_metrics_that_exist():
    defined = defined_series_names()
    queries = [(f, what, expr) for f, what, expr in dashboard_queries()]
    queries += [("rules.yml", f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    assert len(queries) > 40
    unknown = [(f, what, sorted(metric_names(expr) - defined)) for f, what, expr in queries
               if metric_names(expr) - defined]
    assert not unknown, f"queries name metrics that services/shared/metrics.py does not define: {unknown}"
    assert all(metric_names(expr) for _, _, expr in queries), "a query that selects no metric"


def test_dashboards_are_the_three_with_provisioned_datasource_and_unique_ids():
    assert {p.stem for p in DASHBOARDS} == {"pipeline", "model-quality", "serving"}
    provisioned = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [ds["uid"] for ds in provisioned["datasources"]] == [DATASOURCE_UID]
    assert provisioned["datasources"][0]["url"] == "http://prometheus:9090"
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert 36 <= board["schemaVersion"] <= 41, path.name
        uids.add(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == DATASOURCE_UID, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID, (path.name, panel["title"])
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (path.name, panel["title"])
        for ann in board["annotations"]["list"]:
            if "expr" in ann:
                assert ann["datasource"]["uid"] == DATASOURCE_UID
    assert len(uids) == 3
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "driftline.yml").read_text())
    mounts = _mounts(compose()["services"]["grafana"])
    assert mounts[provider["providers"][0]["options"]["path"]] == "./infra/grafana/dashboards"


def test_dashboards_cover_what_operators_watch():
    """Pipeline: throughput, lag, latency, DLQ; model quality: accuracy per version, drift and
    swap annotations, champion vs challenger; serving: rate, p50/p95/p99, errors, version."""
    text = {p.stem: p.read_text() for p in DASHBOARDS}
    for metric in ("driftline_messages_in_total", "driftline_consumer_lag", "driftline_processing_seconds_bucket",
                   "driftline_dead_letters_total"):
        assert metric in text["pipeline"], metric
    quality = json.loads(text["model-quality"])
    assert {a["name"] for a in quality["annotations"]["list"]} >= {"Concept drift", "Model swaps"}
    assert 'role=\\"challenger\\"' in text["model-quality"] and "driftline_model_window_accuracy" in text["model-quality"]
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(driftline_http_request_seconds_bucket" in text["serving"]
    assert "driftline_serving_model_version" in text["serving"] and 'status=~\\"[45]..\\"' in text["serving"]


# -- docker compose -----------------------------------------------------------------------
def design_ports() -> dict[str, int]:
    """The HTTP ports docs/DESIGN.md fixes ("prediction 8000, ingestion 8001, ...")."""
    text = (REPO / "docs" / "DESIGN.md").read_text()
    found = {name: int(port) for name, port in re.findall(r"\b(prediction|ingestion|features|learner|drift) (\d{4})\b", text)}
    assert found, "docs/DESIGN.md names no service ports"
    return found


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def test_compose_runs_the_five_services_from_one_image_with_cli_commands_that_exist():
    doc = compose()
    services = driftline_services(doc)
    assert set(services) == {*SERVICES, *SINKS, "topics"}
    dockerfile = (REPO / "Dockerfile").read_text()
    # The official slim image by default; another base by `--build-arg BASE_IMAGE=...`.
    assert re.findall(r"^(?:ARG|FROM) .*$", dockerfile, re.M) == ["ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}"]
    assert {svc["build"] for svc in services.values()} == {"."}
    group = typer.main.get_command(cli_app)
    for name, svc in services.items():
        command = svc["command"]
        assert command[0] == "driftline", name
        _parse_cli(group, command[1:])  # raises when the command or an argument does not exist
        if name in SERVICES + SINKS:
            assert command[1:] == ["serve", name]
    assert doc["services"]["topics"]["command"] == ["driftline", "infra", "topics"]
    with pytest.raises(Exception, match="no-such-service"):  # the check can fail
        _parse_cli(group, ["serve", "no-such-service"])
    with pytest.raises(Exception, match="no-such-command"):
        _parse_cli(group, ["infra", "no-such-command"])


def _parse_cli(group, args: list[str]) -> None:
    """Resolve `driftline ARGS` down to its command and parse its arguments, without running it
    (typer's click: a missing command or a bad argument raises its usage error)."""
    ctx = group.make_context("driftline", list(args))
    command, rest = group, list(args)
    while hasattr(command, "resolve_command"):
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, list(rest), parent=ctx)


def test_compose_environment_names_are_settings(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no driftline.toml here
    doc = compose()
    names = set()
    for svc in driftline_services(doc).values():
        names |= {n for n in svc["environment"] if n.startswith("DRIFTLINE_")}
        assert svc["environment"]["DRIFTLINE_HOST"] == "0.0.0.0"  # listen on the container network
        assert svc["environment"]["DRIFTLINE_KAFKA_BOOTSTRAP"] == "kafka:9092"
        # with the password compose requires
        assert re.fullmatch(r"redis://:\$\{DRIFTLINE_REDIS_PASSWORD:\?[^}]*\}@redis:6379/0",
                            svc["environment"]["DRIFTLINE_REDIS_URL"])
    assert len(names) >= 5
    for name in sorted(names):
        monkeypatch.delenv(name, raising=False)
        path = name.removeprefix("DRIFTLINE_").lower().split("__")
        before = _get(Settings(), path)
        with monkeypatch.context() as env:
            env.setenv(name, _probe_value(path))
            after = Settings()
        assert _get(after, path) != before, f"{name} does not change any setting"
        assert name in settings_env(after)  # the name `driftline infra status` prints for it
    with monkeypatch.context() as env:  # and the check can fail: a misspelt name changes nothing
        env.setenv("DRIFTLINE_KAFKA_BOOTSTRAPP", "probe-value")
        assert Settings().kafka_bootstrap == "127.0.0.1:9092"


def _probe_value(path: list[str]) -> str:
    """A value of the field's type that no default has."""
    model = Settings
    for part in path:
        field = model.model_fields[part]
        model = field.annotation
    return {int: "12345", float: "1.5"}.get(field.annotation, "probe-value")


def _get(settings: Settings, path: list[str]):
    value = settings
    for part in path:
        value = getattr(value, part)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def test_compose_ports_match_design_and_only_prediction_ingestion_grafana_are_published():
    doc = compose()
    design = design_ports()
    ports = Settings().ports.model_dump()
    assert {name: ports.pop(name) for name in SINKS} == {"offline": 8005}  # the offline store's sink, beside the five
    assert ports == design
    published = {}
    for name, svc in doc["services"].items():
        for mapping in svc.get("ports", []):
            host, container = str(mapping).split(":")
            published[name] = (int(host), int(container))
    assert published == {"prediction": (8000, 8000), "ingestion": (8001, 8001), "grafana": (3000, 3000)}
    for name in SERVICES:  # each healthcheck asks the port the service listens on
        check = " ".join(doc["services"][name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{design[name]}/health" in check, name


def test_compose_kafka_is_the_pinned_broker_in_kraft_mode_and_redis_persists():
    doc = compose()
    kafka = doc["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{stack.kafka_version()}"
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller" and "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    redis = doc["services"]["redis"]
    conf = _mounts(redis)["/usr/local/etc/redis/redis.conf"]
    assert redis["command"][1] == "/usr/local/etc/redis/redis.conf"
    assert re.search(r"^appendonly yes$", (REPO / conf).read_text(), re.M)
    assert "redis-data:/data" in redis["volumes"]


def test_compose_start_order_and_healthchecks():
    doc = compose()
    services = doc["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert cond["condition"] in {"service_started", "service_healthy", "service_completed_successfully"}
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no check"
        if name != "topics":
            assert "healthcheck" in svc, name
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in SERVICES:
        assert services[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_compose_mounts_the_prometheus_config_rules_and_grafana_provisioning():
    services = compose()["services"]
    prom = _mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == "./infra/prometheus/prometheus.compose.yml"
    assert prom["/etc/prometheus/rules.yml"] == "./infra/prometheus/rules.yml"  # the relative rule path
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = _mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    for svc in services.values():
        for target, source in _mounts(svc).items():
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{source} (mounted at {target}) is missing"
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("services", "schemas", "infra", "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_every_image_compose_names_can_run_where_no_registry_can_be_reached():
    """tests/test_deploy_compose.py runs the stack here: each public image has a stand-in recipe
    (tests/deploy/), or is Grafana, which is not run (its dashboards are schema-checked)."""
    from podman_stack import DEPLOY, NOT_RUN, STANDINS

    for name, svc in compose()["services"].items():
        if svc["image"] == "driftline:local" or name in NOT_RUN:
            continue
        repository = svc["image"].rpartition(":")[0]
        assert repository in STANDINS, f"{name}: no stand-in for {svc['image']} in tests/deploy/"
        assert (DEPLOY / STANDINS[repository] / "Containerfile").exists()
