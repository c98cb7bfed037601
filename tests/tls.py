"""Certificates for TLS tests, made with the openssl command line: a CA of the test's own and, signed
by it, a server certificate for 127.0.0.1 (and localhost) and a client certificate.

    from tls import make_certificates

    certs = make_certificates(tmp_path)
    certs.server   # ServerTls(cert, key, ca) for stack.Kafka / stack.Redis
    certs.client_cert, certs.client_key, certs.ca

Keys are RSA 2048, PKCS#8, not encrypted; certificates last two days. `stranger_ca` is a CA that
signed nothing here: a client that trusts only it must refuse the server.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from driftline.infra.stack import ServerTls


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server: ServerTls
    client_cert: Path
    client_key: Path
    stranger_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{result.stderr}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def _issue(folder: Path, name: str, subject: str, extensions: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_certificates(folder: Path) -> Certificates:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "driftline-test-ca")
    # The broker is also its own client (inter-broker listener), so its certificate serves both ends.
    server = _issue(folder, "server", "/CN=127.0.0.1",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n", ca)
    client = _issue(folder, "client", "/CN=driftline-app", "extendedKeyUsage=clientAuth\n", ca)
    stranger, _ = _ca(folder, "stranger-ca")
    return Certificates(ca=ca[0], server=ServerTls(cert=server[0], key=server[1], ca=ca[0]),
                        client_cert=client[0], client_key=client[1], stranger_ca=stranger)
