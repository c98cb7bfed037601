"""docker-compose.yml run for real under podman, on a machine with no Docker engine and no public
image registry (tests/test_deploy_compose.py).

What stands in for what, and why:
- Images. A Debian base made by debootstrap and `podman import`ed (built once, cached in podman's
  store under BASE_IMAGE); the driftline image is the project's Dockerfile built on it
  (`--build-arg BASE_IMAGE`). Each public image the compose file names that is not in the store
  is built as a stand-in under the same name from Debian's packages (Redis, Prometheus) or
  releases from Maven Central on Debian's Java (Kafka, Apicurio Registry), by the Containerfiles
  in tests/deploy/; the stand-ins carry the label STANDIN_LABEL. Grafana (AGPL) is neither run nor built: its dashboards are
  checked against Grafana's own schema (tests/test_dashboards.py).
- Network. The stack gets a network namespace of its own with nothing but a loopback (`ip netns`):
  every container joins it, the compose service names resolve to 127.0.0.1 there, the compose
  file's fixed ports cannot clash with anything on the machine, and no container gets an address
  outside 127.0.0.0/8. The test's own clients (a replay, HTTP probes) run in it with
  `ip netns exec`. Published ports mean nothing there and are reset.
- Compose. podman-compose (PyPI) creates the containers from the compose file plus an override
  with the above. Podman 4.3 (Debian 12) neither schedules healthchecks without systemd nor
  lets podman-compose wait for `service_healthy`, so the Stack does both as Docker's engine and
  `docker compose` would: it runs each container's healthcheck at its interval, and starts the
  services in `depends_on` order, each once its dependencies meet their conditions.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import yaml

from driftline.infra import stack

REPO = Path(__file__).resolve().parents[1]
DEPLOY = Path(__file__).resolve().parent / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "driftline"
SUITE = "bookworm"
BASE_IMAGE = f"localhost/driftline-base:{SUITE}"
STANDIN_LABEL = "io.driftline.standin"
RECIPE_LABEL = "io.driftline.recipe"
PODMAN_PACKAGES = ("podman", "runc", "debootstrap", "uidmap", "fuse-overlayfs")
RUN_LIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
# Build-time: package installs need the machine's network (the host's, never podman's bridge).
BUILD_ARGS = ("--pull=never", "--network", "host", *RUN_LIMITS)
CONTAINERS_CONF = """\
# podman on this machine: runc (crun fails on its hybrid cgroups), the host's network by default
# (never podman's bridge), and limits runc accepts.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
netns = "host"

[engine]
runtime = "runc"
"""
# Debian's python3 refuses `pip install` outside a venv and has no `python`: the base puts one first
# on PATH. HTTPS goes through the machine's extra CA certificates, copied in.
BASE_ENV = {
    "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
    "LANG": "C.UTF-8",
}
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# What each stand-in is built from (tests/deploy/NAME/Containerfile), by the image's repository.
STANDINS = {"apache/kafka": "kafka", "redis": "redis", "prom/prometheus": "prometheus",
            "apicurio/apicurio-registry-mem": "apicurio"}
NOT_RUN = ("grafana",)  # AGPL: not run here (see above)


class PodmanMissing(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """The Debian packages this needs that are not installed (`.ci/run` installs them with SLOW_TESTS)."""
    tools = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "newuidmap": "uidmap",
             "ip": "iproute2"}
    return [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]


def containers_conf() -> Path:
    path = CACHE / "podman" / "containers.conf"
    if not path.exists() or path.read_text() != CONTAINERS_CONF:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(CONTAINERS_CONF)
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf())}


def podman(*args: str, timeout: float = 120, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stdout.decode(errors='replace')[-3000:]}{result.stderr.decode(errors='replace')[-3000:]}")
    return result


def image_label(image: str, label: str) -> str | None:
    """The image's label, or None when the image is not in the store."""
    result = podman("image", "inspect", "--format", "{{json .Labels}}", image, check=False)
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout) or {}).get(label, "")


@contextmanager
def build_lock():
    """One image build at a time on this machine (it is shared, and builds are CPU-heavy)."""
    path = CACHE / "podman" / "build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _recipe(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = list(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        if path.exists():
            for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s*)?)(\S+)", path.read_text(), re.M):
                if "security" not in match.group(1):
                    return match.group(1)
    return "http://deb.debian.org/debian"


