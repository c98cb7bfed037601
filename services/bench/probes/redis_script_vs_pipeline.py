"""One script call claiming 1,000 ids (ingestion's `_CLAIM`, dedup.py) against a redis-py pipeline
of the same 1,000 `SET NX GET EX`: Redis' CPU and this client's CPU per id, on a Redis of its own.
Run: .venv/bin/python services/bench/probes/redis_script_vs_pipeline.py

2026-12-06, each run two alternating rounds of each. A bare redis-server (no append-only file),
two runs: the script 2.89 / 4.72 and 3.80 / 4.84 µs of Redis CPU per id, 2.18 / 2.49 and 2.77 /
2.73 of the client's; the pipeline 2.84 / 2.70 and 2.97 / 2.47, and 19.69 / 15.69 and 16.29 /
17.53. With the local stack's config (append-only file on), one run: the script 5.49 / 6.90 and
2.95 / 3.20, the pipeline 4.30 / 3.97 and 20.77 / 21.42. Lua's `redis.call` costs Redis ~1-3 µs
more per id; the pipeline costs the client ~14-18 more (redis-py building and parsing a thousand
commands)."""
import shutil, tempfile, time
from pathlib import Path

import redis

from _probes import redis_cpu_s

from driftline.infra import stack
from driftline.ingestion.dedup import _CLAIM
from driftline.shared.settings import Settings

home = Path(tempfile.mkdtemp())
server = stack.Redis(Settings(redis_url=f"redis://127.0.0.1:{stack.free_port()}/0", home=home))  # the stack's own config
server.start()
try:
    stack.wait_ready(server, 20)
    r = redis.Redis.from_url(server.settings.redis_url)
    N, ROUNDS = 1000, 30

    def script(k: int):
        keys = [f"seen:{k}:{i}" for i in range(N)]
        return r.execute_command("EVAL", _CLAIM, N, *keys, 3600, *[f"events:0:{k * N + i}" for i in range(N)])

    def pipeline(k: int):
        pipe = r.pipeline(transaction=False)
        for i in range(N):
            pipe.set(f"seen:{k}:{i}", f"events:0:{k * N + i}", nx=True, get=True, ex=3600)
        return pipe.execute()

    for name, call, base in (("script", script, 0), ("pipeline", pipeline, 1000), ("script", script, 2000),
                             ("pipeline", pipeline, 3000)):
        s0, c0 = redis_cpu_s(r), time.process_time()
        for k in range(ROUNDS):
            call(base + k)
        s1, c1 = redis_cpu_s(r), time.process_time()
        print(f"{name:8s}: Redis {(s1 - s0) / (ROUNDS * N) * 1e6:.2f} µs per id, client {(c1 - c0) / (ROUNDS * N) * 1e6:.2f}")
finally:
    server.stop()
    shutil.rmtree(home, ignore_errors=True)
