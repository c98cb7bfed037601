"""The feature store's Redis writes and reads of a features batch: this tree's `features/store.py`
against another git revision's (`git archive`, imported under another name), in one process, runs
alternating, on a Redis of its own. Per payments event: this client's CPU and redis-server's, for
the writes (states, labels, key entities' compare-and-set) and for reading every state back.
Run: .venv/bin/python services/bench/probes/store_code_ab.py REV

2026-12-06, this tree's many-key scripts against 005b5b6's one command per key, 40 batches of 500
events (~400 cards and ~150 merchants each), the stack's Redis (append-only file on), two runs:
the client's writes 46.0 / 50.4 -> 40.1 / 41.5 µs per event, its reads 16.0 / 18.1 -> 8.9 / 9.5;
redis-server's writes 15.8 / 17.0 -> 18.8 / 20.3, its reads 2.3 / 2.5 -> 8.8 / 10.3. (Those runs
gave the other revision's store this tree's window series, which it wrote as their repr: its
figures were too low. Each store now gets its own revision's states; HEAD against this tree then
gives the same figures within the noise.)
"""
import sys

import redis

from _probes import alternate, import_revision, payments_batches, print_store_rounds, redis_of_its_own, store_round
from driftline.features import store as ours
from driftline.shared.keys import Keys

rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
theirs = import_revision(rev, "features.store")

BATCH, EVENTS, ROUNDS = 500, 20_000, 8
# Each store gets states built by its own revision's definitions: given this tree's window series,
# another revision's store would not know them for series and would write their repr.
ours_input = payments_batches(BATCH, EVENTS)
theirs_input = payments_batches(BATCH, EVENTS, import_revision(rev, "features.definitions"))
with redis_of_its_own() as url:
    client = redis.Redis.from_url(url)

    def run(module, fs, batches):
        return lambda: store_round(module.FeatureStore(client, Keys("ab"), fs, 3600, entity_ttl_s=86_400),
                                   client, batches, EVENTS)

    print_store_rounds(alternate({"this tree": run(ours, *ours_input), rev: run(theirs, *theirs_input)}, ROUNDS))
