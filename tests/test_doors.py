"""The client doors: DRIFTLINE_INGEST_TOKENS and DRIFTLINE_PREDICT_TOKENS, the token check they
share with the admin routes, per-client counters and rate limits, secrets read from files. Pure
rules are unit tests; the doors themselves are answered by the real ingestion and prediction apps
against the session's Kafka and Redis."""

from __future__ import annotations

import gc
import hmac
import json
import logging
import time
import uuid

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from pydantic import SecretStr, ValidationError

from driftline.shared.doors import DoorGuard
from driftline.shared.settings import (
    ClientToken,
    InsecureSettings,
    Settings,
    check_secrets,
    settings_env,
    settings_view,
    unknown_env_names,
)
from driftline.shared.tokens import TokenSet
from test_features_service import read_topic
from test_security import GOOD_KEY, cli, offline_env

SHOP = "shop-" + "k7Qx2mZ9pL4vR8sT1wY6uE3"
PARTNER = "partner-" + "Jd82hQ0zXc5VnM3bLp7Ws1"


def holders(**tokens: str) -> list[ClientToken]:
    return [ClientToken(name=name, token=SecretStr(token)) for name, token in tokens.items()]


def count(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


# -- the token lists -----------------------------------------------------------------------------
def test_a_token_list_takes_bare_tokens_and_named_objects(monkeypatch):
    monkeypatch.setenv("DRIFTLINE_INGEST_TOKENS", json.dumps([SHOP, {"name": "partner", "token": PARTNER,
                                                                      "rate_limit": "5/second"}]))
    s = Settings()
    bare, named = s.ingest_tokens
    assert bare.name.startswith("token-") and len(bare.name) == 14  # a fingerprint, stable across restarts
    assert bare.name == Settings().ingest_tokens[0].name and bare.token.get_secret_value() == SHOP
    assert (named.name, named.rate_limit) == ("partner", "5/second")
    assert s.predict_tokens is None  # unset: that door is open


@pytest.mark.parametrize("value, problem", [
    (SHOP, "must be a JSON list"),
    (json.dumps({"name": "shop", "token": SHOP}), "must be a JSON list"),
    (json.dumps([{"nmae": "shop", "token": SHOP}]), "Extra inputs are not permitted"),
    (json.dumps([{"name": "unknown", "token": SHOP}]), "name of callers without a known token"),
    (json.dumps([{"name": "shop keeper", "token": SHOP}]), "String should match pattern"),
    (json.dumps([{"name": "shop", "token": SHOP, "rate_limit": "lots"}]), "a rate limit reads like"),
])
def test_a_malformed_token_list_stops_at_once_without_repeating_a_token(monkeypatch, value, problem):
    monkeypatch.setenv("DRIFTLINE_PREDICT_TOKENS", value)
    with pytest.raises(ValidationError, match=problem) as refused:
        Settings()
    assert SHOP not in str(refused.value)


@pytest.mark.parametrize("update, problem", [
    ({"ingest_tokens": []}, "DRIFTLINE_INGEST_TOKENS lists no token"),
    ({"ingest_tokens": holders(shop="s3cret")}, "the token of 'shop' is too short"),
    ({"predict_tokens": holders(shop="a1" * 15)}, "too regular to be random"),
    ({"predict_tokens": holders(shop=SHOP[:20] + " " + SHOP[21:])}, "characters a bearer token cannot carry"),
    ({"predict_tokens": holders(shop=SHOP, partner=SHOP)}, "'shop' and 'partner' hold the same token"),
    ({"ingest_tokens": holders(shop=SHOP), "admin_token": SecretStr(SHOP)}, "'shop' holds an admin token"),
    ({"admin_token": SecretStr("s3cret")}, "DRIFTLINE_ADMIN_TOKEN: the token of 'admin' is too short"),
    ({"ingest_tokens": [ClientToken(name="shop", token=SecretStr(SHOP), rate_limit="1/second"),
                        ClientToken(name="shop", token=SecretStr(PARTNER))]}, "twice with different rate limits"),
])
def test_weak_shared_or_empty_tokens_are_refused_at_start(update, problem):
    s = Settings(model_key=SecretStr(GOOD_KEY)).model_copy(update=update)
    with pytest.raises(InsecureSettings, match=problem) as refused:
        check_secrets(s)
    assert SHOP not in str(refused.value) and PARTNER not in str(refused.value)
    assert "(refused: " in json.dumps(settings_view(s))  # `infra status` says so too


def test_strong_tokens_pass_and_one_client_may_hold_two_while_rotating():
    s = Settings(model_key=SecretStr(GOOD_KEY), admin_token=SecretStr(uuid.uuid4().hex),
                 ingest_tokens=[{"name": "shop", "token": SHOP}, {"name": "shop", "token": PARTNER}],
                 predict_tokens=[SHOP])  # a client may use one token at both doors
    check_secrets(s)
    assert TokenSet(s.ingest_tokens).names == ("shop",)
    view = settings_view(s)
    assert view["ingest_tokens"] == "(2 tokens: shop)" and SHOP not in json.dumps(view)


def test_a_service_refuses_to_start_with_a_weak_door_token(tmp_path):
    env = {**offline_env(tmp_path), "DRIFTLINE_MODEL_KEY": GOOD_KEY,
           "DRIFTLINE_PREDICT_TOKENS": json.dumps([{"name": "shop", "token": "shop-s3cret"}])}
    started = time.monotonic()
    result = cli("serve", "prediction", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing to start" in result.stderr and "DRIFTLINE_PREDICT_TOKENS" in result.stderr
    assert "shop-s3cret" not in result.stdout + result.stderr
    assert time.monotonic() - started < 30


# -- the check ------------------------------------------------------------------------------------
def test_a_token_is_known_by_its_holder_whatever_the_scheme_case():
    tokens = TokenSet(holders(shop=SHOP, partner=PARTNER))
    assert tokens.identify(f"Bearer {SHOP}") == "shop" and tokens.identify(f"bearer  {PARTNER} ") == "partner"
    for header in (None, "", "Bearer", f"Basic {SHOP}", f"Bearer {SHOP}x", f"{SHOP}", f"Bearer {SHOP[:-1]}"):
        assert tokens.identify(header) is None, header


def test_every_held_token_is_compared_whichever_matches(monkeypatch):
    """No early exit: the time taken does not say which token came close, or whether one matched."""
    tokens = TokenSet(holders(**{f"client{i}": f"{i:02d}-{SHOP}" for i in range(10)}))
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(len(a)) or real(a, b))
    for given in (f"00-{SHOP}", f"09-{SHOP}", "nobody"):
        calls.clear()
        tokens.identify(f"Bearer {given}")
        assert calls == [32] * 10  # ten SHA-256 digests: the token's length does not show either


# -- the door -------------------------------------------------------------------------------------
def test_an_open_door_lets_everyone_in_as_anonymous_and_says_so_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="driftline.shared.doors"):
        guard = DoorGuard.of("ingestion", Settings())
    assert "POST /v1/events and /v1/labels are open to any caller (DRIFTLINE_INGEST_TOKENS is not set)" in caplog.text
    before = count("driftline_client_requests_total", service="ingestion", client="anonymous")
    assert guard.admit(None) == guard.admit("Bearer whatever") == "anonymous"
    assert count("driftline_client_requests_total", service="ingestion", client="anonymous") == before + 2


