"""The retraining policy as a specification: which errors, clocks and features become drift events
and retrain requests (pure logic; no Kafka, no Redis)."""

from __future__ import annotations

import pickle
import math
import random

import pytest
from fastapi import HTTPException
from pydantic import SecretStr

from driftline.drift.datadrift import DataDriftMonitor, psi
from driftline.drift.detectors import DETECTORS, ConceptMonitor, change_point, make_detector
from driftline.drift.policy import RetrainPolicy
from driftline.shared.admin import check_admin
from driftline.shared.settings import DriftSettings, Settings


def outcomes(rates: list[tuple[int, float]], seed: int = 7):
    """(position, correct) for consecutive segments of (length, error rate)."""
    rng = random.Random(seed)
    position = 0
    for length, rate in rates:
        for _ in range(length):
            yield position, rng.random() >= rate
            position += 1


def run(policy: RetrainPolicy, stream, version: int = 1) -> list:
    return [a for position, correct in stream for a in policy.observe(position, correct, version)]


def of(actions, kind: str) -> list[dict]:
    return [a.record for a in actions if a.kind == kind]


# -- concept drift: only an error rate that went up counts ----------------------------------------
@pytest.mark.parametrize("detector", ["ADWIN", "PageHinkley", "DDM", "HDDM_A"])
def test_error_rate_going_up_raises_one_concept_drift_and_one_retrain(detector):
    policy = RetrainPolicy(DriftSettings(detector=detector), model="m")
    actions = run(policy, outcomes([(3000, 0.10), (3000, 0.40)]))
    drifts = [d for d in of(actions, "drift") if d["level"] == "drift"]
    assert len(drifts) == 1, drifts
    drift = drifts[0]
    assert 3000 <= drift["position"] < 3400
    assert drift["kind"] == "concept" and drift["detector"] == detector and drift["model_version"] == 1
    assert drift["error_before"] == pytest.approx(0.10, abs=0.03)
    assert drift["error_after"] == pytest.approx(0.40, abs=0.12)
    retrains = of(actions, "retrain")
    assert [(r["reason"], r["drift_id"]) for r in retrains] == [("concept_drift", drift["drift_id"])]


@pytest.mark.parametrize("detector", DETECTORS)
def test_error_rate_going_down_raises_nothing_although_the_detector_alarms(detector):
    policy = RetrainPolicy(DriftSettings(detector=detector), model="m")
    n = 700 if detector == "KSWIN" else 3000  # KSWIN runs a KS test per error: ~2 ms each
    actions = run(policy, outcomes([(n, 0.40), (n, 0.10)]))
    assert [d for d in of(actions, "drift") if d["level"] == "drift"] == []
    assert of(actions, "retrain") == []


def test_adwin_alarm_on_improvement_is_ignored_not_acted_upon():
    monitor = ConceptMonitor("ADWIN", {}, min_error_increase=0.02)
    alarms = [a for _, ok in outcomes([(3000, 0.40), (3000, 0.10)]) if (a := monitor.update(not ok))]
    assert alarms and all(a.direction == "down" for a in alarms)  # ADWIN did fire: on the improvement
    assert alarms[0].error_before == pytest.approx(0.40, abs=0.03)


@pytest.mark.parametrize("detector", ["ADWIN", "PageHinkley", "KSWIN"])
def test_a_diverged_regressors_vast_errors_raise_alarms_not_overflow(detector):
    # Its answers go from ~1 off to 1e200 off (finite): the change point squares the errors.
    monitor, rng = ConceptMonitor(detector), random.Random(5)
    errors = [rng.random() for _ in range(1500)] + [1e200 * (1 + rng.random()) for _ in range(500)]
    alarms = [a for e in errors if (a := monitor.update(e))]
    assert alarms and all(math.isfinite(a.error_after) for a in alarms) and math.isfinite(monitor.error_rate)


