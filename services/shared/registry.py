"""The model registry, in Redis: every version with its lineage, artifacts signed with HMAC-SHA256.

    reg = ModelRegistry(redis_client, Keys(""), "default", b"secret")
    v = reg.register(model, spec="linear_model.LogisticRegression()", reason="initial")
    reg.set_role("champion", v); model, meta = reg.load(v)

An artifact is `MAGIC | hmac(32 bytes) | pickle`. `load` checks the HMAC before unpickling and
raises TamperedArtifact otherwise: a blob that this deployment's key did not sign never becomes a
model (unpickling is code execution, so this check is the line that must never be skipped).

A version's record also says where its artifact stands in the learner's stream: `learned_until`,
the position of the first labelled example the artifact has not learned; `next_position`, the
same while the learner keeps learning that version (None once it does not); and `digest`, the
artifact's content hash (`digest.model_digest`). A prediction replica loads the artifact and learns the learner's outcomes
from `next_position` on (docs/serving.md); `load` reads artifact and record in one transaction,
so the two always belong together.

Retention (`prune`): the drift loop registers a version for every challenger it tries, most of
which lose their contest; their artifacts (megabytes for a forest) would grow Redis without end.
The artifacts of versions older than the newest `keep` are deleted unless a role, the learner (a
displaced champion still shadowing) or their lines of promotions (what rollbacks go back to) need
them; their lineage records stay, marked `pruned_at`, and `load` refuses a pruned one with
`PrunedArtifact`. `set_role` and the prune are atomic scripts on the model's keys, so neither can
make a pruned version a champion nor prune one that just became a champion. The records are
bounded too (`forget`): beyond the newest `learner.keep_records`, those of pruned versions that no
role or line needs are deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pickle
import time
from collections.abc import Iterable
from typing import Any

import redis

from .digest import model_digest
from .keys import Keys

log = logging.getLogger(__name__)
ARTIFACT_MAGIC = b"DLM1"
ROLES = ("champion", "challenger")


class TamperedArtifact(RuntimeError):
    """The artifact's signature does not match: tampered, corrupt, or signed with another key."""


class UnknownVersion(KeyError):
    def __str__(self) -> str:  # KeyError's own is the bare repr of the version
        return f"version {self.args[0]} is not in the registry, or has no artifact"


class PrunedArtifact(UnknownVersion):
    """A version whose artifact retention deleted (`learner.keep_versions`); its lineage is kept."""

    def __str__(self) -> str:
        return (f"version {self.args[0]}'s artifact was pruned by retention (learner.keep_versions); "
                "its lineage is kept")


VERSIONS_LISTED, MAX_VERSIONS_LISTED = 100, 10_000  # GET /v1/models: the newest versions, by default and at most