def test_a_guarded_door_answers_401_and_counts_each_client_by_name(caplog):
    with caplog.at_level(logging.INFO, logger="driftline.shared.doors"):
        guard = DoorGuard.of("prediction", Settings(predict_tokens=holders(shop=SHOP, partner=PARTNER)))
    assert "need a bearer token of DRIFTLINE_PREDICT_TOKENS (2 tokens: shop, partner)" in caplog.text
    labels = {"service": "prediction"}

    def counts() -> tuple[float, float, float]:
        return (count("driftline_client_requests_total", **labels, client="shop"),
                count("driftline_client_rejections_total", **labels, client="unknown", reason="missing"),
                count("driftline_client_rejections_total", **labels, client="unknown", reason="invalid"))

    before = counts()
    assert guard.admit(f"Bearer {SHOP}") == "shop"
    for header, kind in ((None, "none was sent"), (f"Bearer {SHOP[::-1]}", "the one sent is not known")):
        with pytest.raises(HTTPException) as refused:
            guard.admit(header)
        assert refused.value.status_code == 401 and refused.value.headers == {"WWW-Authenticate": "Bearer"}
        assert kind in refused.value.detail and "DRIFTLINE_PREDICT_TOKENS" in refused.value.detail
    assert counts() == tuple(n + 1 for n in before)  # one let in as shop, one missing, one invalid
    # every client's series exists from the start, and no token is ever a label
    assert REGISTRY.get_sample_value("driftline_client_requests_total", {**labels, "client": "partner"}) is not None
    text = generate_latest(REGISTRY).decode()
    assert 'client="partner"' in text and SHOP not in text and PARTNER not in text


