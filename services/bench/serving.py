"""`driftline bench serving`: the HTTP-only learning loop against river's own, and how fresh the
served model stays.

An application that never touches Kafka: for each row of a data set river ships in its wheel
(Phishing, Bananas), it calls `POST /v1/predict` with an `event_id`, then posts the row's label to
ingestion's `POST /v1/labels`, row by row, as fast as it goes (a keep-alive connection to each,
the standard library's `http.client`: the client's own cost stays small), once the first row is
learned (`served_first`: a learner's start-up is not the loop). The learner learns each
label from the vector the prediction service kept, and every prediction worker learns the
learner's outcomes as they come (docs/serving.md). The served accuracy is compared with river's
own progressive validation at delay 0 (`evaluate.progressive_val_score`, the data set's own
labels, the same rows and model) in the same process: the aims are within 1 point for a logistic
regression and a Hoeffding tree, within 2 for ARF.

The services run with the HTTP-only profile of docs/serving.md (`HTTP_ONLY`, recorded in the
result). Per run it reports rows/s, the accuracies, and where the served model's lag comes from:
sampled every `sample_every` rows, the labels the client has posted that the served model has not
learned (`behind_client`) and the labels the learner has learned that it has not
(`behind_learner`); the learner's own latency per label (from `labels.valid` to its outcome, read
from the topics after the run) and the workers' (`driftline_serving_learn_delay_seconds`: from
the outcome to the served model). It also times one pickle round trip of the final model (what a
snapshot costs the learner and a worker's load; large for ARF).

It starts its own Kafka and Redis (free loopback ports, a temporary home) and, per run, `driftline
serve` ingestion, learner and prediction on a namespace of their own (raw features: the vector is
the row), and stops them all.

    result = run(Path("reports/bench"), quick=True)   # `driftline bench serving --quick`
"""

from __future__ import annotations

import http.client
import json
import os
import pickle
import re
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from .. import serve
from ..infra import stack
from ..shared import kafka
from ..shared.codec import get_codec
from ..shared.settings import Ports, Settings, ensure_local_secrets
from ..shared.topics import Topics

MODELS = {
    "logistic_regression": "preprocessing.StandardScaler() | linear_model.LogisticRegression()",
    "hoeffding_tree": "tree.HoeffdingTreeClassifier()",
    "arf": "forest.ARFClassifier(seed=1, n_models=10)",
}
AIM_POINTS = {"logistic_regression": 1.0, "hoeffding_tree": 1.0, "arf": 2.0}
DATASETS = ("Phishing", "Bananas")
# docs/serving.md: nothing publishes events, so no label waits for events that might still come
# through the features service (the learner still learns labels in their time order, and only
# once nothing is on its way through the pipeline).
HTTP_ONLY = {"DRIFTLINE_FEATURES__SET": "raw", "DRIFTLINE_FEATURES__MAX_REORDER_WAIT_MS": "0"}


def river_rows(dataset: str, limit: int | None = None) -> list[tuple[dict[str, float], Any]]:
    """(x, y) of one of river's bundled data sets, as river gives them."""
    from river import datasets

    rows = []
    for x, y in getattr(datasets, dataset)():
        if limit is not None and len(rows) >= limit:
            break
        rows.append((x, y))
    return rows


def as_fields(x: dict) -> dict[str, float | str]:
    """A row's features as driftline's fields: text names, numbers as floats, text kept."""
    return {str(k): v if isinstance(v, str) else float(v) for k, v in x.items()}


def as_label(y: Any) -> str:
    return str(int(y)) if isinstance(y, (bool, int)) or (isinstance(y, float) and y.is_integer()) else str(y)


def river_accuracy(spec: str, rows: list[tuple[dict, Any]]) -> float:
    """River's own progressive validation at delay 0 (predict, then learn, row by row)."""
    from river import evaluate, metrics

    from ..learner.spec import parse_model

    return evaluate.progressive_val_score(iter(rows), parse_model(spec), metrics.Accuracy()).get()


def pickle_cost(model: Any) -> dict[str, float]:
    started = time.perf_counter()
    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    dumped = time.perf_counter()
    pickle.loads(blob)
    loaded = time.perf_counter()
    return {"bytes": len(blob), "dumps_ms": round((dumped - started) * 1000, 2),
            "loads_ms": round((loaded - dumped) * 1000, 2)}


