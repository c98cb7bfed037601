"""The prediction app as `service_app` builds it (FastAPI's own OpenTelemetry off while none is
configured, shared/app.py native_telemetry) against the same app with FastAPI's default, in one
process on a bench stack's Redis: rounds of 16 concurrent /v1/predict and /health ASGI calls (no
sockets), alternating; CPU µs per request. Run: .venv/bin/python fastapi_telemetry_ab.py [rounds]

2026-12-07 (FastAPI 0.165, a slow and noisy hour of the host), 20 rounds each: /v1/predict 224.4 ->
203.1 µs at the median (paired difference 17.7), /health 109.0 -> 99.7 (11.4)."""
import asyncio, json, statistics, tempfile, time, sys
from pathlib import Path
import redis
from driftline.bench import predict as bp
from driftline.infra import stack
from driftline.shared import app as shared_app
from driftline.shared.keys import Keys
from driftline.shared.registry import ModelRegistry
from driftline.shared.settings import Ports, PredictionSettings, Settings, ensure_local_secrets
home = Path(tempfile.mkdtemp(prefix="fastapi-telemetry-ab-"))
infra = Settings()
settings = ensure_local_secrets(Settings(kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
    redis_url=f"redis://127.0.0.1:{stack.free_port()}/0", namespace="bench", home=home, cache_dir=infra.cache_dir,
    ports=Ports(**{n: stack.free_port() for n in Ports.model_fields}), prediction=PredictionSettings(workers=1), log_level="WARNING"))
stack.up(settings)
def scope(path, method, body_len):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", str(body_len).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
async def call(app, path, method, body):
    sent = False
    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    status = []
    async def send(m):
        if m["type"] == "http.response.start": status.append(m["status"])
    await app(scope(path, method, len(body)), receive, send)
    assert status == [200], status
try:
    client = redis.Redis.from_url(settings.redis_url)
    registry = ModelRegistry(client, Keys(settings.namespace), settings.learner.model_name, settings.model_key.get_secret_value().encode())
    registry.set_role("champion", registry.register(bp.toy_model(seed=1), spec="bench", reason="initial"))
    bodies = [json.dumps(b).encode() for b in bp.seed_entities(settings, client)]
    from driftline.prediction.app import create_app
    new = create_app(settings)
    real = shared_app.native_telemetry
    shared_app.native_telemetry = lambda: {}
    old = create_app(settings)
    shared_app.native_telemetry = real
    print("telemetry enabled? new", new._native_telemetry.enabled(), new._telemetry["tracing"], "old", old._telemetry["tracing"])
    async def run_round(app, path, method, n=40):
        t = time.process_time()
        for k in range(n):
            await asyncio.gather(*(call(app, path, method, bodies[(k * 16 + j) % len(bodies)] if method == "POST" else b"") for j in range(16)))
        return (time.process_time() - t) / (n * 16) * 1e6
    async def main():
        res = {("new", "p"): [], ("old", "p"): [], ("new", "h"): [], ("old", "h"): []}
        async with new.router.lifespan_context(new), old.router.lifespan_context(old):
            await asyncio.sleep(3)
            for app in (new, old):
                await run_round(app, "/v1/predict", "POST", 20); await run_round(app, "/health", "GET", 20)
            for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
                order = [("new", new), ("old", old)] if r % 2 == 0 else [("old", old), ("new", new)]
                for name, app in order:
                    res[(name, "p")].append(await run_round(app, "/v1/predict", "POST"))
                    res[(name, "h")].append(await run_round(app, "/health", "GET"))
        for k, v in res.items():
            print(k, "median", round(statistics.median(v), 1), "min", round(min(v), 1))
        print("paired predict diffs (old-new) median", round(statistics.median(o - n for o, n in zip(res[("old","p")], res[("new","p")])), 1),
              "health", round(statistics.median(o - n for o, n in zip(res[("old","h")], res[("new","h")])), 1))
    asyncio.run(main())
finally:
    stack.down(settings)
