"""infra/kubernetes/: each overlay built by kustomize, every object valid against the Kubernetes
API's own schemas (kubeconform, strict: an unknown field is an error) for the oldest and newest
Kubernetes versions checked here, and what the schemas cannot know: each service runs a CLI command
that exists on the port its settings give, probed on /health and /ready; autoscaling for
ingestion, features and prediction; the learner with its standby; settings that are settings and
secrets that are secret.

No cluster is started. kustomize and kubeconform are built from the Go module proxy and the
schemas come from PyPI (tests/kube_tools.py); once cached, this file takes a few seconds (the
first run: ~4 minutes of `go install` on a 2-core machine).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

import kube_tools
from driftline.cli import app as cli_app
from driftline.serve import SERVICES, SINKS
from driftline.shared.settings import Settings
from test_observability_config import _parse_cli

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "infra" / "kubernetes"
OVERLAYS = ("dev", "production")
VERSIONS = ("1.28.0", "1.33.0")  # the oldest Kubernetes still widely run, and a recent one
AUTOSCALED = {"ingestion", "features", "prediction"}
SECRET = {"DRIFTLINE_MODEL_KEY", "DRIFTLINE_ADMIN_TOKEN", "DRIFTLINE_REDIS_URL"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    """overlay -> the objects `kustomize build` makes of it (dev with a secrets.env filled in, as
    its README asks)."""
    tree = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    example = (tree / "overlays/dev/secrets.env.example").read_text()
    (tree / "overlays/dev/secrets.env").write_text(example.replace("DRIFTLINE_MODEL_KEY=", "DRIFTLINE_MODEL_KEY=" + "k" * 48)
                                                   .replace("DRIFTLINE_ADMIN_TOKEN=", "DRIFTLINE_ADMIN_TOKEN=token"))
    kustomize = kube_tools.tool("kustomize")
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kustomize, "build", str(tree / "overlays" / overlay)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def kubeconform(docs: list[dict], version: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    location = kube_tools.schema_location(version, {kube_tools.schema_file_name(doc) for doc in docs})
    return subprocess.run([kube_tools.tool("kubeconform"), "-strict", "-summary", "-kubernetes-version", version,
                           "-schema-location", location, str(path)], capture_output=True, text=True, timeout=120)


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def container(doc: dict) -> dict:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_schemas(built, overlay, version, tmp_path):
    result = kubeconform(built[overlay], version, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(built[overlay])}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout


def test_kubeconform_rejects_a_wrong_type_a_misspelt_field_and_an_unknown_kind(built, tmp_path):
    docs = [dict(doc) for doc in built["dev"] if doc["kind"] == "Deployment"][:1]
    broken = yaml.safe_load(yaml.safe_dump(docs[0]))
    broken["spec"]["replicas"] = "two"
    container(broken)["readinessProb"] = container(broken).pop("readinessProbe")
    result = kubeconform([broken], VERSIONS[0], tmp_path)
    assert result.returncode != 0
    assert "got string, want null or integer" in result.stdout and "'readinessProb' not allowed" in result.stdout
    with pytest.raises(KeyError):  # a kind the schemas do not have is an error, not a skip
        kube_tools.schema_location(VERSIONS[0], {"nosuchkind-apps-v1"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_runs_its_command_on_its_port_probed_on_health_and_ready(built, overlay):
    deployments = of_kind(built[overlay], "Deployment")
    assert set(deployments) == {f"driftline-{name}" for name in (*SERVICES, *SINKS)}
    group = typer.main.get_command(cli_app)
    settings = Settings()
    for name, doc in deployments.items():
        service = name.removeprefix("driftline-")
        main = container(doc)
        assert main["command"] == ["driftline", "serve", service]
        _parse_cli(group, main["command"][1:])  # the command exists
        assert main["ports"] == [{"name": "http", "containerPort": settings.port_of(service)}]
        for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            assert main[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
        assert main["resources"]["requests"]["cpu"] and main["resources"]["limits"]["memory"]
    (job,) = of_kind(built[overlay], "Job").values()
    _parse_cli(group, container(job)["command"][1:])
    assert container(job)["command"] == ["driftline", "infra", "topics"]
    for name, svc in of_kind(built[overlay], "Service").items():  # Services send to the named port
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
        assert f"driftline-{name}" in deployments


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingestion_features_and_prediction_scale_and_the_learner_keeps_a_standby(built, overlay):
    docs = built[overlay]
    deployments = of_kind(docs, "Deployment")
    scalers = of_kind(docs, "HorizontalPodAutoscaler")
    targets = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in scalers.values()}
    assert set(targets) == {f"driftline-{name}" for name in AUTOSCALED}
    for name, hpa in targets.items():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment" and name in deployments
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        assert "replicas" not in deployments[name]["spec"], f"{name}: a fixed count would undo the autoscaler"
    learner = deployments["driftline-learner"]
    assert learner["spec"]["replicas"] == 2  # one active (the Redis lease), one standby
    budgets = of_kind(docs, "PodDisruptionBudget")
    assert budgets["driftline-learner"]["spec"]["minAvailable"] == 1
    for name in ("drift", "offline"):  # one instance each: never two during a rollout
        assert deployments[f"driftline-{name}"]["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_settings_secrets_are_secret_and_pods_run_as_the_images_user(built, overlay, monkeypatch):
    docs = built[overlay]
    (config,) = of_kind(docs, "ConfigMap").values()
    assert not set(config["data"]) & SECRET
    for name, value in config["data"].items():  # the settings class refuses a DRIFTLINE_* name it lacks
        monkeypatch.setenv(name, value)
    Settings()
    uid = int(re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M).group(1))
    for doc in (*of_kind(docs, "Deployment").values(), *of_kind(docs, "Job").values()):
        pod = doc["spec"]["template"]["spec"]
        refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container(doc)["envFrom"]}
        assert refs["configMapRef"] == config["metadata"]["name"]
        assert refs["secretRef"].startswith("driftline-secrets")
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
        assert container(doc)["securityContext"]["readOnlyRootFilesystem"] is True
    secrets = of_kind(docs, "Secret")
    if overlay == "dev":  # generated from secrets.env
        (secret,) = secrets.values()
        assert set(secret["data"]) == SECRET
    else:  # from the cluster's secret store: nothing secret in the repository
        assert not secrets
        (deployment, *_) = of_kind(docs, "Deployment").values()
        assert re.fullmatch(r".+/driftline:\d+\.\d+\.\d+", container(deployment)["image"])