class Client:
    """One keep-alive HTTP/1.1 connection, JSON in and out."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        self.conn.request(method, path, None if body is None else json.dumps(body),
                          {"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def http_loop(predict_url: str, ingest_url: str, learner_url: str, rows: list[tuple[dict, str]], run_id: str,
              sample_every: int = 50, timeout_s: float = 600.0) -> dict[str, Any]:
    """Predict with an event_id, then post the label, row by row; served accuracy and lag samples."""
    predict, ingest = Client(predict_url), Client(ingest_url)
    correct, behind_client, behind_learner = 0, [], []
    t0, started = time.time(), time.monotonic()
    try:
        for i, (x, y) in enumerate(rows):
            event_id, ts = f"{run_id}-{i}", t0 + i * 1e-3
            answer = predict.call("POST", "/v1/predict", {"entity_id": run_id, "fields": x, "event_id": event_id,
                                                          "ts": ts})
            correct += answer["prediction"] == y
            ingest.call("POST", "/v1/labels", {"event_id": event_id, "label": y, "ts": ts})
            if i == 0:
                served_first(predict, learner_url, timeout_s=120.0)
            if i % sample_every == sample_every - 1:
                served = predict.call("GET", "/v1/models")["replicas"].get("champion") or {}
                learned = httpx.get(learner_url + "/health", timeout=10).json().get("position", 0)
                behind_client.append(i + 1 - served.get("examples", 0))
                behind_learner.append(max(0, learned - (served.get("position") or 0)))
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the HTTP loop took over {timeout_s}s (at row {i})")
    finally:
        predict.close()
        ingest.close()
    wall = time.monotonic() - started

    def spread(values: list[int]) -> dict[str, Any]:
        return {"p50": statistics.median(values) if values else None, "max": max(values) if values else None}

    return {"rows": len(rows), "served_accuracy": round(correct / len(rows), 4), "wall_s": round(wall, 2),
            "rows_per_s": round(len(rows) / wall, 1), "behind_client": spread(behind_client),
            "behind_learner": spread(behind_learner), "samples": len(behind_client)}


def served_first(predict: Client, learner_url: str, timeout_s: float) -> None:
    """Wait until the served model has learned the first row: a learner that has just started
    learns its first label only once every labels.valid partition has told where it stands (up to
    a few seconds), and that start-up, not the loop, would then decide a short data set's accuracy."""
    deadline = time.monotonic() + timeout_s
    while (served := predict.call("GET", "/v1/models")["replicas"].get("champion") or {}).get("examples", 0) < 1:
        if time.monotonic() > deadline:
            learner = httpx.get(learner_url + "/health", timeout=10).json()
            raise TimeoutError(f"the first label was not served within {timeout_s}s: served {served}; learner "
                               f"{ {k: learner.get(k) for k in ('state', 'position', 'waiting_labels', 'status')} }")
        time.sleep(0.01)


