"""Regression and categorical inputs, the pure parts: the task follows from the model, text
values reach models that cannot take them one-hot encoded, regression statistics and contest."""

from __future__ import annotations

import pickle
import random

import pytest
from river import compose, evaluate, linear_model, metrics, preprocessing, tree

from driftline.features.definitions import load_feature_set
from driftline.learner.champion import Contest, Roles, Slot, warm_start
from driftline.learner.labels import LabelError, answer, is_regressor, label_problem, learn
from driftline.learner.prequential import Prequential
from driftline.learner.spec import parse_model


@pytest.mark.parametrize("spec, regression", [
    ("linear_model.LinearRegression()", True),
    ("preprocessing.StandardScaler() | linear_model.LinearRegression()", True),
    ("tree.HoeffdingAdaptiveTreeRegressor()", True),
    ("forest.ARFRegressor(n_models=3)", True),
    ("preprocessing.StandardScaler() | linear_model.LogisticRegression()", False),
    ("tree.HoeffdingTreeClassifier()", False),
])
def test_the_task_follows_from_the_model(spec, regression):
    model = parse_model(spec)
    assert is_regressor(model) is regression
    learn(model, {"a": 1.0, "b": 2.0}, "1")
    y_pred, proba = answer(model, {"a": 1.0, "b": 2.0})
    assert (proba == {}) is regression and isinstance(float(y_pred), float)


def test_a_text_label_for_a_regressor_is_refused_before_anything_is_learned():
    model = parse_model("linear_model.LinearRegression()")
    assert label_problem(model, "spam")[0] == "non_numeric_label" and "not a number" in label_problem(model, "spam")[1]
    assert label_problem(model, "nan") and label_problem(model, "12.5") is None
    assert "within ±1e+30" in label_problem(model, "-2e30")[1] and label_problem(model, "1e30") is None
    for beyond in ("inf", "1e200"):  # 1e200 would overflow river's RMSE (it squares the error)
        with pytest.raises(LabelError):
            learn(model, {"a": 1.0}, beyond)


@pytest.mark.parametrize("spec", ["preprocessing.StandardScaler() | linear_model.LogisticRegression()",
                                  "linear_model.Perceptron()", "tree.HoeffdingTreeClassifier()",
                                  "forest.ARFClassifier(n_models=2, seed=1)", "naive_bayes.GaussianNB()"])
def test_a_label_a_classifier_cannot_learn_is_refused_and_the_model_learns_on(spec):
    # Labels 0/1 first; then "yes" (river's binary classifiers raise on it; a tree or a forest keeps
    # it among its classes and fails on every example after it), and "7" (a binary one learns it as 1).
    roles = Roles(Slot("champion", 1, parse_model(spec), Prequential(100)))
    rng, refused = random.Random(3), []
    for i in range(300):
        x = {"a": rng.uniform(-1, 1)}
        y = {100: "yes", 200: "7"}.get(i, "1" if x["a"] > 0 else "0")
        problem = label_problem(roles.champion.model, y, roles.classes, max_classes=10)
        if problem:
            refused.append((y, problem[0]))
            continue
        roles.learn(x, y, roles.score(x))
    binary = not roles.champion.model._multiclass
    assert refused == ([("yes", "unlearnable_label"), ("7", "unlearnable_label")] if binary
                       else [("yes", "unlearnable_label")])  # a multiclass model may learn a class 7
    assert roles.classes == {"0", "1"} | ({"7"} if not binary else set()) and roles.champion.stats.accuracy > 0.7


def test_a_multiclass_model_of_text_classes_refuses_numbers():
    roles = Roles(Slot("champion", 1, parse_model("tree.HoeffdingTreeClassifier()"), Prequential(100)))
    roles.learn({"a": 1.0}, "cat", roles.score({"a": 1.0}))
    assert roles.classes == {"cat"} and label_problem(roles.champion.model, "dog", roles.classes) is None
    assert label_problem(roles.champion.model, "3", roles.classes)[0] == "unlearnable_label"


def test_untrusted_labels_cannot_grow_a_classifiers_classes_without_end():
    roles = Roles(Slot("champion", 1, parse_model("tree.HoeffdingTreeClassifier()"), Prequential(100)))
    refused = []
    for i in range(50):
        y = f"class-{i % 30}"
        problem = label_problem(roles.champion.model, y, roles.classes, max_classes=20)
        if problem:
            refused.append(problem[0])
            continue
        roles.learn({"a": float(i)}, y, roles.score({"a": float(i)}))
    assert len(roles.classes) == 20 and refused == ["too_many_classes"] * 10
    assert label_problem(roles.champion.model, "class-3", roles.classes, max_classes=20) is None  # a known one


def category_rows(n: int, seed: int = 3):
    rng = random.Random(seed)
    for _ in range(n):
        country, amount = rng.choice(["KR", "FR", "US", "BR"]), rng.random()
        score = {"KR": 2.0, "BR": 1.0, "FR": -1.0, "US": -2.0}[country] + 3 * (amount - 0.5)
        yield {"country": country, "amount": amount}, int(score > 0)


def test_a_linear_model_learns_from_text_values_exactly_as_river_pipeline_with_one_hot_encoding():
    rows = list(category_rows(2000))
    ours, hits = linear_model.LogisticRegression(), 0
    for x, y in rows:
        hits += answer(ours, x)[0] == str(y)
        learn(ours, x, str(y))
    river_model = ((compose.Select("amount") + (compose.Select("country") | preprocessing.OneHotEncoder()))
                   | linear_model.LogisticRegression())
    expected = evaluate.progressive_val_score(iter(rows), river_model, metrics.Accuracy()).get()
    assert hits / len(rows) == pytest.approx(expected, abs=0.002) and expected > 0.8
    # The encoding choice survives pickling (the registry and checkpoints pickle models).
    assert answer(pickle.loads(pickle.dumps(ours)), rows[0][0]) == answer(ours, rows[0][0])


