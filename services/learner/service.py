"""The learner's HTTP app: GET /health, /metrics, /v1/models; admin rollback and promote.

    driftline serve learner          # port settings.ports.learner

The admin routes are the prediction service's, through the same `shared.swaps` path: the registry
role changes, `model.swaps` says so, and the active learner (and every prediction replica)
follows. Routes only translate; the worker and `shared.swaps` do the work.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Query

from ..shared.admin import AdminAction, admin_action  # the one admin guard of every service, audited
from ..shared.registry import MAX_VERSIONS_LISTED, VERSIONS_LISTED, PrunedArtifact, TamperedArtifact, UnknownVersion
from ..shared.app import service_app
from ..shared.process import configure_logging, run_app
from ..shared.settings import Settings
from ..shared.swaps import make_champion, publish_swap, rollback_target
from .worker import SERVICE, LearnerWorker
from .spec import parse_model


def create_app(settings: Settings, worker: LearnerWorker | None = None) -> FastAPI:
    worker = worker or LearnerWorker(settings)
    app = service_app(SERVICE, worker=worker, title="driftline learner")
    registry = worker.registry

    @app.get("/v1/models", tags=["models"], summary="Champion, challenger, the newest versions and their lineage")
    def models(limit: int = Query(VERSIONS_LISTED, ge=1, le=MAX_VERSIONS_LISTED,
                                  description="how many of the newest versions to list")
               ) -> dict[str, Any]:
        versions, total = registry.listing(limit)
        return {"model": worker.name, "champion": registry.champion(), "challenger": registry.challenger(),
                "versions": versions, "versions_total": total, "live": worker.status()}

    def swap(version: int, reason: str) -> dict[str, Any]:
        try:
            from_version = make_champion(registry, version)
        except PrunedArtifact as exc:
            raise HTTPException(409, f"model {worker.name}: {exc}") from None
        except UnknownVersion:
            raise HTTPException(404, f"model {worker.name} has no version {version}") from None
        except TamperedArtifact:
            raise HTTPException(409, f"version {version}'s artifact signature does not match; refused") from None
        published = publish_swap(worker.producer, worker.topics, model=worker.name, from_version=from_version,
                                 to_version=version, reason=reason, position=worker.position, service=SERVICE)
        return {"model": worker.name, "from_version": from_version, "to_version": version, "reason": reason,
                "position": worker.position, "ts": time.time(), "published": published}

    @app.post("/v1/models/rollback", tags=["models"], summary="Make an earlier version the champion again")
    def rollback(body: dict | None = Body(None),
                 act: AdminAction = admin_action(settings, SERVICE, "rollback")) -> dict[str, Any]:
        version = (body or {}).get("version") or rollback_target(registry)
        act.about(version=version)
        if not isinstance(version, int):
            raise HTTPException(409, "nothing to roll back to: name a version in {'version': N}")
        return act.answered(swap(version, "rollback"))

    @app.post("/v1/models/{version}/promote", tags=["models"], summary="Make a version the champion")
    def promote(version: int, act: AdminAction = admin_action(settings, SERVICE, "promote")) -> dict[str, Any]:
        return act.about(version=version).answered(swap(version, "manual"))

    return app


def serve(settings: Settings) -> None:
    configure_logging(settings)
    parse_model(settings.learner.model)  # a bad spec stops the service here, with its clear error
    run_app(create_app(settings), settings.ports.learner, settings)