def test_a_client_over_its_rate_limit_gets_429_with_retry_after_and_the_others_go_on():
    guard = DoorGuard("prediction", [ClientToken(name="shop", token=SecretStr(SHOP)),
                                     ClientToken(name="partner", token=SecretStr(PARTNER), rate_limit="100/second")],
                      rate_limit="3/second")
    shop = f"Bearer {SHOP}"
    admitted = 0
    with pytest.raises(HTTPException) as limited:
        for _ in range(10):
            guard.admit(shop)
            admitted += 1
    assert admitted == 3 and limited.value.status_code == 429
    retry = int(limited.value.headers["Retry-After"])
    assert 1 <= retry <= 2 and "shop is over its rate limit of 3 per 1 second" in limited.value.detail
    for _ in range(10):  # its own limit, its own window
        assert guard.admit(f"Bearer {PARTNER}") == "partner"
    time.sleep(retry)
    assert guard.admit(shop) == "shop"  # back in after Retry-After
    assert count("driftline_client_rejections_total", service="prediction", client="shop", reason="rate_limited") >= 1


def test_an_open_door_with_a_rate_limit_counts_all_callers_as_one():
    guard = DoorGuard("ingestion", None, rate_limit="2/minute")
    guard.admit(None), guard.admit("Bearer anything")
    with pytest.raises(HTTPException) as limited:
        guard.admit(None)
    assert limited.value.status_code == 429 and 1 <= int(limited.value.headers["Retry-After"]) <= 120


def test_the_guard_micro_benchmark_reports_microseconds_per_request():
    """`driftline bench doors` at its smallest: it runs, and says the cost of each kind of check."""
    from driftline.bench.doors import run

    result = run(quick=True)
    print(json.dumps(result, indent=1))
    assert set(result["us_per_request"]) == {"open door", "1 token", "10 tokens", "100 tokens",
                                             "10 tokens, rate limited", "unknown token (401)"}
    assert all(0 < us < 10_000 for us in result["us_per_request"].values())


# -- secrets from files (Docker secrets) -----------------------------------------------------------
def test_every_secret_may_come_from_a_file(tmp_path, monkeypatch):
    files = {"MODEL_KEY": GOOD_KEY, "ADMIN_TOKEN": uuid.uuid4().hex, "INGEST_TOKENS": json.dumps([SHOP]),
             "PREDICT_TOKENS": json.dumps([{"name": "partner", "token": PARTNER}]),
             "REDIS_URL": "redis://:pa55-word@127.0.0.1:6390/0",
             "KAFKA_SECURITY": json.dumps({"security.protocol": "SASL_SSL", "sasl.password": "kafka-pa55"})}
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")  # as `echo` writes it
        monkeypatch.setenv(f"DRIFTLINE_{name}_FILE", str(tmp_path / name))
    assert not unknown_env_names()
    s = Settings()
    assert s.model_key.get_secret_value() == GOOD_KEY and s.admin_token.get_secret_value() == files["ADMIN_TOKEN"]
    assert s.ingest_tokens[0].token.get_secret_value() == SHOP and s.predict_tokens[0].name == "partner"
    assert s.redis_url == files["REDIS_URL"] and s.kafka_security["sasl.password"] == "kafka-pa55"
    # a child started with these settings reads the same files (and gets no secret in its environment)
    env = settings_env(s)
    assert env["DRIFTLINE_ADMIN_TOKEN_FILE"] == str(tmp_path / "ADMIN_TOKEN") and "DRIFTLINE_ADMIN_TOKEN" not in env
    values = " ".join(env.values())
    assert not [secret for secret in (GOOD_KEY, SHOP, PARTNER, "kafka-pa55", "pa55-word") if secret in values]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child.admin_token == s.admin_token and child.predict_tokens == s.predict_tokens


