"""A model's content hash: the same for two models in the same learned state, whatever their
history in memory, and different as soon as anything they learned differs.

    >>> from river import linear_model
    >>> a, b = linear_model.LogisticRegression(), linear_model.LogisticRegression()
    >>> a.learn_one({"x": 1.0}, True); b.learn_one({"x": 1.0}, True)
    >>> model_digest(a) == model_digest(b), model_digest(a) == model_digest(linear_model.LogisticRegression())
    (True, False)

It is how a prediction replica proves that it serves the learner's model (docs/serving.md): the
learner writes the digest of every snapshot it saves into the registry, a replica computes its
own on demand, and the two are compared at the same stream position.

Pickled bytes alone do not say it, for three reasons, each handled here:

- pickle writes an object shared by two references once and then refers back to it, so the
  bytes depend on which equal objects happen to be *the same object* in memory (a model loaded
  from an artifact shares differently from the one that was saved). The digest pickles without
  that memo (`fast` mode): every object written as its value.
- the order in which attributes were first set depends on the calls made (a river pipeline caches
  its plan at its first prediction or its first learning, whichever comes first), and so does a
  `defaultdict`'s, whose reads insert the default (a scaler asked to transform a feature it has
  not learned yet): attributes are written sorted by name, and a `defaultdict` without the
  entries that equal its default (the same to every reader), sorted.
- a set is written in its iteration order, which for strings changes from process to process
  (hash randomisation): sets in an object's state are written sorted.
- river gives each new Gaussian estimator in a tree's leaves an unseeded random generator that
  learning never draws from, so two equal trees differ there: a `proba` distribution is written
  without its generator. Every other generator (a forest's, seeded or not) is in the digest.

A model with reference cycles cannot be pickled in `fast` mode; it is then pickled with the memo,
which can only make two equal models look different, never two different ones look equal.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections import defaultdict
from typing import Any

_PRIMITIVE_DEFAULTS = (int, float, str, bytes, bool, type(None), tuple)


def _order(value: Any) -> tuple[str, str]:
    return type(value).__name__, repr(value)


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind is set or kind is frozenset:
        return kind.__name__, sorted(value, key=_order)
    if kind is dict and any(type(v) in (set, frozenset) for v in value.values()):
        return {k: _canonical(v) for k, v in value.items()}
    return value


class _CanonicalPickler(pickle.Pickler):
    def __init__(self, file, distribution: type | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.distribution = distribution

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object but the built-in containers and scalars.
        if isinstance(obj, type) or callable(obj) and not hasattr(obj, "__dict__"):
            return NotImplemented  # classes and functions: pickled by reference
        if isinstance(obj, defaultdict):
            factory = obj.default_factory
            default = factory() if factory is not None else None
            if factory is None or not isinstance(default, _PRIMITIVE_DEFAULTS):
                items = obj.items()
            else:
                items = [(k, v) for k, v in obj.items() if not (type(v) is type(default) and v == default)]
            return defaultdict, (factory,), None, None, iter(sorted(items, key=lambda kv: _order(kv[0])))
        try:
            reduced = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 -- let pickle say what it cannot write
            return NotImplemented
        if not isinstance(reduced, tuple) or len(reduced) < 3 or type(reduced[2]) is not dict:
            return NotImplemented
        state = reduced[2]
        if self.distribution is not None and isinstance(obj, self.distribution):
            state = {k: v for k, v in state.items() if k != "_rng"}
        return (reduced[0], reduced[1], {k: _canonical(state[k]) for k in sorted(state)}, *reduced[3:])


def _distribution() -> type | None:
    try:
        from river.proba.base import Distribution
    except ImportError:  # not a river deployment: nothing of theirs to leave out
        return None
    return Distribution


def model_digest(model: Any) -> str:
    """SHA-256 (hex) of the model's canonical pickle (see the module's doc)."""
    buf = io.BytesIO()
    pickler = _CanonicalPickler(buf, _distribution())
    pickler.fast = True
    try:
        pickler.dump(model)
    except (ValueError, RecursionError):  # a reference cycle: `fast` mode cannot write it
        buf = io.BytesIO()
        _CanonicalPickler(buf, _distribution()).dump(model)
    return hashlib.sha256(buf.getvalue()).hexdigest()
