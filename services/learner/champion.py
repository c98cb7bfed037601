"""Champion and challenger: the models the learner holds, and the rule that promotes or drops.

    >>> contest = Contest(promote_after=3, margin=0.1, max_shadow=10)
    >>> for _ in range(3): contest.record(champion_hit=False, challenger_hit=True)
    >>> contest.verdict()
    'promote'

While a challenger exists both models score every event and learn every label; the champion alone
answers. The contest compares them on the *same* examples (the last `promote_after` shared ones):
the challenger is promoted when its accuracy there beats the champion's by at least `margin`, and
dropped when it has not won after `max_shadow` shared examples. Plain picklable state: it lives in
the learner's checkpoint, so a crash while a challenger is shadowing loses nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from .labels import argmax, proba_to_text, to_river
from .prequential import Prequential

Verdict = Literal["promote", "drop"] | None


@dataclass
class Slot:
    """One model in one role, with its prequential statistics."""

    role: str
    version: int
    model: Any
    stats: Prequential
    examples: int = 0  # labels this version has learned (warm start included)
    revision: int = 0  # registry revision of the artifact last published

    def score(self, x: dict[str, float]) -> tuple[str | None, dict[str, float]]:
        """(y_pred, proba) as text, before the label is known."""
        proba = proba_to_text(self.model.predict_proba_one(x))
        return argmax(proba), proba

    def learn(self, x: dict[str, float], label: str) -> None:
        self.model.learn_one(x, to_river(label))
        self.examples += 1


@dataclass
class Contest:
    """The challenger's shadow record against the champion on shared examples."""

    promote_after: int
    margin: float
    max_shadow: int
    shared: int = 0
    recent: deque = field(default_factory=deque)  # (champion_hit, challenger_hit), last promote_after

    def record(self, champion_hit: bool, challenger_hit: bool) -> None:
        self.shared += 1
        self.recent.append((int(champion_hit), int(challenger_hit)))
        while len(self.recent) > self.promote_after:
            self.recent.popleft()

    @property
    def champion_accuracy(self) -> float:
        return sum(c for c, _ in self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def challenger_accuracy(self) -> float:
        return sum(c for _, c in self.recent) / len(self.recent) if self.recent else 0.0

    def verdict(self) -> Verdict:
        if self.shared >= self.promote_after and len(self.recent) >= self.promote_after:
            lead = self.challenger_accuracy - self.champion_accuracy
            if lead > 0 and lead >= self.margin - 1e-12:
                return "promote"
        if self.shared >= self.max_shadow:
            return "drop"
        return None

    def evidence(self) -> dict[str, float]:
        return {"shared": self.shared, "window": len(self.recent),
                "champion_accuracy": self.champion_accuracy, "challenger_accuracy": self.challenger_accuracy}