def ensure_base_image(log=print) -> str:
    """BASE_IMAGE, made once: debootstrap (minbase) + python3 and a venv first on PATH + the
    machine's CA certificates. Rebuilt only when this recipe changes (~50 s)."""
    extra_certs = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    recipe = _recipe(SUITE, BASE_PACKAGES, BASE_ENV, [(p.name, p.read_bytes()) for p in extra_certs])
    if image_label(BASE_IMAGE, RECIPE_LABEL) == recipe:
        return BASE_IMAGE
    with build_lock():
        if image_label(BASE_IMAGE, RECIPE_LABEL) == recipe:  # built by someone else meanwhile
            return BASE_IMAGE
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="driftline-rootfs-") as tmp:
            root = Path(tmp) / "rootfs"
            run = lambda *argv: subprocess.run(argv, check=True, capture_output=True, timeout=900)  # noqa: E731
            run("debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(root),
                debian_mirror())
            for cert in extra_certs:
                shutil.copy(cert, root / "usr/local/share/ca-certificates" / cert.name)
            run("chroot", str(root), "update-ca-certificates")
            run("chroot", str(root), "python3", "-m", "venv", "/opt/venv")
            # Packages installed in an image build must not try to start their daemons.
            policy = root / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
            (root / "var/lib/apt/lists/partial").mkdir(parents=True)
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            changes = [arg for key, value in BASE_ENV.items() for arg in ("--change", f"ENV {key}={value}")]
            changes += ["--change", f"LABEL {RECIPE_LABEL}={recipe}", "--change", 'CMD ["python"]']
            imported = subprocess.run(["podman", "import", *changes, "-", BASE_IMAGE], stdin=tar.stdout,
                                      env=podman_env(), capture_output=True, timeout=600)
            tar.wait()
            if imported.returncode != 0:
                raise RuntimeError(f"podman import failed: {imported.stderr.decode(errors='replace')}")
        log(f"base image {BASE_IMAGE} built in {time.monotonic() - t0:.0f} s")
    return BASE_IMAGE


def build(tag: str, context: Path, *, containerfile: Path | None = None, labels: dict[str, str] | None = None,
          timeout: float = 1200) -> None:
    args = ["build", *BUILD_ARGS, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag]
    if containerfile:
        args += ["-f", str(containerfile)]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    podman(*args, str(context), timeout=timeout)


def ensure_driftline_image(tag: str, log=print) -> str:
    """The project's Dockerfile on the Debian base; podman's layer cache makes a rebuild with
    unchanged dependencies take seconds."""
    ensure_base_image(log)
    t0 = time.monotonic()
    with build_lock():
        build(tag, REPO)
    log(f"{tag} built in {time.monotonic() - t0:.0f} s")
    return tag


def ensure_standin(image: str, log=print) -> str:
    """`image` as the store has it, or, when it is not there, a stand-in built under its name.
    Returns what was used ("store" or "stand-in")."""
    repository, _, version = image.rpartition(":")
    name = STANDINS.get(repository)
    if name is None and image_label(image, STANDIN_LABEL) is None:
        raise LookupError(f"{image} is not in podman's store and has no stand-in: add tests/deploy/NAME/Containerfile "
                          "and name it in podman_stack.STANDINS")
    if name is None:
        return "store"
    context = DEPLOY / name
    files = sorted(p for p in context.rglob("*") if p.is_file())
    recipe = _recipe(version, [(str(p.relative_to(context)), p.read_bytes()) for p in files])
    label = image_label(image, STANDIN_LABEL)
    if label is not None and label in ("", recipe):
        return "store" if label == "" else "stand-in"
    ensure_base_image(log)
    t0 = time.monotonic()
    with build_lock(), tempfile.TemporaryDirectory(prefix=f"driftline-{name}-") as tmp:
        build_dir = Path(tmp)
        shutil.copytree(context, build_dir, dirs_exist_ok=True)
        if name == "kafka":  # the broker jars `make setup` fetched, and the local stack's log4j config
            settings = stack.Settings()
            kafka = stack.Kafka(settings)
            kafka.install()
            assert version == stack.kafka_version(), f"{image}: the jars cached are Kafka {stack.kafka_version()}"
            shutil.copytree(kafka.libs, build_dir / "libs")
            shutil.copy(REPO / "infra/kafka/log4j.properties", build_dir / "log4j.properties")
        if name == "apicurio":  # the release's runner jar and its lib/, under a name the entrypoint knows
            release = apicurio_release(version)
            shutil.copytree(release, build_dir / "registry", ignore=shutil.ignore_patterns(".complete"))
            (build_dir / "registry" / f"apicurio-registry-app-{version}-runner.jar").rename(
                build_dir / "registry" / "registry-runner.jar")
        build(image, build_dir, labels={STANDIN_LABEL: recipe})
    log(f"stand-in {image} built from {context.relative_to(REPO)} in {time.monotonic() - t0:.0f} s")
    return "stand-in"


