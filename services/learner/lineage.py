"""The model roles over time: retrain requests, promotions, drops and swaps made elsewhere, each
applied to `champion.Roles` and recorded in the registry as a version with its lineage (why it
was made, what it replaced, its contest), with `model.swaps` for each champion change.

    lineage = Lineage(registry, settings.learner, publish=lambda old, new, reason: ..., telemetry=t)
    roles = Roles(lineage.first_champion())       # the registry's champion, or a new version 1
    lineage.retrain(roles, request, position, warm=buffer.since)   # True: the roles changed

`champion.Roles` holds the rules of one example; this holds what happens between examples. The
learner's worker calls one method per control record or verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..shared import metrics
from ..shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from ..shared.settings import LearnerSettings
from .champion import Contest, Roles, Slot, Verdict, warm_start
from .prequential import Prequential
from .spec import describe, parse_model
from .telemetry import Telemetry

log = logging.getLogger(__name__)
WarmExamples = list[tuple[dict, str, bool | None, int | None]]


class Lineage:
    def __init__(self, registry: ModelRegistry, cfg: LearnerSettings,
                 publish: Callable[[int | None, int, str], None], telemetry: Telemetry) -> None:
        self.registry = registry
        self.cfg = cfg
        self.name = registry.model
        self.publish = publish  # (from_version, to_version, reason) -> model.swaps
        self.telemetry = telemetry

    # -- decisions: each returns whether the roles changed (the worker checkpoints then) ---------
    def retrain(self, roles: Roles, req: dict, position: int, warm: Callable[[int | None, int], WarmExamples]) -> bool:
        """A retrain request: a challenger warm-started on `warm(since_position, position)`, unless
        the request is about a replaced champion or a challenger is still shadowing."""
        champion, challenger = roles.champion, roles.challenger
        asked_of = req.get("model_version")
        if req["reason"] != "demand" and asked_of is not None and asked_of != champion.version:
            # Drift seen in the errors of a champion that has been replaced since: the new one is
            # watched from scratch, and a challenger against it would be built on stale evidence.
            log.info("learner %s: retrain request %s (%s) about v%s ignored: v%d is the champion now", self.name,
                     req["request_id"], req["reason"], asked_of, champion.version)
            return False
        if challenger is not None:
            log.info("learner %s: retrain request %s (%s) ignored: challenger v%d is still shadowing",
                     self.name, req["request_id"], req["reason"], challenger.version)
            self.ignored(challenger, req, position)
            return False
        slot, contest = self.challenger(req, champion, position, warm(req.get("since_position"), position))
        roles.start(slot, contest)
        log.info("learner %s: challenger v%d (%s, warm start %d, %d shadowed in replay) shadows champion v%d",
                 self.name, slot.version, req["reason"], slot.examples, contest.shared, champion.version)
        if contest.verdict() == "promote":  # the replayed evidence is already conclusive
            self.conclude(roles, "promote", position)
        return True

    def conclude(self, roles: Roles, verdict: Verdict, position: int) -> None:
        """The contest's verdict: promote the challenger, or drop it."""
        evidence = roles.contest.evidence()
        if verdict == "promote":
            self.telemetry.retire(roles.champion, roles.challenger)
            old, new = roles.promote()
            self.promoted(old, new, evidence, position)
            log.info("learner %s: PROMOTED v%d over v%d at position %d (%s)", self.name, new.version, old.version,
                     position, evidence)
        else:
            self.telemetry.retire(roles.challenger)
            slot = roles.drop()
            self.dropped(slot, evidence, position)
            metrics.CHALLENGERS_DROPPED.labels(self.name).inc()
            log.info("learner %s: challenger v%d dropped at position %d (%s)", self.name, slot.version, position,
                     evidence)

    def follow(self, roles: Roles, swap: dict) -> bool:
        """A champion change published elsewhere (a rollback or a manual promotion through the
        prediction service or our admin route): adopted when the registry agrees."""
        new = self.followed(swap, roles.champion, roles.challenger)
        if new is None:
            return False
        if new is roles.challenger:
            self.telemetry.retire(new)
        old = roles.replace_champion(new, Contest.from_settings(self.cfg))
        self.save(old)
        self.telemetry.retire(old)
        log.info("learner %s: champion is now v%d (%s, from v%s)", self.name, new.version, swap["reason"],
                 old.version)
        return True

    # -- the registry records ---------------------------------------------------------------------

    def slot(self, role: str, version: int, model, examples: int = 0, revision: int = 0) -> Slot:
        return Slot(role, version, model, Prequential(self.cfg.window), examples=examples, revision=revision)

    def first_champion(self) -> Slot:
        """A registry without a checkpoint: continue from its champion; none: register version 1."""
        version = self.registry.champion()
        if version is not None:
            model, meta = self.registry.load(version)
            slot = self.slot("champion", version, model, examples=int(meta.get("examples_seen", 0)))
        else:
            model = parse_model(self.cfg.model)
            version = self.registry.register(model, spec=self.cfg.model, reason="initial")
            self.registry.set_role("champion", version)
            slot = self.slot("champion", version, model)
            self.publish(None, version, "initial")
        log.info("learner %s: first start, champion v%d = %s", self.name, version, describe(model))
        return slot

    def challenger(self, req: dict, champion: Slot, position: int, warm: WarmExamples) -> tuple[Slot, Contest]:
        """The challenger a retrain request asks for, warm-started on `warm` (see `warm_start`);
        one registered by a learner that crashed before its checkpoint is taken up again."""
        version = next((m["version"] for m in self.registry.versions() if m.get("request_id") == req["request_id"]),
                       None)
        contest = Contest.from_settings(self.cfg)
        if version is not None:  # its warm-up record was not kept: the contest starts afresh
            model, meta = self.registry.load(version)
            examples = int(meta.get("examples_seen", 0))
        else:
            model = parse_model(self.cfg.model)
            # Test-then-train, as if the challenger had shadowed since the change point: the request
            # reaches us a batch or more after the drift, and this way that delay costs no evidence.
            examples = warm_start(model, warm, champion.version, contest)
            version = self.registry.register(
                model, spec=self.cfg.model, reason=req["reason"], parent=champion.version,
                drift_id=req.get("drift_id"), examples_seen=examples, position=position)
            self.registry.annotate(version, request_id=req["request_id"], warm_start=examples,
                                   requested_at=req.get("position"))
        self.registry.set_role("challenger", version)
        return self.slot("challenger", version, model, examples=examples), contest

    def ignored(self, challenger: Slot, req: dict, position: int) -> None:
        """A retrain request that came while `challenger` shadows: noted on the challenger."""
        meta = self.registry.meta(challenger.version)
        ignored = meta.get("ignored_requests", []) + [{"request_id": req["request_id"], "reason": req["reason"],
                                                       "position": position}]
        self.registry.annotate(challenger.version, ignored_requests=ignored[-50:])

    def promoted(self, old: Slot, new: Slot, evidence: dict, position: int) -> None:
        old.revision = self.save(old)
        new.revision = self.save(new)
        already = self.registry.champion() == new.version  # a crashed learner promoted it already
        self.registry.set_role("champion", new.version)
        self.registry.set_role("challenger", None)
        self.registry.annotate(new.version, promoted_at=position, replaced=old.version, contest=evidence)
        self.registry.annotate(old.version, retired_at=position, retired_by=new.version)
        if not already:
            self.publish(old.version, new.version, "promotion")

    def dropped(self, slot: Slot, evidence: dict, position: int) -> None:
        self.registry.annotate(slot.version, dropped_at=position, contest=evidence,
                               drop_reason=f"did not beat the champion ({self.cfg.promotion_rule}, margin "
                                           f"{self.cfg.promote_margin:g}) within {self.cfg.max_shadow} shared "
                                           f"examples",
                               metrics=slot.stats.as_dict())
        self.registry.set_role("challenger", None)

    def followed(self, swap: dict, champion: Slot, challenger: Slot | None) -> Slot | None:
        """The new champion of a swap made elsewhere, when the registry agrees (None: ignore it)."""
        target = swap["to_version"]
        if target == champion.version or self.registry.champion() != target:
            return None  # ours, or already superseded by a later change
        if challenger is not None and challenger.version == target:
            if swap["reason"] == "promotion":
                return None  # our own promotion, lost in a crash: the replay will make it again
            self.registry.set_role("challenger", None)
            return challenger
        try:
            model, meta = self.registry.load(target)
        except (TamperedArtifact, UnknownVersion) as exc:
            log.error("learner %s: REFUSED to follow the swap to v%s: %r; keeping v%d", self.name, target, exc,
                      champion.version)
            return None
        return self.slot("champion", target, model, examples=int(meta.get("examples_seen", 0)),
                         revision=int(meta.get("revision", 0)))

    def save(self, slot: Slot, offsets: dict[str, int] | None = None) -> int:
        """The slot's model and statistics into its version; returns the new revision."""
        return self.registry.update(slot.version, slot.model, examples_seen=slot.examples,
                                    metrics=slot.stats.as_dict(), offsets=offsets)
