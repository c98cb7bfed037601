"""`driftline demo`: the whole loop on one machine, from nothing to a report and back to nothing.

    demo(load("elec2"), report_dir=Path("reports/demo"))

Starts the local Kafka and Redis (unless they already run), starts the five services with the
chosen model and features, replays the dataset, writes the report, and stops everything it
started, also on Ctrl-C, SIGTERM or failure. Labels come 100 events late by default (delayed
feedback, as in production; `--label-delay 0` shows the last-label feature at its best). Each demo runs in a namespace of its own
(`demo-<id>`: its own topics, consumer groups and Redis keys), so a second demo starts from a
fresh model instead of the first one's; the namespace is deleted at the end unless `keep`.
It never stops a Kafka, Redis or service that it did not start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..infra import stack
from ..serve import (SERVICES as FIVE, SINKS, Supervisor, sigterm_as_interrupt, start_service, stop_services,
                     wait_healthy)
from ..shared.kafka import admin, ensure_topics
from ..shared.settings import Settings, ensure_local_secrets, get_settings, redact_url, settings_env
from ..shared.topics import Topics
from .datasets import REGRESSION, Dataset

REGRESSION_MODEL = "preprocessing.StandardScaler() | linear_model.LinearRegression()"


def _regressor(spec: str) -> bool:
    from ..learner.labels import is_regressor
    from ..learner.spec import parse_model

    return is_regressor(parse_model(spec))
from .publish import replay

SERVICES = FIVE + SINKS  # the demo also fills the offline store


class DemoError(RuntimeError):
    """The demo could not run; the message says what to fix."""


def demo_settings(base: Settings, model: str | None, features: str | None, run_id: str) -> Settings:
    """The demo's own namespace, model and features on the operator's hosts and ports."""
    namespace = f"{base.namespace}.demo-{run_id}" if base.namespace else f"demo-{run_id}"
    return base.model_copy(update={
        "namespace": namespace,
        "learner": base.learner.model_copy(update={"model": model or base.learner.model}),
        "features": base.features.model_copy(update={"set": features or base.features.set}),
    })


def demo(
    dataset: Dataset,
    *,
    limit: int | None = None,
    rate: float = 0.0,
    label_delay: int = 100,
    model: str | None = None,
    features: str | None = None,
    report_dir: Path = Path("reports/demo"),
    stall_timeout_s: float = 60.0,
    keep: bool = False,
    console=None,
) -> dict[str, Any]:
    from rich.console import Console

    console = console or Console(stderr=True)
    base = ensure_local_secrets(get_settings())  # zero-config: a random key and token, once per home
    if model is None and dataset.name in REGRESSION and not _regressor(base.learner.model):
        model = REGRESSION_MODEL  # a regression stream needs a regressor; the configured model is a classifier
    if features is None and dataset.features is not None:
        features = dataset.features  # payments: its windowed aggregates are what the stream is about
    settings = demo_settings(base, model, features, uuid.uuid4().hex[:6])
    t0 = time.monotonic()
    already = {c.name for c in stack.components(base) if c.running()}
    sigterm_as_interrupt()
    started_services = False
    procs: dict[str, subprocess.Popen] = {}
    watching: threading.Event | None = None
    try:
        console.print(f"[bold]driftline demo[/]: {dataset.name}, model {settings.learner.model!r}, "
                      f"features {settings.features.set!r}, label delay {label_delay}")
        console.print(f"Kafka {base.kafka_bootstrap} and Redis {redact_url(base.redis_url)} ...")
        stack.up(base, create_topics=False)
        ensure_topics(settings)
        _check_ports_free(settings)
        console.print(f"starting {', '.join(SERVICES)} (namespace {settings.namespace}; logs in {base.home / 'logs'})")
        env = settings_env(settings)
        started_services = True
        for name in SERVICES:
            procs[name] = start_service(name, env=env)
        try:
            wait_healthy(SERVICES, timeout=180, procs=procs)
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(f"{exc}\n{_log_tail(base, exc)}") from None
        console.print(f"all five services and the offline sink are up after {time.monotonic() - t0:.1f} s; replaying")
        # A service that exits or stays unhealthy is restarted while the replay runs.
        supervisor = Supervisor(procs, start=lambda name: start_service(name, env=env),
                                url_of=lambda name: f"http://{settings.host}:{settings.port_of(name)}",
                                say=console.print)
        watching = threading.Event()
        watcher = threading.Thread(target=_supervise, args=(supervisor, watching, procs), daemon=True)
        watcher.start()
        report = replay(settings, dataset, limit=limit, rate=rate, label_delay=label_delay,
                        model=settings.learner.model, features=settings.features.set, report_dir=report_dir,
                        stall_timeout_s=stall_timeout_s, console=console)
        console.print(f"demo done in {time.monotonic() - t0:.1f} s")
        return report
    finally:
        if watching is not None:
            watching.set()
            watcher.join(10)
        t_stop = time.monotonic()
        if started_services:
            _stop_all(procs)
        t_services = time.monotonic()
        if not keep and stack.Kafka(base).ready():
            _drop_namespace(settings)
        t_drop = time.monotonic()
        for component in reversed(stack.components(base)):
            if component.name not in already:
                component.stop()
        console.print(f"stopped what the demo started (services {t_services - t_stop:.1f} s, namespace "
                      f"{t_drop - t_services:.1f} s, infra {time.monotonic() - t_drop:.1f} s)")


def _supervise(supervisor: Supervisor, stop: threading.Event, procs: dict[str, subprocess.Popen]) -> None:
    try:
        while not stop.wait(1.0):
            if supervisor.check():
                procs.update(supervisor.procs)  # _stop_all stops the restarted ones
    finally:
        supervisor.close()


def _stop_all(procs: dict[str, subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM every service at once (each checkpoints and commits on the way out), SIGKILL what
    is still there after `timeout`; one slow service does not hold up the others' shutdown."""
    for proc in procs.values():
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    stop_services(SERVICES, timeout=1.0)  # forget their pid files (nothing is left to stop)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_service gives each its own session
    except ProcessLookupError:
        pass


