"""`driftline train`: a candidate built from the offline store, registered with the lineage that
rebuilds it, optionally entered into the champion/challenger contest.

    result = train(settings, since=1.7e9, until=1.8e9, spec="tree.HoeffdingTreeClassifier()")
    result["version"], result["lineage"]["rows"]

The examples are the store's champion rows (one per learned example) of the configured model with
event time in [since, until), in event-time order, learned test-then-train (prequential metrics).
Their selection is recorded as data (`Selection`): the same query over the same append-only files
gives the same rows in the same order, which `reproduce.py` checks by their hash before rebuilding.
With `challenge`, a RetrainRequest (reason `demand`) names the registered version: the learner
takes it up as its challenger exactly as it takes up one it registered itself, and the contest decides.
"""

from __future__ import annotations

import hashlib
import json
import platform
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import duckdb

from ..learner.champion import predict
from ..learner.labels import label_problem, to_river
from ..learner.prequential import Prequential
from ..learner.spec import describe, parse_model
from ..shared.settings import Settings
from .store import OfflineStore, vector_of

PACKAGES = ("river", "numpy", "scipy", "pandas", "driftline")


@dataclass
class Selection:
    """Which stored rows a model learned, as data: model, event-time range, the highest outcomes
    offset there was (rows are only ever appended after it), and what they hashed to."""

    model: str
    since: float | None
    until: float | None
    max_offset: int
    rows: int = 0
    sha256: str = ""
    first_offset: int | None = None
    last_offset: int | None = None
    files: list[str] | None = None

    def query(self, store: OfflineStore) -> tuple[str, list[Any]]:
        sql = (f"SELECT features, categories, y_true, event_ts, position, \"offset\", filename FROM read_parquet(?, "
               f"hive_partitioning = true, filename = true) WHERE model = ? AND role = 'champion' AND \"offset\" <= ?")
        params: list[Any] = [store.glob(), self.model, self.max_offset]
        if self.since is not None:
            sql += " AND event_ts >= ?"
            params.append(self.since)
        if self.until is not None:
            sql += " AND event_ts < ?"
            params.append(self.until)
        return sql + " ORDER BY event_ts, position, \"offset\"", params


def examples(store: OfflineStore, sel: Selection) -> tuple[list[tuple[dict, str]], Selection]:
    """The selected examples in learning order, and the selection with its count, hash and files."""
    if not store.files(sel.model):
        return [], sel
    sql, params = sel.query(store)
    rows = duckdb.execute(sql, params).fetchall()
    digest = hashlib.sha256()
    out = []
    for features, categories, y, *_ in rows:
        x = vector_of(features, categories)
        digest.update(json.dumps([x, y], sort_keys=True).encode())
        out.append((x, y))
    offsets = [r[5] for r in rows]
    root = str(store.root)
    files = sorted({r[6][len(root) + 1:] if r[6].startswith(root) else r[6] for r in rows})
    return out, Selection(sel.model, sel.since, sel.until, sel.max_offset, len(rows), digest.hexdigest(),
                          min(offsets, default=None), max(offsets, default=None), files)


def max_offset(store: OfflineStore, model: str) -> int:
    if not store.files(model):
        return -1
    return int(duckdb.execute("SELECT max(\"offset\") FROM read_parquet(?, hive_partitioning = true) WHERE model = ?",
                              [store.glob(), model]).fetchone()[0] or -1)


def learn(model: Any, data: list[tuple[dict, str]]) -> Prequential:
    """Test-then-train over `data`, in order."""
    stats = Prequential(window=1000)
    for x, y in data:
        y_pred = predict(model, x)
        stats.update(y, y_pred, {})
        model.learn_one(x, to_river(y))
    return stats


def environment() -> dict[str, str]:
    """What a rebuild needs to match: interpreter and package versions."""
    env = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return env


def registry_of(settings: Settings):
    from ..shared import redis_clients
    from ..shared.keys import Keys
    from ..shared.registry import ModelRegistry

    client = redis_clients.connect(settings.redis_url)
    return ModelRegistry(client, Keys(settings.namespace), settings.learner.model_name,
                         settings.model_key.get_secret_value().encode())


def train(settings: Settings, *, since: float | None, until: float | None, spec: str | None = None,
          challenge: bool = False) -> dict[str, Any]:
    """Build, register and (with `challenge`) enter a candidate. Returns what was done."""
    spec = spec or settings.learner.model
    name = settings.learner.model_name
    store = OfflineStore.from_settings(settings)
    data, sel = examples(store, Selection(name, since, until, max_offset(store, name)))
    if not data:
        raise ValueError(f"the offline store under {store.root} has no examples of model {name!r} in that range")
    model = parse_model(spec)
    for y in dict.fromkeys(y for _, y in data):  # a stream has few label values
        problem = label_problem(model, y, {data[0][1]})
        if problem:
            raise ValueError(f"{spec} cannot learn the selection's labels: {problem[1]}")
    stats = learn(model, data)
    registry = registry_of(settings)
    request_id = uuid.uuid4().hex
    parent = registry.champion()
    version = registry.register(model, spec=spec, reason="offline", parent=parent, examples_seen=len(data),
                                metrics=stats.as_dict())
    lineage = {"store": str(store.root), **asdict(sel)}
    # Built fresh from the spec (not from the parent's model): the parent is the champion it will challenge.
    registry.annotate(version, request_id=request_id, offline=lineage, environment=environment())
    result = {"model": name, "version": version, "spec": spec, "describe": describe(model), "parent": parent,
              "metrics": stats.as_dict(), "lineage": lineage, "challenger": False}
    if challenge:
        result["challenger"] = enter_contest(settings, name, request_id, parent)
    return result


def enter_contest(settings: Settings, name: str, request_id: str, champion: int | None) -> bool:
    """Ask the learner to take the registered version up as its challenger (RetrainRequest,
    reason `demand`, whose request_id the version carries)."""
    from ..drift.policy import retrain_request
    from ..shared import kafka
    from ..shared.codec import get_codec
    from ..shared.topics import Topics

    record = retrain_request(name, "demand", version=champion, position=0)
    record["request_id"] = request_id
    producer = kafka.producer(settings)
    kafka.produce(producer, Topics(settings.namespace).retrain_requests, get_codec().encode("RetrainRequest", record),
                  key=name)
    return producer.flush(15) == 0