def apicurio_release(version: str) -> Path:
    """Apicurio Registry's release (Quarkus runner jar + lib/) from Maven Central, unpacked once
    into the cache folder the local stack's registry uses too."""
    home = CACHE / f"apicurio-registry-{version}"
    if (home / ".complete").exists():
        return home
    artifact = f"io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
    with tempfile.TemporaryDirectory(prefix="driftline-apicurio-") as tmp:
        subprocess.run(["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={artifact}", f"-DoutputDirectory={tmp}"],
                       check=True, capture_output=True, timeout=900)
        (archive,) = Path(tmp).glob("*.tar.gz")
        partial = home.with_name(home.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(partial, filter="data")
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
    (home / ".complete").write_text(version)
    return home


def podman_compose() -> list[str]:
    """podman-compose from PyPI, in a venv of its own under the cache (installed once)."""
    venv = CACHE / "podman-compose"
    exe = venv / "bin" / "podman-compose"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "podman-compose>=1.3"], check=True, timeout=600)
    return [str(exe)]


def _seconds(duration: str | int | None, default: float) -> float:
    """A compose duration ("10s", "1m30s") or podman's nanoseconds, in seconds."""
    if duration is None:
        return default
    if isinstance(duration, (int, float)):
        return duration / 1e9
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)", duration):
        total += float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def start_order(services: dict[str, dict]) -> list[str]:
    """Services in an order where each comes after everything it depends on.

        >>> start_order({"b": {"depends_on": {"a": {}}}, "a": {}, "c": {"depends_on": ["b"]}})
        ['a', 'b', 'c']
    """
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join(path + (name,))}")
        for dep in services[name].get("depends_on", {}):
            visit(dep, path + (name,))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


