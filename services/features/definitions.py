"""Feature definitions: how an event and its entity's state become the vector a model sees.

This is the one function both the features service (training) and the prediction service
(serving) call, so what is served is what was learned from. It must never read anything but the
entity state it is given: the state *before* the event (point-in-time correct, no label leakage).

    >>> fs = load_feature_set("default")
    >>> state = {}
    >>> x = fs.vector(state, {"price": 1.0}, ts=0.0)     # from the state before the event
    >>> fs.apply_event(state, {"price": 1.0}, ts=0.0)     # then the event updates the state
    0

Text values are categories (`{"country": "KR"}`): they pass into the vector as they are, for a
model that handles them (`preprocessing.OneHotEncoder()`, a tree, naive Bayes), and the per-field
statistics (delta, moving averages) cover the numeric fields only.

    >>> fs.vector({}, {"price": 2.0, "country": "KR"}, ts=1.0)["country"]
    'KR'

Definitions are data: `default`, `raw` (the event's fields alone) or a TOML/YAML file with the keys
of `FeatureSpec`. The entity state is a flat dict of floats and strings, stored as a Redis hash.

Windowed aggregates (`[[aggregate]]` in the file, `Aggregate` here) read and fold `windows.Series`
kept in the state of their key's entity: the event's own entity (`key = "entity_id"`), or the
entity another field names (a merchant, a device), whose state the caller passes in `keyed`.
A key field is an identifier, not a feature: it is left out of the vector.

    >>> fs = FeatureSet(FeatureSpec(name="t", aggregate=[
    ...     {"key": "merchant", "fn": "count", "window": "10m", "name": "merchant_count_10m"}]))
    >>> merchant = {}
    >>> fs.apply_keyed("merchant", merchant, {"merchant": "m1", "amount": 9.0}, ts=0.0)
    0
    >>> fs.vector({}, {"merchant": "m1", "amount": 5.0}, ts=60.0, keyed={"merchant": merchant})
    {'amount': 5.0, 'merchant_count_10m': 1.0}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .windows import (
    DEFAULT_TILES, EXTREMES, IN_ORDER, LAST, SQUARES, SUMS, Series, SeriesSpec, Summary, key_text, parse_window,
    value_hash,
)

State = dict[str, Any]
ENTITY_KEY = "entity_id"
AGGREGATE_FNS = ("count", "sum", "mean", "min", "max", "std", "last", "distinct")
KEY_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")  # a key field: in topic names, so Kafka's characters, no dot
NEEDS = {"count": 0, "distinct": 0, "sum": SUMS, "mean": SUMS, "std": SUMS | SQUARES, "min": EXTREMES,
         "max": EXTREMES, "last": LAST}  # what each asks a window's summary for


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute. Field lists take names, or ["*"] for every field of the event."""

    name: str = "default"
    fields: bool = True  # the event's own fields
    count: bool = False  # log(1 + events the entity had before this one)
    since_last: bool = False  # seconds since the entity's previous event
    delta: list[str] = field(default_factory=list)  # value minus the entity's previous value
    ewm_alphas: list[float] = field(default_factory=list)  # exponentially weighted mean/variance
    ewm_fields: list[str] = field(default_factory=list)
    ewm_outputs: list[str] = field(default_factory=lambda: ["mean", "dev", "z"])  # of mean, std, dev, z
    last_label: bool = False  # the entity's last known label (numeric, or one-hot per class)
    aggregate: list[dict] = field(default_factory=list)  # windowed aggregates (`Aggregate`'s keys)
    lateness: str = "5m"  # how late (behind its key's newest event) an event may come and still be placed


PRESETS: dict[str, FeatureSpec] = {
    "raw": FeatureSpec(name="raw"),
    "default": FeatureSpec(
        name="default",
        count=True,
        since_last=True,
        delta=["*"],
        ewm_alphas=[0.5, 0.04],
        ewm_fields=["*"],
        ewm_outputs=["dev", "z"],
        last_label=True,
    ),
}


