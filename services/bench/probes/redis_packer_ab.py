"""The feature store's Redis writes and reads of a features batch with redis-py's command packer
against `redis_clients.HiredisPacker`, in one process, runs alternating, on a Redis of its own: per
payments event, this client's CPU (writes: states, labels, key entities' compare-and-set; reads:
every state back). The store's code is the same in both; only the connections' packer differs.
Run: .venv/bin/python services/bench/probes/redis_packer_ab.py

2026-12-07 (a slow day of this host: river's own loop ran at 54-75k events/s against ~100k the day
before), 40 batches of 500 payments events, twice: the client's writes 70.8 -> 50.2 and 48.6 ->
39.5 µs per event (the second beside a test run), its reads 17.2 -> 14.6 and 11.0 -> 11.6 (few
arguments: no change to tell); redis-server's the same.
"""
import redis

from _probes import alternate, payments_batches, print_store_rounds, redis_of_its_own, store_round
from driftline.features import store as ours
from driftline.shared.keys import Keys
from driftline.shared.redis_clients import HiredisPacker

BATCH, EVENTS, ROUNDS = 500, 20_000, 8
fs, batches = payments_batches(BATCH, EVENTS)
with redis_of_its_own() as url:
    def run(client):
        return lambda: store_round(ours.FeatureStore(client, Keys("ab"), fs, 3600, entity_ttl_s=86_400),
                                   client, batches, EVENTS)

    print_store_rounds(alternate({"redis-py's packer": run(redis.Redis.from_url(url)),
                                  "HiredisPacker": run(redis.Redis.from_url(url, command_packer=HiredisPacker()))},
                                 ROUNDS))