class Stack:
    """The compose project `project` in a network namespace of its own (see the module doc)."""

    def __init__(self, project: str, env: dict[str, str], workdir: Path, log=print) -> None:
        self.project = project
        self.env = env  # what the operator's shell holds: the secrets the compose file requires
        self.workdir = workdir
        self.log = log
        self.netns = f"{project}-net"
        self.doc = yaml.safe_load(COMPOSE_FILE.read_text())
        self.services = {name: svc for name, svc in self.doc["services"].items() if name not in NOT_RUN}
        self.override = workdir / "podman-override.yml"
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._checks: dict[str, float] = {}  # container -> when its healthcheck is due next

    # -- the namespace ---------------------------------------------------------------------
    def create_namespace(self) -> None:
        subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True, capture_output=True)
        hosts = Path("/etc/netns") / self.netns / "hosts"  # what `ip netns exec` mounts on /etc/hosts
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text("127.0.0.1 localhost " + " ".join(self.doc["services"]) + "\n")
        lines = ["services:"]
        for name, svc in self.doc["services"].items():
            lines += [f"  {name}:", f"    network_mode: ns:/run/netns/{self.netns}", "    pull_policy: never"]
            lines += ["    ports: !reset []"] if "ports" in svc else []
            lines += ["    extra_hosts:"]
            lines += [f"      - {other}:127.0.0.1" for other in self.doc["services"]]
        self.override.write_text("\n".join(lines) + "\n")

    def remove_namespace(self) -> None:
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / self.netns, ignore_errors=True)

    def run_inside(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 300,
                   check: bool = True) -> subprocess.CompletedProcess:
        """A host program in the stack's namespace: it sees the stack's loopback and names."""
        result = subprocess.run(["ip", "netns", "exec", self.netns, *argv], env=env or os.environ.copy(),
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def http_status(self, *urls: str) -> dict[str, int]:
        """GET each URL from inside the namespace: url -> status (0 when nothing answered)."""
        code = ("import json, sys, urllib.request, urllib.error\nout = {}\n"
                "for url in sys.argv[1:]:\n"
                "    try:\n        out[url] = urllib.request.urlopen(url, timeout=5).status\n"
                "    except urllib.error.HTTPError as e:\n        out[url] = e.code\n"
                "    except Exception:\n        out[url] = 0\n"
                "print(json.dumps(out))\n")
        return json.loads(self.run_inside(sys.executable, "-c", code, *urls).stdout)

    def get_json(self, url: str) -> dict:
        code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"
        return json.loads(self.run_inside(sys.executable, "-c", code, url).stdout)

    # -- compose ---------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = [*podman_compose(), "--in-pod=false", "-p", self.project, "-f", str(COMPOSE_FILE),
                "-f", str(self.override), *args]
        result = subprocess.run(argv, cwd=REPO, env={**podman_env(), **self.env}, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"podman-compose {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def containers(self, all_states: bool = True) -> list[dict]:
        args = ["ps", "--format", "json", "--filter", f"label=io.podman.compose.project={self.project}"]
        return json.loads(podman(*args, *(["-a"] if all_states else [])).stdout or "[]")

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def inspect(self, service: str) -> dict:
        return json.loads(podman("inspect", self.container(service)).stdout)[0]

    def health(self, service: str) -> str | None:
        state = self.inspect(service)["State"]
        return (state.get("Health") or state.get("Healthcheck") or {}).get("Status")

    def up(self, timeout: float = 300) -> dict[str, float]:
        """Every service but NOT_RUN, in depends_on order, each started once its dependencies meet
        their conditions (as `docker compose up -d` does). Returns when each was started."""
        self._ticker = threading.Thread(target=self._run_healthchecks, daemon=True)
        self._ticker.start()
        t0, started = time.monotonic(), {}
        for name in start_order(self.services):
            for dep, cond in self.services[name].get("depends_on", {}).items():
                self.wait_for(dep, cond["condition"], timeout - (time.monotonic() - t0))
            self.compose("up", "-d", "--no-deps", name)
            started[name] = time.monotonic() - t0
            self._checks[self.container(name)] = time.monotonic()
            self.log(f"  {name} started {started[name]:.0f} s in")
        return started

    def wait_for(self, service: str, condition: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect(service)["State"]
            if condition == "service_started" and state["Running"]:
                return
            if condition == "service_healthy" and self.health(service) == "healthy":
                return
            if condition == "service_completed_successfully" and not state["Running"] and state["Status"] == "exited":
                if state["ExitCode"] != 0:
                    raise RuntimeError(f"{service} exited with {state['ExitCode']}:\n{self.logs(service)}")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} not {condition} in time (state {state['Status']}, "
                                   f"health {self.health(service)}):\n{self.logs(service)}")
            time.sleep(0.5)

    def _run_healthchecks(self) -> None:
        """Docker's engine runs each container's healthcheck every `interval`; podman 4.3 needs
        systemd's timers for that, which this machine has not: this thread is the timer."""
        intervals: dict[str, float] = {}
        while not self._stop.wait(0.5):
            for container, due in list(self._checks.items()):
                if time.monotonic() < due:
                    continue
                try:
                    if container not in intervals:
                        found = json.loads(podman("inspect", container, check=False).stdout or "[]")
                        check = found and (found[0].get("Config") or {}).get("Healthcheck")
                        if not check:
                            del self._checks[container]
                            continue
                        intervals[container] = _seconds(check.get("Interval"), 30.0)
                    podman("healthcheck", "run", container, check=False, timeout=60)
                except (subprocess.SubprocessError, ValueError) as exc:  # a hung check: the next one may answer
                    self.log(f"  healthcheck of {container}: {exc}")
                self._checks[container] = time.monotonic() + intervals.get(container, 10.0)

    def logs(self, service: str, tail: int = 40) -> str:
        result = podman("logs", "--tail", str(tail), self.container(service), check=False)
        return (result.stdout + result.stderr).decode(errors="replace")

    def down(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join(timeout=60)
        self.compose("down", "--volumes", "--timeout", "20", timeout=600)

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project is still on the machine: containers, volumes, pods, networks."""
        label = f"label=io.podman.compose.project={self.project}"
        names = lambda *args: [line for line in podman(*args).stdout.decode().split() if line]  # noqa: E731
        return {
            "containers": names("ps", "-a", "--filter", label, "--format", "{{.Names}}"),
            "volumes": names("volume", "ls", "--filter", label, "--format", "{{.Name}}"),
            "pods": [p for p in names("pod", "ps", "--format", "{{.Name}}") if self.project in p],
            "networks": [n for n in names("network", "ls", "--format", "{{.Name}}") if self.project in n],
        }

    def force_remove(self) -> None:
        """After a failure: whatever the project left, gone (containers, volumes, the namespace)."""
        self._stop.set()
        left = self.leftovers()
        if left["containers"]:
            podman("rm", "-f", "-t", "5", *left["containers"], check=False, timeout=120)
        if left["volumes"]:
            podman("volume", "rm", "-f", *left["volumes"], check=False)
        for pod in left["pods"]:
            podman("pod", "rm", "-f", pod, check=False)
        for network in left["networks"]:
            podman("network", "rm", "-f", network, check=False)
        self.remove_namespace()


def new_project() -> str:
    return f"driftline-{uuid.uuid4().hex[:8]}"