@dataclass(frozen=True)
class Aggregate:
    """One `[[aggregate]]` entry: `fn` of `field` over the events of the entity `key` names within
    the last `window`, before the current event. `tiles` (optional) sets the error bound: a
    busy key's value may miss the events of one tile, `window / tiles`, at the old edge."""

    fn: str
    window: str
    name: str
    key: str = ENTITY_KEY
    field: str | None = None
    tiles: int = DEFAULT_TILES

    def __post_init__(self) -> None:
        where = f"aggregate {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("every aggregate needs a name (its name in the vector)")
        if self.fn not in AGGREGATE_FNS:
            raise ValueError(f"{where}: fn {self.fn!r} is not one of {', '.join(AGGREGATE_FNS)}")
        if not isinstance(self.key, str) or not KEY_NAME.fullmatch(self.key):
            raise ValueError(f"{where}: key must name an event field (or entity_id) of letters, digits, '_' and "
                             f"'-' (up to 100; it names the internal topics features.by.<key>.<p>), not {self.key!r}")
        if self.fn == "count" and self.field is not None:
            raise ValueError(f"{where}: count takes no field (it counts the key's events)")
        if self.fn != "count" and not (isinstance(self.field, str) and self.field):
            raise ValueError(f"{where}: {self.fn} needs a field")
        if self.field is not None and self.field == self.key:
            raise ValueError(f"{where}: the key field {self.key!r} cannot be aggregated over itself")
        if self.field == ENTITY_KEY and self.fn != "distinct":
            raise ValueError(f"{where}: entity_id (the event's own entity) can only be counted as distinct")
        if not isinstance(self.tiles, int) or not 1 <= self.tiles <= 240:
            raise ValueError(f"{where}: tiles must be a whole number from 1 to 240")
        parse_window(self.window)

    def series(self, lateness_s: float) -> SeriesSpec:
        return SeriesSpec(field=self.field, window_s=parse_window(self.window), tiles=self.tiles,
                          distinct=self.fn == "distinct", lateness_s=lateness_s)


def _aggregates(spec: FeatureSpec) -> list[Aggregate]:
    out = []
    for entry in spec.aggregate:
        if not isinstance(entry, dict):
            raise ValueError(f"an [[aggregate]] entry is a table of keys, got {entry!r}")
        unknown = set(entry) - set(Aggregate.__dataclass_fields__)
        if unknown:
            raise ValueError(f"aggregate {entry.get('name')!r}: unknown keys {sorted(unknown)}")
        missing = {"fn", "window", "name"} - set(entry)
        if missing:
            raise ValueError(f"aggregate {entry.get('name')!r}: missing {sorted(missing)}")
        out.append(Aggregate(**entry))
    names = [a.name for a in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"aggregate names must be unique: {twice}")
    return out


@dataclass(frozen=True)
class _KeyWindows:
    """The series of one key and, per series, what its summary must hold and the aggregates read
    from it: (fn, name)."""

    key: str
    series: tuple[tuple[SeriesSpec, int, tuple[tuple[str, str], ...]], ...]

    @property
    def longest_s(self) -> float:
        return max(spec.reach for spec, _, _ in self.series)


def _compile_windows(aggregates: list[Aggregate], lateness_s: float) -> dict[str, _KeyWindows]:
    by_key: dict[str, dict[SeriesSpec, list[tuple[str, str]]]] = {}
    for a in aggregates:
        by_key.setdefault(a.key, {}).setdefault(a.series(lateness_s), []).append((a.fn, a.name))
    out = {}
    for key, series in by_key.items():
        entries = []
        for spec, aggs in series.items():
            needs = 0
            for fn, _name in aggs:
                needs |= NEEDS[fn]
            entries.append((spec, needs, tuple(aggs)))
        out[key] = _KeyWindows(key, tuple(entries))
    return out


def _value(fn: str, s: Summary) -> float | None:
    """One aggregate of a window's summary; None (left out of the vector) where an empty window
    has no value: a mean, std, min, max or last of nothing."""
    if fn == "count":
        return float(s.n)
    if fn == "sum":
        return s.total if s.n else 0.0
    if fn == "distinct":
        return s.distinct
    if fn == "mean":
        return s.mean
    if fn == "std":
        return s.std
    if fn == "min":
        return s.low
    if fn == "max":
        return s.high
    return s.last


def _pick(names: list[str], fields: dict[str, float | str], skip: frozenset = frozenset()) -> list[str]:
    """The numeric fields named (text values are categories: no delta or moving average of them;
    key fields are identifiers: none either)."""
    numeric = [n for n, v in fields.items() if not isinstance(v, str) and n not in skip]
    return sorted(numeric) if names == ["*"] else [n for n in names if n in numeric]


