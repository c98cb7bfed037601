"""A service's FastAPI app (shared/app.py): FastAPI's own OpenTelemetry is off unless OpenTelemetry
was configured before the app was built."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from fastapi.testclient import TestClient

from driftline.shared.app import service_app


def test_an_app_built_without_opentelemetry_configured_asks_no_provider_per_request(monkeypatch):
    from opentelemetry import _logs, metrics, trace

    app = service_app("drift")
    asked = []
    for module, name in ((trace, "get_tracer_provider"), (metrics, "get_meter_provider"),
                         (_logs, "get_logger_provider")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda real=real, name=name: asked.append(name) or real())
    with TestClient(app) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
    # FastAPI's default asks all three on every request (when it has native telemetry at all)
    assert asked == []


def test_an_app_built_after_opentelemetry_was_configured_keeps_fastapis_telemetry():
    pytest.importorskip("fastapi.telemetry")
    # In a process of its own: a global provider, once set, stays for the process.
    code = textwrap.dedent("""
        from fastapi.testclient import TestClient
        from opentelemetry import trace

        asked = []

        class Provider(trace.TracerProvider):  # an SDK's, as far as FastAPI can tell
            def get_tracer(self, *args, **kwargs):
                asked.append(args[0] if args else kwargs.get("instrumenting_module_name"))
                return trace.NoOpTracer()

        trace.set_tracer_provider(Provider())
        from driftline.shared.app import service_app

        with TestClient(service_app("drift")) as client:
            assert client.get("/health").status_code == 200
        assert asked, "FastAPI's telemetry did not ask the configured provider for a tracer"
        print("asked", asked)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "asked" in done.stdout
