"""End to end, the tasks users bring: a regressor, and events with categorical (text) fields,
through the real ingestion, features and learner services, against river alone on the same rows."""

from __future__ import annotations

import random

import pytest

from driftline.replay.datasets import Dataset, load
from pipeline import metric, replay_report, start_pipeline

pytestmark = pytest.mark.e2e

LINREG = "preprocessing.StandardScaler() | linear_model.LinearRegression()"
ROWS = 3_000
DELAY = 50


def river_score(rows, model, metric, delay: int, target=float) -> float:
    """river's own answer: progressive_val_score with the label of row i revealed `delay` rows later."""
    from river import evaluate

    return evaluate.progressive_val_score(((x, target(y)) for x, y, _ in rows), model, metric, delay=delay).get()


def test_a_regressor_through_the_pipeline_matches_river_progressive_validation_mae_within_one_percent(
        settings, run_service, tmp_path):
    from river import metrics

    from driftline.learner.spec import parse_model

    procs = start_pipeline(run_service, model=LINREG, features="raw")
    report = replay_report(settings, "friedman-abrupt", limit=ROWS, label_delay=DELAY, model=LINREG, features="raw",
                           report_dir=tmp_path)
    rows = list(load("friedman-abrupt").rows())[:ROWS]
    expected = river_score(rows, parse_model(LINREG), metrics.MAE(), DELAY)
    pq = report["prequential"]
    print(f"friedman-abrupt[:{ROWS}] LinearRegression delay {DELAY}: pipeline MAE {pq['mae']:.4f} "
          f"river {expected:.4f}; RMSE {pq['rmse']:.4f} R2 {pq['r2']:.4f}")
    assert report["examples_learned"] == report["labels_sent"] == ROWS and report["labels_dlq"] == 0
    assert pq["task"] == "regression" and pq["mae"] == pytest.approx(expected, rel=0.01)
    assert pq["rmse"] >= pq["mae"] > 0 and 0.3 < pq["r2"] < 1  # a linear fit of a non-linear target
    assert all(w["mae"] is not None for w in pq["windows"]) and pq["windows"][-1]["end"] == ROWS
    outcome = report["_outcomes"][-1]
    assert outcome["error"] == pytest.approx(float(outcome["y_pred"]) - float(outcome["y_true"]))
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # The learner's own figures, exported to Prometheus, agree with the outcomes' (no accuracy for a regressor).
    learner = procs["learner"]
    assert metric(learner, "driftline_model_mae", role="champion") == pytest.approx(pq["mae"], rel=1e-3)
    assert metric(learner, "driftline_model_r2", role="champion") == pytest.approx(pq["r2"], abs=1e-3)
    assert metric(learner, "driftline_model_accuracy", role="champion") == 0.0


def category_rows(n: int, seed: int = 7):
    """A stream whose label depends on a category (country) and a number; 5% label noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        country = rng.choice(["KR", "FR", "US", "BR", "JP"])
        amount = rng.random()
        y = {"KR": 2.0, "BR": 1.0, "JP": 0.0, "FR": -1.0, "US": -2.0}[country] + 3 * (amount - 0.5) > 0
        if rng.random() < 0.05:
            y = not y
        rows.append(({"country": country, "amount": amount}, str(int(y)), f"user{i % 20}"))
    return rows


def test_categorical_fields_flow_through_both_doors_and_the_model_learns_from_them(settings, run_service):
    """LogisticRegression alone gets the text values one-hot encoded by the learner; river's own
    pipeline one-hot encodes the category explicitly: the same accuracy on the same rows."""
    from river import compose, linear_model, metrics, preprocessing

    rows = category_rows(ROWS)
    ds = Dataset("categories", lambda: iter(rows), len(rows), (), 0, "label from a category", "y")
    start_pipeline(run_service, model="linear_model.LogisticRegression()", features="raw")
    report = replay_report(settings, ds, label_delay=0, features="raw")
    river_model = ((compose.Select("amount") + (compose.Select("country") | preprocessing.OneHotEncoder()))
                   | linear_model.LogisticRegression())
    expected = river_score(rows, river_model, metrics.Accuracy(), 0, target=int)
    pq = report["prequential"]
    print(f"categories: pipeline accuracy {pq['accuracy']:.4f}, river's own pipeline {expected:.4f}")
    assert report["events_valid"] == report["examples_learned"] == ROWS
    assert expected > 0.75, "the category matters: a model that ignores it cannot get here"
    assert pq["accuracy"] == pytest.approx(expected, abs=0.02)


def test_a_csv_regression_target_with_text_columns_and_a_text_label_goes_to_the_dlq(settings, run_service, tmp_path):
    lines = ["size,city,price"]
    for i in range(300):
        city = ("Seoul", "Lyon", "Lima")[i % 3]
        price = "n/a-price" if i == 150 else f"{(i % 7) * 10 + {'Seoul': 100, 'Lyon': 50, 'Lima': 0}[city]:.1f}"
        lines.append(f"{i % 7},{city},{price}")
    path = tmp_path / "homes.csv"
    path.write_text("\n".join(lines) + "\n")
    start_pipeline(run_service, model="tree.HoeffdingTreeRegressor()", features="default")
    report = replay_report(settings, f"csv:{path}", target="price", label_delay=5)
    assert report["events_valid"] == 300 and report["events_dlq"] == 0
    assert report["labels_dlq"] == 1 and report["examples_learned"] == 299
    assert report["prequential"]["task"] == "regression" and report["prequential"]["mae"] < 40
