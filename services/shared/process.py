"""A service's process: uvicorn on the settings' host and port, the log format, its CPU priority.

    configure_logging(settings)
    lower_priority(settings.service_nice)      # a service off the critical path (serve.py)
    run_app(app, settings.ports.drift, settings)
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from .settings import Settings, check_secrets


def run_app(app: FastAPI, port: int, settings: Settings, workers: int = 1, factory: str | None = None) -> None:
    """Serve `app` with uvicorn on the settings' host (`factory` import string when workers > 1).
    Never with a weak model key or token (`driftline serve` says so first; this is the last line)."""
    import uvicorn

    check_secrets(settings)
    # No `server: uvicorn` header: what the server runs is nobody's business (and one header less
    # to write per answer).
    options = {"host": settings.host, "port": port, "log_level": settings.log_level.lower(), "access_log": False,
               "server_header": False}
    if workers > 1 and factory:
        uvicorn.run(factory, factory=True, workers=workers, **options)
    else:
        uvicorn.run(app, **options)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def lower_priority(nice: int) -> int:
    """Run this process at `nice` (Unix: 0 is the default, 19 the lowest), before it starts its
    threads (they inherit it). Linux gives each session its own scheduling group (autogroup), in
    which a process's nice counts only against the group's other processes: a service that
    `serve all` started in a session of its own (the session's leader) sets its group's nice too.
    A terminal's session is left alone. Returns the nice now in force; never raises.

    Why: behind a backlog on a shared host every service has work, and the scheduler shared the
    cores out evenly per group: the learner, the one stage that cannot use more than one core,
    got ~0.45 of one while ingestion and features ran ahead of it (docs/operations.md).
    """
    log = logging.getLogger(__name__)
    if nice <= 0 or not hasattr(os, "nice"):
        return 0
    try:
        now = os.nice(max(0, nice - os.nice(0)))
    except OSError as exc:
        log.warning("could not lower this service's CPU priority to nice %d: %s", nice, exc)
        return os.nice(0)
    if os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup", "w") as group:
                group.write(str(nice))
        except OSError:  # not Linux, no autogroup, or not allowed: the process's own nice stands
            log.debug("no autogroup nice", exc_info=True)
    return now
