"""`driftline bench serving`: the HTTP-only learning loop, and how fresh the served model stays.

An application that never touches Kafka: for each row of a data set river ships in its wheel
(Bananas, 5,300 rows, two features), it calls `POST /v1/predict` with an `event_id`, then posts
the row's true label to ingestion's `POST /v1/labels`, row by row. The learner learns each label
from the vector the prediction service kept, and ships its champion to serving every
`learner.update_interval_s` (`driftline.learner.updates`). The served accuracy is compared with
river's own progressive loop (predict, then learn, same rows, same model, delay 0) in the same
process: the aim (issue 17) is within 2 points.

It starts its own Kafka and Redis (free loopback ports, a temporary home) and `driftline serve`
ingestion, learner and prediction (raw features: the vector is the row), and stops them all.
Every 50 rows it reads `/v1/models` and the learner's `/health`: the served model's lag behind
the learner, in examples. It also times one pickle round trip of the final model (what every
model.update costs the learner and each replica; large for ARF).

    result = run(Path("reports/bench"), quick=True)   # `driftline bench serving --quick`
"""

from __future__ import annotations

import os
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from .. import serve
from ..infra import stack
from ..shared.settings import Ports, Settings, ensure_local_secrets

MODELS = {"hoeffding_tree": "tree.HoeffdingTreeClassifier()", "arf": "forest.ARFClassifier(seed=1, n_models=10)"}
AIM_POINTS = 0.02


def bananas(limit: int | None = None) -> Iterator[tuple[dict[str, float], str]]:
    """(fields, label) of river's Bananas, labels as text ("0"/"1") as driftline carries them."""
    from river import datasets

    for i, (x, y) in enumerate(datasets.Bananas()):
        if limit is not None and i >= limit:
            return
        yield {f"x{k}": float(v) for k, v in x.items()}, str(int(y))


def river_loop(spec: str, rows: list[tuple[dict, str]]) -> tuple[float, Any]:
    """River's own progressive validation at delay 0: accuracy, and the final model."""
    from ..learner.spec import parse_model

    model = parse_model(spec)
    correct = 0
    for x, y in rows:
        correct += model.predict_one(x) == y
        model.learn_one(x, y)
    return correct / len(rows), model


def pickle_cost(model: Any) -> dict[str, float]:
    started = time.perf_counter()
    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter()
    pickle.loads(blob)
    loaded = time.perf_counter()
    return {"bytes": len(blob), "dumps_ms": round((dumped - started) * 1000, 2),
            "loads_ms": round((loaded - dumped) * 1000, 2)}


def http_loop(predict_url: str, ingest_url: str, rows: list[tuple[dict, str]],
              run_id: str, sample_every: int = 50, timeout_s: float = 600.0) -> dict[str, Any]:
    """Predict with an event_id, then post the label, row by row; served accuracy and lag samples."""
    correct = 0
    lags: list[int] = []
    started = time.monotonic()
    t0 = time.time()
    with httpx.Client(timeout=10.0) as client:
        for i, (x, y) in enumerate(rows):
            event_id, ts = f"{run_id}-{i}", t0 + i * 1e-3
            answer = client.post(predict_url + "/v1/predict",
                                 json={"entity_id": "bananas", "fields": x, "event_id": event_id, "ts": ts})
            answer.raise_for_status()
            correct += answer.json()["prediction"] == y
            posted = client.post(ingest_url + "/v1/labels", json={"event_id": event_id, "label": y, "ts": ts})
            posted.raise_for_status()
            if i % sample_every == sample_every - 1:
                served = client.get(predict_url + "/v1/models").json().get("serving_examples_seen") or 0
                lags.append(i + 1 - served)
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the HTTP loop took over {timeout_s}s (at row {i})")
    wall = time.monotonic() - started
    return {"rows": len(rows), "served_accuracy": round(correct / len(rows), 4), "wall_s": round(wall, 2),
            "rows_per_s": round(len(rows) / wall, 1),
            "served_lag_examples": {"p50": statistics.median(lags) if lags else None,
                                    "max": max(lags) if lags else None, "samples": len(lags)}}


def learned(learner_url: str) -> int:
    champion = httpx.get(learner_url + "/health", timeout=5).json().get("champion") or {}
    return int(champion.get("examples", 0))


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    limit = 1000 if quick else None
    models = {"hoeffding_tree": MODELS["hoeffding_tree"]} if quick else MODELS
    rows = list(bananas(limit))
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"dataset": "bananas", "rows": len(rows), "label_delay": 0, "models": {},
                              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    infra = Settings()
    for name, spec in models.items():
        home = Path(tempfile.mkdtemp(prefix="driftline-bench-serving-"))
        settings = ensure_local_secrets(Settings(
            kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
            redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
            namespace="bench", home=home, cache_dir=infra.cache_dir,
            ports=Ports(**{n: stack.free_port() for n in Ports.model_fields}), log_level="WARNING",
        ))
        env = {"DRIFTLINE_LEARNER__MODEL": spec, "DRIFTLINE_FEATURES__SET": "raw"}
        procs = {}
        try:
            stack.up(settings)
            for service in ("ingestion", "learner", "prediction"):
                procs[service] = serve.start_service(service, env=env, log_path=home / f"{service}.log",
                                                     settings=settings)
            serve.wait_healthy(list(procs), timeout=120, procs=procs, settings=settings)
            url = {s: f"http://{settings.host}:{settings.port_of(s)}" for s in procs}
            deadline = time.monotonic() + 120
            while httpx.get(url["prediction"] + "/ready", timeout=5).status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("bench serving: the prediction service never became ready")
                time.sleep(0.2)
            reference, final = river_loop(spec, rows)
            loop = http_loop(url["prediction"], url["ingestion"], rows, run_id=name)
            deadline = time.monotonic() + 60
            while learned(url["learner"]) < len(rows) and time.monotonic() < deadline:
                time.sleep(0.2)
            result["models"][name] = {
                "model": spec, **loop, "river_accuracy": round(reference, 4),
                "points_behind_river": round((reference - loop["served_accuracy"]) * 100, 2),
                "within_aim": reference - loop["served_accuracy"] <= AIM_POINTS,
                "learned": learned(url["learner"]), "artifact": pickle_cost(final),
            }
        finally:
            for proc in procs.values():
                serve.stop_process(proc)
            stack.down(settings)
            shutil.rmtree(home, ignore_errors=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result
