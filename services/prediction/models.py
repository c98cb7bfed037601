"""The model the prediction service serves, and how it is swapped without stopping requests.

A `ServingModel` is immutable: the river model, its version and revision. `ModelHolder.current`
is the one reference requests read; the follower thread loads a new model off the request path
and replaces the reference in a single assignment (atomic under the GIL). A request reads the
reference ONCE and uses that pair to the end, so it finishes on the model it started with and
names the version that really answered. The holder must never hand out a model whose artifact
signature was not checked, and never lets a refused artifact replace the one that serves.

    holder = ModelHolder("default")
    holder.load(registry, version=1)                   # signature checked by the registry
    served = holder.current                            # grab once per request
    prediction, proba = score(served.model, {"price": 0.3})

Labels are strings everywhere in driftline; river gives back Python values (bool for binary
models trained on 0/1), mapped back by the learner's own `labels.proba_to_text`, so a served
prediction compares with a learned label exactly as the learner's predictions do.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..learner.labels import answer
from ..shared import metrics
from ..shared.registry import ModelRegistry, TamperedArtifact, UnknownVersion

log = logging.getLogger(__name__)


class NonFiniteOutput(ValueError):
    """The model's probabilities are not finite numbers (inputs far outside what it has seen)."""


def score(model: Any, x: dict[str, float]) -> tuple[str | None, dict[str, float]]:
    """(prediction, proba) of one vector, labels as strings (the learner's own mapping). The
    prediction is the argmax of proba, as river's `predict_one` does; None before the model has
    seen a label (empty proba). A regressor's prediction is its number as text, with no proba."""
    y_pred, proba = answer(model, x)
    if not all(math.isfinite(p) for p in proba.values()) or (y_pred is not None and not proba
                                                               and not math.isfinite(float(y_pred))):
        raise NonFiniteOutput("the model's output for these fields is not a finite number")
    return y_pred, proba


@dataclass(frozen=True)
class ServingModel:
    """One loaded version: what a request grabs once and keeps."""

    model: Any
    version: int
    revision: int
    examples_seen: int = 0
    loaded_at: float = field(default_factory=time.time)


class ModelHolder:
    """The serving reference of one model name, replaced whole on every swap."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.current: ServingModel | None = None
        self.refused: dict[int, str] = {}  # version -> why it was refused (for /v1/models, logs)
        self._load_lock = threading.Lock()  # loads are serialized; reads never take it

    def swap(self, served: ServingModel) -> None:
        self.current = served  # the one atomic step: readers see the old or the new pair, whole
        metrics.SERVING_VERSION.labels(self.model_name).set(served.version)

    def load(self, registry: ModelRegistry, version: int, *, force: bool = False) -> ServingModel | None:
        """Load `version` from the registry and serve it, unless it already serves at the same
        revision. A tampered or missing artifact is refused loudly; the current model keeps
        serving. Returns what serves afterwards."""
        with self._load_lock:
            current = self.current
            try:
                revision = int(registry.meta(version).get("revision", 0))
            except UnknownVersion:
                log.error("model %s version %s is not in the registry; still serving %s",
                          self.model_name, version, current and current.version)
                return current
            if not force and current is not None and current.version == version and current.revision >= revision:
                return current
            try:
                model, meta = registry.load(version)
            except TamperedArtifact as exc:
                self.refused[version] = str(exc)
                log.error("REFUSED model %s version %s (%s); still serving version %s",
                          self.model_name, version, exc, current and current.version)
                return current
            except UnknownVersion:
                log.error("model %s version %s has no artifact; still serving %s",
                          self.model_name, version, current and current.version)
                return current
            served = ServingModel(model, version, int(meta.get("revision", 0)), int(meta.get("examples_seen", 0)))
            self.refused.pop(version, None)
            self.swap(served)
            log.info("serving model %s version %s revision %s", self.model_name, version, served.revision)
            return served

    def sync_champion(self, registry: ModelRegistry) -> ServingModel | None:
        """Serve whatever the registry names champion now (at its latest revision)."""
        champion = registry.champion()
        if champion is None:
            return self.current
        return self.load(registry, champion)
