"""The admin audit trail: every admin request of every service (promote, rollback, canary, retrain)
leaves one JSON record -- who, what, when, the answer -- refused ones too, on the driftline.audit
logger and in the `audit_log` file. The services' apps answer for real (Kafka and Redis of the
session); the record's shape and the file are unit tests."""

from __future__ import annotations

import gc
import json
import logging
import os
import stat
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftline.shared import audit
from driftline.shared.process import configure_logging
from driftline.shared.settings import Settings

ALICE, BOB = "alice-" + uuid.uuid4().hex, "bob-" + uuid.uuid4().hex
ADMINS = SecretStr(json.dumps([{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]))
KEYS = ["ts", "service", "action", "who", "client", "path", "target", "status", "outcome", "detail", "answer"]


def test_a_record_has_one_shape_and_an_outcome_for_each_answer():
    for status, outcome in ((200, "done"), (202, "done"), (401, "refused"), (403, "refused"), (404, "failed"),
                            (422, "failed"), (503, "failed")):
        entry = audit.record(service="drift", action="retrain", who="alice", client="10.0.0.7", path="/v1/retrain",
                             target={"reason": "demand"}, status=status, detail=None, answer=None)
        assert list(entry) == KEYS and entry["outcome"] == outcome
        assert entry["ts"].endswith("Z") and json.loads(json.dumps(entry)) == entry


def test_the_trail_file_is_private_appended_and_the_logger_ignores_a_quiet_log_level(tmp_path, caplog):
    trail = tmp_path / "audit" / "admin.jsonl"
    audit.open_trail(trail)
    assert stat.S_IMODE(trail.stat().st_mode) == 0o600
    configure_logging(Settings(log_level="WARNING"))
    assert logging.getLogger(audit.LOGGER).isEnabledFor(logging.INFO)  # a WARNING log level keeps the audit
    with caplog.at_level(logging.INFO, logger=audit.LOGGER):
        for i in range(3):
            audit.write({"n": i}, trail)
    assert [json.loads(line) for line in trail.read_text().splitlines()] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [json.loads(r.getMessage()) for r in caplog.records if r.name == audit.LOGGER] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_service_does_not_start_with_an_audit_log_it_cannot_write(tmp_path):
    from driftline.shared.admin import admin_action

    (tmp_path / "a-file").write_text("where the log's folder should be")
    with pytest.raises(OSError):
        admin_action(Settings(audit_log=tmp_path / "a-file" / "audit.jsonl"), "prediction", "promote")


@pytest.fixture
def apps(settings, redis_client, tmp_path):
    """The three services with admin routes, their admins alice and bob, the trail in a file."""
    from test_prediction_api import register
    from test_security import service_apps

    s = settings.model_copy(update={"admin_token": ADMINS, "audit_log": tmp_path / "audit.jsonl"})
    register(s, redis_client, seed=1)
    register(s, redis_client, seed=2, champion=False, parent=1)
    built = service_apps(s)
    clients = {name: TestClient(app) for name, (app, _route) in built.items()}
    yield clients, s.audit_log
    built.clear()
    clients.clear()
    gc.collect()  # their Kafka clients go before the session's broker


def as_(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_every_admin_request_of_every_service_leaves_one_record(apps, caplog):
    clients, trail = apps
    prediction, learner, drift = clients["prediction"], clients["learner"], clients["drift"]
    with caplog.at_level(logging.INFO, logger=audit.LOGGER):
        asked = [
            (prediction.post("/v1/models/rollback", headers=as_(None)), "rollback", "unknown", 401),
            (prediction.post("/v1/models/rollback", headers=as_("guess-" + uuid.uuid4().hex)), "rollback", "unknown", 401),
            (prediction.post("/v1/models/2/promote", headers=as_(ALICE)), "promote", "alice", 200),
            (prediction.post("/v1/canary", json={"share": 1.5}, headers=as_(BOB)), "canary_share", "bob", 422),
            (prediction.post("/v1/canary", json={"share": 1.5}), "canary_share", "unknown", 401),
            (prediction.post("/v1/canary/rollback", headers=as_(BOB)), "canary_rollback", "bob", 200),
            (learner.post("/v1/models/9/promote", headers=as_(ALICE)), "promote", "alice", 404),
            (drift.post("/v1/retrain", json={"reason": "demand"}, headers=as_(BOB)), "retrain", "bob", 202),
        ]
    for response, *_ in asked:
        assert response.status_code in (200, 202, 401, 404, 422), response.text
    trail_records = [json.loads(line) for line in trail.read_text().splitlines()]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == audit.LOGGER]
    assert trail_records == logged
    assert [(e["action"], e["who"], e["status"]) for e in trail_records] == [
        (action, who, status) for response, action, who, status in asked]
    assert [r.status_code for r, *_ in asked] == [e["status"] for e in trail_records]
    for entry in trail_records:
        assert list(entry) == KEYS and entry["client"] == "testclient"
    promote = trail_records[2]
    assert (promote["service"], promote["path"], promote["target"], promote["outcome"]) == (
        "prediction", "/v1/models/2/promote", {"version": 2}, "done")
    assert (promote["answer"]["from_version"], promote["answer"]["to_version"]) == (1, 2)
    refused_share, retrain = trail_records[3], trail_records[7]
    assert refused_share["outcome"] == "failed" and "share" in refused_share["detail"]
    assert trail_records[4]["outcome"] == "refused" and trail_records[4]["detail"].startswith("admin route")
    assert trail_records[6]["detail"] == "model default has no version 9" and trail_records[6]["service"] == "learner"
    assert (retrain["service"], retrain["target"], retrain["answer"]["reason"]) == ("drift", {"reason": "demand"}, "demand")
    text = trail.read_text()
    assert ALICE not in text and BOB not in text
    assert stat.S_IMODE(os.stat(trail).st_mode) == 0o600


def test_the_retrain_command_writes_its_own_record_as_the_os_user(settings, tmp_path):
    import getpass
    import subprocess
    import sys

    from driftline.shared.settings import settings_env

    s = settings.model_copy(update={"audit_log": tmp_path / "audit.jsonl"})
    done = subprocess.run([sys.executable, "-m", "driftline.cli", "retrain", "--reason", "demand"],
                          env={**os.environ, **settings_env(s)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    entry, = [json.loads(line) for line in s.audit_log.read_text().splitlines()]
    assert (entry["service"], entry["action"], entry["who"], entry["status"], entry["outcome"]) == (
        "cli", "retrain", f"os:{getpass.getuser()}", 202, "done")
    assert entry["target"] == {"reason": "demand"} and entry["answer"]["request_id"] in done.stdout