def test_a_tree_takes_text_values_as_they_are():
    model = tree.HoeffdingTreeClassifier(grace_period=50)
    for x, y in category_rows(500):
        learn(model, x, str(y))
    assert not getattr(model, "_driftline_one_hot", False)


def test_the_default_feature_set_passes_categories_and_keeps_statistics_of_numbers_only():
    fs, state = load_feature_set("default"), {}
    for i, country in enumerate(["KR", "FR", "KR"]):
        x = fs.vector(state, {"country": country, "amount": float(i)}, ts=float(i))
        fs.apply_event(state, {"country": country, "amount": float(i)}, ts=float(i))
    assert x["country"] == "KR" and x["amount_delta"] == 1.0
    assert not any("country" in key for key in state)
    # The same name as a number in one event and text in another: each gets its own plan.
    assert "amount_delta" not in fs.vector(state, {"amount": "high"}, ts=4.0)
    assert fs.vector(state, {"amount": 5.0}, ts=4.0)["amount_delta"] == 3.0


def test_prequential_regression_figures_match_river_and_old_checkpoints_still_load():
    stats, mae, r2 = Prequential(window=3), metrics.MAE(), metrics.R2()
    for y, p in [(1.0, 2.0), (2.0, 2.5), (3.0, 2.0), (4.0, 5.0), (5.0, 4.0)]:
        stats.update_error(y, p)
        mae.update(y, p)
        r2.update(y, p)
    assert stats.mae == pytest.approx(mae.get()) and stats.r2 == pytest.approx(r2.get())
    assert stats.window_mae == pytest.approx((1 + 1 + 1) / 3) and stats.as_dict()["rmse"] > stats.mae
    old = Prequential()
    for name in ("scored", "mae_metric", "rmse_metric", "r2_metric", "window_mae_metric"):
        del old.__dict__[name]  # as pickled before regression metrics existed
    assert pickle.loads(pickle.dumps(old)).mae == 0.0


def test_the_regression_contest_promotes_a_clearly_better_model_on_paired_errors_and_not_a_tie():
    rng = random.Random(1)
    better = Contest("mcnemar", promote_after=50, window=200, margin=0.01, max_shadow=1000)
    tie = Contest("mcnemar", promote_after=50, window=200, margin=0.01, max_shadow=1000)
    for _ in range(100):
        base = abs(rng.gauss(0, 1))
        better.record(base + 1.0, abs(rng.gauss(0, 1)))
        tie.record(base, abs(rng.gauss(0, 1)))
    assert better.verdict() == "promote" and better.report()["champion_mae"] > better.report()["challenger_mae"]
    assert tie.verdict() is None and tie.evidence() < 100


def test_roles_with_regressors_score_errors_publish_answers_and_warm_start_a_challenger():
    roles = Roles(Slot("champion", 1, parse_model("linear_model.LinearRegression()"), Prequential()))
    for i in range(30):
        x = {"a": float(i % 5)}
        learned = roles.learn(x, str(3.0 * x["a"]), roles.score(x))
    assert isinstance(learned.hits["champion"], float) and roles.champion.stats.scored == 30
    examples = [({"a": 1.0}, "3.0", 0.5, 1), ({"a": 2.0}, "6.0", 0.5, 1)]
    assert warm_start(parse_model("linear_model.LinearRegression()"), examples) == 2


def test_residual_drift_is_detected_after_a_regression_concept_change_and_only_a_rise_counts():
    from driftline.drift.detectors import ConceptMonitor
    from driftline.replay.datasets import load

    model = parse_model("preprocessing.StandardScaler() | linear_model.LinearRegression()")
    monitor = ConceptMonitor("ADWIN", {}, min_error_increase=0.02)
    ups, downs = [], []
    for i, (x, y, _) in enumerate(load("friedman-abrupt").rows()):
        if i == 12_000:
            break
        alarm = monitor.update(abs(float(answer(model, x)[0]) - float(y)))
        if i < 10_000:  # the model is not retrained after the drift: its residuals rise
            learn(model, x, y)
        if alarm is not None and alarm.level == "drift":
            (ups if alarm.direction == "up" else downs).append(i)
    assert not [i for i in ups if i < 10_000], "no rise of the error before the drift"
    assert ups and 10_000 <= ups[0] < 10_500, ups


def test_predict_requests_take_categories_and_serve_a_regressor_number():
    from driftline.ingestion.validate import check_fields
    from driftline.prediction.models import score
    from driftline.prediction.schemas import PredictRequest
    from driftline.shared.settings import IngestionSettings

    req = PredictRequest(entity_id="a", fields={"country": "KR", "amount": 3})
    assert req.fields == {"country": "KR", "amount": 3.0} and check_fields(req.fields, IngestionSettings()) is None
    too_long = PredictRequest(entity_id="a", fields={"country": "K" * 200})
    assert check_fields(too_long.fields, IngestionSettings()).reason == "category_too_long"
    model = parse_model("linear_model.LinearRegression()")
    learn(model, {"country": "KR", "amount": 3.0}, "10")
    y_pred, proba = score(model, {"country": "KR", "amount": 3.0})
    assert proba == {} and float(y_pred) > 0