def learner_latency_ms(settings: Settings, model: str) -> dict[str, float] | None:
    """Per label, from its record on `labels.valid` to its champion outcome (broker timestamps)."""
    topics, codec = Topics(settings.namespace), get_codec()

    def stamps(topic: str, keep) -> dict[str, int]:
        c = kafka.consumer(settings, f"bench-serving-{uuid.uuid4().hex[:8]}")
        c.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in kafka.partitions_of(settings, topic)])
        out, idle = {}, 0
        try:
            while idle < 3:
                messages = c.consume(1000, timeout=0.5)
                idle = 0 if messages else idle + 1
                for m in messages:
                    if m.error() is None and (record := keep(codec.decode(m.value()))) is not None:
                        out[record] = m.timestamp()[1]
        finally:
            c.close()
        return out

    labels = stamps(topics.labels_valid, lambda r: r["event_id"])
    outcomes = stamps(topics.outcomes, lambda r: r["event_id"] if r["model"] == model and r["role"] == "champion"
                      else None)
    delays = sorted(outcomes[e] - labels[e] for e in outcomes if e in labels)
    if not delays:
        return None
    return {p: float(delays[min(len(delays) - 1, int(q * len(delays)))]) for p, q in
            (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def learn_delay_ms(metrics_text: str) -> dict[str, float] | None:
    """Mean and p99 (bucket bound) of driftline_serving_learn_delay_seconds, summed over workers."""
    buckets = [(float(le), float(v)) for le, v in re.findall(
        r'^driftline_serving_learn_delay_seconds_bucket\{le="([^"]+)"\} (\S+)$', metrics_text, re.M)]
    total = re.search(r"^driftline_serving_learn_delay_seconds_sum (\S+)$", metrics_text, re.M)
    count = re.search(r"^driftline_serving_learn_delay_seconds_count (\S+)$", metrics_text, re.M)
    if not buckets or not count or float(count.group(1)) == 0:
        return None
    n = float(count.group(1))
    p99 = next(le for le, v in sorted(buckets) if v >= 0.99 * n)
    return {"mean": round(float(total.group(1)) / n * 1000, 2), "p99_bucket": p99 * 1000}


def one_run(infra: Settings, home: Path, spec: str, name: str, dataset: str, rows: list) -> dict[str, Any]:
    settings = infra.model_copy(update={"namespace": f"bench{uuid.uuid4().hex[:6]}", "home": home / name,
                                        "ports": Ports(**{n: stack.free_port() for n in Ports.model_fields})})
    kafka.ensure_topics(settings)
    env = {"DRIFTLINE_LEARNER__MODEL": spec, **HTTP_ONLY}
    procs = {}
    try:
        for service in ("ingestion", "learner", "prediction"):
            procs[service] = serve.start_service(service, env=env, log_path=home / f"{name}-{service}.log",
                                                 settings=settings)
        serve.wait_healthy(list(procs), timeout=120, procs=procs, settings=settings)
        url = {s: f"http://{settings.host}:{settings.port_of(s)}" for s in procs}
        deadline = time.monotonic() + 120
        while httpx.get(url["prediction"] + "/ready", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("bench serving: the prediction service never became ready")
            time.sleep(0.2)
        fields = [(as_fields(x), as_label(y)) for x, y in rows]
        loop = http_loop(url["prediction"], url["ingestion"], url["learner"], fields, run_id=name)
        deadline = time.monotonic() + 60
        while httpx.get(url["learner"] + "/health", timeout=5).json().get("position", 0) < len(rows):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return {**loop, "learned": httpx.get(url["learner"] + "/health", timeout=5).json().get("position"),
                "learner_latency_ms": learner_latency_ms(settings, settings.learner.model_name),
                "worker_learn_delay_ms": learn_delay_ms(httpx.get(url["prediction"] + "/metrics", timeout=10).text)}
    finally:
        for proc in procs.values():
            serve.stop_process(proc)


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    from ..learner.spec import parse_model

    plan = [("hoeffding_tree", "Bananas", 1000)] if quick else [
        (name, dataset, None) for dataset in DATASETS for name in MODELS]
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"settings": HTTP_ONLY, "label_delay": 0, "runs": {},
                              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    home = Path(tempfile.mkdtemp(prefix="driftline-bench-serving-"))
    base = Settings()
    infra = ensure_local_secrets(Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}", redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        namespace="bench", home=home, cache_dir=base.cache_dir, log_level="WARNING"))
    try:
        stack.up(infra)
        for name, dataset, limit in plan:
            spec, rows = MODELS[name], river_rows(dataset, limit)
            reference = river_accuracy(spec, rows)
            run_name = f"{name}-{dataset.lower()}"
            loop = one_run(infra, home, spec, run_name, dataset, rows)
            final = parse_model(spec)
            for x, y in rows:
                final.learn_one(x, y)
            behind = round((reference - loop["served_accuracy"]) * 100, 2)
            result["runs"][run_name] = {
                "model": spec, "dataset": dataset, **loop, "river_accuracy": round(reference, 4),
                "points_behind_river": behind, "aim_points": AIM_POINTS[name], "within_aim": behind <= AIM_POINTS[name],
                "artifact": pickle_cost(final)}
    finally:
        stack.down(infra)
        shutil.rmtree(home, ignore_errors=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result
