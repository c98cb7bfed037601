"""The online feature store: entity state and per-event feature snapshots in Redis.

Both sides of training/serving parity go through here: the features service reads a batch of
entity states, computes vectors with `FeatureSet.vector` and writes the new states back; the
prediction service calls `FeatureStore.vector` for one request, which reads the same hash and
calls the same function. It must never compute a feature itself (that is `definitions.py`'s job)
and never issue one Redis round trip per field or per event of a batch.

    >>> store = FeatureStore(redis_client, Keys("t1"), load_feature_set("default"), snapshot_ttl_s=3600)
    >>> x = store.vector("meter-7", {"price": 0.3}, ts=1700000000.0)   # state before the event
    >>> store.save_snapshots([{"event_id": "e1", "entity_id": "meter-7", "ts": 1.0, "features": x,
    ...                        "feature_set": store.feature_set.name, "published_ms": None}])

Layout (keys from `Keys`, hash-tagged by entity or event, so a Redis Cluster works):
- `Keys.entity(entity_id)` — hash, the entity state: numbers as `repr` strings, `label` as the
  label string, plus bookkeeping fields that start with `_`: `_off`/`_p`, the events.valid offset
  and partition of the last event folded into the state (a redelivered event at an offset <= `_off`
  is not applied twice; one entity lives on one partition because events are keyed by entity).
- `Keys.snapshot(event_id)` — hash with a TTL; field `fv` = the Avro FeatureVector the event was
  scored with. The learner and the prediction service add `p.<role>` fields to the same hash.

Labels are folded in by a one-key Lua script that keeps the label of the latest event (by event
time), so a label never overwrites a later one and a redelivered label changes nothing, even when
the label and the entity's events are handled by different replicas.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..shared import metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.keys import Keys
from .definitions import FeatureSet, State

SNAPSHOT_FIELD = "fv"
OFFSET_FIELD = "_off"
PARTITION_FIELD = "_p"
LABEL_FIELDS = ("label", "label_ts")  # written only by SET_LABEL_LUA
STRING_FIELDS = frozenset({"label"})
INT_FIELDS = frozenset({"n", OFFSET_FIELD, PARTITION_FIELD})

# KEYS[1] entity hash; ARGV: label, event ts (repr). Same rule as FeatureSet.apply_label:
# a label of an earlier event than the known one is ignored; equal ts overwrites (idempotent).
SET_LABEL_LUA = """
local known = redis.call('HGET', KEYS[1], 'label_ts')
if known and tonumber(known) > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'label', ARGV[1], 'label_ts', ARGV[2])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def encode_value(value: Any) -> str:
    """One state value as stored: numbers as their repr (exact round trip), strings as they are."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return repr(value)
    return str(value)


def encode_state(state: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, str]:
    """The hash fields of a state (None values are left out: a missing field means unknown)."""
    skip = set(exclude)
    return {k: encode_value(v) for k, v in state.items() if v is not None and k not in skip}


def decode_state(raw: Mapping[Any, Any]) -> State:
    """A state from HGETALL (bytes or str): `label` stays a string, counters are ints, the rest floats."""
    state: State = {}
    for key, value in raw.items():
        k, v = _text(key), _text(value)
        if k in STRING_FIELDS:
            state[k] = v
        elif k in INT_FIELDS:
            state[k] = int(v)
        else:
            try:
                state[k] = float(v)
            except ValueError:  # a field some newer writer added; keep it rather than fail
                state[k] = v
    return state


class FeatureStore:
    """Entity state and feature snapshots of one namespace, for one feature set."""

    def __init__(self, client, keys: Keys, feature_set: FeatureSet, snapshot_ttl_s: int,
                 service: str = "features") -> None:
        self.client = client
        self.keys = keys
        self.feature_set = feature_set
        self.snapshot_ttl_s = int(snapshot_ttl_s)
        self.service = service
        self.codec = get_codec()

    # -- reads --------------------------------------------------------------------------------
    def read_states(self, entity_ids: Iterable[str]) -> dict[str, State]:
        """The states of these entities ({} for a new one), in one pipelined round trip."""
        states, _ = self.read_batch(entity_ids, ())
        return states

    def read_batch(self, entity_ids: Iterable[str], event_ids: Iterable[str]) -> tuple[dict[str, State], dict[str, dict]]:
        """Entity states and the snapshot vectors (`fv`, decoded) of some events, one round trip.
        Events whose snapshot is missing or unreadable are absent from the second dict."""
        entity_ids = list(dict.fromkeys(entity_ids))
        event_ids = list(dict.fromkeys(event_ids))
        if not entity_ids and not event_ids:
            return {}, {}
        pipe = self.client.pipeline(transaction=False)
        for entity_id in entity_ids:
            pipe.hgetall(self.keys.entity(entity_id))
        for event_id in event_ids:
            pipe.hget(self.keys.snapshot(event_id), SNAPSHOT_FIELD)
        started = time.perf_counter()
        replies = pipe.execute()
        metrics.REDIS_SECONDS.labels(self.service, "read_batch").observe(time.perf_counter() - started)
        states = {e: decode_state(r or {}) for e, r in zip(entity_ids, replies)}
        vectors: dict[str, dict] = {}
        for event_id, blob in zip(event_ids, replies[len(entity_ids):]):
            if blob is None:
                continue
            try:
                vectors[event_id] = self.codec.decode(blob, expect="FeatureVector")
            except DecodeError:
                continue
        return states, vectors

    def read_snapshots(self, event_ids: Iterable[str]) -> dict[str, dict]:
        """The FeatureVectors kept for these events (missing or expired ones are left out)."""
        return self.read_batch((), event_ids)[1]

    def vector(self, entity_id: str, fields: dict[str, float], ts: float) -> dict[str, float]:
        """The features of an event from its entity's current state: one round trip (none for a
        stateless feature set), then the same `FeatureSet.vector` the features service uses."""
        if not self.feature_set.stateful:
            return self.feature_set.vector({}, fields, ts)
        started = time.perf_counter()
        raw = self.client.hgetall(self.keys.entity(entity_id))
        metrics.REDIS_SECONDS.labels(self.service, "read_state").observe(time.perf_counter() - started)
        return self.feature_set.vector(decode_state(raw or {}), fields, ts)

    # -- writes -------------------------------------------------------------------------------
    def queue_snapshots(self, pipe, vectors: Iterable[Mapping[str, Any]]) -> None:
        self.queue_snapshot_blobs(pipe, ((fv["event_id"], self.codec.encode("FeatureVector", dict(fv)))
                                         for fv in vectors))

    def queue_snapshot_blobs(self, pipe, blobs: Iterable[tuple[str, bytes]]) -> None:
        """(event_id, encoded FeatureVector) pairs: the service encodes each vector once, for
        Redis and Kafka alike."""
        ttl = self.snapshot_ttl_s
        for event_id, blob in blobs:
            key = self.keys.snapshot(event_id)
            pipe.hset(key, SNAPSHOT_FIELD, blob)
            pipe.expire(key, ttl)

    def queue_states(self, pipe, states: Mapping[str, State]) -> None:
        """One HSET per entity with every field (offsets included): atomic per key. Label fields
        are left to `queue_label`, whose script never lets an older label win."""
        for entity_id, state in states.items():
            mapping = encode_state(state, exclude=LABEL_FIELDS)
            if mapping:
                pipe.hset(self.keys.entity(entity_id), mapping=mapping)

    def queue_label(self, pipe, entity_id: str, label: str, event_ts: float) -> None:
        # Plain EVAL, not a registered Script: redis-py would add a SCRIPT EXISTS round trip to
        # every pipeline that carries one, and Redis caches the compiled script by its hash anyway.
        pipe.eval(SET_LABEL_LUA, 1, self.keys.entity(entity_id), label, encode_value(float(event_ts)))

    def save_snapshots(self, vectors: Iterable[Mapping[str, Any]]) -> None:
        """Keep these FeatureVector dicts under their event ids with the TTL (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        self.queue_snapshots(pipe, vectors)
        self.execute(pipe, "write_snapshots")

    def write_states(self, states: Mapping[str, State]) -> None:
        pipe = self.client.pipeline(transaction=False)
        self.queue_states(pipe, states)
        self.execute(pipe, "write_states")

    def execute(self, pipe, op: str) -> list:
        if not len(pipe):
            return []
        started = time.perf_counter()
        out = pipe.execute()
        metrics.REDIS_SECONDS.labels(self.service, op).observe(time.perf_counter() - started)
        return out
