"""`driftline bench predict`: how fast the prediction service answers, and how fast a swap lands.

It starts its own Kafka and Redis (free ports, a temporary home), registers a river model trained
on default-feature vectors, writes online state for a few hundred entities (so every request does
the real Redis read), and runs `driftline serve prediction` as a subprocess. Then:

- load with `wrk` (Debian's package; POST bodies from a small lua script; loopback only, bounded
  in time) at 16 connections (and 64 unless --quick) against `POST /v1/predict`, against the same
  server's `GET /health`, and against a bare FastAPI app (`bench/bare.py`, one route) started in
  the same run: requests/s, p50 and p99 latency (`wrk --latency`), and the three ratios of the
  aims: predict p99, predict/health and health/bare throughput. The machine may be shared, so
  only ratios measured in one run compare; the load average is recorded before and after;
- with `BENCH_PREDICT_PROFILE=1`, py-spy flame graphs of the service (samples of the thread that
  holds the GIL: where its CPU goes, not its waits) under /v1/predict load and under one batch at a
  time (`profiles/predict.svg` and `predict-batch.svg` next to the JSON; py-spy from PyPI; `=raw`:
  collapsed stacks, one line per stack and its samples, in `.txt` files);
- the time a swap takes to reach every uvicorn worker: register a new version, make it champion,
  publish `model.swaps`, then poll the workers' `driftline_serving_model_version` gauges (one per
  process in multiprocess mode) until every worker serves the new version.

- `POST /v1/predict/batch` of 100 rows (the first entities' bodies), one request at a time and
  four at once: its latency.

Aims: p99 <= 5 ms at 16 connections with one worker, predict >= 0.6 of /health's throughput,
<= 0.25 ms of server CPU per prediction, /health >= 0.8 of the bare app's, a batch of 100 rows
<= 10 ms p99. It measures and reports; it never asserts. Everything it starts is stopped at the end.

    result = run(Path("reports/bench"), quick=True)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from ..features.definitions import load_feature_set
from ..features.store import FeatureStore
from .. import serve
from ..infra import stack
from ..shared.swaps import publish_swap
from ..shared import kafka
from ..shared.keys import Keys
from ..shared.registry import ModelRegistry
from ..shared.settings import Ports, PredictionSettings, Settings, ensure_local_secrets
from ..shared.topics import Topics

FIELDS = ("nswprice", "nswdemand", "vicprice", "vicdemand", "transfer", "period")
ENTITIES = 200
AIM_P99_MS = 5.0
AIM_RATIO = 0.6
AIM_HEALTH_RATIO = 0.8
AIM_CPU_MS = 0.25

BATCH_ROWS = 100
AIM_BATCH_P99_MS = 10.0
BATCH_LUA = """
-- POST /v1/predict/batch: %d rows a request, over entities that have online state
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %s
"""
LUA = """
-- POST /v1/predict with bodies cycling over entities that have online state
local bodies = %s
local i = 0
request = function()
  i = (i %% #bodies) + 1
  return wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def toy_model(seed: int, n: int = 500):
    """A StandardScaler | LogisticRegression trained on default-feature vectors of random events."""
    from river import linear_model, preprocessing

    fs = load_feature_set("default")
    rng = random.Random(seed)
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for _ in range(n):
        fields = {f: rng.random() for f in FIELDS}
        model.learn_one(fs.vector({}, fields, 0.0), int(fields["nswprice"] > fields["vicprice"]))
    return model


def bench_settings(home: Path, workers: int) -> Settings:
    """Settings of a bench stack under `home`: Kafka, Redis and the services on free ports."""
    return ensure_local_secrets(Settings(
        kafka_bootstrap=f"127.0.0.1:{stack.free_port()}",
        redis_url=f"redis://127.0.0.1:{stack.free_port()}/0",
        namespace="bench",
        home=home,
        cache_dir=Settings().cache_dir,
        ports=Ports(**{name: stack.free_port() for name in Ports.model_fields}),
        prediction=PredictionSettings(workers=workers),
        log_level="WARNING",
    ))


def seed_champion(settings: Settings, client: redis.Redis) -> tuple[ModelRegistry, list[dict[str, Any]]]:
    """A toy champion in the registry and online state for its entities (`seed_entities`): the
    registry, and request bodies for those entities."""
    registry = ModelRegistry(client, Keys(settings.namespace), settings.learner.model_name,
                             settings.model_key.get_secret_value().encode())
    registry.set_role("champion", registry.register(toy_model(seed=1), spec="bench", reason="initial"))
    return registry, seed_entities(settings, client)


def seed_entities(settings: Settings, client: redis.Redis) -> list[dict[str, Any]]:
    """Online state for ENTITIES entities (written as the features service writes it); returns
    request bodies for them."""
    fs = load_feature_set(settings.features.set)
    store = FeatureStore(client, Keys(settings.namespace), fs, settings.features.snapshot_ttl_s)
    rng = random.Random(1)
    states, bodies = {}, []
    for e in range(ENTITIES):
        state: dict[str, Any] = {}
        for t in range(5):
            fs.apply_event(state, {f: rng.random() for f in FIELDS}, ts=1000.0 + t)
        states[f"meter-{e}"] = state
        bodies.append({"entity_id": f"meter-{e}", "fields": {f: round(rng.random(), 4) for f in FIELDS}})
    store.write_states(states)
    return bodies


# -- wrk ------------------------------------------------------------------------------------
def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    lat = {p: _seconds(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    return {
        "requests_per_s": round(rps, 1),
        "p50_ms": round(lat["50"] * 1000, 3),
        "p90_ms": round(lat["90"] * 1000, 3),
        "p99_ms": round(lat["99"] * 1000, 3),
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(0) if errors else None,
    }


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process of a process group (the service
    and its uvicorn workers). Per request, this is what load costs the server, whatever else runs
    on the machine; wall-clock figures on a busy machine say more about the neighbours."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is pgrp (the 5th field of /proc/pid/stat)
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, seconds: float, script: Path | None = None, pgid: int | None = None) -> dict[str, Any]:
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script is not None:
        argv += ["-s", str(script)]
    cpu0 = group_cpu_s(pgid) if pgid else 0.0
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    result = parse_wrk(out)
    if pgid:
        result["server_cpu_ms_per_request"] = round((group_cpu_s(pgid) - cpu0) * 1000 / max(1, result["requests"]), 3)
    return result


# -- the service ----------------------------------------------------------------------------
def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"bench predict: timed out waiting for {what}")


def swap_metric(url: str) -> tuple[float, float]:
    """(sum, count) of driftline_swap_seconds over every worker (multiprocess /metrics)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    total = re.search(r"^driftline_swap_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^driftline_swap_seconds_count (\S+)$", text, re.M)
    return (float(total.group(1)) if total else 0.0, float(count.group(1)) if count else 0.0)


def serving_versions(url: str) -> dict[str, int]:
    """{worker pid: version it serves}, from one GET /metrics: with several workers, prometheus'
    multiprocess mode keeps `driftline_serving_model_version` per process (a `pid` label)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    out = {}
    for labels, value in re.findall(r"^driftline_serving_model_version\{([^}]*)\} (\S+)$", text, re.M):
        pid = re.search(r'pid="(\d+)"', labels)
        out[pid.group(1) if pid else "main"] = int(float(value))
    return out


def swap_reach(settings: Settings, registry: ModelRegistry, url: str, workers: int, rounds: int) -> dict[str, Any]:
    """Seconds from a model.swaps message (in Kafka) until every worker serves the new version
    (polled every 20 ms from the workers' own gauges), and the workers' own swap time
    (driftline_swap_seconds: message timestamp to new model serving, mean over workers); a
    request to /v1/predict confirms that the new version answers."""
    producer = kafka.producer(settings)
    topics = Topics(settings.namespace)
    reach = []
    sum0, count0 = swap_metric(url)
    for r in range(rounds):
        previous = registry.champion()
        version = registry.register(toy_model(seed=100 + r), spec="bench", reason="manual", parent=previous)
        registry.set_role("champion", version)
        publish_swap(producer, topics, model=registry.model, from_version=previous, to_version=version,
                     reason="manual")
        sent = time.monotonic()
        while time.monotonic() - sent < 30:
            seen = serving_versions(url)
            if len(seen) >= workers and all(v == version for v in seen.values()):
                reach.append(round(time.monotonic() - sent, 4))
                break
            time.sleep(0.02)
        else:
            reach.append(None)
        probe = {"entity_id": "meter-0", "fields": {f: 0.5 for f in FIELDS}}
        assert httpx.post(url + "/v1/predict", json=probe, timeout=5).json()["model_version"] == version
        time.sleep(0.3)
    sum1, count1 = swap_metric(url)
    per_worker = (sum1 - sum0) / (count1 - count0) if count1 > count0 else None
    return {"to_every_worker_s": reach, "worker_swap_mean_s": round(per_worker, 4) if per_worker else None,
            "worker_swaps": int(count1 - count0)}


def start_bare(port: int, log_path: Path) -> subprocess.Popen:
    import sys

    out = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "driftline.bench.bare", str(port)], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def profile(pid: int, svg: Path, seconds: int, fmt: str = "flamegraph") -> subprocess.Popen | None:
    """py-spy record of a running process in the background: samples of the thread holding the
    GIL, so a thread waiting on a socket or a poll is not counted as busy (`fmt` "raw": collapsed
    stacks, one line per stack with its sample count)."""
    exe = shutil.which("py-spy") or str(Path(os.sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    svg.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--gil", "-o", str(svg),
                             "--nonblocking", "-f", fmt], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    seconds = 3 if quick else 10
    workers = int(os.environ.get("BENCH_PREDICT_WORKERS", "1"))
    home = Path(tempfile.mkdtemp(prefix="driftline-bench-predict-"))
    settings = bench_settings(home, workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = bare = None
    result: dict[str, Any] = {"workers": workers, "duration_s": seconds, "cpus": os.cpu_count()}
    try:
        stack.up(settings)
        client = redis.Redis.from_url(settings.redis_url)
        registry, bodies = seed_champion(settings, client)
        script = home / "predict.lua"
        script.write_text(LUA % ("{" + ", ".join(json.dumps(json.dumps(b)) for b in bodies) + "}"))
        batch_script = home / "batch.lua"
        batch_script.write_text(BATCH_LUA % (BATCH_ROWS, json.dumps(json.dumps({"items": bodies[:BATCH_ROWS]}))))

        proc = serve.start_service("prediction", log_path=home / "prediction.log", settings=settings)
        url = f"http://{settings.host}:{settings.ports.prediction}"
        wait_until(lambda: httpx.get(url + "/ready", timeout=2).status_code == 200, 120, "/ready")
        wait_until(lambda: len(serving_versions(url)) == workers, 60, "every worker serving")
        check = httpx.post(url + "/v1/predict", json=bodies[0], timeout=5)
        assert check.status_code == 200, check.text

        bare_port = stack.free_port()
        bare = start_bare(bare_port, home / "bare.log")
        bare_url = f"http://127.0.0.1:{bare_port}"
        wait_until(lambda: httpx.get(bare_url + "/health", timeout=2).status_code == 200, 60, "the bare app")

        wrk(url + "/v1/predict", 16, 2, script)  # warm-up: connections, caches, lazy imports
        wrk(bare_url + "/health", 16, 1)
        if os.environ.get("BENCH_PREDICT_PROFILE"):
            fmt, suffix = ("raw", "txt") if os.environ["BENCH_PREDICT_PROFILE"] == "raw" else ("flamegraph", "svg")
            for name, route, connections, lua in (("predict", "/v1/predict", 16, script),
                                                  ("predict-batch", "/v1/predict/batch", 1, batch_script)):
                spy = profile(proc.pid, out_dir / "profiles" / f"{name}.{suffix}", seconds, fmt)
                wrk(url + route, connections, seconds, lua)
                if spy is not None:
                    spy.wait(seconds + 30)
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        for connections in (16,) if quick else (16, 64):
            predict = wrk(url + "/v1/predict", connections, seconds, script, pgid=proc.pid)
            health = wrk(url + "/health", connections, seconds, pgid=proc.pid)
            ceiling = wrk(bare_url + "/health", connections, seconds, pgid=bare.pid)
            result[f"c{connections}"] = {
                "predict": predict,
                "health": health,
                "bare_health": ceiling,
                "ratio": round(predict["requests_per_s"] / health["requests_per_s"], 3),
                "health_ratio": round(health["requests_per_s"] / ceiling["requests_per_s"], 3),
                # The same ratios from server CPU per request: what they would be on an idle machine.
                "cpu_ratio": round(health["server_cpu_ms_per_request"] / predict["server_cpu_ms_per_request"], 3),
                "health_cpu_ratio": round(ceiling["server_cpu_ms_per_request"]
                                          / health["server_cpu_ms_per_request"], 3),
            }
        # One batch of BATCH_ROWS rows at a time, then four at once: its latency, not throughput.
        result["batch"] = {f"c{c}": wrk(url + "/v1/predict/batch", c, seconds, batch_script, pgid=proc.pid)
                           for c in (1, 4)}
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result["swap"] = swap_reach(settings, registry, url, workers, rounds=3 if quick else 5)
        c16 = result["c16"]
        result["aims"] = {
            f"p99_ms_at_16_le_{AIM_P99_MS}": c16["predict"]["p99_ms"] <= AIM_P99_MS,
            f"ratio_at_16_ge_{AIM_RATIO}": c16["ratio"] >= AIM_RATIO,
            f"health_ratio_at_16_ge_{AIM_HEALTH_RATIO}": c16["health_ratio"] >= AIM_HEALTH_RATIO,
            f"server_cpu_ms_per_predict_le_{AIM_CPU_MS}": c16["predict"]["server_cpu_ms_per_request"] <= AIM_CPU_MS,
            f"batch_{BATCH_ROWS}_p99_ms_le_{AIM_BATCH_P99_MS}": result["batch"]["c1"]["p99_ms"] <= AIM_BATCH_P99_MS,
        }
        client.close()
    finally:
        for child in (proc, bare):
            if child is not None:
                serve.stop_process(child)
        stack.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    return result
