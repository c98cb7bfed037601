"""A service's HTTP app: GET /health, GET /ready, GET /metrics and per-route HTTP metrics, and
the start and stop of its stream worker (loop.py) with the app.

    app = service_app("drift", worker=worker)    # then process.run_app(app, port, settings)
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.routing import request_response as starlette_request_response

from . import metrics
from .bodylimit import BodyLimit
from .deps import DEPS
from .loop import StreamWorker

# Services whose only bodies are admin requests ({"version": 3}, {"reason": "demand"}) take this much.
ADMIN_BODY_BYTES = 64 * 1024


class HttpMetrics:
    """Request count and latency per route template, as pure ASGI middleware: Starlette's
    `BaseHTTPMiddleware` (`@app.middleware("http")`) runs every request through an extra task and
    memory streams, which cost more than a whole fast route. The labelled children are cached."""

    def __init__(self, app, service: str) -> None:
        self.app = app
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def children(self, path: str, method: str, status: int) -> tuple[Any, Any]:
        key = (path, method, status)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (metrics.HTTP_REQUESTS.labels(self.service, path, method, str(status)),
                                           metrics.HTTP_SECONDS.labels(self.service, path))
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router writes the matched route into this same scope dict.
            path = getattr(scope.get("route"), "path", "unmatched")  # the template, never the raw path
            count, seconds = self.children(path, scope["method"], status)
            count.inc()
            seconds.observe(time.perf_counter() - started)


class RequestRoute(APIRoute):
    """A route whose endpoint takes the `Request` alone and returns its `Response` itself (it reads,
    validates and renders on its own): FastAPI's per-request machinery around it (dependency
    solving, the response model's validation and serialisation, the telemetry hooks) is skipped,
    ~30 µs of the ~160 a `/v1/predict` costs in process; the OpenAPI still shows the route's
    `response_model`, `responses` and `openapi_extra`. Exception handlers apply as on any route.

        app.router.add_api_route("/v1/predict", predict, methods=["POST"], route_class_override=RequestRoute)

    An endpoint that asks FastAPI for anything else (a query parameter, a dependency, a body
    model) would get nothing: it is refused when the route is made.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Starlette's own request/response wrapper, not FastAPI's copy of it: FastAPI's opens two
        # AsyncExitStacks per request for dependencies with `yield` and uploaded files, which such an
        # endpoint never has. The app's exception handlers apply the same way in both.
        self.app = starlette_request_response(self.get_route_handler())

    def get_route_handler(self) -> Callable[[Any], Any]:
        d = self.dependant
        extra = [p.name for p in (*d.path_params, *d.query_params, *d.header_params, *d.cookie_params,
                                  *d.body_params)] + [sub.name or "a dependency" for sub in d.dependencies]
        extra += [name for name in (d.response_param_name, d.background_tasks_param_name, d.websocket_param_name,
                                    d.http_connection_param_name, d.security_scopes_param_name) if name]
        if d.request_param_name is None or extra:
            raise TypeError(f"{self.path}: a RequestRoute endpoint takes the Request alone "
                            f"(it declares {extra or 'no Request'})")
        return self.endpoint  # called with the Request; a plain `def` runs in the thread pool


def native_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (the versions that have it) for a driftline app: off unless a
    tracer, meter or logger provider was set before the app is built (as `opentelemetry-instrument`
    does at start), by FastAPI's own test of that. Left on and unconfigured, it asks the three
    global providers on every request and follows each route through its telemetry hooks: in
    process, a plain JSON route took 74 µs a request with it and 63 without. driftline's own
    metrics are Prometheus' (GET /metrics). Keyword arguments for FastAPI(); empty where FastAPI
    has no such thing, or where its test moved (FastAPI's default then holds).

        >>> native_telemetry().get("telemetry", {"tracing": False})["tracing"]
        False
    """
    try:
        from fastapi.telemetry._api import _unconfigured
        from opentelemetry import _logs, metrics, trace
    except ImportError:
        return {}
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider(), _logs.get_logger_provider())
    if not all(_unconfigured(p) for p in providers):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def service_app(
    service: str,
    worker: StreamWorker | None = None,
    title: str | None = None,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
    max_body_bytes: int = ADMIN_BODY_BYTES,
    body_limit_setting: str = "(the admin routes' limit)",
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with /health, /metrics and HTTP metrics; starts and stops the worker.
    Every request body is limited to `max_body_bytes` (413) before routing and before any auth."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if on_start:
            on_start()
        # What is loaded by now (modules, the app, a served model) lives as long as the process:
        # frozen out of the collector's sight, a full collection no longer walks it all while a
        # request waits (bench predict, 16 connections: p99 55-69 ms -> 9 ms, CPU per request -15%).
        gc.freeze()
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.stop()
        if on_stop:
            on_stop()

    # /docs and /redoc load Swagger UI / ReDoc from the installed fastapi-offline package, not a CDN:
    # the docs open on a machine without internet.
    app = FastAPIOffline(title=title or f"driftline {service}", lifespan=lifespan,
                         **{**native_telemetry(), **fastapi_kwargs})
    app.state.worker = worker

    app.add_middleware(HttpMetrics, service=service)

    # Added last, so outermost: a too-large body is refused before routing, auth or parsing.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, service=service, setting=body_limit_setting)

    # `async def`: answered on the event loop, no thread-pool hop, except for a stream worker's
    # details (its Kafka probe may wait up to a second while the broker is away).
    @app.get("/health", tags=["ops"], summary="Is the process alive and its loop running?")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"service": service, "status": "ok"}
        if worker is not None:
            body.update(await run_in_threadpool(worker.health))
            if not worker.alive:
                body["status"] = "worker stopped"
                return JSONResponse(body, status_code=503)
            # Alive but waiting for Redis or Kafka: still 200 (a restart would not bring them
            # back); /ready says 503 meanwhile.
            missing = DEPS.missing()
            if missing:
                body["status"] = "waiting: " + "; ".join(missing)
        return JSONResponse(body)

    if worker is not None:  # the prediction service has its own /ready (model loaded, ...)
        @app.get("/ready", tags=["ops"], summary="Is the loop running and are Redis and Kafka there?")
        def ready() -> JSONResponse:
            worker.probe_kafka()
            reasons = ([] if worker.alive else ["worker stopped"]) + DEPS.missing()
            return JSONResponse({"service": service, "ready": not reasons, "reasons": reasons},
                                status_code=503 if reasons else 200)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)

    return app


def metrics_registry():
    """What /metrics exports: this process's metrics or, when a service runs several worker processes
    (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR set before they start), the
    sum over all of them."""
    import os

    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry
