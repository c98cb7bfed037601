"""The drift loop of one model, example by example: score, learn, detect, retrain, contest, promote.

    >>> loop = Adaptation.fresh("tree.HoeffdingTreeClassifier()", LearnerSettings(), DriftSettings(), "default")
    >>> answers, _ = loop.score({"x": 1.0})            # at event time: every role's answer
    >>> step = loop.learn({"x": 1.0}, "1", answers, position=0)   # when its label is due
    >>> step.learned.hits, step.changes
    ({'champion': False}, [])

Everything that decides when to retrain and which model serves is here and nowhere else: the
retraining policy on the champion's errors and on the features' distributions (`drift.policy`,
`drift.detectors`, `drift.datadrift`), the warm-start buffer (`examples`), the challenger's
contest and promotion, and the displaced champion's way back (`champion`). It does no I/O: each
step returns the changes it made (an alarm, a retrain request, a challenger started, a promotion,
...) and the learner's worker records them in the registry and on Kafka, while `driftline bench
drift` drives this very object over a data set in memory. Given the same examples in the same
order it makes the same decisions at the same positions, at any speed and behind any backlog,
because it runs where the examples are learned: no other process has to keep up with the learner
for a drift to be acted on at the example it was seen.

Decisions that come from outside the stream (an operator's demand, a schedule, a candidate
trained offline) arrive as retrain requests (`request`) and are taken at the position the
learner has reached when it reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..drift.datadrift import DataDriftMonitor
from ..drift.policy import Action, RetrainPolicy
from ..shared.settings import DriftSettings, LearnerSettings
from .champion import Contest, Learned, Roles, Slot, warm_start
from .examples import ExampleBuffer
from .labels import is_regressor
from .prequential import Prequential
from .spec import parse_model

__all__ = ["Adaptation", "Change", "Step", "Versions", "CountingVersions"]
NEW_CHANGE = ("concept_drift", "data_drift")  # requests about a change the stream went through


@dataclass(frozen=True)
class Change:
    """One thing a step did, for the worker to record and publish.

    kind            record
    alarm           a DriftEvent (concept or data drift)
    request         a RetrainRequest this loop made (reason concept_drift, data_drift, new_data, performance)
    suppressed      {"reason": ...}: a trigger held back by the cooldown
    started         {"request": ..., "warm_start": n}; `slot` is the new challenger
    ignored         {"request": ..., "why": ...}; `slot` is the challenger still shadowing, if any
    promoted        {"evidence": ...}; `slot` the new champion, `other` the one it replaced
    restored        {"evidence": ...}; `slot` the displaced champion back, `other` the one that leaves
    dropped         {"evidence": ...}; `slot` the challenger that did not win
    forgotten       {"evidence": ...}; `slot` the displaced champion that did not win back its place
    """

    kind: str
    record: dict[str, Any] = field(default_factory=dict)
    slot: Slot | None = None
    other: Slot | None = None
    position: int = 0


@dataclass
class Step:
    """What learning one label did: the roles' answers and hits, and the changes it made."""

    learned: Learned
    changes: list[Change]


class Versions(Protocol):
    """Where a new challenger's version number comes from (the registry, in the learner)."""

    def challenger(self, request: dict, model: Any, parent: int, warm: int, position: int) -> int: ...

    def candidate(self, request: dict) -> tuple[int, Any, int] | None:
        """(version, model, examples seen) of a model registered for `request` elsewhere (a
        candidate trained offline): it enters the contest as it is, without a warm start."""
        ...


class CountingVersions:
    """Versions from a counter, for runs in memory (`driftline bench drift`)."""

    def __init__(self, last: int = 1) -> None:
        self.last = last

    def challenger(self, request: dict, model: Any, parent: int, warm: int, position: int) -> int:
        self.last += 1
        return self.last

    def candidate(self, request: dict) -> None:
        return None


