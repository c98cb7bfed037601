"""Champion and challenger: the models the learner holds, and the rule that promotes or drops.

    >>> contest = Contest(rule="margin", promote_after=3, window=3, margin=0.1, max_shadow=10)
    >>> for _ in range(3): contest.record(champion_hit=False, challenger_hit=True)
    >>> contest.verdict()
    'promote'

While a challenger exists both models score every event and learn every label; the champion alone
answers. The contest compares them on the *same* examples, the last `window` shared ones, once
there are `promote_after` of them:

- ``mcnemar`` (default): McNemar's exact test on the examples where the two disagree. The
  challenger is promoted when it is right-where-the-champion-is-wrong more often than the
  reverse with one-sided confidence `confidence`, and leads by at least `margin`. A clearly
  better model wins within a hundred or two examples; a coin-flip lead never does.
- ``margin``: the challenger's accuracy beats the champion's by at least `margin`.

A challenger that has not won after `max_shadow` shared examples is dropped. Plain picklable
state: it lives in the learner's checkpoint, so a crash while a challenger is shadowing loses
nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from scipy.stats import binomtest

from .labels import argmax, proba_to_text, to_river
from .prequential import Prequential

Verdict = Literal["promote", "drop"] | None
Rule = Literal["mcnemar", "margin"]


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


def predict(model: Any, x: dict[str, float]) -> str | None:
    """A river model's answer as the contract's label text."""
    return argmax(proba_to_text(model.predict_proba_one(x)))


@dataclass
class Contest:
    """The challenger's shadow record against the champion on shared examples."""

    rule: Rule
    promote_after: int
    window: int
    margin: float
    max_shadow: int
    confidence: float = 0.99
    shared: int = 0
    recent: deque = field(default_factory=deque)  # (champion_hit, challenger_hit), the last `window`

    @classmethod
    def from_settings(cls, cfg) -> Contest:
        """From `LearnerSettings`."""
        return cls(cfg.promotion_rule, cfg.promote_after, cfg.promote_window, cfg.promote_margin, cfg.max_shadow,
                   cfg.promote_confidence)

    def __setstate__(self, state: dict) -> None:
        # A contest checkpointed before the rule existed: the margin rule over `promote_after`.
        self.__dict__.update({"rule": "margin", "window": state.get("promote_after", 500), "confidence": 0.99})
        self.__dict__.update(state)

    def record(self, champion_hit: bool, challenger_hit: bool) -> None:
        self.shared += 1
        self.recent.append((int(champion_hit), int(challenger_hit)))
        while len(self.recent) > self.window:
            self.recent.popleft()

    @property
    def champion_accuracy(self) -> float:
        return sum(c for c, _ in self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def challenger_accuracy(self) -> float:
        return sum(c for _, c in self.recent) / len(self.recent) if self.recent else 0.0

    def disagreements(self) -> tuple[int, int]:
        """(challenger right where the champion is wrong, the reverse) over the window."""
        wins = sum(1 for champion, challenger in self.recent if challenger and not champion)
        losses = sum(1 for champion, challenger in self.recent if champion and not challenger)
        return wins, losses

    def p_value(self) -> float:
        """McNemar's exact one-sided test: how likely this many wins out of the disagreements are
        if the two models were equally good."""
        wins, losses = self.disagreements()
        if wins + losses == 0:
            return 1.0
        return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)

    def verdict(self) -> Verdict:
        if self.shared >= self.promote_after and self.recent:
            lead = self.challenger_accuracy - self.champion_accuracy
            if lead > 0 and lead >= self.margin - 1e-12:
                if self.rule == "margin" or self.p_value() <= 1 - self.confidence:
                    return "promote"
        if self.shared >= self.max_shadow:
            return "drop"
        return None

    def evidence(self) -> dict[str, float]:
        wins, losses = self.disagreements()
        return {"rule": self.rule, "shared": self.shared, "window": len(self.recent),
                "champion_accuracy": self.champion_accuracy, "challenger_accuracy": self.challenger_accuracy,
                "challenger_wins": wins, "champion_wins": losses, "p_value": round(self.p_value(), 6)}