@dataclass(frozen=True)
class _Plan:
    """The state keys and feature names for one set of field names, built once (hot path)."""

    deltas: list[tuple[str, str, str]]  # field, state key of its previous value, feature name
    ewms: list[tuple[float, str, str, str, tuple[str | None, str | None, str | None, str | None]]]
    # alpha, field, mean key, variance key, names of (mean, std, dev, z) features or None


class FeatureSet:
    """A compiled FeatureSpec: `vector` reads the state, `apply_event`/`apply_label` update it."""

    _MAX_PLANS = 1024

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:8]
        self.name = f"{spec.name}@{digest}"
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._no_fields_plan = _Plan([], []) if not (spec.delta or spec.ewm_alphas) else None
        self.aggregates = _aggregates(spec)
        self.windows = _compile_windows(self.aggregates, parse_window(spec.lateness))
        self._own = self.windows.get(ENTITY_KEY)  # aggregates over the event's own entity
        self.keys: tuple[str, ...] = tuple(k for k in self.windows if k != ENTITY_KEY)  # other entities
        self._key_fields = frozenset(self.keys)

    @property
    def stages(self) -> tuple[str, ...]:
        """The features service's stages after an event's own entity, each with its internal topics
        (`features.by.<stage>.<source>`): one per key field, then `entity_id`, the vectors' stage,
        which brings each event back to its own entity's partition to publish (keyed.py).

            >>> FeatureSet(FeatureSpec(aggregate=[{"key": "merchant", "fn": "count", "window": "1h", "name": "n"}])).stages
            ('merchant', 'entity_id')
            >>> FeatureSet(FeatureSpec()).stages
            ()
        """
        return (*self.keys, ENTITY_KEY) if self.keys else ()

    @property
    def stateful(self) -> bool:
        s = self.spec
        return bool(s.count or s.since_last or s.delta or s.ewm_alphas or s.last_label or self._own)

    def key_values(self, fields: dict[str, float | str]) -> dict[str, str]:
        """The entities an event names besides its own: key field -> key text (absent when the
        event does not carry that field).

            >>> fs = FeatureSet(FeatureSpec(aggregate=[{"key": "merchant", "fn": "count", "window": "1h", "name": "n"}]))
            >>> fs.key_values({"merchant": 17.0, "amount": 3.0}), fs.key_values({"amount": 3.0})
            ({'merchant': '17'}, {})
        """
        return {k: key_text(fields[k]) for k in self.keys if k in fields}

    def key_ttl_s(self, key: str, entity_ttl_s: int) -> int:
        """How long an idle key entity's state is kept: nothing in it outlives its longest window
        (and lateness), so twice that and an hour, or `entity_ttl_s` when that is shorter (0: no bound)."""
        needed = int(2 * self.windows[key].longest_s + 3600)
        return min(needed, entity_ttl_s) if entity_ttl_s > 0 else needed

    def _plan(self, fields: dict[str, float | str]) -> _Plan:
        if self._no_fields_plan is not None:  # no deltas, no moving averages: nothing per field
            return self._no_fields_plan
        # A field may be a number in one event and text in another: the plan depends on both.
        names = tuple(k if v.__class__ is not str else k + "\x00" for k, v in fields.items())
        plan = self._plans.get(names)
        if plan is None:
            s, outs, keys = self.spec, self.spec.ewm_outputs, self._key_fields
            plan = _Plan(
                deltas=[(f, f"prev:{f}", f"{f}_delta") for f in _pick(s.delta, fields, keys)],
                ewms=[
                    (alpha, f, f"ewm:{alpha}:{f}", f"ewv:{alpha}:{f}", (
                        f"{f}_ewm{alpha}" if "mean" in outs else None,
                        f"{f}_ewstd{alpha}" if "std" in outs else None,
                        f"{f}_dev{alpha}" if "dev" in outs else None,
                        f"{f}_z{alpha}" if "z" in outs else None,
                    ))
                    for alpha in s.ewm_alphas for f in _pick(s.ewm_fields, fields, keys)
                ],
            )
            if len(self._plans) >= self._MAX_PLANS:  # events with ever-new field names
                self._plans.clear()
            self._plans[names] = plan
        return plan

    def untracked(self, state: State, fields: dict[str, float]) -> list[str]:
        """The fields of an event that the entity's state keeps no per-field statistics for yet
        (they would add keys to the state): the ones a per-entity bound counts."""
        plan = self._plan(fields)
        firsts = {f: key for f, key, _name in plan.deltas}
        for _alpha, f, mean_key, _var, _names in plan.ewms:
            firsts.setdefault(f, mean_key)
        return [f for f, key in firsts.items() if key not in state]

    @staticmethod
    def tracked(state: State) -> set[str]:
        """The event fields this state holds per-field statistics for (`prev:f`, `ewm:a:f`, `ewv:a:f`)."""
        names = set()
        for key in state:
            if key.startswith("prev:"):
                names.add(key[5:])
            elif key.startswith(("ewm:", "ewv:")):
                parts = key.split(":", 2)
                if len(parts) == 3:
                    names.add(parts[2])
        return names

    def vector(self, state: State, fields: dict[str, float], ts: float,
               keyed: dict[str, State] | None = None) -> dict[str, float]:
        """The features of an event, from the entity's state before it (and, for aggregates keyed
        by another field, from `keyed`: key field -> that entity's state before it). The same as
        `field_features`, then `own_features`, then `key_features` of each key field in order: the
        parts the features service computes where each state lives (docs/features.md)."""
        x = self.field_features(fields)
        self._own_features(state, fields, ts, x)
        for key in self.keys:
            if key in fields:  # an event that names no such entity has none of its aggregates
                self.key_features(key, (keyed or {}).get(key) or {}, ts, x)
        return x

    def field_features(self, fields: dict[str, float | str]) -> dict[str, float | str]:
        """The event's own fields as features (none for `fields = false`; key fields never)."""
        if not self.spec.fields:
            return {}
        return {k: v for k, v in fields.items() if k not in self._key_fields} if self._key_fields else dict(fields)

    def own_features(self, state: State, fields: dict[str, float], ts: float) -> dict[str, float]:
        """The numeric features of the event's own entity (its count, deltas, moving averages, last
        label, windowed aggregates), from its state before the event.

            >>> FeatureSet(PRESETS["default"]).own_features({}, {"x": 2.0}, ts=0.0)["x_delta"]
            0.0
        """
        x: dict[str, float] = {}
        self._own_features(state, fields, ts, x)
        return x

    def _own_features(self, state: State, fields: dict[str, float], ts: float, x: dict) -> None:
        s = self.spec
        plan = self._plan(fields)
        if s.count:
            x["_count"] = math.log1p(float(state.get("n", 0)))
        if s.since_last:
            last_ts = state.get("ts")
            x["_since_last"] = max(0.0, ts - float(last_ts)) if last_ts is not None else 0.0
        for f, prev_key, name in plan.deltas:
            prev = state.get(prev_key)
            x[name] = fields[f] - float(prev) if prev is not None else 0.0
        for _alpha, f, mean_key, var_key, (mean_name, std_name, dev_name, z_name) in plan.ewms:
            mean = state.get(mean_key)
            value = fields[f]
            mean_f = float(mean) if mean is not None else value
            std = math.sqrt(max(float(state.get(var_key, 0.0)), 0.0))
            dev = value - mean_f
            if mean_name:
                x[mean_name] = mean_f
            if std_name:
                x[std_name] = std
            if dev_name:
                x[dev_name] = dev
            if z_name:
                x[z_name] = dev / std if std > 1e-9 else 0.0
        if s.last_label:
            x.update(self._label_features(state.get("label")))
        if self._own is not None:
            _read_windows(self._own, state, ts, x)

    def key_features(self, key: str, state: State, ts: float, x: dict) -> None:
        """Add the aggregates of key field `key` to `x`, from the state of the entity it names
        before the event (the features service calls it where that state lives)."""
        _read_windows(self.windows[key], state, ts, x)

    @staticmethod
    def _label_features(label: Any) -> dict[str, float]:
        if label is None:
            return {"_last_label_known": 0.0}
        try:
            value = float(label)
            if math.isfinite(value):
                return {"_last_label_known": 1.0, "_last_label": value}
        except (TypeError, ValueError):
            pass
        return {"_last_label_known": 1.0, f"_last_label={label}": 1.0}

    def apply_keyed(self, key: str, state: State, fields: dict[str, float | str], ts: float,
                    entity_id: str | None = None) -> int:
        """Fold an event into the state of the entity its field `key` names (after its vector was
        taken); `entity_id` is the event's own (for `distinct` of `entity_id`: the cards a
        merchant saw). Returns `windows.IN_ORDER`, `LATE` or `DROPPED` (see windows.py)."""
        return _fold_windows(self.windows[key], state, fields, ts, entity_id)

    def apply_event(self, state: State, fields: dict[str, float], ts: float) -> int:
        """Fold an event into its entity's state (after its vector was taken). Returns what its
        own windowed aggregates made of it (`windows.IN_ORDER` without any)."""
        outcome = _fold_windows(self._own, state, fields, ts) if self._own is not None else IN_ORDER
        plan = self._plan(fields)
        state["n"] = int(state.get("n", 0)) + 1
        state["ts"] = ts
        for f, prev_key, _name in plan.deltas:
            state[prev_key] = fields[f]
        for alpha, f, mean_key, var_key, _names in plan.ewms:
            mean = state.get(mean_key)
            value = fields[f]
            if mean is None:
                state[mean_key] = value
                state[var_key] = 0.0
                continue
            # West's incremental exponentially weighted mean and variance.
            mean = float(mean)
            var = float(state.get(var_key, 0.0))
            diff = value - mean
            incr = alpha * diff
            state[mean_key] = mean + incr
            state[var_key] = (1 - alpha) * (var + diff * incr)
        return outcome

    def apply_label(self, state: State, label: str, event_ts: float) -> bool:
        """Record a label as the entity's last known one, unless a label of a later event is
        already known (labels may arrive out of order). Idempotent. Returns whether it changed."""
        if not self.spec.last_label:
            return False
        known_ts = state.get("label_ts")
        if known_ts is not None and float(known_ts) > event_ts:
            return False
        state["label"] = label
        state["label_ts"] = event_ts
        return True


