"""CPU per request of single ASGI calls in-process (no sockets): what each serving-path change saves.
Run: .venv/bin/python services/bench/probes/asgi_micro.py"""
import asyncio, time
from fastapi import FastAPI
from starlette.middleware.base import BaseHTTPMiddleware

from _probes import asgi_request

async def measure(app, path, n=3000):
    async with app.router.lifespan_context(app):
        for _ in range(200):
            await asgi_request(app, path)
        t = time.process_time()
        for _ in range(n):
            await asgi_request(app, path)
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
