"""The drift loop against never retraining on streams `driftline bench drift` does not carry:
river's Phishing and Bananas, Hyperplane, STAGGER and SEA with regimes that come back, a Mixed
concept drift; logistic regression and a Hoeffding tree, label delays 0 and 100. In-process, the
learner's own `Adaptation` (bench.drift.simulate). python never_worse_streams.py

2026-12-06, with the baseline shadowing for good: the loop at or above never retraining in every
row; against the rule before it, the same but for the tree on the Mixed drift (0.8848 -> 0.8994
at delay 0, 0.8890 -> 0.8877 at delay 100)."""
import itertools

from river import datasets as rd
from river.datasets import synth

from driftline.bench.drift import LOGREG, TREE, mean, prequential_hits, simulate
from driftline.replay.datasets import _river_rows


def rows_of(stream):
    return list(_river_rows(lambda: stream, None, "e")())  # the whole stream


STREAMS = {
    "hyperplane": None,  # driftline's own generator (replay dataset)
    "phishing": rows_of(rd.Phishing()),
    "bananas": rows_of(rd.Bananas()),
    "stagger-recurring": rows_of(itertools.chain(*[itertools.islice(synth.STAGGER(classification_function=f, seed=s), 3000)
                                                   for s, f in enumerate([0, 1, 2, 0, 1, 2, 0])])),
    "sea-recurring": rows_of(itertools.chain(*[itertools.islice(synth.SEA(variant=v, seed=s, noise=0.1), 3000)
                                               for s, v in enumerate([0, 3, 0, 3, 0, 3])])),
    "mixed": rows_of(itertools.islice(synth.ConceptDriftStream(
        stream=synth.Mixed(seed=1, classification_function=0), drift_stream=synth.Mixed(seed=2, classification_function=1),
        position=5000, width=1000, seed=3), 20000)),
}
for name, rows in STREAMS.items():
    for spec in (LOGREG, TREE):
        for delay in (0, 100):
            sim = simulate(name, spec, label_delay=delay, rows=rows)
            never = prequential_hits(name, spec, label_delay=delay, rows=rows)
            print(f"{name:18s} {spec[:14]:14s} delay {delay:<3d} driftline {mean(sim['hits']):.4f} "
                  f"never {mean(never):.4f} swaps {len(sim['swaps'])} restored {len(sim['restored'])}", flush=True)
