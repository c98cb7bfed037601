"""Certificates for TLS tests, made by `infra/secure/make-secrets.sh` (what an operator runs for
docker-compose.secure.yml): a CA of the test's own and, signed by it, a server certificate for
127.0.0.1 (also kafka, redis, localhost) and a client certificate.

    from tls import make_certificates

    certs = make_certificates(tmp_path / "secrets")
    certs.server   # ServerTls(cert, key, ca) for stack.Kafka / stack.Redis
    certs.client_cert, certs.client_key, certs.ca

`stranger_ca` is another CA that signed nothing here: a client that trusts only it must refuse the
servers.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from driftline.infra.stack import REPO, ServerTls

MAKE_SECRETS = REPO / "infra" / "secure" / "make-secrets.sh"


@dataclass(frozen=True)
class Certificates:
    folder: Path
    ca: Path
    server: ServerTls
    client_cert: Path
    client_key: Path
    stranger_ca: Path


def make_certificates(folder: Path) -> Certificates:
    made = subprocess.run(["bash", str(MAKE_SECRETS), str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(f"{MAKE_SECRETS.name} failed:\n{made.stdout}{made.stderr}")
    stranger = folder.parent / f"{folder.name}-stranger-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger",
                    "-keyout", str(stranger.with_suffix(".key")), "-out", str(stranger)], check=True, capture_output=True)
    return Certificates(folder=folder, ca=folder / "ca.pem",
                        server=ServerTls(cert=folder / "server.pem", key=folder / "server.key", ca=folder / "ca.pem"),
                        client_cert=folder / "client.pem", client_key=folder / "client.key", stranger_ca=stranger)
