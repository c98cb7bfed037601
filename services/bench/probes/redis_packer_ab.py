"""The feature store's Redis writes and reads of a features batch with redis-py's command packer
against `redis_clients.HiredisPacker`, in one process, runs alternating, on a Redis of its own: per
payments event, this client's CPU (writes: states, labels, key entities' compare-and-set; reads:
every state back). The store's code is the same in both; only the connections' packer differs.
Run: .venv/bin/python services/bench/probes/redis_packer_ab.py

2026-12-07 (a slow hour of this host: river's own loop ran at ~70k events/s against ~100k the day
before), 40 batches of 500 payments events: the client's writes 70.8 -> 50.2 µs per event, its
reads 17.2 -> 14.6; redis-server's the same (31.4 / 30.7 writes, 16.1 / 15.0 reads).
"""
import shutil, statistics, tempfile, time
from itertools import islice
from pathlib import Path

import redis

from _probes import ROOT, redis_cpu_s
from driftline.features import store as ours
from driftline.features.definitions import load_feature_set
from driftline.infra import stack
from driftline.replay.payments import endless
from driftline.shared.keys import Keys
from driftline.shared.redis_clients import HiredisPacker
from driftline.shared.settings import Settings

BATCH, EVENTS, ROUNDS = 500, 20_000, 8
fs = load_feature_set(str(ROOT / "services" / "features" / "payments.toml"))
batches = []  # (card states, merchant states, labels) as the features service would write them
cards: dict = {}
merchants: dict = {}
events = list(islice(endless(1.7e9), EVENTS))
for at in range(0, EVENTS, BATCH):
    card_states, merchant_states, labels = {}, {}, {}
    for entity, fields, ts in events[at:at + BATCH]:
        fs.apply_event(card_states.setdefault(entity, cards.setdefault(entity, {})), fields, ts)
        merchant = str(fields["merchant"])
        fs.apply_keyed("merchant", merchant_states.setdefault(merchant, merchants.setdefault(merchant, {})),
                       fields, ts, entity)
        labels[entity] = (str(int(fields["amount"] > 50)), ts)
    batches.append((card_states, merchant_states, labels))

home = Path(tempfile.mkdtemp())
server = stack.Redis(Settings(redis_url=f"redis://127.0.0.1:{stack.free_port()}/0", home=home))
server.start()
try:
    stack.wait_ready(server, 20)
    clients = {"redis-py's packer": redis.Redis.from_url(server.settings.redis_url),
               "HiredisPacker": redis.Redis.from_url(server.settings.redis_url, command_packer=HiredisPacker())}
    def run(client) -> tuple[float, float, float, float]:
        client.flushall()
        store = ours.FeatureStore(client, Keys("ab"), fs, 3600, entity_ttl_s=86_400)
        cpu = {"write": 0.0, "read": 0.0, "redis write": 0.0, "redis read": 0.0}
        for card_states, merchant_states, labels in batches:
            t, r = time.process_time(), redis_cpu_s(client)
            pipe = client.pipeline(transaction=False)
            store.queue_states(pipe, {e: dict(s) for e, s in card_states.items()})
            store.queue_labels(pipe, labels)
            pipe.execute()
            pipe = client.pipeline(transaction=False)
            store.queue_keyed(pipe, "merchant", {m: dict(s) for m, s in merchant_states.items()}, 7200)
            pipe.execute()
            t2, r2 = time.process_time(), redis_cpu_s(client)
            store.read_batch(list(card_states), [], keyed=[("merchant", m) for m in merchant_states])
            cpu["write"] += t2 - t
            cpu["redis write"] += r2 - r
            cpu["read"] += time.process_time() - t2
            cpu["redis read"] += redis_cpu_s(client) - r2
        return tuple(v / EVENTS * 1e6 for v in cpu.values())

    runs: dict[str, list] = {name: [] for name in clients}
    for k in range(ROUNDS):
        order = list(clients.items())
        for name, client in order if k % 2 else order[::-1]:
            runs[name].append(run(client))
    for name, values in runs.items():
        medians = [round(statistics.median(v[i] for v in values), 2) for i in range(4)]
        print(f"{name}: µs per event, client write {medians[0]} read {medians[1]}, "
              f"redis-server write {medians[2]} read {medians[3]}")
finally:
    server.stop()
    shutil.rmtree(home, ignore_errors=True)
