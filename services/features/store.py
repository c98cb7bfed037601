"""The online feature store: entity state and per-event feature snapshots in Redis.

Both sides of training/serving parity go through here: the features service reads a batch of
entity states, computes vectors with `FeatureSet.vector` and writes the new states back; the
prediction service calls `FeatureStore.vector` for one request, which reads the same hash and
calls the same function. It must never compute a feature itself (that is `definitions.py`'s job)
and never issue one Redis round trip per field or per event of a batch.

    store = FeatureStore(redis_client, Keys("t1"), load_feature_set("default"), snapshot_ttl_s=3600)
    x = store.vector("meter-7", {"price": 0.3}, ts=1700000000.0)   # state before the event
    store.save_snapshots([{"event_id": "e1", "entity_id": "meter-7", "ts": 1.0, "features": x,
                           "feature_set": store.feature_set.name, "published_ms": None}])

Layout (keys from `Keys`, hash-tagged by entity or event: on a Redis Cluster every script and
multi-key command below runs on keys of one slot, a batch's scripts once per slot):
- `Keys.entity(entity_id)` — hash, the entity state: its numbers packed in two fields (`_xn`,
  their names joined by NUL; `_x`, their values as little-endian doubles, in that order: one
  field to read and parse instead of one text field each), counters as text, `label` as the
  label string, plus bookkeeping fields that start with `_`: `_off`/`_p`, the events.valid offset
  and partition of the last event folded into the state (a redelivered event at an offset <= `_off`
  is not applied twice; one entity lives on one partition because events are keyed by entity).
- `Keys.snapshot(event_id)` — hash with a TTL; field `fv` = the Avro FeatureVector the event was
  scored with, fields `p.<role>` = the Avro Prediction each role made for it (written by the learner
  and the prediction service), `k` = the labels the learner had learned when it scored it (an
  outcome's `known`), `f` = the input it was folded from. `Snapshots` below is the only code that
  reads or writes this hash.

- `Keys.keyed_entity(key, value)` — hash, the state of an entity another field of the event
  names (`merchant` = `m-17`): its windowed aggregates' series (`w:...`, binary, windows.py),
  `_o:<partition>`, the events.valid offset of the last event folded in from each partition
  (events of one merchant come from every partition), and `_v`, a version that every write
  bumps. One worker owns a key entity (keyed.py); `queue_keyed` still writes only if `_v` is the
  one it knows (compare-and-set in a script, atomic per key): two owners never overwrite each other.
- `Keys.features_applied()` — hash "topic/partition" -> the next input offset whose effects are
  in Redis (`queue_applied`, last in each batch's pipeline).

Window series (`w:` fields) and the packed numbers are binary in both hashes; everything else is
text (`label_ts` too: the label script compares it). A number stored as text by a driftline
before the packing (or whose name holds a NUL) still reads; the next write of that state deletes
the text copy of each number it packs.

Entity states expire after `features.entity_ttl_s` without a write, key entities after twice
their longest window and an hour (or that TTL if shorter); `FieldNames` bounds the distinct field
names of a model (a Redis set per model).

Labels are folded in by a Lua script (a batch's labels in one call) that keeps the label of the
latest event (by event time), so a label never overwrites a later one and a redelivered label
changes nothing, even when the label and the entity's events are handled by different replicas.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..shared import metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.keys import Keys
from ..shared.redis_clients import eval_script, per_key, per_key_calls, queue_script_per_slot
from .definitions import FeatureSet, State
from .windows import Series

log = logging.getLogger(__name__)
SNAPSHOT_FIELD = "fv"
# Which input ("partition:offset" on events.valid) the features service folded the event from. A
# copy of the event published again upstream (an ingestion crash between Kafka's acknowledgement
# and its published mark) then has another marker and is not folded a second time, for as long
# as the snapshot lives (features.snapshot_ttl_s). /v1/predict's snapshots have no marker.
FOLDED_FIELD = "f"
# How many labels the learner had learned when it scored the event (the outcome's `known`), kept
# beside its predictions: an outcome joined after a learner restart says it too.
KNOWN_FIELD = "k"
ROLES = ("champion", "challenger", "previous")  # previous: a displaced champion, kept for its contest only
OFFSET_FIELD = "_off"
PARTITION_FIELD = "_p"
LABEL_FIELDS = ("label", "label_ts")  # written only by SET_LABELS_LUA
STRING_FIELDS = frozenset({"label"})
VERSION_FIELD = "_v"  # a key entity's write count (compare-and-set)
GUARD_PREFIX = "_o:"  # a key entity's last folded offset per events.valid partition
INT_FIELDS = frozenset({"n", OFFSET_FIELD, PARTITION_FIELD, VERSION_FIELD})
WINDOW_PREFIX = "w:"  # a window series, binary (windows.Series.to_bytes)
NUMBERS_FIELD = "_x"  # a state's numbers, packed: little-endian doubles...
NUMBER_NAMES_FIELD = "_xn"  # ...and their names, joined by NUL, in the same order
# In a decoded state: its numbers found as text fields (written before the packing), which the
# next write of the state deletes. Never stored.
STALE_TEXT_FIELD = "_stale_text"

# Key entities' states, many in one call, each written only when no other worker wrote it since it
# was read (compare-and-set on `_v`, which the write bumps). ARGV = the TTL (0 = none), then per key:
# the version read ('' = none), its number of fields, the field/value pairs. Returns per key 1, or 0
# for "read again".
SET_KEYED_LUA = """
local out, at = {}, 2
for k = 1, #KEYS do
  local version, n = ARGV[at], tonumber(ARGV[at + 1])
  local v = redis.call('HGET', KEYS[k], '_v')
  if (v or '') ~= version then
    out[k] = 0
  else
    redis.call('HSET', KEYS[k], '_v', (tonumber(v) or 0) + 1, unpack(ARGV, at + 2, at + 1 + 2 * n))
    if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[k], ARGV[1]) end
    out[k] = 1
  end
  at = at + 2 + 2 * n
end
return out
"""

# Entity states, many in one call: ARGV = the TTL in seconds (0 = none), then per key its number of
# fields and the field/value pairs. One call per slot group instead of an HSET and an EXPIRE per
# entity (redis-py's cost is per command more than per argument).
WRITE_STATES_LUA = """
local at = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[at])
  redis.call('HSET', KEYS[k], unpack(ARGV, at + 1, at + 2 * n))
  if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[k], ARGV[1]) end
  at = at + 1 + 2 * n
end
return #KEYS
"""

# Labels into entity hashes, many in one call: ARGV = the entity TTL in seconds (0 = none; refreshed
# like any write to the state), then per key its label and its event's ts (repr). Same rule as
# FeatureSet.apply_label: a label of an earlier event than the known one is ignored; an equal ts
# overwrites (idempotent). Returns how many were written.
SET_LABELS_LUA = """
local written = 0
for k = 1, #KEYS do
  local label, ts = ARGV[2 * k], ARGV[2 * k + 1]
  local known = redis.call('HGET', KEYS[k], 'label_ts')
  if not (known and tonumber(known) > tonumber(ts)) then
    redis.call('HSET', KEYS[k], 'label', label, 'label_ts', ts)
    if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[k], ARGV[1]) end
    written = written + 1
  end
end
return written
"""

# KEYS[1] a snapshot hash; ARGV: TTL, then field, value pairs. Writes only when the key does not
# exist: a /v1/predict with the event_id of a real event must never replace that event's vector.
NEW_SNAPSHOT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] the model's set of field names; ARGV[1] the bound, then names. Adds those that fit and
# returns the ones refused, atomically (several replicas admit names concurrently).
ADMIT_NAMES_LUA = """
local refused = {}
local size = redis.call('SCARD', KEYS[1])
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    if size < tonumber(ARGV[1]) then
      redis.call('SADD', KEYS[1], ARGV[i])
      size = size + 1
    else
      table.insert(refused, ARGV[i])
    end
  end
end
return refused
"""


# KEYS[1] snapshot hash; ARGV[1] 'nx' (keep a prediction made earlier, at event time, over a
# re-scored one) or 'set', then field, value pairs. Writes only while the snapshot exists: an
# expired one is never recreated without its TTL.
# Vectors into their snapshots, each with the TTL: ARGV = vector field, ttl, folded field, then per
# key its vector ('' for none: an event whose vector a key field's stage completes) and the marker
# of the input it was folded from ('' for none).
SAVE_VECTORS_LUA = """
for i = 1, #KEYS do
  local vector, marker = ARGV[2 * i + 2], ARGV[2 * i + 3]
  if vector ~= '' and marker ~= '' then redis.call('hset', KEYS[i], ARGV[1], vector, ARGV[3], marker)
  elseif vector ~= '' then redis.call('hset', KEYS[i], ARGV[1], vector)
  elseif marker ~= '' then redis.call('hset', KEYS[i], ARGV[3], marker) end
  redis.call('expire', KEYS[i], ARGV[2])
