"""Feature definitions: how an event and its entity's state become the vector a model sees.

This is the one function both the features service (training) and the prediction service
(serving) call, so what is served is what was learned from. It must never read anything but the
entity state it is given: the state *before* the event (point-in-time correct, no label leakage).

    >>> fs = load_feature_set("default")
    >>> state = {}
    >>> x = fs.vector(state, {"price": 1.0}, ts=0.0)     # from the state before the event
    >>> fs.apply_event(state, {"price": 1.0}, ts=0.0)     # then the event updates the state

Text values are categories (`{"country": "KR"}`): they pass into the vector as they are, for a
model that handles them (`preprocessing.OneHotEncoder()`, a tree, naive Bayes), and the per-field
statistics (delta, moving averages) cover the numeric fields only.

    >>> fs.vector({}, {"price": 2.0, "country": "KR"}, ts=1.0)["country"]
    'KR'

Definitions are data: `default`, `raw` (the event's fields alone) or a TOML/YAML file with the keys
of `FeatureSpec`. The entity state is a flat dict of floats and strings, stored as a Redis hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

State = dict[str, Any]


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


def _pick(names: list[str], fields: dict[str, float | str]) -> list[str]:
    """The numeric fields named (text values are categories: no delta or moving average of them)."""
    numeric = [n for n, v in fields.items() if not isinstance(v, str)]
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

    @property
    def stateful(self) -> bool:
        s = self.spec
        return bool(s.count or s.since_last or s.delta or s.ewm_alphas or s.last_label)

    def _plan(self, fields: dict[str, float | str]) -> _Plan:
        # A field may be a number in one event and text in another: the plan depends on both.
        names = tuple(k if v.__class__ is not str else k + "\x00" for k, v in fields.items())
        plan = self._plans.get(names)
        if plan is None:
            s, outs = self.spec, self.spec.ewm_outputs
            plan = _Plan(
                deltas=[(f, f"prev:{f}", f"{f}_delta") for f in _pick(s.delta, fields)],
                ewms=[
                    (alpha, f, f"ewm:{alpha}:{f}", f"ewv:{alpha}:{f}", (
                        f"{f}_ewm{alpha}" if "mean" in outs else None,
                        f"{f}_ewstd{alpha}" if "std" in outs else None,
                        f"{f}_dev{alpha}" if "dev" in outs else None,
                        f"{f}_z{alpha}" if "z" in outs else None,
                    ))
                    for alpha in s.ewm_alphas for f in _pick(s.ewm_fields, fields)
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

    def vector(self, state: State, fields: dict[str, float], ts: float) -> dict[str, float]:
        """The features of an event, from the entity's state before it."""
        s = self.spec
        plan = self._plan(fields)
        x: dict[str, float] = dict(fields) if s.fields else {}
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
        return x

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

    def apply_event(self, state: State, fields: dict[str, float], ts: float) -> None:
        """Fold an event into its entity's state (after its vector was taken)."""
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


def load_feature_set(spec: str = "default") -> FeatureSet:
    """`default`, `raw`, or the path of a TOML/YAML file with FeatureSpec's keys."""
    if spec in PRESETS:
        return FeatureSet(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"feature set {spec!r}: not 'default', 'raw' or a readable file")
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    data = data.get("features", data)
    unknown = set(data) - set(FeatureSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"feature set {spec!r}: unknown keys {sorted(unknown)}")
    data.setdefault("name", path.stem)
    return FeatureSet(FeatureSpec(**data))
