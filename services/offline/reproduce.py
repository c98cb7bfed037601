"""`driftline reproduce MODEL VERSION`: rebuild a registered version from its lineage and prove it.

    result = reproduce(settings, "default", 7)
    result["proof"]        # "identical pickle bytes" or "identical predictions on the next N examples"

A version's model is its spec (a seed is an argument of the spec), fresh, taught in order:
1. what it learned before it was registered: the offline selection of `driftline train`
   (`train.Selection`, re-run and checked by its hash and count), or the warm start of a
   drift-triggered challenger (the `warm_start` champion examples just before its `position`), or
   nothing (a first version);
2. then every example it learned while it served or shadowed, up to the `examples_seen` of the
   artifact being checked: while the learner keeps learning it in one stretch, the stream positions
   just before the artifact's `next_position`, one example each (every role learns every label,
   with an answer of its own or not: the labels that come just after a promotion, or just after a
   challenger's request, are of events the champion before it answered), also once the learner
   has stopped learning it (`learned_until`); otherwise the store's rows that carry its version.
The rebuilt model is compared with the registered artifact (its signature checked first): byte for
byte when the model is deterministic, else by its probabilities on the next 1,000 stored examples
(the last 1,000 it learned when none came after it yet).
Package versions then and now are reported beside the proof.
"""

from __future__ import annotations

import copy
import pickle
import sys
from typing import Any

import duckdb

from ..learner.spec import parse_model
from ..shared.registry import UnknownVersion, verify
from ..shared.settings import Settings
from .store import OfflineStore, vector_of
from .train import Selection, environment, examples, learn, registry_of

NEXT = 1000


class NotReproducible(RuntimeError):
    """The lineage cannot rebuild the version (its examples are not, or no longer, in the store)."""


def stored(store: OfflineStore, where: str, params: list[Any], limit: int | None = None) -> list[tuple]:
    """(features, y_true, position) of the store's rows matching `where`, in position order. A
    challenger's row has no vector of its own: it learned the champion's row's (the same example)."""
    if not store.files():
        return []
    limit_sql = f"LIMIT {int(limit)}" if limit is not None else ""
    sql = f"""WITH picked AS (
                SELECT model, event_id, position, "offset", role, features, categories, y_true
                FROM read_parquet(?, hive_partitioning = true) WHERE {where}
                ORDER BY position, "offset" {limit_sql}),
              vectors AS (
                SELECT model, event_id, position, any_value(features) AS features, any_value(categories) AS categories
                FROM read_parquet(?, hive_partitioning = true) WHERE role = 'champion' GROUP BY ALL)
              SELECT CASE WHEN p.role = 'champion' THEN p.features ELSE coalesce(p.features, v.features) END,
                     CASE WHEN p.role = 'champion' THEN p.categories ELSE coalesce(p.categories, v.categories) END,
                     p.y_true, p.position
              FROM picked p LEFT JOIN vectors v USING (model, event_id, position)
              ORDER BY p.position, p."offset"
    """
    rows = duckdb.execute(sql, [store.glob(), *params, store.glob()]).fetchall()
    return [(vector_of(f, c), y, position) for f, c, y, position in rows]


def first_position(store: OfflineStore, model: str, version: int) -> int | None:
    """The earliest stream position of a row that carries `version` (None: there is none)."""
    if not store.files():
        return None
    found = duckdb.execute("SELECT min(position) FROM read_parquet(?, hive_partitioning = true) "
                           "WHERE model = ? AND model_version = ?", [store.glob(), model, version]).fetchone()
    return None if found is None or found[0] is None else int(found[0])


def snapshot(registry, model: str, version: int) -> tuple[dict, bytes, Any]:
    """The version's lineage, signed artifact payload and model, all of one revision (the learner
    may save a new revision while we read)."""
    for _ in range(20):
        try:
            meta = registry.meta(version)
        except UnknownVersion:
            raise NotReproducible(f"{model} has no version {version} in the registry (never registered, or its "
                                  "lineage record deleted by retention: learner.keep_records)") from None
        artifact = registry.r.get(registry.keys.registry_artifact(model, version))
        if artifact is None:
            raise NotReproducible(f"{model} v{version} has no artifact to compare with: "
                                  f"{registry.absent(version, meta)}")
        blob = verify(artifact, registry.key)
        if registry.meta(version).get("revision") == meta.get("revision"):
            return meta, blob, pickle.loads(blob)  # noqa: S301 -- verified above
    raise NotReproducible(f"{model} v{version} kept changing while it was read; try again")


