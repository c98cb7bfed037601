"""The prediction app as `service_app` builds it (FastAPI's own OpenTelemetry off while none is
configured, shared/app.py native_telemetry) against the same app with FastAPI's default, in one
process on a bench stack's Redis: rounds of 16 concurrent /v1/predict and /health ASGI calls (no
sockets), alternating; CPU µs per request. Run: .venv/bin/python fastapi_telemetry_ab.py [rounds]

2026-12-07 (FastAPI 0.165, a slow and noisy hour of the host), 20 rounds each: /v1/predict 224.4 ->
203.1 µs at the median (paired difference 17.7), /health 109.0 -> 99.7 (11.4)."""
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from driftline.bench.predict import bench_settings, seed_champion
from driftline.infra import stack
from driftline.shared import app as shared_app

from _probes import alternate, asgi_request

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
settings = bench_settings(Path(tempfile.mkdtemp(prefix="fastapi-telemetry-ab-")), workers=1)
stack.up(settings)
try:
    _registry, bodies = seed_champion(settings, redis.Redis.from_url(settings.redis_url))
    bodies = [json.dumps(b).encode() for b in bodies]
    from driftline.prediction.app import create_app
    apps = {"telemetry off": create_app(settings)}
    built = shared_app.native_telemetry
    shared_app.native_telemetry = lambda: {}  # FastAPI's default
    apps["FastAPI's default"] = create_app(settings)
    shared_app.native_telemetry = built
    loop = asyncio.new_event_loop()

    async def per_request(app, path: str, method: str, n: int = 40) -> float:
        """CPU µs per request over n rounds of 16 at once."""
        started = time.process_time()
        for k in range(n):
            statuses = await asyncio.gather(*(asgi_request(app, path, method, bodies[(k * 16 + j) % len(bodies)]
                                                           if method == "POST" else b"") for j in range(16)))
            assert set(statuses) == {200}, statuses
        return (time.process_time() - started) / (n * 16) * 1e6

    async def both(app) -> tuple[float, float]:
        return await per_request(app, "/v1/predict", "POST"), await per_request(app, "/health", "GET")

    with contextlib.ExitStack() as lifespans:
        for app in apps.values():
            context = app.router.lifespan_context(app)
            loop.run_until_complete(context.__aenter__())
            lifespans.callback(lambda c=context: loop.run_until_complete(c.__aexit__(None, None, None)))
        loop.run_until_complete(asyncio.sleep(3))
        for app in apps.values():  # warm-up
            loop.run_until_complete(both(app))
        runs = alternate({name: (lambda app=app: loop.run_until_complete(both(app))) for name, app in apps.items()},
                         rounds)
    for name, values in runs.items():
        print(f"{name}: /v1/predict {statistics.median(v[0] for v in values):.1f} µs, "
              f"/health {statistics.median(v[1] for v in values):.1f} µs at the median")
    (off, default) = runs.values()
    print("paired differences at the median: /v1/predict",
          round(statistics.median(d[0] - o[0] for o, d in zip(off, default)), 1),
          "/health", round(statistics.median(d[1] - o[1] for o, d in zip(off, default)), 1))
finally:
    stack.down(settings)
