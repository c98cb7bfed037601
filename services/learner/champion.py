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

For regressors the contest records each model's absolute error on the shared examples instead of
its hit: ``mcnemar`` becomes the paired test that fits errors, Wilcoxon's signed-rank test (one-
sided: the challenger's errors are smaller), and `margin` is the relative MAE improvement required
(0.01 = the challenger's MAE is at least 1% below the champion's).

A challenger that has not won after `max_shadow` shared examples is dropped. Plain picklable
state: it lives in the learner's checkpoint, so a crash while a challenger is shadowing loses
nothing.

`Roles` holds the two slots and their contest and does one example's test-then-train for both;
`warm_start` replays a challenger's first examples against the champion's recorded answers. The
learner and `driftline bench drift` both run these, so the benchmark measures the learner's rule.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from scipy.stats import binomtest, wilcoxon

from .labels import answer, error, is_regressor, learn
from .prequential import Prequential
from .spec import parse_model  # noqa: F401 -- the examples above use it

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
        return answer(self.model, x)

    def learn(self, x: dict[str, float], label: str) -> None:
        learn(self.model, x, label)
        self.examples += 1

    def update_stats(self, y: str, p: dict) -> bool | float | None:
        """Score the answer `p` made at event time: a classifier's hit, a regressor's absolute error."""
        if is_regressor(self.model):
            y_pred = float(p["y_pred"]) if p["y_pred"] is not None else None
            if y_pred is not None and not math.isfinite(y_pred):
                y_pred = None  # a diverged model's answer: counted, not scored (it would poison the means)
            return self.stats.update_error(float(y), y_pred)
        return self.stats.update(y, p["y_pred"], p["proba"])


def predict(model: Any, x: dict[str, float]) -> str | None:
    """A river model's answer as the contract's label text."""
    return answer(model, x)[0]


def judge(model: Any, x: dict[str, float], y: str) -> bool | float | None:
    """What a model's answer for `x` enters a contest as: its hit, or its absolute error."""
    y_pred = predict(model, x)
    if is_regressor(model):
        err = error(y_pred, y)
        return None if err is None else abs(err)
    return y_pred == y


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

    def record(self, champion_hit: bool | float, challenger_hit: bool | float) -> None:
        """One shared example: each model's hit (bool), or for regressors each absolute error (float)."""
        self.shared += 1
        if isinstance(champion_hit, bool) or isinstance(challenger_hit, bool):
            self.recent.append((int(champion_hit), int(challenger_hit)))
        else:
            self.recent.append((float(champion_hit), float(challenger_hit)))
        while len(self.recent) > self.window:
            self.recent.popleft()

    @property
    def champion_accuracy(self) -> float:
        return sum(c for c, _ in self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def challenger_accuracy(self) -> float:
        return sum(c for _, c in self.recent) / len(self.recent) if self.recent else 0.0

    def disagreements(self) -> tuple[int, int]:
        """(challenger right where the champion is wrong, the reverse) over the window; for errors,
        (challenger's error smaller, the reverse)."""
        if self.regression:
            return (sum(1 for champion, challenger in self.recent if challenger < champion),
                    sum(1 for champion, challenger in self.recent if champion < challenger))
        wins = sum(1 for champion, challenger in self.recent if challenger and not champion)
        losses = sum(1 for champion, challenger in self.recent if champion and not challenger)
        return wins, losses

    @property
    def regression(self) -> bool:
        return bool(self.recent) and isinstance(self.recent[0][0], float)

    def p_value(self) -> float:
        """McNemar's exact one-sided test: how likely this many wins out of the disagreements are
        if the two models were equally good. For errors, Wilcoxon's signed-rank test on the paired
        differences (challenger's errors smaller)."""
        if self.regression:
            diffs = [champion - challenger for champion, challenger in self.recent if champion != challenger]
            if len(diffs) < 2:
                return 1.0
            return float(wilcoxon(diffs, alternative="greater").pvalue)
        wins, losses = self.disagreements()
        if wins + losses == 0:
            return 1.0
        return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)

    def verdict(self) -> Verdict:
        if self.shared >= self.promote_after and self.recent:
            lead = self.challenger_accuracy - self.champion_accuracy
            if self.regression:  # relative MAE improvement (the "accuracies" are mean errors)
                lead = (self.champion_accuracy - self.challenger_accuracy) / max(self.champion_accuracy, 1e-12)
            if lead > 0 and lead >= self.margin - 1e-12:
                if self.rule == "margin" or self.p_value() <= 1 - self.confidence:
                    return "promote"
        if self.shared >= self.max_shadow:
            return "drop"
        return None

    def evidence(self) -> dict[str, float]:
        wins, losses = self.disagreements()
        if self.regression:
            return {"rule": self.rule, "shared": self.shared, "window": len(self.recent),
                    "champion_mae": self.champion_accuracy, "challenger_mae": self.challenger_accuracy,
                    "challenger_wins": wins, "champion_wins": losses, "p_value": round(self.p_value(), 6)}
        return {"rule": self.rule, "shared": self.shared, "window": len(self.recent),
                "champion_accuracy": self.champion_accuracy, "challenger_accuracy": self.challenger_accuracy,
                "challenger_wins": wins, "champion_wins": losses, "p_value": round(self.p_value(), 6)}


