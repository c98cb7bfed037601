"""A service's process: uvicorn on the settings' host and port, and the log format.

    configure_logging(settings)
    run_app(app, settings.ports.drift, settings)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from .settings import Settings, check_secrets


def run_app(app: FastAPI, port: int, settings: Settings, workers: int = 1, factory: str | None = None) -> None:
    """Serve `app` with uvicorn on the settings' host (`factory` import string when workers > 1).
    Never with a weak model key or token (`driftline serve` says so first; this is the last line)."""
    import uvicorn

    check_secrets(settings)
    if workers > 1 and factory:
        uvicorn.run(factory, factory=True, host=settings.host, port=port, workers=workers,
                    log_level=settings.log_level.lower(), access_log=False)
    else:
        uvicorn.run(app, host=settings.host, port=port, log_level=settings.log_level.lower(), access_log=False)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