# KEYS: versions, artifact, roles; ARGV: version, role. 0: no such version; -1: its artifact is gone.
_SET_ROLE = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('exists', KEYS[2]) == 0 then return -1 end
redis.call('hset', KEYS[3], ARGV[2], ARGV[1])
return 1
"""
# KEYS: roles, kept, then one artifact per ARGV version. Deletes those not in a role now; returns them.
_PRUNE = """
local in_role = {}
for _, v in ipairs(redis.call('hvals', KEYS[1])) do in_role[v] = true end
local pruned = {}
for i, v in ipairs(ARGV) do
  if not in_role[v] then
    redis.call('del', KEYS[i + 2])
    redis.call('zrem', KEYS[2], v)
    pruned[#pruned + 1] = v
  end
end
return pruned
"""


def sign(blob: bytes, key: bytes) -> bytes:
    return ARTIFACT_MAGIC + hmac.new(key, blob, hashlib.sha256).digest() + blob


def verify(artifact: bytes, key: bytes) -> bytes:
    """The signed payload of an artifact, or TamperedArtifact."""
    header = len(ARTIFACT_MAGIC) + 32
    if len(artifact) < header or artifact[: len(ARTIFACT_MAGIC)] != ARTIFACT_MAGIC:
        raise TamperedArtifact("not a signed driftline artifact")
    mac, blob = artifact[len(ARTIFACT_MAGIC):header], artifact[header:]
    if not hmac.compare_digest(mac, hmac.new(key, blob, hashlib.sha256).digest()):
        raise TamperedArtifact("artifact signature does not match: tampered, or signed with another key")
    return blob


def dumps_signed(obj: Any, key: bytes) -> bytes:
    return sign(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), key)


def loads_signed(artifact: bytes, key: bytes) -> Any:
    return pickle.loads(verify(artifact, key))  # noqa: S301 -- verified above


def lines_back(starts: set[int], metas: dict[int, dict[str, Any]], depth: int) -> set[int]:
    """`starts` and, from each, what it replaced (else its parent) and so on, up to `depth` back
    among the versions of `metas` (`prune`: those with stored artifacts; `forget`: every record):
    what successive rollbacks go back to (`swaps.rollback_target`), also from a displaced champion
    that may be restored.

        >>> lines_back({5}, {5: {"replaced": 3}, 3: {"parent": 1}, 1: {}, 4: {"parent": 3}}, depth=5)
        {1, 3, 5}
        >>> sorted(lines_back({5, 4}, {5: {"replaced": 3}, 3: {"parent": 1}, 1: {}, 4: {"parent": 3}}, depth=1))
        [3, 4, 5]
    """
    lines = set(starts)
    for version in starts:
        for _ in range(depth):
            meta = metas.get(version)
            back = None if meta is None else (meta.get("replaced") or meta.get("parent"))
            if back is None or int(back) not in metas:
                break
            version = int(back)
            lines.add(version)
    return lines


class ModelRegistry:
    def __init__(self, client: redis.Redis, keys: Keys, model_name: str, signing_key: bytes) -> None:
        self.r = client
        self.keys = keys
        self.model = model_name
        self.key = signing_key
        self._set_role = client.register_script(_SET_ROLE)
        self._prune = client.register_script(_PRUNE)
        self._indexed = False

    # -- writing ----------------------------------------------------------------------------
    def register(
        self,
        model: Any,
        *,
        spec: str,
        reason: str,
        parent: int | None = None,
        drift_id: str | None = None,
        examples_seen: int = 0,
        metrics: dict[str, float] | None = None,
        offsets: dict[str, int] | None = None,
        position: int = 0,
        next_position: int | None = None,
    ) -> int:
        """Store a new version with its lineage; returns its number (1, 2, ...). `next_position`:
        the learner holds it and learns the stream from there on (None: not the learner's)."""
        version = int(self.r.incr(self.keys.registry_seq(self.model)))
        meta = {
            "version": version,
            "model": self.model,
            "spec": spec,
            "parent": parent,
            "reason": reason,
            "drift_id": drift_id,
            "created_at": time.time(),
            "updated_at": time.time(),
            "examples_seen": examples_seen,
            "position": position,
            "metrics": metrics or {},
            "offsets": offsets or {},
            "revision": 0,
            "next_position": next_position,
            "learned_until": next_position,
            "digest": model_digest(model),
        }
        self._index_once()
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.registry_artifact(self.model, version), dumps_signed(model, self.key))
        pipe.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))
        pipe.zadd(self.keys.registry_kept(self.model), {str(version): version})
        pipe.execute()
        return version

    def update(self, version: int, model: Any, *, examples_seen: int, metrics: dict[str, float] | None = None,
               offsets: dict[str, int] | None = None, next_position: int | None = None,
               learned_until: int | None = None) -> int:
        """Replace a version's artifact as it keeps learning; returns the new revision.
        `next_position`: the learner's stream position it has learned up to, None when it stops
        learning it; `learned_until`: that position also then (see the module's doc)."""
        meta = self.meta(version)
        meta["revision"] = int(meta.get("revision", 0)) + 1
        meta["examples_seen"] = examples_seen
        meta["updated_at"] = time.time()
        meta["next_position"] = next_position
        meta["learned_until"] = next_position if learned_until is None else learned_until
        meta["digest"] = model_digest(model)
        if metrics is not None:
            meta["metrics"] = metrics
        if offsets is not None:
            meta["offsets"] = offsets
        meta.pop("pruned_at", None)  # a learner replaying after a crash saves a pruned version again
        self._index_once()
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.registry_artifact(self.model, version), dumps_signed(model, self.key))
        pipe.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))
        pipe.zadd(self.keys.registry_kept(self.model), {str(version): version})
        pipe.execute()
        return meta["revision"]

    def annotate(self, version: int, **fields: Any) -> None:
        """Merge fields into a version's lineage record (metrics at retirement, drop reason...); a
        `request_id` is also indexed (`version_of_request`)."""
        meta = self.meta(version)
        meta.update(fields)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))
        if fields.get("request_id") is not None:
            pipe.hset(self.keys.registry_requests(self.model), fields["request_id"], version)
        pipe.execute()

    def set_role(self, role: str, version: int | None) -> None:
        """UnknownVersion without such a version, PrunedArtifact when its artifact is gone."""
        assert role in ROLES
        if version is None:
            self.r.hdel(self.keys.registry_roles(self.model), role)
            return
        done = self._set_role(keys=[self.keys.registry_versions(self.model),
                                    self.keys.registry_artifact(self.model, version),
                                    self.keys.registry_roles(self.model)], args=[version, role])
        if done == 0:
            raise UnknownVersion(version)
        if done == -1:
            raise PrunedArtifact(version)

    # -- retention --------------------------------------------------------------------------
    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete the artifacts of the versions older than the newest `keep` stored that neither
        a role, `protect` (the learner's slots) nor their lines of promotions (up to `keep` back)
        need; returns the versions pruned. Their lineage records stay (`pruned_at`).

            reg.prune(20, protect={slot.version for slot in roles.every_slot()})
        """
        self._index_once()
        kept = [int(v) for v in self.r.zrange(self.keys.registry_kept(self.model), 0, -1)]
        if len(kept) <= keep:
            return []
        candidates = kept[:len(kept) - keep]
        roles = {int(v) for v in self.r.hvals(self.keys.registry_roles(self.model))}
        raw = self.r.hmget(self.keys.registry_versions(self.model), [str(v) for v in kept])
        metas = {v: json.loads(m) for v, m in zip(kept, raw) if m is not None}
        protected = lines_back(roles | set(protect), metas, depth=keep)
        victims = [v for v in candidates if v not in protected]
        if not victims:
            return []
        pruned = [int(v) for v in self._prune(
            keys=[self.keys.registry_roles(self.model), self.keys.registry_kept(self.model),
                  *(self.keys.registry_artifact(self.model, v) for v in victims)], args=victims)]
        now = time.time()
        for version in pruned:
            self.annotate(version, pruned_at=now)
        return pruned

    def forget(self, keep: int, protect: Iterable[int] = (), depth: int = 20) -> list[int]:
        """Delete the lineage records of the versions older than the newest `keep` records whose
        artifacts retention deleted already, unless a role, `protect` or their lines of promotions
        (up to `depth` back) name them, with their retrain requests' index entries; returns them.
        A long-running drift loop registers versions without end (some 500 per million examples of
        a drifting stream): their records would grow Redis and every `GET /v1/models`.

            reg.forget(1000, protect={slot.version for slot in roles.every_slot()})
        """
        self._index_once()
        raw = self.r.hgetall(self.keys.registry_versions(self.model))  # at most ~keep of them: bounded here
        if len(raw) <= keep:
            return []
        metas = {int(v): json.loads(m) for v, m in raw.items()}
        stored = {int(v) for v in self.r.zrange(self.keys.registry_kept(self.model), 0, -1)}
        starts = {int(v) for v in self.r.hvals(self.keys.registry_roles(self.model))} | set(protect)
        needed = lines_back(starts, metas, depth)
        victims = [v for v in sorted(metas)[:len(metas) - keep] if v not in stored and v not in needed]
        if not victims:
            return []
        requests = [metas[v]["request_id"] for v in victims if metas[v].get("request_id") is not None]
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.keys.registry_versions(self.model), *(str(v) for v in victims))
        if requests:
            pipe.hdel(self.keys.registry_requests(self.model), *requests)
        pipe.execute()
        return victims

    @staticmethod
    def absent(version: int, meta: dict[str, Any]) -> UnknownVersion:
        """Why a version with lineage `meta` has no artifact: PrunedArtifact when retention
        deleted it, else UnknownVersion."""
        return PrunedArtifact(version) if "pruned_at" in meta else UnknownVersion(version)

    def version_of_request(self, request_id: str) -> int | None:
        """The version registered for a retrain request (`annotate(..., request_id=...)`), if any."""
        self._index_once()
        version = self.r.hget(self.keys.registry_requests(self.model), request_id)
        return int(version) if version is not None else None

    def _index_once(self) -> None:
        """A registry written before the retention and request indexes: build them once from the
        lineage records (the index of stored artifacts exists from the first version on)."""
        if self._indexed:
            return
        kept = self.keys.registry_kept(self.model)
        if self.r.exists(kept) or not self.r.hlen(self.keys.registry_versions(self.model)):
            self._indexed = bool(self.r.exists(kept))  # an empty registry: asked again at its first version
            return
        metas = self.versions()
        stored = [m["version"] for m in metas if self.r.exists(self.keys.registry_artifact(self.model, m["version"]))]
        pipe = self.r.pipeline(transaction=True)
        if stored:
            pipe.zadd(kept, {str(v): v for v in stored})
        for m in metas:
            if m.get("request_id") is not None:
                pipe.hset(self.keys.registry_requests(self.model), m["request_id"], m["version"])
        pipe.execute()
        self._indexed = True

    # -- reading ----------------------------------------------------------------------------
    def role(self, role: str) -> int | None:
        v = self.r.hget(self.keys.registry_roles(self.model), role)
        return int(v) if v is not None else None

    def champion(self) -> int | None:
        return self.role("champion")

    def challenger(self) -> int | None:
        return self.role("challenger")

    def meta(self, version: int) -> dict[str, Any]:
        raw = self.r.hget(self.keys.registry_versions(self.model), str(version))
        if raw is None:
            raise UnknownVersion(version)
        return json.loads(raw)

    def versions(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The lineage records, oldest first: every one, or the newest `limit`."""
        if limit is not None:
            return self.listing(limit)[0]
        raw = self.r.hgetall(self.keys.registry_versions(self.model)).values()
        return sorted((json.loads(v) for v in raw if v is not None), key=lambda m: m["version"])

    def count(self) -> int:
        """How many lineage records there are (`forget` bounds them)."""
        return int(self.r.hlen(self.keys.registry_versions(self.model)))

    def listing(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The newest `limit` lineage records, oldest first, and how many there are in all: two
        round trips, the count read off the same key listing."""
        numbers = sorted(int(v) for v in self.r.hkeys(self.keys.registry_versions(self.model)))
        raw = self.r.hmget(self.keys.registry_versions(self.model), [str(v) for v in numbers[-limit:]]) \
            if numbers and limit > 0 else []
        return sorted((json.loads(v) for v in raw if v is not None), key=lambda m: m["version"]), len(numbers)

    def load(self, version: int) -> tuple[Any, dict[str, Any]]:
        """The model of a version (signature checked) and its lineage, read together."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.registry_artifact(self.model, version))
        pipe.hget(self.keys.registry_versions(self.model), str(version))
        artifact, raw = pipe.execute()
        if artifact is None or raw is None:
            raise UnknownVersion(version) if raw is None else self.absent(version, json.loads(raw))
        try:
            model = loads_signed(artifact, self.key)
        except TamperedArtifact:
            log.error("REFUSED model %s version %s: its artifact signature does not match", self.model, version)
            raise
        return model, json.loads(raw)