end
return #KEYS
"""

# Many hashes read in one command (one per slot on a cluster), each key's HGETALL as its flat
# field/value array: a pipeline of HGETALLs costs redis-py ~9 µs per key to pack and parse, one
# script call ~3 (100 states: 1.13 -> 0.28 ms of CPU, sync client on loopback).
READ_HASHES_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('hgetall', KEYS[i]) end
return out
"""

# The fields ARGV of many hashes, one command: per key its HMGET (false -> nil where none).
READ_FIELDS_LUA = """
local out = {}
for i = 1, #KEYS do out[i] = redis.call('hmget', KEYS[i], unpack(ARGV)) end
return out
"""

# Predictions into the snapshots that exist, many events in one call: ARGV = mode ('nx' | 'set'),
# then per key its number of fields and the field/value pairs. Returns how many keys existed.
SET_PREDICTIONS_LUA = """
local at, written = 2, 0
for k = 1, #KEYS do
  local n = tonumber(ARGV[at])
  if redis.call('exists', KEYS[k]) == 1 then
    written = written + 1
    for i = at + 1, at + 2 * n, 2 do
      if ARGV[1] == 'nx' then redis.call('hsetnx', KEYS[k], ARGV[i], ARGV[i + 1])
      else redis.call('hset', KEYS[k], ARGV[i], ARGV[i + 1]) end
    end
  end
  at = at + 1 + 2 * n
end
return written
"""


def queue_read_hashes(pipe: Any, keys: list[str]) -> list[list[int]]:
    """The whole hashes of `keys`, asked in a pipeline of the caller's (sync or asyncio, one node
    or a cluster): one script call per slot group. `hashes_reply` reads the replies of the calls
    it returns."""
    return queue_script_per_slot(pipe, READ_HASHES_LUA, keys, [()] * len(keys))


def hashes_reply(groups: list[list[int]], replies: list) -> list[dict]:
    """Each key's hash as HGETALL gives it (field -> value; {} for a missing key), in key order.

        >>> hashes_reply([[0, 2], [1]], [[[b"n", b"3"], []], [[b"a", b"1", b"b", b"2"]]])
        [{b'n': b'3'}, {b'a': b'1', b'b': b'2'}, {}]
    """
    return [_as_hash(flat) for flat in per_key(groups, replies)]


def _as_hash(flat: list) -> dict:
    pairs = iter(flat)  # field, value, field, value, ...
    return dict(zip(pairs, pairs))


def _counted_pairs(mapping: Mapping[Any, Any], *before: Any) -> list[Any]:
    """A key's arguments for the many-key write scripts: `before`, the number of pairs, the pairs.

        >>> _counted_pairs({"a": 1, "b": 2}, "v3")
        ['v3', 2, 'a', 1, 'b', 2]
    """
    args = [*before, len(mapping)]
    for item in mapping.items():
        args += item
    return args


def queue_read_fields(pipe: Any, keys: list[str], fields: Iterable[str]) -> list[list[int]]:
    """The values of `fields` in each hash of `keys` (HMGET), one script call per slot group; the
    replies read back with `per_key` (per key a list of values, None where a field is missing)."""
    return queue_script_per_slot(pipe, READ_FIELDS_LUA, keys, [()] * len(keys), tuple(fields))


def prediction_field(role: str) -> str:
    """The snapshot field that holds a role's Prediction: 'p.champion', 'p.challenger'."""
    return f"p.{role}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def encode_value(value: Any) -> str | bytes:
    """One state value as stored: numbers as their repr (exact round trip), strings as they are,
    window series as their bytes.

        >>> [encode_value(v) for v in (3, 0.5, True, "spam", b"\\x01")]
        ['3', '0.5', '1', 'spam', b'\\x01']
    """
    encode = _ENCODE_BY_TYPE.get(type(value))
    if encode is None:
        if isinstance(value, Series):
            return value.to_bytes()
        # a subclass of a plain type (numpy's float64, an IntEnum) is stored as that type
        encode = next((_ENCODE_BY_TYPE[t] for t in type(value).__mro__ if t in _ENCODE_BY_TYPE), str)
    return encode(value)


# How the plain types are stored, looked up by exact type (every state write runs it per field).
_ENCODE_BY_TYPE: dict[type, Any] = {float: repr, int: repr, str: str, bytes: lambda v: v,
                                    bool: lambda v: "1" if v else "0"}