@pytest.mark.parametrize("step", [5.0, 50.0])
def test_a_large_step_detected_within_a_few_errors_is_judged_again_and_counts_as_up(step):
    # ADWIN flags a step of the residuals 3 errors after it: the change point then cannot leave
    # fewer than min_side (30) errors on the newest side, most of them from before, and the rise
    # is not significant. Judged again 30 errors later, it is (without that second look, such a
    # drift goes unanswered).
    monitor, rng = ConceptMonitor("ADWIN", min_side=30), random.Random(5)
    errors = [rng.random() for _ in range(1500)] + [step * (1 + rng.random()) for _ in range(500)]
    alarms = [a for e in errors if (a := monitor.update(e))]
    assert alarms[0].position < 1510 and alarms[0].direction != "up"  # the first judgement
    up = [a for a in alarms if a.direction == "up"]
    assert up and 1500 + 30 <= up[0].position <= 1500 + 40 and up[0].error_after > step


def test_a_rise_smaller_than_min_error_increase_is_not_concept_drift():
    policy = RetrainPolicy(DriftSettings(min_error_increase=0.5), model="m")
    actions = run(policy, outcomes([(3000, 0.10), (3000, 0.40)]))
    assert of(actions, "retrain") == [] and of(actions, "drift") == []


def test_stationary_errors_raise_no_alarm():
    policy = RetrainPolicy(DriftSettings(), model="m")
    assert run(policy, outcomes([(20000, 0.15)])) == []


def test_ddm_publishes_a_warning_before_its_drift():
    policy = RetrainPolicy(DriftSettings(detector="DDM"), model="m")
    actions = run(policy, outcomes([(3000, 0.10), (3000, 0.40)]))
    levels = [(d["level"], d["position"]) for d in of(actions, "drift") if d["position"] >= 3000]
    assert levels[0][0] == "warning" and ("drift", levels[-1][1]) in levels


def test_change_point_finds_the_split():
    cut, before, after = change_point([0] * 500 + [1, 0] * 100)
    assert cut == 500 and before == 0.0 and after == pytest.approx(0.5)


# -- cooldown ---------------------------------------------------------------------------------------
def test_cooldown_holds_automatic_requests_and_counts_the_suppressed():
    policy = RetrainPolicy(DriftSettings(on_new_data=100, cooldown=250), model="m")
    actions = run(policy, outcomes([(1000, 0.1)]))
    assert [r["position"] for r in of(actions, "retrain")] == [99, 399, 699, 999]
    assert [s["reason"] for s in of(actions, "suppressed")] == ["new_data"] * 6


def test_cooldown_holds_a_second_drift_soon_after_the_first():
    policy = RetrainPolicy(DriftSettings(cooldown=5000), model="m")
    actions = run(policy, outcomes([(3000, 0.05), (1500, 0.30), (1500, 0.60)]))
    drifts = [d for d in of(actions, "drift") if d["level"] == "drift"]
    assert len(drifts) >= 2
    assert len(of(actions, "retrain")) == 1
    assert of(actions, "suppressed")[0]["reason"] == "concept_drift"


def test_demand_is_never_held_back_by_the_cooldown():
    policy = RetrainPolicy(DriftSettings(on_new_data=10, cooldown=10**9), model="m")
    run(policy, outcomes([(100, 0.1)]))
    assert policy.cooling_down()
    assert policy.demand().record["reason"] == "demand"
    with pytest.raises(ValueError):
        policy.demand("because")


# -- the other triggers -----------------------------------------------------------------------------
def test_schedule_trigger_fires_every_period():
    now = [1000.0]
    policy = RetrainPolicy(DriftSettings(on_schedule_s=60, cooldown=0), model="m", clock=lambda: now[0])
    assert policy.tick() == []
    now[0] += 61
    assert [r["reason"] for r in of(policy.tick(), "retrain")] == ["schedule"]
    assert policy.tick() == []


def test_performance_trigger_fires_once_per_window_under_the_threshold():
    policy = RetrainPolicy(DriftSettings(on_accuracy_below=0.7, accuracy_window=200, cooldown=0), model="m")
    actions = run(policy, outcomes([(1000, 0.1), (300, 0.6)]))
    perf = [r for r in of(actions, "retrain") if r["reason"] == "performance"]
    assert 1 <= len(perf) <= 2 and all(r["position"] >= 1000 for r in perf)


