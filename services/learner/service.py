"""The learner's HTTP app: GET /health, /metrics, /v1/models; admin rollback and promote.

    driftline serve learner          # port settings.ports.learner

The admin routes are the prediction service's, through the same `shared.swaps` path: the registry
role changes, `model.swaps` says so, and the active learner (and every prediction replica)
follows. Routes only translate; the worker and `shared.swaps` do the work.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Body, FastAPI, Header, HTTPException

from ..shared.registry import TamperedArtifact, UnknownVersion
from ..shared.runtime import configure_logging, run_app, service_app
from ..shared.settings import Settings
from ..shared.swaps import make_champion, publish_swap, rollback_target
from .worker import SERVICE, LearnerWorker
from .spec import parse_model


def check_admin(settings: Settings, authorization: str | None) -> None:
    """403 when no admin token is configured, 401 without the right `Bearer <token>`."""
    if settings.admin_token is None:
        raise HTTPException(403, "admin routes are closed: no DRIFTLINE_ADMIN_TOKEN is configured")
    expected = f"Bearer {settings.admin_token.get_secret_value()}".encode()
    if not authorization or not hmac.compare_digest(authorization.encode(), expected):
        raise HTTPException(401, "missing or wrong 'Authorization: Bearer <admin token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings, worker: LearnerWorker | None = None) -> FastAPI:
    worker = worker or LearnerWorker(settings)
    app = service_app(SERVICE, worker=worker, title="driftline learner")
    registry = worker.registry

    @app.get("/v1/models", tags=["models"], summary="Champion, challenger, every version and its lineage")
    def models() -> dict[str, Any]:
        return {"model": worker.name, "champion": registry.champion(), "challenger": registry.challenger(),
                "versions": registry.versions(), "live": worker.status()}

    def swap(version: int, reason: str) -> dict[str, Any]:
        try:
            from_version = make_champion(registry, version)
        except UnknownVersion:
            raise HTTPException(404, f"model {worker.name} has no version {version}") from None
        except TamperedArtifact:
            raise HTTPException(409, f"version {version}'s artifact signature does not match; refused") from None
        publish_swap(worker.producer, worker.topics, model=worker.name, from_version=from_version, to_version=version,
                     reason=reason, position=worker.position, service=SERVICE)
        return {"model": worker.name, "from_version": from_version, "to_version": version, "reason": reason,
                "position": worker.position}

    @app.post("/v1/models/rollback", tags=["models"], summary="Make an earlier version the champion again")
    def rollback(body: dict | None = Body(None), authorization: str | None = Header(None)) -> dict[str, Any]:
        check_admin(settings, authorization)
        version = (body or {}).get("version") or rollback_target(registry)
        if not isinstance(version, int):
            raise HTTPException(409, "nothing to roll back to: name a version in {'version': N}")
        return swap(version, "rollback")

    @app.post("/v1/models/{version}/promote", tags=["models"], summary="Make a version the champion")
    def promote(version: int, authorization: str | None = Header(None)) -> dict[str, Any]:
        check_admin(settings, authorization)
        return swap(version, "manual")

    return app


def serve(settings: Settings) -> None:
    configure_logging(settings)
    parse_model(settings.learner.model)  # a bad spec stops the service here, with its clear error
    run_app(create_app(settings), settings.ports.learner, settings)
