"""The feature store's Redis writes and reads of a features batch: this tree's `features/store.py`
against another git revision's (`git archive`, imported under another name), in one process, runs
alternating, on a Redis of its own. Per payments event: this client's CPU and redis-server's, for
the writes (states, labels, key entities' compare-and-set) and for reading every state back.
Run: .venv/bin/python services/bench/probes/store_code_ab.py REV

2026-12-06, this tree's many-key scripts against 005b5b6's one command per key, 40 batches of 500
events (~400 cards and ~150 merchants each), the stack's Redis (append-only file on), two runs:
the client's writes 46.0 / 50.4 -> 40.1 / 41.5 µs per event, its reads 16.0 / 18.1 -> 8.9 / 9.5;
redis-server's writes 15.8 / 17.0 -> 18.8 / 20.3, its reads 2.3 / 2.5 -> 8.8 / 10.3.
"""
import shutil, statistics, sys, tempfile, time
from itertools import islice
from pathlib import Path

import redis

from _probes import ROOT, import_revision, redis_cpu_s
from driftline.features import store as ours
from driftline.features.definitions import load_feature_set
from driftline.infra import stack
from driftline.replay.payments import endless
from driftline.shared.keys import Keys
from driftline.shared.settings import Settings

rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
theirs = import_revision(rev, "features.store")

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
    client = redis.Redis.from_url(server.settings.redis_url)
    def run(module) -> tuple[float, float, float, float]:
        client.flushall()
        store = module.FeatureStore(client, Keys("ab"), fs, 3600, entity_ttl_s=86_400)
        cpu = {"write": 0.0, "read": 0.0, "redis write": 0.0, "redis read": 0.0}
        for card_states, merchant_states, labels in batches:
            t, r = time.process_time(), redis_cpu_s(client)
            pipe = client.pipeline(transaction=False)
            store.queue_states(pipe, {e: dict(s) for e, s in card_states.items()})
            if hasattr(store, "queue_labels"):
                store.queue_labels(pipe, labels)
            else:  # one script call per label
                for entity, (label, ts) in labels.items():
                    store.queue_label(pipe, entity, label, ts)
            pipe.execute()
            pipe = client.pipeline(transaction=False)
            try:
                store.queue_keyed(pipe, "merchant", {m: dict(s) for m, s in merchant_states.items()}, 7200)
            except TypeError:  # one compare-and-set call per key entity
                for m, s in merchant_states.items():
                    store.queue_keyed(pipe, "merchant", m, dict(s), 7200)
            pipe.execute()
            t2, r2 = time.process_time(), redis_cpu_s(client)
            store.read_batch(list(card_states), [], keyed=[("merchant", m) for m in merchant_states])
            cpu["write"] += t2 - t
            cpu["redis write"] += r2 - r
            cpu["read"] += time.process_time() - t2
            cpu["redis read"] += redis_cpu_s(client) - r2
        return tuple(v / EVENTS * 1e6 for v in cpu.values())

    runs: dict[str, list] = {"this tree": [], rev: []}
    for k in range(ROUNDS):
        order = [("this tree", ours), (rev, theirs)]
        for name, module in order if k % 2 else order[::-1]:
            runs[name].append(run(module))
    for name, values in runs.items():
        medians = [round(statistics.median(v[i] for v in values), 2) for i in range(4)]
        print(f"{name}: µs per event, client write {medians[0]} read {medians[1]}, "
              f"redis-server write {medians[2]} read {medians[3]}")
finally:
    server.stop()
    shutil.rmtree(home, ignore_errors=True)
