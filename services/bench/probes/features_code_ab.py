"""The feature computations of the working tree against another revision's, in one process, runs
alternating: CPU µs per event of each version, and whether every vector is the same.
Run: .venv/bin/python services/bench/probes/features_code_ab.py [REV]   (default HEAD)

On a shared host whose speed moves by a third within minutes, two processes run one after the
other compare badly; two versions in one process, taking turns, see the same moments. The other
revision's `services` package is taken from git (`git archive`) and imported under another name.
Two workloads, both as the features service runs them (the vector from the state before the
event, then the event folded in): `payments.toml` over 30,000 payments (the card's own aggregates,
then the merchant's), and the default set over 20,000 Elec2 rows (a label every third row).

2026-12-06, against 9ec9331 (before `Series.count` and the in-order fold), every vector the same:
payments 38.0 -> 30.7 µs per event at the median of five runs each at a quiet moment; 46.6 -> 43.0
and 51.3 -> 45.8 (ten each) at busier ones, where the default set, whose code did not change,
came out 15.8 / 16.8 and 17.3 / 18.8: differences under ~10% need a quiet host even this way.
Against HEAD (the same code both ways): 43.4 / 43.4 and 14.4 / 14.0. After the loops went back to
calling `_series` and a fold to leaving its pruning to `_prune`: 35.1 -> 37.0 and 41.9 -> 43.9
against the inlined code, 43.8 -> 38.5 and 55.0 -> 49.9 against 9ec9331."""
import statistics
import sys
import time
from itertools import islice

from _probes import import_revision
from driftline.features import definitions as ours
from driftline.features.windows import key_text
from driftline.replay.datasets import FEATURES_DIR, load
from driftline.replay.payments import endless

ROUNDS = 10
rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
theirs = import_revision(rev, "features.definitions")

payments = list(islice(endless(1.7e9), 30_000))
elec2 = list(load("elec2").rows())[:20_000]


def payments_run(defs):
    fs = defs.load_feature_set(str(FEATURES_DIR / "payments.toml"))  # one file for both versions

    def run():
        cards, merchants, out = {}, {}, []
        for card, fields, ts in payments:
            state = cards.setdefault(card, {})
            x = fs.own_features(state, fields, ts)
            fs.apply_event(state, fields, ts)
            merchant = merchants.setdefault(key_text(fields["merchant"]), {})
            fs.key_features("merchant", merchant, ts, x)
            fs.apply_keyed("merchant", merchant, fields, ts, card)
            out.append(x)
        return out
    return run


def default_run(defs):
    fs = defs.load_feature_set("default")

    def run():
        states, out = {}, []
        for i, (fields, label, entity) in enumerate(elec2):
            state = states.setdefault(entity, {})
            out.append(fs.vector(state, fields, 1000.0 + i))
            fs.apply_event(state, fields, 1000.0 + i)
            if i % 3 == 0:
                fs.apply_label(state, label, 1000.0 + i)
        return out
    return run


for name, make, n in (("payments", payments_run, len(payments)), ("default", default_run, len(elec2))):
    versions = {rev: make(theirs), "working tree": make(ours)}
    same = versions[rev]() == versions["working tree"]()
    spent = {v: [] for v in versions}
    for r in range(ROUNDS):
        for v in (list(versions) if r % 2 else list(versions)[::-1]):
            started = time.process_time()
            versions[v]()
            spent[v].append((time.process_time() - started) / n * 1e6)
    print(f"{name}: " + "; ".join(f"{v} {statistics.median(s):.1f} µs/event (min {min(s):.1f})" for v, s in spent.items())
          + f"; every vector the same: {same}")
