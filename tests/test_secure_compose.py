"""docker-compose.secure.yml and infra/secure/make-secrets.sh agree with each other and with the
settings: compose cannot run here, so what it would be given is checked piece by piece -- the
names are settings, every secret it mounts is a file the script makes, Kafka's stores open with
their password files, the certificates name the hosts, the tokens pass the services' start checks."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from driftline.infra.stack import REPO
from driftline.shared.settings import Settings, check_secrets, unknown_env_names
from tls import MAKE_SECRETS

SECURE = yaml.safe_load((REPO / "docker-compose.secure.yml").read_text())
MAIN = yaml.safe_load((REPO / "docker-compose.yml").read_text())
DRIFTLINE = [name for name, svc in MAIN["services"].items() if svc.get("image") == "driftline:local"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run(["bash", str(MAKE_SECRETS), str(folder)], check=True, capture_output=True)
    return folder


def test_the_script_refuses_to_overwrite_a_folder(made):
    again = subprocess.run(["bash", str(MAKE_SECRETS), str(made)], capture_output=True, text=True)
    assert again.returncode == 1 and "exists" in again.stderr


def test_every_driftline_service_gets_the_secure_settings_and_only_settings(made, monkeypatch):
    assert set(SECURE["services"]) >= set(DRIFTLINE)
    declared = SECURE["secrets"]
    for name in DRIFTLINE:
        svc = SECURE["services"][name]
        env = svc["environment"]
        assert not unknown_env_names(env), name
        mounted = set(svc["secrets"])
        for value in env.values():
            for secret in re.findall(r"/run/secrets/([\w.]+)", value):
                assert secret in mounted and secret in declared, (name, secret)
        assert env["DRIFTLINE_REDIS_URL"].startswith("rediss://") and "ssl_ca_certs=/run/secrets/ca.pem" in env["DRIFTLINE_REDIS_URL"]
        assert json.loads(env["DRIFTLINE_KAFKA_SECURITY"])["security.protocol"] == "SSL"
    for secret, spec in declared.items():
        assert (made / spec["file"].removeprefix("./secrets/")).is_file(), secret
    # the settings the services would start with, the files where make-secrets.sh put them
    env = SECURE["services"]["prediction"]["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("/run/secrets/", f"{made}/"))
    for line in (made / "env").read_text().splitlines():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DRIFTLINE_REDIS_URL", "rediss://:pw@redis:6379/0")  # compose fills its password in
    s = Settings()
    check_secrets(s)  # strong enough for the services to start
    assert [h.name for h in s.ingest_tokens] == ["producer"] and [h.name for h in s.predict_tokens] == ["app"]
    assert s.kafka_security["ssl.certificate.location"] == f"{made}/client.pem"


def test_kafka_gets_stores_that_open_with_their_password_files(made):
    kafka = SECURE["services"]["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "SSL://kafka:9092" and env["KAFKA_SSL_CLIENT_AUTH"] == "required"
    mount = dict(reversed(v.split(":")[:2]) for v in kafka["volumes"])["/etc/kafka/secrets"]
    stores = made / mount.removeprefix("./secrets/")
    for store, password, entry in (("KAFKA_SSL_KEYSTORE_FILENAME", "KAFKA_SSL_KEYSTORE_CREDENTIALS", "PrivateKeyEntry"),
                                   ("KAFKA_SSL_TRUSTSTORE_FILENAME", "KAFKA_SSL_TRUSTSTORE_CREDENTIALS", "trustedCertEntry")):
        listed = subprocess.run(["keytool", "-list", "-storetype", "PKCS12", "-keystore", str(stores / env[store]),
                                 "-storepass:file", str(stores / env[password])], capture_output=True, text=True)
        assert listed.returncode == 0 and entry in listed.stdout, listed.stdout + listed.stderr
    client = (stores / "client-ssl.properties").read_text()
    for location in re.findall(r"location=/etc/kafka/secrets/(\S+)", client):
        assert (stores / location).is_file()
    assert "--command-config /etc/kafka/secrets/client-ssl.properties" in kafka["healthcheck"]["test"][1]


def test_the_certificates_name_both_servers_and_chain_to_the_ca(made):
    names = subprocess.run(["openssl", "x509", "-in", str(made / "server.pem"), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True, check=True).stdout
    for host in ("DNS:kafka", "DNS:redis", "IP Address:127.0.0.1"):
        assert host in names
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(made / "ca.pem"), str(made / "server.pem"),
                               str(made / "client.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    redis = SECURE["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--port") + 1] == "0" and command[command.index("--tls-port") + 1] == "6379"
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert command[command.index(flag) + 1].removeprefix("/run/secrets/") in redis["secrets"]
    assert "--tls" in redis["healthcheck"]["test"]
