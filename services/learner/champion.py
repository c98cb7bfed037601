"""Champion and challenger: the models the learner holds, and the rule that promotes or drops.

    >>> contest = Contest(rule="margin", promote_after=3, window=3, margin=0.1, max_shadow=10)
    >>> for _ in range(3): contest.record(champion_hit=False, challenger_hit=True)
    >>> contest.verdict()
    'promote'

While a challenger exists both models score every event and learn every label; the champion alone
answers. The contest compares them on the *same* examples, each judged on the answer it gave at
event time, once there are `promote_after` of them:

- ``mcnemar`` (default): McNemar's comparison on the discordant pairs (the examples where exactly
  one of the two is right), run as an anytime-valid sequential test: the evidence that the
  challenger is right more often than the champion where they disagree is a likelihood ratio
  (a uniform mixture over every win rate above one half), and the challenger is promoted once it
  reaches 1 / (1 - `confidence`) and the challenger leads the last `window` shared examples by at
  least `margin`. The contest is watched after every example, which a fixed-size test does not
  allow (peeking at a 1% test after every example promotes a coin flip far more often than 1%);
  by Ville's inequality this one keeps its level however often it is looked at.
- ``margin``: the challenger's accuracy over the window beats the champion's by at least `margin`.

For regressors the pairs are the two absolute errors: the challenger "wins" an example where its
error is the smaller, and `margin` is the relative MAE improvement required (0.01 = the
challenger's MAE is at least 1% below the champion's).

Only answers given at event time count as evidence. A challenger's warm start (`warm_start`)
teaches it the examples since the drift's change point, but those are the very examples on which
the detector saw the champion fail: judged on them, any new model looks better than it is, and on
a stream of short regimes (Elec2) that alone promoted models that then did worse.

A promotion is not final: the champion it displaced keeps learning and shadowing as `previous`
for `max_shadow` examples, in a contest of its own against the new champion under the same rule,
and comes back if it wins (a recurring concept, or a promotion that did not pay). The model the
loop started from (`baseline`: never retrained, it learns every label) is never let go once
displaced: it shadows every champion after it, its contest starting again every `max_shadow`
examples, and comes back whenever it wins. That is what "never worse than not adapting" asks: the
model that did not adapt is always there to be compared with. A challenger that has not won
after `max_shadow` shared examples is dropped. Plain picklable state: it lives in
the learner's checkpoint, so a crash while a challenger is shadowing loses nothing.

`Roles` holds the slots and their contests and does one example's test-then-train for all of them;
`warm_start` teaches a new challenger the recent examples. The learner and `driftline bench drift`
both run these through `adaptation.Adaptation`, so the benchmark measures the learner's rule.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from scipy.special import betainc, betaln

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


LOG_FLOAT_MAX = math.log(sys.float_info.max)


def evidence_for(wins: int, losses: int) -> float:
    """The likelihood ratio that the challenger wins more than half of the discordant pairs,
    against exactly half: a uniform mixture over win rates in (1/2, 1]. Under "no better" it is a
    nonnegative supermartingale, so it ever reaches 1/alpha with probability at most alpha.

        >>> round(evidence_for(0, 0), 3), round(evidence_for(30, 10), 1), round(evidence_for(10, 30), 3)
        (1.0, 63.2, 0.046)
        >>> evidence_for(3000, 10)  # past a float's range: a long contest under the margin rule
        inf
    """
    n = wins + losses
    tail = 1.0 - float(betainc(wins + 1, losses + 1, 0.5))  # the mass of the mixture above one half
    if tail <= 0.0:
        return 0.0
    log_ratio = (n + 1) * math.log(2.0) + float(betaln(wins + 1, losses + 1)) + math.log(tail)
    return math.exp(log_ratio) if log_ratio < LOG_FLOAT_MAX else math.inf


@dataclass
class Contest:
    """A shadow's record against the champion on shared examples (each judged on its event-time answer)."""

    rule: Rule
    promote_after: int
    window: int
    margin: float
    max_shadow: int
    confidence: float = 0.99
    shared: int = 0
    recent: deque = field(default_factory=deque)  # (champion_hit, challenger_hit), the last `window`
    wins: int = 0  # discordant pairs since the contest began: the challenger's
    losses: int = 0  # ... and the champion's
    # Running sums over `recent`: the verdict is asked after every shared example, and summing
    # the window each time cost ~10% of the learner while a challenger shadowed.
    champion_sum: float = 0.0
    challenger_sum: float = 0.0

    def __setstate__(self, state: dict) -> None:  # a checkpoint written before the running sums
        self.__dict__.update(state)
        if "champion_sum" not in state:
            self.champion_sum = float(sum(c for c, _ in self.recent))
            self.challenger_sum = float(sum(c for _, c in self.recent))

    @classmethod
    def from_settings(cls, cfg) -> Contest:
        """From `LearnerSettings`."""
        return cls(cfg.promotion_rule, cfg.promote_after, cfg.promote_window, cfg.promote_margin, cfg.max_shadow,
                   cfg.promote_confidence)

    def record(self, champion_hit: bool | float, challenger_hit: bool | float) -> None:
        """One shared example: each model's hit (bool), or for regressors each absolute error (float)."""
        self.shared += 1
        if isinstance(champion_hit, bool) or isinstance(challenger_hit, bool):
            pair = (int(champion_hit), int(challenger_hit))
            better, worse = pair[1] > pair[0], pair[0] > pair[1]
        else:
            pair = (float(champion_hit), float(challenger_hit))
            better, worse = pair[1] < pair[0], pair[0] < pair[1]  # errors: smaller is better
        self.wins += better
        self.losses += worse
        self.recent.append(pair)
        self.champion_sum += pair[0]
        self.challenger_sum += pair[1]
        while len(self.recent) > self.window:
            old_champion, old_challenger = self.recent.popleft()
            self.champion_sum -= old_champion
            self.challenger_sum -= old_challenger

    @property
    def champion_accuracy(self) -> float:
        return self.champion_sum / len(self.recent) if self.recent else 0.0

    @property
    def challenger_accuracy(self) -> float:
        return self.challenger_sum / len(self.recent) if self.recent else 0.0

    def disagreements(self) -> tuple[int, int]:
        """(challenger right where the champion is wrong, the reverse) over the window; for errors,
        (challenger's error smaller, the reverse)."""
        # A copy first: /health reads this from another thread while the learner appends, and a
        # Python loop over the deque itself may then fail with "deque mutated during iteration"
        # (tuple() of a deque is one C call, so it runs without a thread switch).
        recent = tuple(self.recent)
        if self.regression:
            return (sum(1 for champion, challenger in recent if challenger < champion),
                    sum(1 for champion, challenger in recent if champion < challenger))
        wins = sum(1 for champion, challenger in recent if challenger and not champion)
        losses = sum(1 for champion, challenger in recent if champion and not challenger)
        return wins, losses

    @property
    def regression(self) -> bool:
        return bool(self.recent) and isinstance(self.recent[0][0], float)

    def evidence(self) -> float:
        """`evidence_for` the discordant pairs since the contest began."""
        return evidence_for(self.wins, self.losses)

    def lead(self) -> float:
        """The challenger's lead over the window: accuracy points, or for errors the relative MAE drop."""
        if self.regression:
            return (self.champion_accuracy - self.challenger_accuracy) / max(self.champion_accuracy, 1e-12)
        return self.challenger_accuracy - self.champion_accuracy

    def verdict(self) -> Verdict:
        if self.shared >= self.promote_after and self.recent:
            lead = self.lead()
            if lead > 0 and lead >= self.margin - 1e-12:
                if self.rule == "margin" or self.evidence() >= 1.0 / max(1e-12, 1.0 - self.confidence):
                    return "promote"
        if self.shared >= self.max_shadow:
            return "drop"
        return None

    def report(self) -> dict[str, float]:
        """What the registry keeps of the contest (a version's lineage)."""
        wins, losses = self.disagreements()
        names = ("champion_mae", "challenger_mae") if self.regression else ("champion_accuracy", "challenger_accuracy")
        return {"rule": self.rule, "shared": self.shared, "window": len(self.recent),
                names[0]: self.champion_accuracy, names[1]: self.challenger_accuracy,
                "challenger_wins": wins, "champion_wins": losses,
                "discordant_since_start": [self.wins, self.losses],
                "evidence": round(min(self.evidence(), 1e12), 3)}


