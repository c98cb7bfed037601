"""When the learner saves snapshots of its models for serving (`model.updates`).

Serving does not wait for them to be fresh: every prediction worker learns the learner's outcomes
as they come, in the learner's order, so the model it serves *is* the learner's a few milliseconds
later (prediction/replica.py, docs/serving.md). A snapshot (each public role's artifact in the
registry, at the stream position it has learned up to, and a ModelUpdate) is where a worker starts
from, and where one that fell far behind catches up from: the examples after it are what a worker
must learn before it serves the learner's model, so they bound a start-up's work.

Every `update_interval_s` (default 10 s) after the first label learned since the last snapshot, or
as soon as `update_every` labels are waiting, whichever comes first. The cost of a snapshot grows
with the model (a full pickle, signed, plus its content hash: ~1 ms for a logistic regression, up to
seconds for a large forest on a busy machine), so it is paced: after one that took c seconds, the
next waits at least c * (1 - share) / share, where share is `update_max_share` (default 0.05):
snapshots never take more than that share of the learner's time.

    >>> pacer = UpdatePacer(every=1000, interval_s=0.25, max_share=0.2, now=10.0)
    >>> pacer.due(since_update=0, now=10.0)
    False
    >>> pacer.due(since_update=1, now=10.0)       # the first label: not yet (interval from start)
    False
    >>> pacer.due(since_update=1, now=10.3)
    True
    >>> pacer.done(started=10.3, now=10.4)         # that publish took 100 ms
    >>> pacer.due(since_update=5, now=10.6)        # interval passed, but pacing asks 400 ms
    False
    >>> pacer.due(since_update=5, now=10.81)
    True
"""

from __future__ import annotations

import time


class UpdatePacer:
    def __init__(self, every: int, interval_s: float, max_share: float, now: float | None = None) -> None:
        self.every = max(1, int(every))
        self.interval_s = max(0.0, float(interval_s))
        self.max_share = min(1.0, max(1e-3, float(max_share)))
        self.last = time.monotonic() if now is None else now
        self.cost_s = 0.0  # what the last publish took

    @classmethod
    def from_settings(cls, cfg) -> UpdatePacer:
        return cls(cfg.update_every, cfg.update_interval_s, cfg.update_max_share)

    def due(self, since_update: int, now: float) -> bool:
        """Should the learner publish now, with `since_update` labels learned since the last one?"""
        if since_update <= 0:
            return False
        waited = now - self.last
        if waited < self.cost_s * (1.0 - self.max_share) / self.max_share:
            return False  # pacing: the last publish was expensive
        return since_update >= self.every or waited >= self.interval_s

    def done(self, started: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.cost_s = max(0.0, now - started)
        self.last = now

    def publish(self, publish) -> None:
        """Run `publish()` and remember what it cost."""
        started = time.monotonic()
        try:
            publish()
        finally:
            self.done(started)
