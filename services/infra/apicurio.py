"""A local schema registry for tests and benchmarks: Apicurio Registry, whose Confluent-compatible
API (`/apis/ccompat/v7`) is what `schema_registry_url` names.

    registry = ApicurioRegistry(settings, port=stack.free_port())
    registry.install()                      # once per machine: Maven Central, cached
    registry.start(); registry.wait_ready()
    registry.url                            # http://127.0.0.1:PORT/apis/ccompat/v7
    registry.stop()

The 2.6 line runs on Java 17 (3.x needs 21). Its release `tar.gz` (classifier `all`) holds a
Quarkus runner jar and its `lib/`: fetched with Maven (`dependency:copy`) into
`<cache_dir>/apicurio-registry-<version>/`. Storage is its default in-memory H2: everything is
gone when it stops. Every port it opens is on the settings' host (loopback by default): the HTTP
API, Quarkus' management interface (if a build enables one), and Narayana's process-id socket,
which binds loopback by itself.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import httpx

from ..shared.settings import Settings
from .stack import Component, InfraError, _connect_host, port_open

VERSION = "2.6.13.Final"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{VERSION}:tar.gz:all"
CONFLUENT_API = "/apis/ccompat/v7"
NATIVE_API = "/apis/registry/v2"  # Apicurio's own API, which its serdes use


class ApicurioRegistry(Component):
    def __init__(self, settings: Settings, port: int) -> None:
        super().__init__("schema-registry", settings)
        self.port = port

    @property
    def home(self) -> Path:
        return self.settings.cache_dir / f"apicurio-registry-{VERSION}"

    @property
    def runner(self) -> Path:
        return self.home / f"apicurio-registry-app-{VERSION}-runner.jar"

    @property
    def base(self) -> str:
        return f"http://{_connect_host(self.settings.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API: the value of DRIFTLINE_SCHEMA_REGISTRY_URL."""
        return self.base + CONFLUENT_API

    @property
    def native_url(self) -> str:
        return self.base + NATIVE_API

    def installed(self) -> bool:
        return (self.home / ".complete").exists()

    def install(self) -> None:
        """Fetch and unpack the release once per machine (Maven Central, through Maven)."""
        if self.installed():
            return
        if shutil.which("java") is None or shutil.which("mvn") is None:
            raise InfraError("Apicurio Registry needs Java 17+ and Maven on PATH (Debian: openjdk-17-jre-headless maven)")
        partial = self.home.with_name(self.home.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        fetched = subprocess.run(["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}",
                                  f"-DoutputDirectory={partial}"], capture_output=True, text=True, timeout=900)
        archives = list(partial.glob("*.tar.gz"))
        if fetched.returncode != 0 or len(archives) != 1:
            raise InfraError(f"could not fetch {ARTIFACT}:\n{fetched.stdout[-2000:]}{fetched.stderr[-2000:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(partial, filter="data")
        archives[0].unlink()
        shutil.rmtree(self.home, ignore_errors=True)
        partial.rename(self.home)
        (self.home / ".complete").write_text(VERSION)

    def start(self) -> None:
        host = self.settings.host
        if port_open(_connect_host(host), self.port):
            raise InfraError(f"schema registry: {host}:{self.port} is already taken")
        # A short-lived JVM on a small machine: the first JIT tier and the serial collector (as the
        # broker's, stack.Kafka._java), a small heap.
        self._spawn(["java", "-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                     f"-Dquarkus.http.host={host}", f"-Dquarkus.http.port={self.port}",
                     f"-Dquarkus.management.host={host}", "-Dquarkus.management.port=0",
                     "-Dquarkus.log.console.color=false", "-jar", str(self.runner)], cwd=self.home)

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/subjects", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until its API answered (a JVM start: ~10 s on a quiet machine)."""
        started = time.monotonic()
        while not self.ready():
            if not self.running():
                raise InfraError(f"the schema registry exited:\n{self.log_tail()}")
            if time.monotonic() - started > timeout:
                raise InfraError(f"the schema registry did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.3)
        return time.monotonic() - started
