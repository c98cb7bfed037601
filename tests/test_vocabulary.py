"""One list per concept: the settings, the factories, the API and the docs all follow the lists
in `shared.vocabulary` and `shared.deadletter`."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from driftline.drift.detectors import make_detector
from driftline.drift.policy import REASONS as POLICY_REASONS
from driftline.drift.service import RetrainBody
from driftline.ingestion.validate import REASONS as INGESTION_REASONS
from driftline.shared.deadletter import REASONS as DLQ_REASONS
from driftline.shared.settings import DriftSettings
from driftline.shared.vocabulary import DRIFT_DETECTORS, RETRAIN_REASONS

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@pytest.mark.parametrize("name", list(DRIFT_DETECTORS))
def test_every_listed_detector_is_a_setting_and_builds(name):
    assert DriftSettings(detector=name).detector == name
    assert make_detector(name).drift_detected is False


def test_an_unlisted_detector_is_refused_by_settings_and_factory():
    with pytest.raises(ValueError):
        DriftSettings(detector="EDDM")
    with pytest.raises(ValueError):
        make_detector("EDDM")


def test_the_configuration_reference_names_exactly_the_listed_detectors():
    row = next(line for line in CONFIGURATION.read_text().splitlines() if line.startswith("| `DRIFTLINE_DRIFT__DETECTOR`"))
    assert row.split("|")[3].strip().split(": ", 1)[1] == ", ".join(DRIFT_DETECTORS)


def test_retrain_reasons_and_dead_letter_reasons_are_one_list_each():
    assert POLICY_REASONS == RETRAIN_REASONS
    assert set(typing.get_args(RetrainBody.model_fields["reason"].annotation)) == set(RETRAIN_REASONS)
    assert INGESTION_REASONS is DLQ_REASONS and "unknown_event" in DLQ_REASONS