def warm_start(model: Any, examples: Iterable[tuple[dict, str, bool | None, int | None]]) -> int:
    """Teach a new challenger `examples` (x, y, the champion's hit, the champion version then), oldest
    first. Returns how many it learned. Nothing here enters the contest (see the module's doc).

    >>> warm_start(parse_model("dummy.NoChangeClassifier()"), [({}, "1", False, 1), ({}, "0", True, 1)])
    2
    """
    n = 0
    for x, y, _champion_hit, _version in examples:
        learn(model, x, y)
        n += 1
    return n


@dataclass
class Learned:
    """What one labelled example did: each role's hit (for the versions that answered it), the
    answers to publish as outcomes (role, Prediction), and each contest's verdict: the
    challenger's (`verdict`), the displaced champion's (`recall`) and the baseline's (`anchor`)."""

    hits: dict[str, bool]
    answers: list[tuple[str, dict]]
    verdict: Verdict = None
    recall: Verdict = None
    anchor: Verdict = None


PUBLISHED = ("champion", "challenger")  # the roles whose answers go to predictions and outcomes


@dataclass
class Roles:
    """The champion, the challenger shadowing it (or None), the champion a promotion displaced
    (`previous`, or None), the model the loop started from once displaced (`baseline`, or None;
    `baseline_version` names it while it is champion) and their contests.

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
    previous: Slot | None = None
    recall: Contest | None = None  # the previous champion's contest against the one that replaced it
    baseline: Slot | None = None
    anchor: Contest | None = None  # the baseline's contest against the champion
    baseline_version: int | None = None  # the never retrained model's version (None: the first champion's)
    classes: set[str] = field(default_factory=set)  # a classifier's labels learned so far (labels.label_problem)

    def __post_init__(self) -> None:
        if self.baseline_version is None:
            self.baseline_version = self.champion.version

    def __setstate__(self, state: dict) -> None:  # a checkpoint written before `previous` or `baseline`
        self.__dict__.update({"previous": None, "recall": None, "baseline": None, "anchor": None, "classes": set(),
                              **state})
        if self.__dict__.get("baseline_version") is None:  # its champion is where it starts from
            self.baseline_version = self.champion.version

    @staticmethod
    def describe(roles: Roles | None) -> dict[str, Any]:
        """Each role's version, examples and statistics, and the contests' records (for /health)."""
        def slot(s: Slot | None):
            return None if s is None else {"version": s.version, "examples": s.examples, **s.stats.as_dict()}

        return {"champion": slot(roles.champion if roles else None),
                "challenger": slot(roles.challenger if roles else None),
                "contest": roles.contest.report() if roles and roles.contest else None,
                "previous": slot(roles.previous if roles else None),
                "recall": roles.recall.report() if roles and roles.recall else None,
                "baseline": slot(roles.baseline if roles else None),
                "anchor": roles.anchor.report() if roles and roles.anchor else None}

    def slots(self) -> list[Slot]:
        """The roles that answer in public (predictions, outcomes, telemetry)."""
        return [s for s in (self.champion, self.challenger) if s is not None]

    def every_slot(self) -> list[Slot]:
        """Every model that scores and learns: the public roles, the displaced champion and the baseline."""
        return [s for s in (self.champion, self.challenger, self.previous, self.baseline) if s is not None]

    def score(self, x: dict[str, float]) -> dict[str, dict]:
        """Each role's answer for an event, before its label: {role: {model_version, y_pred, proba}}."""
        out = {}
        for slot in self.every_slot():
            y_pred, proba = slot.score(x)
            out[slot.role] = {"model_version": slot.version, "y_pred": y_pred, "proba": proba}
        return out

    def learn(self, x: dict[str, float], y: str, answers: dict[str, dict]) -> Learned:
        """Test-then-train on one label: score the answers made at event time (a version scores
        only its own answers; a champion without one, past the label's grace, answers now), then
        every model learns, and a label both sides of a contest answered enters that contest."""
        hits: dict[str, bool] = {}
        published: list[tuple[str, dict]] = []
        for slot in self.every_slot():
            p = answers.get(slot.role)
            if p is None and slot.role == "champion":
                y_pred, proba = slot.score(x)
                p = {"model_version": slot.version, "y_pred": y_pred, "proba": proba}
            if p is not None and p["model_version"] == slot.version:
                hit = slot.update_stats(y, p)
                if hit is not None:  # a regressor with no prediction yet has no error to count
                    hits[slot.role] = hit
            if p is not None and slot.role in PUBLISHED and (slot.role == "champion"
                                                             or p["model_version"] == slot.version):
                published.append((slot.role, p))
        for slot in self.every_slot():
            slot.learn(x, y)
        if y not in self.classes and not is_regressor(self.champion.model):
            self.classes.add(y)  # what the learner's `label_problem` holds the next labels to
        learned = Learned(hits, published)
        if self.contest is not None and "champion" in hits and "challenger" in hits:
            self.contest.record(hits["champion"], hits["challenger"])
            learned.verdict = self.contest.verdict()
        if self.recall is not None and "champion" in hits and "previous" in hits:
            self.recall.record(hits["champion"], hits["previous"])
            learned.recall = self.recall.verdict()
        if self.anchor is not None and "champion" in hits and "baseline" in hits:
            self.anchor.record(hits["champion"], hits["baseline"])
            learned.anchor = self.anchor.verdict()
        return learned

    def start(self, challenger: Slot, contest: Contest) -> None:
        self.challenger, self.contest = challenger, contest

    def promote(self, recall: Contest | None = None, anchor: Contest | None = None) -> tuple[Slot, Slot, Slot | None]:
        """The challenger becomes the champion: (old champion, new champion, the earlier previous
        champion that leaves now, if any). With `recall`, the old champion stays as `previous`,
        or as `baseline` when it is the model the loop started from (with `anchor`); a baseline
        shadowing already starts its contest again (`anchor`) against the new champion."""
        old, new, gone = self.champion, self.challenger, self.previous
        assert new is not None
        new.role = "champion"
        self.champion, self.challenger, self.contest = new, None, None
        self.previous, self.recall = None, None
        if recall is not None and old.version == self.baseline_version and anchor is not None:
            old.role = "baseline"
            self.baseline, self.anchor = old, anchor
        elif recall is not None:
            old.role = "previous"
            self.previous, self.recall = old, recall
        if self.baseline is not None and self.baseline is not old and anchor is not None:
            self.anchor = anchor
        return old, new, gone

    def restore_previous(self, contest: Contest | None = None, anchor: Contest | None = None) -> tuple[Slot, Slot]:
        """The displaced champion won its contest: it is the champion again and the one that
        replaced it leaves (its promotion is undone). A shadowing challenger restarts its contest
        (`contest`), and the baseline its own (`anchor`). Returns (the champion that leaves, the
        one restored)."""
        gone, back = self.champion, self.previous
        assert back is not None
        back.role = "champion"
        self.champion, self.previous, self.recall = back, None, None
        if self.contest is not None:
            self.contest = contest
        if self.anchor is not None and anchor is not None:
            self.anchor = anchor
        return gone, back

    def restore_baseline(self, contest: Contest | None = None) -> tuple[Slot, Slot, Slot | None]:
        """The baseline won its contest: it is the champion again; the champion it beat leaves, and
        so does a displaced champion shadowing (it was a model of the same retraining). A
        shadowing challenger restarts its contest (`contest`). Returns (the champion that leaves,
        the baseline, the previous champion that leaves, if any)."""
        gone, back, also = self.champion, self.baseline, self.previous
        assert back is not None
        back.role = "champion"
        self.champion, self.baseline, self.anchor = back, None, None
        self.previous, self.recall = None, None
        if self.contest is not None:
            self.contest = contest
        return gone, back, also

    def anchor_again(self, anchor: Contest) -> None:
        """The baseline did not win within its contest: it is not let go, a new contest starts."""
        self.anchor = anchor

    def drop(self) -> Slot:
        """The challenger goes: it did not win."""
        slot = self.challenger
        assert slot is not None
        self.challenger, self.contest = None, None
        return slot

    def forget_previous(self) -> Slot:
        """The displaced champion goes: it did not win back its place within its contest."""
        slot = self.previous
        assert slot is not None
        self.previous, self.recall = None, None
        return slot

    def replace_champion(self, new: Slot, contest: Contest | None = None) -> Slot:
        """A champion chosen elsewhere (rollback, manual promotion) takes over; returns the old one.
        A shadowing challenger restarts its contest (`contest`) against the new champion; a
        displaced champion's contest ends (an operator chose)."""
        old = self.champion
        new.role = "champion"
        if self.challenger is not None and self.challenger.version == new.version:
            self.challenger, self.contest = None, None
        elif self.contest is not None:
            self.contest = contest
        self.previous, self.recall = None, None
        # An operator chose: the model chosen is what "not adapting" means from here on.
        self.baseline, self.anchor, self.baseline_version = None, None, new.version
        self.champion = new
        return old
