"""The ceiling for `driftline bench predict`: a bare FastAPI app with one `/health` route, served by
uvicorn with the same options as a driftline service (one worker, no access log, FastAPI's own
OpenTelemetry as `service_app` sets it). It is what this machine's Python, uvicorn and FastAPI can
do at all; the service's own `/health` is compared with it.

    $ python -m driftline.bench.bare 18080
"""

from __future__ import annotations

import sys

from fastapi import FastAPI

from ..shared.app import native_telemetry

app = FastAPI(**native_telemetry())


@app.get("/health")
async def health() -> dict[str, str]:
    return {"service": "bare", "status": "ok"}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
