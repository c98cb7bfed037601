"""The model registry, in Redis: every version with its lineage, artifacts signed with HMAC-SHA256.

    reg = ModelRegistry(redis_client, Keys(""), "default", b"secret")
    v = reg.register(model, spec="linear_model.LogisticRegression()", reason="initial")
    reg.set_role("champion", v); model, meta = reg.load(v)

An artifact is `MAGIC | hmac(32 bytes) | pickle`. `load` checks the HMAC before unpickling and
raises TamperedArtifact otherwise: a blob that this deployment's key did not sign never becomes a
model (unpickling is code execution, so this check is the line that must never be skipped).

A version's record also says where its artifact stands in the learner's stream: `next_position`,
the position of the first labelled example the artifact has not learned while the learner keeps
learning that version (None once the learner does not), and `digest`, the artifact's content hash
(`digest.model_digest`). A prediction replica loads the artifact and learns the learner's outcomes
from `next_position` on (docs/serving.md); `load` reads artifact and record in one transaction,
so the two always belong together.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pickle
import time
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
    pass


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


class ModelRegistry:
    def __init__(self, client: redis.Redis, keys: Keys, model_name: str, signing_key: bytes) -> None:
        self.r = client
        self.keys = keys
        self.model = model_name
        self.key = signing_key

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
            "digest": model_digest(model),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.registry_artifact(self.model, version), dumps_signed(model, self.key))
        pipe.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))
        pipe.execute()
        return version

    def update(self, version: int, model: Any, *, examples_seen: int, metrics: dict[str, float] | None = None,
               offsets: dict[str, int] | None = None, next_position: int | None = None) -> int:
        """Replace a version's artifact as it keeps learning; returns the new revision.
        `next_position`: the learner's stream position it has learned up to (see the module's doc)."""
        meta = self.meta(version)
        meta["revision"] = int(meta.get("revision", 0)) + 1
        meta["examples_seen"] = examples_seen
        meta["updated_at"] = time.time()
        meta["next_position"] = next_position
        meta["digest"] = model_digest(model)
        if metrics is not None:
            meta["metrics"] = metrics
        if offsets is not None:
            meta["offsets"] = offsets
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.registry_artifact(self.model, version), dumps_signed(model, self.key))
        pipe.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))
        pipe.execute()
        return meta["revision"]

    def annotate(self, version: int, **fields: Any) -> None:
        """Merge fields into a version's lineage record (metrics at retirement, drop reason...)."""
        meta = self.meta(version)
        meta.update(fields)
        self.r.hset(self.keys.registry_versions(self.model), str(version), json.dumps(meta))

    def set_role(self, role: str, version: int | None) -> None:
        assert role in ROLES
        if version is None:
            self.r.hdel(self.keys.registry_roles(self.model), role)
        else:
            if not self.r.hexists(self.keys.registry_versions(self.model), str(version)):
                raise UnknownVersion(version)
            self.r.hset(self.keys.registry_roles(self.model), role, version)

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

    def versions(self) -> list[dict[str, Any]]:
        raw = self.r.hgetall(self.keys.registry_versions(self.model))
        return sorted((json.loads(v) for v in raw.values()), key=lambda m: m["version"])

    def load(self, version: int) -> tuple[Any, dict[str, Any]]:
        """The model of a version (signature checked) and its lineage, read together."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.keys.registry_artifact(self.model, version))
        pipe.hget(self.keys.registry_versions(self.model), str(version))
        artifact, raw = pipe.execute()
        if artifact is None or raw is None:
            raise UnknownVersion(version)
        try:
            model = loads_signed(artifact, self.key)
        except TamperedArtifact:
            log.error("REFUSED model %s version %s: its artifact signature does not match", self.model, version)
            raise
        return model, json.loads(raw)