class Adaptation:
    def __init__(self, roles: Roles, cfg: LearnerSettings, drift: DriftSettings, name: str,
                 versions: Versions, state: dict | None = None,
                 new_model: Callable[[], Any] | None = None) -> None:
        self.roles = roles
        self.cfg = cfg
        if not cfg.keep_baseline:  # turned off since the checkpoint: the baseline stops shadowing
            roles.baseline, roles.anchor = None, None
        self.drift = drift
        self.name = name
        self.versions = versions
        self.new_model = new_model or (lambda: parse_model(cfg.model))
        state = state or {}
        self.policy = RetrainPolicy(drift, name)
        if "policy" in state:
            self.policy.restore(state["policy"])
        if self.policy.version != roles.champion.version:
            self.policy.swap(roles.champion.version)
        self.data = state.get("data") if drift.data_drift else None
        if drift.data_drift and self.data is None:
            self.data = DataDriftMonitor(drift.data_drift_window, drift.data_drift_psi, ignore=drift.data_drift_ignore)
        self.scored = int(state.get("scored", 0))  # events scored: one in data_drift_sample feeds data drift
        self.examples = ExampleBuffer(cfg.warm_start, state.get("examples", ()))

    @classmethod
    def fresh(cls, spec: str, cfg: LearnerSettings, drift: DriftSettings, name: str,
              versions: Versions | None = None) -> Adaptation:
        """A new champion (version 1) of `spec`, for runs in memory."""
        cfg = cfg.model_copy(update={"model": spec})
        roles = Roles(Slot("champion", 1, parse_model(spec), Prequential(cfg.window)))
        return cls(roles, cfg, drift, name, versions or CountingVersions())

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the roles: the policy, the data monitor, the buffer."""
        return {"policy": self.policy.snapshot(), "data": self.data, "scored": self.scored,
                "examples": self.examples.rows()}

    # -- the stream ------------------------------------------------------------------------------
    def score(self, x: dict[str, Any]) -> tuple[dict[str, dict], list[Change]]:
        """Every role's answer for an event (before its label), and what its features did to the
        data-drift monitor (one event in `data_drift_sample`)."""
        return self.roles.score(x), self.saw(x)

    def saw(self, x: dict[str, Any]) -> list[Change]:
        """An event was scored (by this loop now, or before a restart): data drift, sampled."""
        self.scored += 1
        if self.data is None or self.scored % max(1, self.drift.data_drift_sample):
            return []
        changes: list[Change] = []
        for alarm in self.data.update(x):
            changes += self._act(self.policy.data_drift(alarm.feature, alarm.psi, "PSI"), self.policy.position)
        return changes

    def learn(self, x: dict[str, Any], y: str, answers: dict[str, dict], position: int) -> Step:
        """Test-then-train on one label at `position` (labels learned before it), then the policy
        on the champion's answer, then the contests' verdicts."""
        champion = self.roles.champion
        learned = self.roles.learn(x, y, answers)
        # A verdict is about the contest that gave it: one that a decision of this same example
        # replaced (a retrain replacing the challenger, a promotion or a restore changing the
        # champion) says nothing about the new one.
        contest, recall, anchor = self.roles.contest, self.roles.recall, self.roles.anchor
        hit = learned.hits.get("champion")
        self.examples.add(position, x, y, hit, champion.version)
        changes: list[Change] = []
        if hit is not None:  # a regressor's first answers have no error yet
            regression = is_regressor(champion.model)
            changes += self._act(self.policy.observe(position, bool(hit) if not regression else False,
                                                     champion.version, float(hit) if regression else None),
                                 position + 1)
        if learned.verdict is not None and contest is not None and self.roles.contest is contest:
            changes.append(self._conclude(learned.verdict, position + 1))
        if learned.recall is not None and recall is not None and self.roles.recall is recall:
            changes.append(self._recall(learned.recall, position + 1))
        if learned.anchor is not None and anchor is not None and self.roles.anchor is anchor:
            changes += self._anchor(learned.anchor, position + 1)
        return Step(learned, changes)

    def request(self, req: dict, position: int) -> list[Change]:
        """A retrain request from outside the stream (demand, schedule, a candidate trained offline)."""
        return self._retrain(req, position)

    def followed(self, new: Slot) -> None:
        """A champion chosen elsewhere (an operator's rollback or promotion) took over: watch it."""
        self.policy.swap(new.version)

    # -- decisions -------------------------------------------------------------------------------
    def _act(self, actions: list[Action], position: int) -> list[Change]:
        changes: list[Change] = []
        for action in actions:
            if action.kind == "drift":
                changes.append(Change("alarm", action.record, position=position))
            elif action.kind == "suppressed":
                changes.append(Change("suppressed", action.record, position=position))
            elif action.kind == "retrain":
                changes.append(Change("request", action.record, position=position))
                changes += self._retrain(action.record, position)
        return changes

    def _retrain(self, req: dict, position: int) -> list[Change]:
        champion, challenger = self.roles.champion, self.roles.challenger
        asked_of = req.get("model_version")
        if req["reason"] != "demand" and asked_of is not None and asked_of != champion.version:
            # About a champion replaced since: the new one is watched from scratch, and a
            # challenger against it would be built on stale evidence.
            return [Change("ignored", {"request": req, "why": f"about v{asked_of}; v{champion.version} is the "
                                                             f"champion now"}, position=position)]
        changes: list[Change] = []
        if challenger is not None:
            if req["reason"] not in NEW_CHANGE or self.roles.contest.evidence() >= 1.0:
                return [Change("ignored", {"request": req, "why": f"challenger v{challenger.version} is still "
                                                                 f"shadowing"}, slot=challenger, position=position)]
            # The stream changed again while the challenger was not ahead: it was made for a change
            # the stream has moved past, and its record would hold the next one back.
            changes.append(Change("dropped", {"evidence": self.roles.contest.report(), "why": "replaced"},
                                  slot=self.roles.drop(), position=position))
        candidate = self.versions.candidate(req)
        if candidate is not None:
            version, model, warm = candidate
        else:
            model = self.new_model()
            warm = warm_start(model, self.examples.since(req.get("since_position"), position))
            version = self.versions.challenger(req, model, champion.version, warm, position)
        slot = Slot("challenger", version, model, Prequential(self.cfg.window), examples=warm)
        self.roles.start(slot, Contest.from_settings(self.cfg))
        return changes + [Change("started", {"request": req, "warm_start": warm}, slot=slot, position=position)]

    def _conclude(self, verdict: str, position: int) -> Change:
        evidence = self.roles.contest.report()
        if verdict == "promote":
            old, new, gone = self.roles.promote(recall=Contest.from_settings(self.cfg), anchor=self._anchor_contest())
            self.policy.swap(new.version)
            return Change("promoted", {"evidence": evidence, "forgotten": gone}, slot=new, other=old,
                          position=position)
        return Change("dropped", {"evidence": evidence}, slot=self.roles.drop(), position=position)

    def _recall(self, verdict: str, position: int) -> Change:
        evidence = self.roles.recall.report()
        if verdict == "promote":
            gone, back = self.roles.restore_previous(Contest.from_settings(self.cfg), self._anchor_contest())
            self.policy.swap(back.version)
            return Change("restored", {"evidence": evidence}, slot=back, other=gone, position=position)
        return Change("forgotten", {"evidence": evidence}, slot=self.roles.forget_previous(), position=position)

    def _anchor_contest(self) -> Contest | None:
        """The baseline's next contest (None: `keep_baseline` is off, it leaves as any displaced champion)."""
        return Contest.from_settings(self.cfg) if self.cfg.keep_baseline else None

    def _anchor(self, verdict: str, position: int) -> list[Change]:
        """The baseline's contest: back as champion when it wins, else a new contest (never let go)."""
        evidence = self.roles.anchor.report()
        if verdict == "promote":
            gone, back, also = self.roles.restore_baseline(Contest.from_settings(self.cfg))
            self.policy.swap(back.version)
            return [Change("restored", {"evidence": evidence, "forgotten": also}, slot=back, other=gone,
                           position=position)]
        self.roles.anchor_again(Contest.from_settings(self.cfg))
        return []

