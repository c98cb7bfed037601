"""The closed lists driftline's contracts name, each written once: retrain reasons and drift
detectors. Settings, factories, the HTTP API's schemas, the CLI and the docs read them from here
(dead-letter reasons live with their builder in `deadletter.py`).

    >>> "concept_drift" in RETRAIN_REASONS, AUTOMATIC_RETRAIN_REASONS[-1]
    (True, 'performance')
    >>> DRIFT_DETECTORS["HDDM_A"]
    ('binary.HDDMA', {})

Nothing heavy is imported here: `shared.settings` reads it at start.
"""

from __future__ import annotations

from typing import Any

# Why a challenger is asked for (RetrainRequest.reason): the automatic triggers, then a person's demand.
AUTOMATIC_RETRAIN_REASONS = ("concept_drift", "data_drift", "schedule", "new_data", "performance")
RETRAIN_REASONS = AUTOMATIC_RETRAIN_REASONS + ("demand",)

# Drift detectors by their config name: the class under `river.drift` and its default arguments.
# Adding one here is all a new detector needs (settings accept it, `make_detector` builds it).
DRIFT_DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "ADWIN": ("ADWIN", {}),
    "PageHinkley": ("PageHinkley", {}),
    "KSWIN": ("KSWIN", {"seed": 42}),  # reproducible alarms
    "DDM": ("binary.DDM", {}),
    "HDDM_A": ("binary.HDDMA", {}),
    "HDDM_W": ("binary.HDDMW", {}),
}
# Detectors of 0/1 input with a warning zone (river's binary detectors); the others only have a drift level.
WARNING_DETECTORS = tuple(name for name, (path, _) in DRIFT_DETECTORS.items() if path.startswith("binary."))
