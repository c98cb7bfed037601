"""CPU per request of single ASGI calls in-process (no sockets): what each serving-path change saves.
Run: .venv/bin/python reports/bench/profiles/asgi_micro.py"""
import asyncio, time
from fastapi import FastAPI
from starlette.middleware.base import BaseHTTPMiddleware

def scope(path, method="GET"):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [(b"host", b"x")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

async def call(app, path):
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(m):
        pass
    await app(scope(path), receive, send)

async def measure(app, path, n=3000):
    async with app.router.lifespan_context(app) if hasattr(app, "router") else _null():
        for _ in range(200):
            await call(app, path)
        t = time.process_time()
        for _ in range(n):
            await call(app, path)
        return (time.process_time() - t) / n * 1e6

def bare(async_route=True, base_mw=False):
    app = FastAPI()
    if async_route:
        @app.get("/health")
        async def h():
            return {"status": "ok"}
    else:
        @app.get("/health")
        def h():
            return {"status": "ok"}
    if base_mw:
        @app.middleware("http")
        async def mw(request, call_next):
            return await call_next(request)
    return app

async def main():
    from driftline.shared.app import service_app
    cases = {"bare FastAPI, async def": bare(),
             "bare, plain def (thread-pool hop)": bare(async_route=False),
             "bare + @app.middleware('http') (BaseHTTPMiddleware)": bare(base_mw=True),
             "service_app /health (this branch)": service_app("micro")}
    for name, app in cases.items():
        print(f"{await measure(app, '/health'):8.1f} us CPU  {name}")

asyncio.run(main())