def encode_state(state: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, str | bytes]:
    """The hash fields of a state (None values are left out: a missing field means unknown), its
    numbers packed into NUMBER_NAMES_FIELD and NUMBERS_FIELD.

        >>> encode_state({"n": 3, "x": 0.1, "label": "spam", "gone": None, "ok": True, "_v": 2}, exclude=["_v"])
        {'n': '3', 'label': 'spam', 'ok': '1', '_xn': 'x', '_x': b'\\x9a\\x99\\x99\\x99\\x99\\x99\\xb9?'}
    """
    skip = set(exclude)
    skip.add(STALE_TEXT_FIELD)
    by_type = _ENCODE_BY_TYPE
    fields: dict[str, str | bytes] = {}
    names: list[str] = []
    numbers = array("d")
    for k, v in state.items():
        if v is None or k in skip:
            continue
        if isinstance(v, float) and _packable(k):
            names.append(k)
            numbers.append(v)
            continue
        encode = by_type.get(type(v))
        fields[k] = encode(v) if encode is not None else encode_value(v)
    if names:
        if _BIG_ENDIAN:
            numbers.byteswap()
        fields[NUMBER_NAMES_FIELD] = "\0".join(names)
        fields[NUMBERS_FIELD] = numbers.tobytes()
    return fields


_BIG_ENDIAN = sys.byteorder == "big"


def _packable(name: str) -> bool:
    """Whether a number of this name goes into the packed fields: not the label fields (the label
    script reads `label_ts` as text), nor a name holding the NUL that separates packed names."""
    return name not in LABEL_FIELDS and "\0" not in name


def decode_state(raw: Mapping[Any, Any]) -> State:
    """A state from HGETALL (bytes or str): the packed numbers as floats, `label` a string,
    counters ints, window series bytes (decoded when a feature reads them).

        >>> decode_state({b"label": b"spam", b"n": b"3", b"_xn": b"price_last", b"w:x": b"\\x01",
        ...               b"_x": b"\\x00\\x00\\x00\\x00\\x00\\x00\\xe0?"})
        {'label': 'spam', 'n': 3, 'w:x': b'\\x01', 'price_last': 0.5}

    Read for every prediction and every event, with the same few field names each time: what a
    name is (`_kind`) is remembered, and the numbers are one array read from their bytes (parsing
    a number from text costs ~0.3 µs, ten times a packed one)."""
    state: State = {}
    kinds = _FIELD_KINDS
    names = packed = None
    stale = []
    for key, value in raw.items():
        name, kind = kinds.get(key) or _kind(key)
        if kind is _FLOAT:
            try:
                state[name] = float(value)
            except ValueError:  # a field some newer writer added; keep it rather than fail
                state[name] = _text(value)
            else:
                if _packable(name):
                    stale.append(name)
        elif kind is _RAW:
            state[name] = value
        elif kind is _INT:
            state[name] = int(value)
        elif kind is _PACKED:
            packed = value
        elif kind is _PACKED_NAMES:
            try:
                names = _split_names(value)
            except TypeError:  # a bytearray is not hashable: split it without the cache
                names = _split_names.__wrapped__(value)
        else:
            state[name] = _text(value)
    if packed is not None and names is not None and len(packed) % 8 == 0:  # else not ours: left out
        numbers = array("d")
        numbers.frombytes(packed)
        if _BIG_ENDIAN:
            numbers.byteswap()
        state.update(zip(names, numbers))  # over any text copy: the packed one is newer
    if stale:
        state[STALE_TEXT_FIELD] = stale
    return state


_RAW, _STRING, _INT, _FLOAT, _PACKED, _PACKED_NAMES = "raw", "string", "int", "float", "packed", "packed names"
_FIELD_KINDS: dict[Any, tuple[str, str]] = {}  # a stored field name -> (its name, how its value reads)
_MAX_FIELD_KINDS = 65_536  # names are bounded per model and per entity; this bounds the memory of them all


@functools.lru_cache(maxsize=4096)  # every entity of a feature set shares the same few lists
def _split_names(value: bytes | str) -> tuple[str, ...]:
    """The names of a packed field, as stored, split.

        >>> _split_names(b"ts\\0prev:x")
        ('ts', 'prev:x')
    """
    return tuple(_text(value).split("\0"))


def _kind(key: Any) -> tuple[str, str]:
    name = _text(key)
    if name.startswith(WINDOW_PREFIX):
        kind = _RAW
    elif name == NUMBERS_FIELD:
        kind = _PACKED
    elif name == NUMBER_NAMES_FIELD:
        kind = _PACKED_NAMES
    elif name in STRING_FIELDS:
        kind = _STRING
    elif name in INT_FIELDS or name.startswith(GUARD_PREFIX):
        kind = _INT
    else:
        kind = _FLOAT
    if len(_FIELD_KINDS) >= _MAX_FIELD_KINDS:
        _FIELD_KINDS.clear()
    _FIELD_KINDS[key] = (name, kind)
    return name, kind


