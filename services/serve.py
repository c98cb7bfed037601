"""`driftline serve SERVICE|all`: run one service in this process, or all five as child processes.

With `all`, each service runs as its own process (as it would in production) and its pid is
written under `<home>/run/`; Ctrl-C or SIGTERM stops them all. `driftline infra down` also stops
services that `serve all` left behind. `serve all` (and `driftline demo`) supervise them: a
service whose process exits, or whose /health answers 503 (or nothing) for UNHEALTHY_S, is
restarted with backoff (1 s doubling to 60 s; back to 1 s after 5 minutes up), and the log says so.
"""

from __future__ import annotations

import http.client
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import urlsplit

import typer
from rich.console import Console

from .shared.settings import InsecureSettings, Settings, check_secrets, get_settings, settings_env

SERVICES = ("ingestion", "features", "learner", "drift", "prediction")
SINKS = ("offline",)  # beside the five: the offline store's sink reads outcomes, off the hot path
# At the default CPU priority: the learner (in stream order, on one core: the pipeline's pace behind
# a backlog) and the prediction service (HTTP answers); the others run at `service_nice`.
CRITICAL_PATH = ("learner", "prediction")
console = Console(stderr=True)


class ServiceName(str, Enum):
    ingestion = "ingestion"
    features = "features"
    learner = "learner"
    drift = "drift"
    prediction = "prediction"
    offline = "offline"
    all = "all"


