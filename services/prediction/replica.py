"""A served model that learns what the learner learned, in the learner's order: the learner's
model, state for state, not a copy shipped now and then.

    >>> from driftline.learner.spec import parse_model
    >>> replica = Replica.from_artifact(parse_model("dummy.NoChangeClassifier()"),
    ...                                 {"version": 3, "revision": 1, "next_position": 10, "updated_at": 0.0})
    >>> replica.learns(10, {"x": 1.0}, "1"), replica.learns(10, {"x": 1.0}, "1")   # learned; then already known
    (True, False)
    >>> replica.score({"x": 5.0}), replica.position
    (('1', {'1': 1.0}), 11)
    >>> replica.learns(14, {}, "0")
    Traceback (most recent call last):
    ...
    driftline.prediction.replica.Gap: version 3 needs the example at position 11 next, not 14

The learner's champion learns each label exactly once, at a position that counts the labels
learned before it, and publishes it as an outcome with the vector it learned from (`outcomes`, one
partition, in that order; a learner that restarts re-learns what it had published without
publishing it again). Every model the learner holds (champion, challenger, the displaced champion)
learns that same example at that position. So a replica that starts from a registry artifact saved
at position P (`next_position`) and learns the outcome at P, then P+1, ... with the learner's own
wrapper (`labels.learn`, its one-hot fallback included) holds the learner's model after each of
them. It learns an example only when it holds exactly the model before it: an example it has
already learned is skipped, and one beyond the next (`Gap`) means it cannot know the model any
more: the follower reloads an artifact, it never guesses. An artifact the learner does not learn
on (`next_position` None: a version it dropped, or one an operator rolled back to before the
learner took it up) is served as it is, and followed once the learner saves it at the position
where it resumes.

Requests score under the replica's lock, and the follower learns under it, one example at a time:
a request never sees a model halfway through an update, and waits at most one `learn_one`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..learner.labels import learn
from ..shared.digest import model_digest
from .models import score


class Gap(RuntimeError):
    """An example beyond the next one: the examples between are not known to this replica."""

    def __init__(self, version: int, needed: int, got: int) -> None:
        super().__init__(f"version {version} needs the example at position {needed} next, not {got}")
        self.needed, self.got = needed, got


class Replica:
    """One version as this worker serves it, and where it stands in the learner's stream."""

    def __init__(self, model: Any, version: int, revision: int = 0, position: int | None = None,
                 examples: int = 0, saved_at: float = 0.0) -> None:
        self.model = model
        self.version = version
        self.revision = revision  # of the artifact it was loaded from
        self.position = position  # the next example it learns; None: served as loaded (see the module's doc)
        self.examples = examples  # labelled examples it has learned
        self.saved_at = saved_at  # when the learner saved that artifact (its clock)
        self.stream_ts = saved_at  # the examples it has not learned come after this time (learner clock)
        self.loaded_at = time.time()
        self.lock = threading.Lock()
        self.sought = False  # the follower has sought the stream back for it once (follower.gap)
        self.frozen_at: int | None = None  # the stream position from which a replica not following misses
        self.missing_since: float | None = None  # learner time of the first example it missed

    @classmethod
    def from_artifact(cls, model: Any, meta: dict[str, Any]) -> Replica:
        """A replica of a registry artifact and its record (`ModelRegistry.load`)."""
        position = meta.get("next_position")
        return cls(model, int(meta["version"]), int(meta.get("revision", 0)),
                   None if position is None else int(position), int(meta.get("examples_seen", 0)),
                   float(meta.get("updated_at") or 0.0))

    @property
    def following(self) -> bool:
        return self.position is not None

    def learns(self, position: int, x: dict[str, Any], y: str) -> bool:
        """Learn the example at `position` if it is the next one (True); False if already learned
        or not followed; Gap if it is beyond the next one."""
        if self.position is None or position < self.position:
            return False
        if position > self.position:
            raise Gap(self.version, self.position, position)
        with self.lock:
            learn(self.model, x, y)
        self.position += 1
        self.examples += 1
        return True

    def freeze(self) -> None:
        """Stop learning: it serves what it has until the follower loads a newer artifact."""
        if self.position is not None:
            self.frozen_at, self.position = self.position, None

    def missed(self, position: int, ts: float | None) -> None:
        """An example of the stream it has not learned (not following, or beyond the next one)."""
        if self.frozen_at is None and self.position is None:
            self.frozen_at = position
        if self.missing_since is None:
            self.missing_since = ts if ts is not None else time.time()

    def lag(self, newest: tuple[int, float] | None, now: float) -> tuple[int, float]:
        """(examples, seconds) behind the learner, given the newest example read from the stream
        (position, the learner's time): 0 once it has learned everything read."""
        if newest is None:
            return 0, 0.0
        start = self.position if self.position is not None else self.frozen_at
        behind = 0 if start is None else max(0, newest[0] + 1 - start)
        if behind == 0:
            self.missing_since = None
            return 0, 0.0
        since = self.missing_since if self.missing_since is not None else newest[1]
        return behind, max(0.0, now - since)

    def score(self, x: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
        """(prediction, proba) of one vector (models.score), never halfway through a learn."""
        with self.lock:
            return score(self.model, x)

    def digest(self) -> str:
        """The model's content hash (`digest.model_digest`), as the learner computes it."""
        with self.lock:
            return model_digest(self.model)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "revision": self.revision, "position": self.position,
                "examples": self.examples, "following": self.following}