class FieldNames:
    """The distinct event field names one model may see, bounded (`features.max_feature_names`):
    untrusted input must not grow the model (and every entity's state) without end.

        names = FieldNames(redis_client, Keys("t1"), "default", limit=2)
        names.admit({"a", "b", "c"})      # -> the one refused: two that fit are kept, for good

    Names already admitted are remembered in this process, so a steady stream costs no round trip.
    """

    def __init__(self, client, keys: Keys, model: str, limit: int, key: str | None = None) -> None:
        self.client = client
        self.key = key or keys.field_names(model)
        self.limit = int(limit)
        self.known: set[str] = set()

    def admit(self, names: Iterable[str]) -> set[str]:
        """The names refused (the model already has `limit` others); the rest are admitted."""
        # In the order given (the stream's): which names fit under the bound must not depend on hashing.
        new = [n for n in dict.fromkeys(names) if n not in self.known]
        if not new:
            return set()
        refused = {_text(n) for n in eval_script(self.client, ADMIT_NAMES_LUA, [self.key], [self.limit, *new])}
        self.known.update(n for n in new if n not in refused)
        return refused


class Categories:
    """The distinct text values each field of one model may take, bounded per field
    (`features.max_categories`): one `FieldNames` set per categorical field.

        cats = Categories(redis_client, Keys("t1"), "default", limit=1000)
        cats.admit({"country": {"KR", "FR"}})      # -> {("country", v), ...} refused
    """

    def __init__(self, client, keys: Keys, model: str, limit: int) -> None:
        self.client, self.keys, self.model, self.limit = client, keys, model, int(limit)
        self.fields: dict[str, FieldNames] = {}  # bounded: field names are (features.max_feature_names)

    def admit(self, values: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
        refused: set[tuple[str, str]] = set()
        for field, texts in values.items():
            names = self.fields.get(field)
            if names is None:
                names = self.fields[field] = FieldNames(self.client, self.keys, self.model, self.limit,
                                                        key=self.keys.categories(self.model, field))
            refused.update((field, text) for text in names.admit(texts))
        return refused


class FeatureStore:
    """Entity state and feature snapshots of one namespace, for one feature set."""

    def __init__(self, client, keys: Keys, feature_set: FeatureSet, snapshot_ttl_s: int,
                 service: str = "features", entity_ttl_s: int = 0) -> None:
        self.client = client
        self.keys = keys
        self.feature_set = feature_set
        self.snapshot_ttl_s = int(snapshot_ttl_s)
        self.entity_ttl_s = int(entity_ttl_s)
        self.service = service
        self.codec = get_codec()
        self.snapshots = Snapshots(client, keys, snapshot_ttl_s, service)

    # -- reads --------------------------------------------------------------------------------
    def read_states(self, entity_ids: Iterable[str]) -> dict[str, State]:
        """The states of these entities ({} for a new one), in one pipelined round trip."""
        return self.read_batch(entity_ids, ()).states

    def read_batch(self, entity_ids: Iterable[str], event_ids: Iterable[str], folded_of: Iterable[str] = (),
                   keyed: Iterable[tuple[str, str]] = (), labels_of: Iterable[str] = ()) -> "BatchRead":
        """Entity states, the snapshot vectors (`fv`, decoded) of `event_ids`, the fold markers
        (FOLDED_FIELD) of `folded_of`, the states of the key entities `keyed`
        ((key field, key text) pairs: /v1/predict/batch) and the label fields of `labels_of` (the
        entities whose state the caller holds: any replica may write their label), one round
        trip. Events whose snapshot is missing or unreadable are absent from the snapshots."""
        entity_ids = list(dict.fromkeys(entity_ids))
        event_ids = list(dict.fromkeys(event_ids))
        folded_of = list(dict.fromkeys(folded_of))
        keyed = list(dict.fromkeys(keyed))
        labels_of = list(dict.fromkeys(labels_of))
        if not entity_ids and not event_ids and not folded_of and not keyed and not labels_of:
            return BatchRead()
        # Scripts that read many keys each, one call per slot group (none for no keys): a pipeline
        # of one command per key costs the client several times the CPU (READ_HASHES_LUA).
        pipe = self.client.pipeline(transaction=False)
        hash_groups = queue_read_hashes(pipe, [self.keys.entity(e) for e in entity_ids]
                                        + [self.keys.keyed_entity(k, v) for k, v in keyed])
        label_groups = queue_read_fields(pipe, [self.keys.entity(e) for e in labels_of], LABEL_FIELDS)
        snapshot_groups = queue_read_fields(pipe, [self.keys.snapshot(e) for e in event_ids], (SNAPSHOT_FIELD,))
        folded_groups = queue_read_fields(pipe, [self.keys.snapshot(e) for e in folded_of], (FOLDED_FIELD,))
        started = time.perf_counter()
        replies = pipe.execute()
        metrics.REDIS_SECONDS.labels(self.service, "read_batch").observe(time.perf_counter() - started)
        hashes, labels, snapshots, folded = per_key_calls(replies, hash_groups, label_groups, snapshot_groups,
                                                          folded_groups)
        out = BatchRead()
        out.states = {e: decode_state(_as_hash(r)) for e, r in zip(entity_ids, hashes)}
        out.keyed = {k: decode_state(_as_hash(r)) for k, r in zip(keyed, hashes[len(entity_ids):])}
        for entity_id, (label, label_ts) in zip(labels_of, labels):
            out.labels[entity_id] = (None if label is None else _text(label),
                                     None if label_ts is None else float(_text(label_ts)))
        for event_id, (blob,) in zip(event_ids, snapshots):
            if blob is None:
                continue
            try:
                out.snapshots[event_id] = self.codec.decode(blob, expect="FeatureVector")
            except DecodeError:
                continue
        out.folded = {e: _text(marker) for e, (marker,) in zip(folded_of, folded) if marker is not None}
        return out

    def read_snapshots(self, event_ids: Iterable[str]) -> dict[str, dict]:
        """The FeatureVectors kept for these events (missing or expired ones are left out)."""
        return self.read_batch((), event_ids).snapshots

    def state_keys(self, entity_id: str, fields: Mapping[str, Any]) -> list[str]:
        """The Redis hashes a request's vector reads: its entity's, then each key entity's its
        fields name (none for a stateless feature set). `vector_from` takes their HGETALLs."""
        fs = self.feature_set
        keys = [self.keys.entity(entity_id)] if fs.stateful else []
        return keys + [self.keys.keyed_entity(k, v) for k, v in fs.key_values(fields).items()]

    def vector_from(self, replies: list, fields: dict[str, float], ts: float) -> dict[str, float]:
        """The same `FeatureSet.vector` the features service computes, from the HGETALL replies
        of `state_keys` (in that order)."""
        fs = self.feature_set
        replies = list(replies)
        state = decode_state(replies.pop(0) or {}) if fs.stateful else {}
        keyed = {k: decode_state(r or {}) for k, r in zip(fs.key_values(fields), replies)}
        return fs.vector(state, fields, ts, keyed=keyed)

    def vector(self, entity_id: str, fields: dict[str, float], ts: float) -> dict[str, float]:
        """The features of an event from the current state of its entity (and of the key entities
        it names): one round trip (none for a set without state), then `FeatureSet.vector`."""
        keys = self.state_keys(entity_id, fields)
        if not keys:
            return self.feature_set.vector({}, fields, ts)
        started = time.perf_counter()
        pipe = self.client.pipeline(transaction=False)
        groups = queue_read_hashes(pipe, keys)
        replies = hashes_reply(groups, pipe.execute())
        metrics.REDIS_SECONDS.labels(self.service, "read_state").observe(time.perf_counter() - started)
        return self.vector_from(replies, fields, ts)

    # -- writes -------------------------------------------------------------------------------
    def queue_snapshots(self, pipe, vectors: Iterable[Mapping[str, Any]]) -> None:
        self.queue_snapshot_blobs(pipe, ((fv["event_id"], self.codec.encode("FeatureVector", dict(fv)), "")
                                         for fv in vectors))

    def queue_snapshot_blobs(self, pipe, blobs: Iterable[tuple[str, bytes, str]]) -> None:
        """(event_id, encoded FeatureVector, folded marker) triples: the service encodes each
        vector once, for Redis and Kafka alike."""
        self.snapshots.queue_vectors(pipe, blobs)

    def queue_states(self, pipe, states: Mapping[str, State]) -> None:
        """Every field of each state (offsets included), in one script call per slot group
        (WRITE_STATES_LUA): atomic per key. Label fields are left to `queue_labels`, whose script
        never lets an older label win. With an entity TTL, a state not written for that long is
        forgotten (bounded memory for one-off entities)."""
        keys: list[str] = []
        key_args: list[list[Any]] = []
        for entity_id, state in states.items():
            mapping = encode_state(state, exclude=LABEL_FIELDS)
            if mapping:
                key = self.keys.entity(entity_id)
                stale = state.pop(STALE_TEXT_FIELD, None)
                if stale:  # text copies of numbers now packed (a state written before the packing)
                    pipe.hdel(key, *stale)
                keys.append(key)
                key_args.append(_counted_pairs(mapping))
        if keys:
            queue_script_per_slot(pipe, WRITE_STATES_LUA, keys, key_args, (self.entity_ttl_s,))

    def queue_keyed(self, pipe, key: str, states: Mapping[str, State], ttl_s: int) -> list[list[int]]:
        """Write the states of key field `key`'s entities (its text -> state), each only if no other
        worker wrote it since the version this one knows (its `_v`), one script call per slot
        group (SET_KEYED_LUA). `ttl_s`: the keys' (`FeatureSet.key_ttl_s`). Returns the calls'
        groups: `per_key` of their replies is 1 per entity written, 0 for "someone else wrote it"."""
        key_args = []
        for state in states.values():
            version = state.get(VERSION_FIELD)
            key_args.append(_counted_pairs(encode_state(state, exclude=(VERSION_FIELD,)),
                                           "" if version is None else str(version)))
        return queue_script_per_slot(pipe, SET_KEYED_LUA, [self.keys.keyed_entity(key, v) for v in states],
                                     key_args, (ttl_s,))

    def queue_applied(self, pipe, applied: Mapping[tuple[str, int], int]) -> None:
        """How far each input partition's effects go ((topic, partition) -> next offset): queued last
        in a batch's pipeline, since Redis' append-only file keeps a prefix of the writes."""
        if applied:
            pipe.hset(self.keys.features_applied(), mapping={f"{t}/{p}": o for (t, p), o in applied.items()})

    def queue_labels(self, pipe, labels: Mapping[str, tuple[str, float]]) -> None:
        """entity_id -> (label, its event's ts) into the entity states, one script call per slot
        group (SET_LABELS_LUA: a label never overwrites a later event's)."""
        entity_ids = list(labels)
        queue_script_per_slot(pipe, SET_LABELS_LUA, [self.keys.entity(e) for e in entity_ids],
                              [(labels[e][0], encode_value(float(labels[e][1]))) for e in entity_ids],
                              (self.entity_ttl_s,))

    def queue_label(self, pipe, entity_id: str, label: str, event_ts: float) -> None:
        self.queue_labels(pipe, {entity_id: (label, event_ts)})

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


@dataclass(slots=True)
class BatchRead:
    """What `FeatureStore.read_batch` read: entity states, snapshot vectors, fold markers, key
    entities' states ((key field, key text) -> state) and label fields."""

    states: dict[str, State] = field(default_factory=dict)
    snapshots: dict[str, dict] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    keyed: dict[tuple[str, str], State] = field(default_factory=dict)
    labels: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)  # entity -> (label, label_ts)