def _check_ports_free(settings: Settings) -> None:
    for name in SERVICES:
        port = settings.port_of(name)
        if stack.port_open(settings.host, port):
            raise DemoError(f"{settings.host}:{port} ({name}'s port) is already taken: is `driftline serve` "
                            f"running? Stop it, or choose other ports (DRIFTLINE_PORTS__{name.upper()}=...)")


def _log_tail(base: Settings, exc: Exception, lines: int = 15) -> str:
    for name in SERVICES:
        if name in str(exc):
            path = base.home / "logs" / f"{name}.log"
            try:
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            except OSError:
                return ""
    return ""


def _drop_namespace(settings: Settings) -> None:
    """Delete the demo's topics, consumer groups and Redis keys (only its own namespace, only if reachable)."""
    from ..shared import redis_clients

    try:
        client = redis_clients.connect(settings.redis_url, socket_timeout=2)
        batch = []
        for key in client.scan_iter(match=f"dl:{settings.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
        client.close()
    except Exception:
        pass
    try:
        client = admin(settings)
        topics = Topics(settings.namespace)
        # Every topic of the namespace the broker has, the features service's internal ones too
        # (`features.by.<key>.<source>`, which exist only with key fields), then its consumer groups.
        owned = [t for t in client.list_topics(timeout=10).topics if topics.owns(t)]
        futures = dict(client.delete_topics(owned, operation_timeout=10)) if owned else {}
        groups = [g.group_id for g in client.list_consumer_groups().result(timeout=10).valid
                  if topics.owns_group(g.group_id)]
        if groups:
            futures.update(client.delete_consumer_groups(groups, request_timeout=10))
        for future in futures.values():
            try:
                future.result(timeout=15)
            except Exception:
                pass
    except Exception:
        pass
