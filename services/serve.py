"""`driftline serve SERVICE|all`: run one service in this process, or all five as child processes.

With `all`, each service runs as its own process (as it would in production) and its pid is
written under `<home>/run/`; Ctrl-C or SIGTERM stops them all. `driftline infra down` also stops
services that `serve all` left behind.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from enum import Enum

import typer
from rich.console import Console

from .shared.settings import InsecureSettings, Settings, check_model_key, get_settings, settings_env

SERVICES = ("ingestion", "features", "learner", "drift", "prediction")
SINKS = ("offline",)  # beside the five: the offline store's sink reads outcomes, off the hot path
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
    """Run a service (or all five) on the host and ports the settings name."""
    settings = get_settings()
    try:
        check_model_key(settings)  # before anything listens: a guessable key is remote code execution
    except InsecureSettings as exc:
        console.print(f"[red]driftline serve {service.value}: refusing to start:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    if service is ServiceName.all:
        serve_all()
        return
    from .shared.runtime import configure_logging

    configure_logging(settings)
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
    """Stop services started by `serve all` under this home (SIGTERM, then SIGKILL). Returns those stopped."""
    stopped = []
    for name in services:
        path = pid_file(name, settings)
        if not path.exists():
            continue
        try:
            pid = int(path.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
        path.unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def serve_all() -> None:
    procs = {name: start_service(name) for name in SERVICES + SINKS}
    try:
        wait_healthy(SERVICES + SINKS, procs=procs)
        console.print("[green]all five services and the offline store's sink are up[/]; Ctrl-C stops them")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        dead = [n for n, p in procs.items() if p.poll() is not None]
        console.print(f"[red]{', '.join(dead)} exited[/]; stopping the others")
    except KeyboardInterrupt:
        pass
    finally:
        stop_services(SERVICES + SINKS)
