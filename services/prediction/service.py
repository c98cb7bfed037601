"""`driftline serve prediction`: the prediction API on `settings.ports.prediction`.

With `prediction.workers` > 1, uvicorn runs that many worker processes from the factory
`driftline.prediction.app:create_app`; each worker has its own model follower (its own consumer
group), so a swap reaches every one of them. Prometheus metrics of several processes need
prometheus_client's multiprocess mode: this sets `PROMETHEUS_MULTIPROC_DIR` (a fresh folder under
`<home>/prometheus/`) before the workers start, and `/metrics` of any worker then reports the sum
over all of them (gauges per worker, with a `pid` label). Limit: files of a worker that died stay in
the folder until the next start.

    $ DRIFTLINE_PREDICTION__WORKERS=2 driftline serve prediction
"""

from __future__ import annotations

import os
import shutil

from ..shared.process import run_app
from ..shared.settings import Settings, settings_env

FACTORY = "driftline.prediction.app:create_app"


def serve(settings: Settings) -> None:
    port = settings.ports.prediction
    workers = max(1, settings.prediction.workers)
    if workers == 1:
        from .app import create_app

        run_app(create_app(settings), port, settings)
        return
    # The workers are fresh interpreters: they read their settings (and the metrics folder) from
    # the environment, so hand them exactly what this process was given.
    metrics_dir = (settings.home / "prometheus" / f"prediction-{port}").resolve()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(settings_env(settings))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    run_app(None, port, settings, workers=workers, factory=FACTORY)