@dataclass(slots=True)
class Snapshot:
    """What an event's snapshot hash holds, decoded: the vector it was scored with (None when
    missing) and each role's Prediction record."""

    vector: dict | None = None
    predictions: dict[str, dict] = field(default_factory=dict)


class Snapshots:
    """The per-event snapshot hashes (`fv`, `p.<role>`, `k`): the one place that knows their fields.

        snapshots = Snapshots(redis_client, Keys("t1"), ttl_s=3600, service="learner")
        found = snapshots.fetch(scored=["e1"], labelled=["e2"])   # {event_id: Snapshot}
    """

    def __init__(self, client, keys: Keys, ttl_s: int = 0, service: str = "features") -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = int(ttl_s)
        self.service = service
        self.codec = get_codec()

    def queue_vectors(self, pipe, blobs: Iterable[tuple[str, bytes, str]]) -> None:
        """(event_id, encoded FeatureVector, folded marker or '') triples, each with the snapshot
        TTL: one command for them all (a pipelined HSET + EXPIRE per event cost the service more
        CPU to build and parse than Redis spent on them); one per hash slot on a cluster."""
        keys, values = [], []
        for event_id, blob, marker in blobs:
            keys.append(self.keys.snapshot(event_id))
            values.append((blob, marker))
        if keys:
            queue_script_per_slot(pipe, SAVE_VECTORS_LUA, keys, values, (SNAPSHOT_FIELD, self.ttl_s, FOLDED_FIELD))

    def queue_new(self, pipe, event_id: str, vector: bytes, predictions: Mapping[str, bytes]) -> None:
        """A whole snapshot (the vector, role -> Prediction), written only where the event has none
        yet: a /v1/predict request must never replace the vector of an event the features service
        or an earlier request wrote. Its reply in the pipeline is 1 if written, 0 if kept."""
        args: list[Any] = [SNAPSHOT_FIELD, vector]
        for role, blob in predictions.items():
            args += [prediction_field(role), blob]
        eval_script(pipe, NEW_SNAPSHOT_LUA, [self.keys.snapshot(event_id)], [self.ttl_s, *args])

    def queue_prediction(self, pipe, event_id: str, role: str, blob: bytes) -> None:
        """A role's Prediction next to a vector queued in the same pipeline (HSET keeps the TTL)."""
        pipe.hset(self.keys.snapshot(event_id), prediction_field(role), blob)

    def queue_predictions_if_present(self, pipe, predictions: Iterable[tuple[str, Mapping[str, bytes], int | None]],
                                     keep_existing: bool = True) -> None:
        """(event_id, role -> encoded Prediction, labels learned when scored or None) into the
        snapshots that exist, in one script call however many (a batch's worth: one call, not one
        per event; one per slot on a cluster); `keep_existing` keeps what was stored earlier."""
        keys: list[str] = []
        key_args: list[list[Any]] = []
        for event_id, blobs, known in predictions:
            keys.append(self.keys.snapshot(event_id))
            fields: dict[str, Any] = {prediction_field(role): blob for role, blob in blobs.items()}
            if known is not None:
                fields[KNOWN_FIELD] = known
            key_args.append(_counted_pairs(fields))
        if keys:
            queue_script_per_slot(pipe, SET_PREDICTIONS_LUA, keys, key_args, ("nx" if keep_existing else "set",))

    def read_vectors(self, event_ids: Iterable[str]) -> dict[str, dict]:
        """The FeatureVectors kept for these events (missing or expired ones are left out)."""
        found = self.fetch((), event_ids, roles=())
        return {e: s.vector for e, s in found.items() if s.vector is not None}

    def fetch(self, scored: Iterable[str], labelled: Iterable[str], roles: Iterable[str] = ROLES,
              op: str = "fetch") -> dict[str, Snapshot]:
        """One pipelined round trip: the predictions of the `scored` events, the vector and the
        predictions of the `labelled` ones. Every id asked for has an entry (empty when missing);
        a field that does not decode is left out (and logged). Each prediction says `known`, the
        labels learned when it was made, when the snapshot kept it."""
        scored, labelled = list(scored), list(labelled)
        if not scored and not labelled:
            return {}
        fields = [prediction_field(r) for r in roles]
        if fields:
            fields.append(KNOWN_FIELD)
        read_scored = scored if fields else []  # no role asked: nothing to read of a scored event
        # One script call per slot group and field list, not an HMGET per event (READ_FIELDS_LUA).
        pipe = self.client.pipeline(transaction=False)
        scored_groups = queue_read_fields(pipe, [self.keys.snapshot(e) for e in read_scored], fields)
        labelled_groups = queue_read_fields(pipe, [self.keys.snapshot(e) for e in labelled], fields + [SNAPSHOT_FIELD])
        started = time.perf_counter()
        replies = pipe.execute()
        metrics.REDIS_SECONDS.labels(self.service, op).observe(time.perf_counter() - started)
        of_scored, of_labelled = per_key_calls(replies, scored_groups, labelled_groups)
        asked = [*((e, fields) for e in read_scored), *((e, fields + [SNAPSHOT_FIELD]) for e in labelled)]
        replies = of_scored + of_labelled
        out: dict[str, Snapshot] = {e: Snapshot() for e in scored}
        for (event_id, names), values in zip(asked, replies):
            snap, known = out.setdefault(event_id, Snapshot()), None
            for name, raw in zip(names, values):
                if raw is None:
                    continue
                try:
                    if name == SNAPSHOT_FIELD:
                        snap.vector = self.codec.decode(raw, expect="FeatureVector")
                    elif name == KNOWN_FIELD:
                        known = int(raw)
                    else:
                        snap.predictions[name[2:]] = self.codec.decode(raw, expect="Prediction")
                except (DecodeError, ValueError) as exc:
                    log.error("snapshot %s field %s does not decode: %s", event_id, name, exc)
            if known is not None:
                for answer in snap.predictions.values():
                    answer["known"] = known
        return out