def _series(state: State, spec: SeriesSpec) -> Series | None:
    """The series a state holds for `spec`, decoded once (Redis gives its bytes) and kept in the
    state as an object until the state is written back."""
    held = state.get(spec.id)
    if held is None or held.__class__ is Series:
        return held
    series = Series.decode(spec, held)
    state[spec.id] = series
    return series


_EMPTY = Summary()


def _read_windows(windows: _KeyWindows, state: State, ts: float, x: dict) -> None:
    for spec, needs, aggregates in windows.series:
        series = _series(state, spec)
        if not needs and not spec.distinct:  # counts alone: no summary to build
            n = float(series.count(ts)) if series is not None else 0.0
            for _fn, name in aggregates:
                x[name] = n
            continue
        summary = series.summary(ts, needs) if series is not None else _EMPTY
        for fn, name in aggregates:
            value = _value(fn, summary)
            if value is not None:
                x[name] = value


def _fold_windows(windows: _KeyWindows, state: State, fields: dict[str, float | str], ts: float,
                  entity_id: str | None = None) -> int:
    outcome = IN_ORDER
    for spec, _needs, _aggregates in windows.series:
        field_ = spec.field
        if field_ is None:
            value = 0.0  # count: every event of the key
        else:
            value = entity_id if field_ == ENTITY_KEY else fields.get(field_)
            if value is None:
                continue
            if spec.distinct:
                value = value_hash(value)
            elif isinstance(value, str):  # text in a numeric aggregate's field: it has no number to add
                continue
        series = _series(state, spec)
        if series is None:
            series = state[spec.id] = Series.new(spec)
        folded = series.fold(ts, value)
        if folded > outcome:
            outcome = folded
    return outcome


def load_feature_set(spec: str = "default") -> FeatureSet:
    """`default`, `raw`, or the path of a TOML/YAML file with FeatureSpec's keys (at the top or
    under `[features]`) and any number of `[[aggregate]]` entries."""
    if spec in PRESETS:
        return FeatureSet(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"feature set {spec!r}: not 'default', 'raw' or a readable file")
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"feature set {spec!r}: not a table of keys")
    if "features" in data:  # FeatureSpec's keys under [features], aggregates beside it
        outer = {k: v for k, v in data.items() if k != "features"}
        data = {**data["features"]}
        if "aggregate" in outer:
            data["aggregate"] = [*data.get("aggregate", []), *outer.pop("aggregate")]
        if outer:
            raise ValueError(f"feature set {spec!r}: unknown keys {sorted(outer)} beside [features]")
    unknown = set(data) - set(FeatureSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"feature set {spec!r}: unknown keys {sorted(unknown)}")
    data.setdefault("name", path.stem)
    try:
        return FeatureSet(FeatureSpec(**data))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"feature set {spec!r}: {exc}") from None
