"""The registry side of the model roles: each champion and challenger as a registered version,
with its lineage (why it was made, what it replaced, its contest), and `model.swaps` for each
champion change the learner makes.

    lineage = Lineage(registry, settings.learner, publish=lambda old, new, reason: ...)
    champion = lineage.first_champion()            # the registry's champion, or a new version 1

`champion.Roles` decides; this records. The learner's worker calls one method per decision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from ..shared.settings import LearnerSettings
from .champion import Contest, Slot, warm_start
from .prequential import Prequential
from .spec import describe, parse_model

log = logging.getLogger(__name__)
WarmExamples = list[tuple[dict, str, bool | None, int | None]]


class Lineage:
    def __init__(self, registry: ModelRegistry, cfg: LearnerSettings,
                 publish: Callable[[int | None, int, str], None]) -> None:
        self.registry = registry
        self.cfg = cfg
        self.name = registry.model
        self.publish = publish  # (from_version, to_version, reason) -> model.swaps

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