def warm_start(model: Any, examples: Iterable[tuple[dict, str, bool | None, int | None]], champion_version: int,
               contest: Contest) -> int:
    """Teach a new challenger `examples` (x, y, the champion's hit, the champion version then), oldest
    first, test-then-train: each example the current champion answered enters the contest as if the
    challenger had shadowed since then. Returns how many it learned.

    >>> model, contest = parse_model("dummy.NoChangeClassifier()"), Contest("margin", 1, 10, 0.0, 100)
    >>> warm_start(model, [({}, "1", False, 1), ({}, "1", True, 1), ({}, "0", True, 0)], 1, contest)
    3
    >>> contest.shared, contest.challenger_accuracy
    (2, 0.5)
    """
    n = 0
    for x, y, champion_hit, version_then in examples:
        if champion_hit is not None and version_then == champion_version:  # this champion's answers only
            mine = judge(model, x, y)
            if mine is not None:
                contest.record(champion_hit if isinstance(champion_hit, bool) else float(champion_hit), mine)
        learn(model, x, y)
        n += 1
    return n


@dataclass
class Learned:
    """What one labelled example did: each role's hit (for the versions that answered it), the
    answers to publish as outcomes (role, Prediction), and the contest's verdict when the example
    entered the contest."""

    hits: dict[str, bool]
    answers: list[tuple[str, dict]]
    verdict: Verdict = None


@dataclass
class Roles:
    """The champion, the challenger shadowing it (or None) and their contest.

    >>> roles = Roles(Slot("champion", 1, parse_model("dummy.NoChangeClassifier()"), Prequential()))
    >>> answers = roles.score({"a": 1.0})          # before the label: {role: Prediction fields}
    >>> roles.learn({"a": 1.0}, "1", answers).hits
    {'champion': False}
    >>> roles.champion.examples, roles.score({"a": 1.0})["champion"]["y_pred"]
    (1, '1')
    """

    champion: Slot
    challenger: Slot | None = None
    contest: Contest | None = None

    @staticmethod
    def describe(roles: Roles | None) -> dict[str, Any]:
        """Each role's version, examples and statistics, and the contest's evidence (for /health)."""
        def slot(s: Slot | None):
            return None if s is None else {"version": s.version, "examples": s.examples, **s.stats.as_dict()}

        return {"champion": slot(roles.champion if roles else None),
                "challenger": slot(roles.challenger if roles else None),
                "contest": roles.contest.evidence() if roles and roles.contest else None}

    def slots(self) -> list[Slot]:
        return [s for s in (self.champion, self.challenger) if s is not None]

    def score(self, x: dict[str, float]) -> dict[str, dict]:
        """Each role's answer for an event, before its label: {role: {model_version, y_pred, proba}}."""
        out = {}
        for slot in self.slots():
            y_pred, proba = slot.score(x)
            out[slot.role] = {"model_version": slot.version, "y_pred": y_pred, "proba": proba}
        return out

    def learn(self, x: dict[str, float], y: str, answers: dict[str, dict]) -> Learned:
        """Test-then-train on one label: score the answers made at event time (a version scores
        only its own answers; a champion without one, past the label's grace, answers now), then
        both models learn, and a label both versions answered enters the contest."""
        hits: dict[str, bool] = {}
        published: list[tuple[str, dict]] = []
        for slot in self.slots():
            p = answers.get(slot.role)
            if p is None and slot.role == "champion":
                y_pred, proba = slot.score(x)
                p = {"model_version": slot.version, "y_pred": y_pred, "proba": proba}
            if p is not None and p["model_version"] == slot.version:
                hit = slot.update_stats(y, p)
                if hit is not None:  # a regressor with no prediction yet has no error to count
                    hits[slot.role] = hit
            if p is not None and (slot.role == "champion" or p["model_version"] == slot.version):
                published.append((slot.role, p))
        for slot in self.slots():
            slot.learn(x, y)
        verdict = None
        if self.contest is not None and len(hits) == 2:
            self.contest.record(hits["champion"], hits["challenger"])
            verdict = self.contest.verdict()
        return Learned(hits, published, verdict)

    def start(self, challenger: Slot, contest: Contest) -> None:
        self.challenger, self.contest = challenger, contest

    def promote(self) -> tuple[Slot, Slot]:
        """The challenger becomes the champion: (old champion, new champion)."""
        old, new = self.champion, self.challenger
        assert new is not None
        new.role = "champion"
        self.champion, self.challenger, self.contest = new, None, None
        return old, new

    def drop(self) -> Slot:
        """The challenger goes: it did not win."""
        slot = self.challenger
        assert slot is not None
        self.challenger, self.contest = None, None
        return slot

    def replace_champion(self, new: Slot, contest: Contest | None = None) -> Slot:
        """A champion chosen elsewhere (rollback, manual promotion) takes over; returns the old one.
        A shadowing challenger restarts its contest (`contest`) against the new champion."""
        old = self.champion
        new.role = "champion"
        if self.challenger is not None and self.challenger.version == new.version:
            self.challenger, self.contest = None, None
        elif self.contest is not None:
            self.contest = contest
        self.champion = new
        return old