def initial_examples(store: OfflineStore, model: str, meta: dict) -> tuple[list[tuple[dict, str]], str]:
    """What the version learned before it was registered, and where that came from."""
    if meta.get("offline"):
        lineage = meta["offline"]
        wanted = Selection(**{k: v for k, v in lineage.items() if k != "store"})
        data, found = examples(OfflineStore(lineage["store"]), wanted)
        if (found.rows, found.sha256) != (wanted.rows, wanted.sha256):
            raise NotReproducible(f"the stored examples changed: {found.rows} rows hashing to {found.sha256[:12]} "
                                  f"where the lineage has {wanted.rows} hashing to {wanted.sha256[:12]}")
        return data, f"offline selection of {found.rows} rows"
    n, position = int(meta.get("warm_start") or 0), int(meta.get("position") or 0)
    if n == 0:
        return [], "fresh"
    rows = stored(store, "model = ? AND role = 'champion' AND position >= ? AND position < ?",
                  [model, position - n, position])
    if len(rows) != n:
        raise NotReproducible(f"its warm start was {n} examples before position {position}; the store has {len(rows)}")
    return [(dict(f), y) for f, y, _ in rows], f"warm start of {n} examples"


def canonical(blob: bytes) -> bytes:
    """The pickle of a model with every string interned. Pickle memoizes by object identity, so a
    model that learned from strings decoded one by one (the live learner's Avro) and its rebuild
    from the store's columns pickle to different bytes for the same state; interned, they do not.

    >>> a, b = ["x" + str(1), "x" + str(1)], ["x1"] * 2      # equal values, shared or not
    >>> pickle.dumps(a) == pickle.dumps(b), canonical(pickle.dumps(a)) == canonical(pickle.dumps(b))
    (False, True)
    """
    obj = pickle.loads(blob)  # noqa: S301 -- only ever a verified artifact or our own rebuild
    dispatch = copy._deepcopy_dispatch  # deepcopy's table of atomic types: str is copied by identity
    saved = dispatch[str]
    dispatch[str] = lambda s, memo: sys.intern(s)
    try:
        return pickle.dumps(copy.deepcopy(obj), protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        dispatch[str] = saved


def reproduce(settings: Settings, model: str, version: int, next_n: int = NEXT) -> dict[str, Any]:
    registry = registry_of(settings.model_copy(update={"learner": settings.learner.model_copy(
        update={"model_name": model})}))
    store = OfflineStore.from_settings(settings)
    meta, stored_blob, stored_model = snapshot(registry, model, version)
    data, source = initial_examples(store, model, meta)
    later = int(meta.get("examples_seen", 0)) - len(data)
    upto = meta.get("learned_until", meta.get("next_position"))  # records before learned_until: next_position
    first = first_position(store, model, version)
    if later <= 0:
        continued = []
    elif upto is not None and first is not None and first >= int(upto) - later:
        # One stretch up to its artifact (no rollback took it up again after a pause): every position in it.
        continued = stored(store, "model = ? AND role = 'champion' AND position >= ? AND position < ?",
                           [model, int(upto) - later, int(upto)])
    else:
        continued = stored(store, "model = ? AND model_version = ?", [model, version], limit=later)
    if len(continued) < later:
        raise NotReproducible(f"{model} v{version} learned {later} examples after it was registered; the offline "
                              f"store under {store.root} has {len(continued)} of them (is the sink behind, or was it "
                              f"started after this version?)")
    data += [(dict(f), y) for f, y, _ in continued]
    rebuilt = parse_model(meta["spec"])
    learn(rebuilt, data)
    blob = pickle.dumps(rebuilt, protocol=pickle.HIGHEST_PROTOCOL)
    then, now = meta.get("environment", {}), environment()
    result: dict[str, Any] = {
        "model": model, "version": version, "revision": meta.get("revision", 0), "spec": meta["spec"],
        "examples": len(data), "before_registration": source, "after_registration": len(continued),
        "environment": then or None,
        "environment_differences": {k: [then.get(k), now.get(k)] for k in sorted(set(then) & set(now))
                                    if then.get(k) != now.get(k)},
        "identical_bytes": blob == stored_blob or canonical(blob) == canonical(stored_blob),
    }
    if result["identical_bytes"]:
        result.update(proof="identical pickle bytes", reproduced=True)
        return result
    last = continued[-1][2] if continued else int(meta.get("position") or 0) - 1
    following = stored(store, "model = ? AND role = 'champion' AND position > ?", [model, last], limit=next_n)
    which = "next"
    if not following:  # nothing came after it (yet): its last learned examples are the probe instead
        following, which = [(x, y, None) for x, y in data[-next_n:]], "last learned"
    same = sum(stored_model.predict_proba_one(dict(f)) == rebuilt.predict_proba_one(dict(f)) for f, _, _ in following)
    proven = bool(following) and same == len(following)
    result.update(compared_on=len(following), compared_examples=which, identical_predictions=same, reproduced=proven,
                  proof=f"identical predictions on the {which} {len(following)} examples" if proven
                  else f"{same} of {len(following)} {which} predictions identical")
    return result
