"""The model roles over time, in the registry: each change the drift loop makes (`adaptation.Change`)
recorded as a version with its lineage (why it was made, what it replaced, its contest), with
`model.swaps` for each champion change; and the changes made elsewhere (an operator's rollback or
promotion) taken up.

    lineage = Lineage(registry, settings.learner, publish=lambda old, new, reason: ..., telemetry=t)
    roles = Roles(lineage.first_champion())       # the registry's champion, or a new version 1
    lineage.record(change)                        # after Adaptation.learn / request

`adaptation.Adaptation` decides; this writes down. It is also the loop's source of version numbers
(`challenger`): a challenger registered by a learner that crashed before its checkpoint keeps its
number when the restarted learner takes the same decision again.

Every artifact saved here carries the stream position it has learned up to (`next_position`), and
a version the learner stops learning is marked so (`next_position` None): a prediction replica
follows a version from its artifact by learning the outcomes from that position on, which is
exact only while the learner learns that version too (docs/serving.md). A version the learner
takes up again (an operator's rollback to an old one) is saved at the position where it resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..shared import metrics, redis_clients
from ..shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion
from ..shared.settings import LearnerSettings
from .adaptation import Change
from .champion import Contest, Roles, Slot
from .prequential import Prequential
from .spec import describe, parse_model
from .telemetry import Telemetry

log = logging.getLogger(__name__)


class Lineage:
    def __init__(self, registry: ModelRegistry, cfg: LearnerSettings,
                 publish: Callable[[int | None, int, str], None], telemetry: Telemetry,
                 flush: Callable[[], object] = lambda: None) -> None:
        self.registry = registry
        self.cfg = cfg
        self.name = registry.model
        self.publish = publish  # (from_version, to_version, reason) -> model.swaps
        self.telemetry = telemetry
        # The outcomes learned before an artifact go to Kafka before it is saved: a replica that
        # loads it must find every one after it, and a learner that crashes must replay the ones
        # before it, not learn them another way (docs/serving.md).
        self.flush = flush

    # -- the loop's decisions ----------------------------------------------------------------------
    def challenger(self, request: dict, model: Any, parent: int, warm: int, position: int) -> int:
        """The version of the challenger `request` asks for (adaptation.Versions): a new one, or
        the one a learner that crashed before its checkpoint registered for the same request."""
        version = self.registry.version_of_request(request["request_id"])
        if version is None:
            self.flush()
            version = self.registry.register(
                model, spec=self.cfg.model, reason=request["reason"], parent=parent,
                drift_id=request.get("drift_id"), examples_seen=warm, position=position, next_position=position)
            self.registry.annotate(version, request_id=request["request_id"], warm_start=warm,
                                   requested_at=request.get("position"))
        return version

    def candidate(self, request: dict) -> tuple[int, Any, int] | None:
        """A version registered for `request` by someone else than a learner (`driftline train`:
        no warm start recorded), to enter the contest as it is (adaptation.Versions). A version a
        learner registered is warm-started again, the same way, by `challenger`: its artifact may
        have learned more since."""
        version = self.registry.version_of_request(request["request_id"])
        meta = None if version is None else self.registry.meta(version)
        if meta is None or "warm_start" in meta:
            return None
        try:
            model, meta = self.registry.load(meta["version"])
        except (TamperedArtifact, UnknownVersion) as exc:
            log.error("learner %s: REFUSED the candidate v%s of request %s: %r", self.name, meta["version"],
                      request["request_id"], exc)
            return None
        return meta["version"], model, int(meta.get("examples_seen", 0))

    def record(self, change: Change) -> bool:
        """Write one change down; True when the roles changed (the worker checkpoints then)."""
        kind, slot, other, position = change.kind, change.slot, change.other, change.position
        if kind == "started":
            req = change.record["request"]
            meta = self.registry.meta(slot.version)
            if meta.get("next_position") != position or meta.get("revision", 0) != 0:  # not as just registered
                slot.revision = self.save(slot, position)  # what it learned before the stream, from here on
            self.registry.set_role("challenger", slot.version)
            log.info("learner %s: challenger v%d (%s, warm start %d) shadows the champion", self.name, slot.version,
                     req["reason"], change.record["warm_start"])
            return True
        if kind == "ignored":
            req = change.record["request"]
            log.info("learner %s: retrain request %s (%s) ignored: %s", self.name, req["request_id"], req["reason"],
                     change.record["why"])
            if slot is not None:
                meta = self.registry.meta(slot.version)
                ignored = meta.get("ignored_requests", []) + [{"request_id": req["request_id"], "reason": req["reason"],
                                                               "position": position}]
                self.registry.annotate(slot.version, ignored_requests=ignored[-50:])
            return False
        if kind == "promoted":
            self.telemetry.retire(other, slot)  # its gauges as challenger, the old champion's
            other.revision = self.save(other, position)  # it shadows on as the previous champion
            slot.revision = self.save(slot, position)
            already = self.registry.champion() == slot.version  # a crashed learner promoted it already
            self.registry.set_role("champion", slot.version)
            self.registry.set_role("challenger", None)
            self.registry.annotate(slot.version, promoted_at=position, replaced=other.version,
                                   contest=change.record["evidence"])
            self.registry.annotate(other.version, retired_at=position, retired_by=slot.version, shadowing=True)
            gone = change.record.get("forgotten")
            if gone is not None:
                self.registry.annotate(gone.version, shadowing=False, next_position=None)
            if not already:
                self.publish(other.version, slot.version, "promotion")
            log.info("learner %s: PROMOTED v%d over v%d at position %d (%s); v%d shadows it", self.name,
                     slot.version, other.version, position, change.record["evidence"], other.version)
            return True
        if kind == "restored":
            self.telemetry.retire(other)
            other.revision = self.save(other, position, leaves=True)  # what it had learned, frozen
            slot.revision = self.save(slot, position)
            already = self.registry.champion() == slot.version
            self.registry.set_role("champion", slot.version)
            self.registry.annotate(slot.version, restored_at=position, shadowing=False,
                                   recall=change.record["evidence"])
            self.registry.annotate(other.version, retired_at=position, retired_by=slot.version)
            gone = change.record.get("forgotten")  # a displaced champion leaving with it (the baseline's return)
            if gone is not None:
                gone.revision = self.save(gone, position, leaves=True)
                self.registry.annotate(gone.version, shadowing=False, next_position=None)
            if not already:
                self.publish(other.version, slot.version, "restored")
            log.info("learner %s: v%d is the champion again at position %d: it did better than v%d, which "
                     "replaced it (%s)", self.name, slot.version, position, other.version, change.record["evidence"])
            return True
        if kind == "dropped":
            self.telemetry.retire(slot)
            why = ("replaced by a challenger for a later change, while it was not ahead"
                   if change.record.get("why") == "replaced" else
                   f"did not beat the champion ({self.cfg.promotion_rule}, margin {self.cfg.promote_margin:g}) "
                   f"within {self.cfg.max_shadow} shared examples")
            self.registry.annotate(slot.version, dropped_at=position, contest=change.record["evidence"],
                                   drop_reason=why, metrics=slot.stats.as_dict(), next_position=None)
            self.registry.set_role("challenger", None)
            metrics.CHALLENGERS_DROPPED.labels(self.name).inc()
            log.info("learner %s: challenger v%d dropped at position %d (%s)", self.name, slot.version, position,
                     change.record["evidence"])
            return True
        if kind == "forgotten":
            self.registry.annotate(slot.version, shadowing=False, recall=change.record["evidence"], next_position=None)
            log.info("learner %s: v%d, displaced at its promotion, stops shadowing at position %d (%s)", self.name,
                     slot.version, position, change.record["evidence"])
            return True
        return False

    def prune(self, roles: Roles) -> list[int]:
        """Retention after a role change (registry.prune): the artifacts of versions nothing needs
        any more, beyond the newest `learner.keep_versions`, are deleted, and their lineage records
        beyond the newest `learner.keep_records`. Best effort: a Redis that does not answer now is
        asked again at the next change."""
        held = {s.version for s in roles.every_slot()}
        try:
            pruned = self.registry.prune(self.cfg.keep_versions, protect=held)
            forgotten = self.registry.forget(self.cfg.keep_records, protect=held, depth=self.cfg.keep_versions)
        except redis_clients.UNAVAILABLE as exc:
            log.warning("learner %s: retention postponed (%s)", self.name, exc)
            return []
        if pruned:
            log.info("learner %s: artifacts of v%s pruned (retention keeps the newest %d and what is needed)",
                     self.name, ", v".join(map(str, pruned)), self.cfg.keep_versions)
        if forgotten:
            log.info("learner %s: lineage records of v%s deleted (retention keeps the newest %d and what is needed)",
                     self.name, ", v".join(map(str, forgotten)), self.cfg.keep_records)
        return pruned

    # -- changes made elsewhere ------------------------------------------------------------------
    def follow(self, roles: Roles, swap: dict, position: int) -> Slot | None:
        """A champion change published elsewhere (a rollback or a manual promotion through the
        prediction service or our admin route): adopted at `position` when the registry agrees.
        Returns the new champion, None when nothing changed."""
        new = self.followed(swap, roles)
        if new is None:
            return None
        if new is roles.challenger:
            self.telemetry.retire(new)
        leaving = [s for s in (roles.champion, roles.previous, roles.baseline) if s is not None and s is not new]
        old = roles.replace_champion(new, Contest.from_settings(self.cfg))
        for slot in leaving:
            slot.revision = self.save(slot, position, leaves=True)
        new.revision = self.save(new, position)  # it learns the stream from here on
        self.telemetry.retire(old)
        log.info("learner %s: champion is now v%d (%s, from v%s)", self.name, new.version, swap["reason"],
                 old.version)
        return new

    # -- the registry records ---------------------------------------------------------------------
    def slot(self, role: str, version: int, model, examples: int = 0, revision: int = 0) -> Slot:
        return Slot(role, version, model, Prequential(self.cfg.window), examples=examples, revision=revision)

    def first_champion(self) -> Slot:
        """A registry without a checkpoint: continue from its champion; none: register version 1."""
        version = self.registry.champion()
        if version is not None:
            model, meta = self.registry.load(version)
            slot = self.slot("champion", version, model, examples=int(meta.get("examples_seen", 0)))
            slot.revision = self.save(slot, 0)  # this learner's stream starts here
        else:
            model = parse_model(self.cfg.model)
            version = self.registry.register(model, spec=self.cfg.model, reason="initial", next_position=0)
            self.registry.set_role("champion", version)
            slot = self.slot("champion", version, model)
            self.publish(None, version, "initial")
        log.info("learner %s: first start, champion v%d = %s", self.name, version, describe(model))
        return slot

    def followed(self, swap: dict, roles: Roles) -> Slot | None:
        """The new champion of a swap made elsewhere, when the registry agrees (None: ignore it)."""
        target, challenger = swap["to_version"], roles.challenger
        if target == roles.champion.version or self.registry.champion() != target:
            return None  # ours, or already superseded by a later change
        if swap["reason"] in ("promotion", "restored") and target in {s.version for s in roles.every_slot()}:
            return None  # our own change, lost in a crash: the replay will make it again
        if challenger is not None and challenger.version == target:
            self.registry.set_role("challenger", None)
            return challenger
        for shadow in (roles.previous, roles.baseline):
            if shadow is not None and shadow.version == target:
                return shadow  # a rollback to a champion it replaced, which has kept learning
        try:
            model, meta = self.registry.load(target)
        except (TamperedArtifact, UnknownVersion) as exc:
            log.error("learner %s: REFUSED to follow the swap to v%s: %r; keeping v%d", self.name, target, exc,
                      roles.champion.version)
            return None
        return self.slot("champion", target, model, examples=int(meta.get("examples_seen", 0)),
                         revision=int(meta.get("revision", 0)))

    def save(self, slot: Slot, position: int, offsets: dict[str, int] | None = None, leaves: bool = False) -> int:
        """The slot's model and statistics into its version, learned up to stream `position` (with
        `leaves`, the learner stops learning it here); returns the new revision."""
        self.flush()
        return self.registry.update(slot.version, slot.model, examples_seen=slot.examples, metrics=slot.stats.as_dict(),
                                    offsets=offsets, next_position=None if leaves else position,
                                    learned_until=position)