def serve(service: ServiceName = typer.Argument(..., help="a service, or 'all'")) -> None:
    """Run a service (or all: the five and the offline sink) on the host and ports the settings name."""
    settings = get_settings()
    try:
        check_secrets(settings)  # before anything listens: a guessable key is remote code execution
    except InsecureSettings as exc:
        console.print(f"[red]driftline serve {service.value}: refusing to start:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    if service is ServiceName.all:
        serve_all()
        return
    from .shared.process import configure_logging, lower_priority

    configure_logging(settings)
    if service.value not in CRITICAL_PATH:
        lower_priority(settings.service_nice)
    module = importlib.import_module(f"driftline.{service.value}.{'sink' if service.value in SINKS else 'service'}")
    module.serve(settings)


def pid_file(service: str, settings: Settings | None = None):
    settings = settings or get_settings()
    run_dir = settings.home / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir / f"{service}.pid"


def start_service(service: str, env: dict[str, str] | None = None, log_path=None,
                  settings: Settings | None = None) -> subprocess.Popen:
    """Start `driftline serve SERVICE` as a child process (logs to a file under <home>/logs).
    With `settings`, the child runs with exactly those (its DRIFTLINE_* environment)."""
    if settings is not None:
        env = {**settings_env(settings), **(env or {})}
    settings = settings or get_settings()
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(log_path or logs / f"{service}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "driftline.cli", "serve", service],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    pid_file(service, settings).write_text(str(proc.pid))
    return proc


def wait_healthy(services: tuple[str, ...] | list[str], timeout: float = 60.0, procs: dict | None = None,
                 settings: Settings | None = None) -> None:
    """Wait until every service answers GET /health with 200 (a child that exits fails at once)."""
    import httpx

    settings = settings or get_settings()
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        name = pending[0]
        if procs and procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited with {procs[name].returncode}; see {settings.home}/logs/{name}.log")
        try:
            r = httpx.get(f"http://{settings.host}:{settings.port_of(name)}/health", timeout=1.0)
            if r.status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not become healthy in {timeout:.0f}s; see {settings.home}/logs/{name}.log")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a child started by `start_service` (its whole session): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_services(services=SERVICES, timeout: float = 15.0, settings: Settings | None = None) -> list[str]:
    """Stop services started by `serve all` under this home: SIGTERM to all at once, then SIGKILL
    to those still running after `timeout`. Returns those stopped.

    All at once, and a dead child that is not reaped yet (a zombie of `serve all` itself) counts
    as stopped: one by one, each zombie held the full timeout, and `serve all` took 90 s to stop."""
    from .infra.stack import pid_alive

    pids: dict[str, int] = {}
    found = []
    for name in services:
        path = pid_file(name, settings)
        if not path.exists():
            continue
        found.append(name)
        try:
            pid = int(path.read_text())
            os.kill(pid, signal.SIGTERM)
            pids[name] = pid
        except (ProcessLookupError, ValueError):
            pass
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids.values():
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return found


UNHEALTHY_S = 30.0  # /health 503 (or no answer) this long: restart
STARTUP_GRACE_S = 120.0  # a starting service may take this long to answer /health at all
BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_S = 1.0, 60.0, 300.0


@dataclass
class Watched:
    name: str
    proc: subprocess.Popen
    started: float
    healthy_since: float | None = None  # since when /health says 200 without a break
    ever_healthy: bool = False  # since the last (re)start
    bad_since: float | None = None
    restarts: int = 0
    backoff: float = BACKOFF_FIRST_S
    restart_at: float | None = None
    why: str = ""
    history: list[str] = field(default_factory=list)


class Supervisor:
    """Keeps child services running: `check()` once a second restarts a service whose process
    exited, or whose /health answered 503 or nothing for `unhealthy_s` (after `grace_s` to start),
    after a backoff that doubles up to BACKOFF_MAX_S and resets once it stayed up STABLE_S.

        sup = Supervisor({"drift": start_service("drift")}, start=start_service, url_of=...)
        while True: sup.check(); time.sleep(1)
    """

    def __init__(self, procs: dict[str, subprocess.Popen], start: Callable[[str], subprocess.Popen],
                 url_of: Callable[[str], str], say: Callable[[str], None] = console.print,
                 unhealthy_s: float = UNHEALTHY_S, grace_s: float = STARTUP_GRACE_S) -> None:
        now = time.monotonic()
        self.watched = {name: Watched(name, proc, now) for name, proc in procs.items()}
        self.start, self.url_of, self.say = start, url_of, say
        self.unhealthy_s, self.grace_s = unhealthy_s, grace_s
        self._connections: dict[str, http.client.HTTPConnection] = {}

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {name: w.proc for name, w in self.watched.items()}

    def health(self, name: str) -> int | None:
        """GET /health's status, None for no answer. One kept-alive connection per service, with
        the standard library's client: the supervisor runs beside the services it watches, and
        httpx's machinery cost it ~1 ms of CPU a check (~20-30 µs per event of a replay)."""
        url = urlsplit(self.url_of(name))
        for attempt in (1, 2):  # a kept-alive connection the service closed: one retry on a new one
            conn = self._connections.get(name)
            if conn is None:
                conn = self._connections[name] = http.client.HTTPConnection(url.hostname, url.port, timeout=2.0)
            try:
                conn.request("GET", (url.path.rstrip("/") or "") + "/health")
                response = conn.getresponse()
                response.read()
                return response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                self._connections.pop(name, None)
                if attempt == 2:
                    return None
        return None

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()

    def check(self) -> list[str]:
        """One pass over the services; returns those restarted now."""
        restarted = []
        for w in self.watched.values():
            now = time.monotonic()
            if w.restart_at is not None:
                if now >= w.restart_at:
                    self._restart(w)
                    restarted.append(w.name)
                continue
            code = w.proc.poll()
            if code is not None:
                self._schedule(w, f"its process exited with {code}")
                continue
            status = self.health(w.name)
            now = time.monotonic()
            if status == 200:
                w.ever_healthy = True
                w.healthy_since = w.healthy_since or now
                w.bad_since = None
                if now - w.healthy_since >= STABLE_S:
                    w.backoff = BACKOFF_FIRST_S
                continue
            w.healthy_since = None
            w.bad_since = w.bad_since or now
            # a starting process has grace_s to answer 200 once; after that, unhealthy_s of 503s
            deadline = w.bad_since + self.unhealthy_s if w.ever_healthy else w.started + self.grace_s
            if now >= deadline:
                what = "answered 503" if status == 503 else "did not answer"
                self._schedule(w, f"its /health {what} for {now - w.bad_since:.0f} s")
                stop_process(w.proc, timeout=10)
        return restarted

    def _schedule(self, w: Watched, why: str) -> None:
        w.restart_at = time.monotonic() + w.backoff
        w.why = why
        self.say(f"[yellow]{w.name}: {why}; restarting it in {w.backoff:.0f} s[/]")

    def _restart(self, w: Watched) -> None:
        w.proc = self.start(w.name)
        w.restarts += 1
        w.history.append(w.why)
        w.started, w.restart_at, w.bad_since, w.healthy_since = time.monotonic(), None, None, None
        w.ever_healthy = False
        w.backoff = min(BACKOFF_MAX_S, w.backoff * 2)
        self.say(f"[yellow]{w.name}: restarted (restart {w.restarts}, pid {w.proc.pid})[/]")


def sigterm_as_interrupt() -> None:
    """SIGTERM takes the same clean way out as Ctrl-C (a KeyboardInterrupt in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        def raise_interrupt(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, raise_interrupt)


def serve_all() -> None:
    settings = get_settings()
    # From the first moment: with the default action, a SIGTERM that came while the services were
    # starting (a service manager, a bench giving up) ended this process alone and left its
    # services running, orphaned.
    sigterm_as_interrupt()
    supervisor = None
    try:
        procs = {name: start_service(name) for name in SERVICES + SINKS}
        supervisor = Supervisor(procs, start=start_service,
                                url_of=lambda name: f"http://{settings.host}:{settings.port_of(name)}")
        wait_healthy(SERVICES + SINKS, procs=procs)
        console.print("[green]all five services and the offline store's sink are up[/]; supervising them; "
                      "Ctrl-C stops them")
        while True:
            supervisor.check()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            supervisor.close()
        stop_services(SERVICES + SINKS)  # by their pid files: those started so far, whatever came first