def test_a_secret_and_its_file_together_or_an_unreadable_file_stop_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLINE_ADMIN_TOKEN_FILE", str(tmp_path / "nowhere"))
    with pytest.raises(ValidationError, match="DRIFTLINE_ADMIN_TOKEN_FILE: cannot read .*nowhere"):
        Settings()
    (tmp_path / "token").write_text(uuid.uuid4().hex)
    monkeypatch.setenv("DRIFTLINE_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("DRIFTLINE_ADMIN_TOKEN", uuid.uuid4().hex)
    with pytest.raises(ValidationError, match="DRIFTLINE_ADMIN_TOKEN and DRIFTLINE_ADMIN_TOKEN_FILE are both set"):
        Settings()


# -- the doors of the real services --------------------------------------------------------------
@pytest.fixture
def released():
    """The apps a test builds are collected after it: their Kafka clients go before the session's broker."""
    yield
    gc.collect()


def event_body(event_id: str) -> dict:
    return {"event_id": event_id, "entity_id": "m-1", "ts": time.time(), "fields": {"price": 0.4}}


def test_ingestion_takes_events_and_labels_only_from_token_holders(settings, released):
    from driftline.ingestion.service import build_app

    s = settings.model_copy(update={"ingest_tokens": holders(producer=SHOP),
                                    "ingestion": settings.ingestion.model_copy(update={"rate_limit": "5/minute"})})
    client = TestClient(build_app(s))  # the HTTP door alone (the Kafka door's loop is not started)
    for route, body in (("/v1/events", event_body("stranger-1")),
                        ("/v1/labels", {"event_id": "stranger-1", "label": "1", "ts": time.time()})):
        for headers in ({}, {"Authorization": f"Bearer {PARTNER}"}, {"Authorization": f"Basic {SHOP}"}):
            r = client.post(route, json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (route, headers, r.text)
    r = client.post("/v1/events", content=b"not even json", headers={"content-type": "application/json"})
    assert r.status_code == 401  # before the body is read
    holder = {"Authorization": f"Bearer {SHOP}"}
    r = client.post("/v1/events", json=event_body("held-1"), headers=holder)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    r = client.post("/v1/labels", json={"event_id": "held-1", "label": "1", "ts": time.time()}, headers=holder)
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert [e["event_id"] for e in read_topic(s, "events.valid", 1, record="Event")] == ["held-1"]
    for _ in range(3):
        client.post("/v1/events", json=[], headers=holder)
    r = client.post("/v1/events", json=[], headers=holder)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/events"]["post"]["security"] == [{"ClientToken": []}]
    assert spec["components"]["securitySchemes"]["ClientToken"]["scheme"] == "bearer"


def test_prediction_answers_only_token_holders_and_checks_them_before_the_body(settings, redis_client, released):
    from test_prediction_api import register

    from driftline.prediction.app import create_app

    s = settings.model_copy(update={"predict_tokens": holders(shop=SHOP)})
    register(s, redis_client, seed=1)
    request = {"entity_id": "m-1", "fields": {"a": 0.3, "b": -0.2}}
    with TestClient(create_app(s)) as client:
        for route, body in (("/v1/predict", request), ("/v1/predict/batch", {"items": [request]})):
            assert client.post(route, json=body).status_code == 401, route
            assert client.post(route, content=b"{broken", headers={"Authorization": "Bearer no"}).status_code == 401
            r = client.post(route, json=body, headers={"Authorization": f"Bearer {SHOP}"})
            assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        holder = {"Authorization": f"Bearer {SHOP}"}
        r = client.post("/v1/predict/batch", json={"items": [request, {"entity_id": "", "fields": {}}]}, headers=holder)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "items", 1], r.text
        r = client.post("/v1/predict/batch", content=b"{broken", headers=holder)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid", r.text
        assert client.get("/v1/models").status_code == 200  # the other routes are not the door's
    assert count("driftline_client_requests_total", service="prediction", client="shop") >= 2