def test_data_drift_asks_for_retraining_only_when_configured():
    quiet = RetrainPolicy(DriftSettings(), model="m").data_drift("x", 0.9, "PSI")
    assert of(quiet, "retrain") == [] and of(quiet, "drift")[0]["feature"] == "x"
    loud = RetrainPolicy(DriftSettings(data_drift_retrains=True), model="m").data_drift("x", 0.9, "PSI")
    event, request = of(loud, "drift")[0], of(loud, "retrain")[0]
    assert event["kind"] == "data" and request["reason"] == "data_drift" and request["drift_id"] == event["drift_id"]


def test_data_drift_monitor_alarms_once_on_a_shift_and_never_when_stationary():
    rng = random.Random(3)
    monitor = DataDriftMonitor(window=500, threshold=0.25)
    stationary = [a for _ in range(20000) for a in monitor.update({"g": rng.gauss(0, 1), "k": float(rng.randint(0, 3))})]
    assert stationary == []
    shifted = [a for _ in range(5000) for a in monitor.update({"g": rng.gauss(1.5, 1), "k": float(rng.randint(0, 3))})]
    assert [a.feature for a in shifted] == ["g"]
    assert psi([10, 10], [10, 10]) == 0.0


def test_counters_and_time_since_features_are_left_out_of_data_drift_by_default():
    # A per-entity event count only grows: against its first window its PSI is huge on every check.
    def alarms(monitor):
        return {a.feature for i in range(6000) for a in monitor.update(
            {"_count": math.log1p(i), "_since_last": float(i % 7), "x": float(i % 10)})}

    assert alarms(DataDriftMonitor(window=500, threshold=0.25, ignore=())) == {"_count"}
    assert alarms(DataDriftMonitor(window=500, threshold=0.25, ignore=DriftSettings().data_drift_ignore)) == set()


# -- versions, swaps, restarts ----------------------------------------------------------------------
def test_a_swap_watches_the_new_champion_from_scratch_and_ignores_late_outcomes_of_the_old():
    policy = RetrainPolicy(DriftSettings(), model="m")
    run(policy, outcomes([(3000, 0.4)]))
    old_monitor = policy.monitor
    policy.swap(2)
    assert policy.version == 2 and policy.monitor is not old_monitor
    assert [a.kind for a in policy.observe(3000, False, 1)] == ["ignored"]
    assert policy.observe(3001, True, 2) == [] and policy.monitor.n == 1


def test_snapshot_restores_positions_cooldown_and_detector():
    settings = DriftSettings(on_new_data=100, cooldown=1000)
    first = RetrainPolicy(settings, model="m")
    stream = list(outcomes([(500, 0.1)]))
    assert len(of(run(first, stream), "retrain")) == 1
    second = RetrainPolicy(settings, model="m")
    second.restore(pickle.loads(pickle.dumps(first.snapshot())))
    assert run(second, stream) == []  # redelivered outcomes are skipped
    assert second.monitor.n == 500 and second.last_retrain == 99
    more = [(p + 500, ok) for p, ok in outcomes([(600, 0.1)])]
    assert [r["position"] for r in of(run(second, more), "retrain")] == [1099]


def test_every_configured_detector_builds_with_float_parameters():
    for name in DETECTORS:
        make_detector(name)
    assert make_detector("ADWIN", {"clock": 16.0, "delta": 0.01}).clock == 16
    with pytest.raises(ValueError):
        make_detector("EDDM")


def test_admin_route_is_closed_when_no_token_is_configured():
    with pytest.raises(HTTPException) as closed:
        check_admin(Settings(admin_token=None), "Bearer anything")
    assert closed.value.status_code == 403
    with pytest.raises(HTTPException) as missing:
        check_admin(Settings(admin_token=SecretStr("s3cret")), None)
    assert missing.value.status_code == 401
    check_admin(Settings(admin_token=SecretStr("s3cret")), "Bearer s3cret")
