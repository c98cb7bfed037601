"""The model-spec parser builds river models from text without ever evaluating it, and the label
mapping lets river's binary classifiers learn from string labels."""

from __future__ import annotations

import random


import pytest
from river import linear_model, optim, preprocessing

from driftline.learner.champion import Contest
from driftline.learner.labels import argmax, proba_to_text, to_river, to_text
from driftline.learner.prequential import Prequential
from driftline.learner.spec import ModelSpecError, describe, parse_model


def test_a_pipeline_spec_builds_the_river_pipeline_with_its_arguments():
    model = parse_model("preprocessing.StandardScaler() | linear_model.LogisticRegression(l2=0.01)")
    assert describe(model) == "StandardScaler | LogisticRegression"
    scaler, lr = model.steps.values()
    assert isinstance(scaler, preprocessing.StandardScaler)
    assert isinstance(lr, linear_model.LogisticRegression) and lr.l2 == 0.01


def test_nested_river_objects_and_literal_containers_are_arguments():
    model = parse_model("linear_model.LogisticRegression(optimizer=optim.SGD(0.05), loss=optim.losses.Log())")
    assert isinstance(model.optimizer, optim.SGD) and isinstance(model.loss, optim.losses.Log)
    forest = parse_model("forest.ARFClassifier(seed=42, n_models=3, nominal_attributes=['a', 'b'])")
    assert forest.n_models == 3 and forest.nominal_attributes == ["a", "b"]
    assert parse_model("linear_model.LogisticRegression(intercept_init=-1.5)").intercept_init == -1.5


@pytest.mark.parametrize("spec, problem", [
    ("os.system('rm -rf /')", "unknown river module 'os'"),
    ("__import__('os')", "is not module.Class"),
    ("linear_model.NoSuchModel()", "river.linear_model has no 'NoSuchModel'"),
    ("linear_model.LogisticRegression(l2=x)", "'x' is a name, not a literal"),
    ("linear_model.LogisticRegression(l2=1 + 2)", "non-literal argument"),
    ("linear_model.LogisticRegression(l2=(lambda: 1)())", "expected a dotted river name"),
    ("preprocessing.StandardScaler().__class__()", "expected a dotted river name"),
    ("linear_model._private()", "private names"),
    ("datasets.Phishing()", "unknown river module 'datasets'"),
    ("tree.HoeffdingTreeClassifier(no_such_arg=1)", "refused its arguments"),
    ("linear_model.LogisticRegression", "expected module.Class(...)"),
    ("optim.losses()", "is not a river class"),
    ("", "empty"),
])
def test_an_unsafe_or_wrong_spec_gets_an_error_naming_the_problem(spec, problem):
    with pytest.raises(ModelSpecError) as err:
        parse_model(spec)
    assert problem in str(err.value)


def test_a_syntax_error_says_where():
    with pytest.raises(ModelSpecError) as err:
        parse_model("tree.HoeffdingTreeClassifier(grace_period=(")
    assert "syntax error" in str(err.value) and "column" in str(err.value)


def test_labels_map_to_river_values_and_outputs_back_to_text():
    assert to_river("1") == 1 and to_river("-3") == -3 and to_river("spam") == "spam" and to_river("1.5") == "1.5"
    assert to_text(True) == "1" and to_text(False) == "0" and to_text(2) == "2" and to_text(None) is None
    assert to_text(3.0) == "3" and to_text("ham") == "ham"
    assert proba_to_text({True: 0.7, False: 0.3}) == {"1": 0.7, "0": 0.3}
    assert argmax({"1": 0.7, "0": 0.3}) == "1" and argmax({}) is None


def test_a_binary_classifier_learns_from_string_labels():
    model = parse_model("linear_model.LogisticRegression()")
    for _ in range(20):
        model.learn_one({"a": 1.0}, to_river("1"))
        model.learn_one({"a": -1.0}, to_river("0"))
    assert argmax(proba_to_text(model.predict_proba_one({"a": 1.0}))) == "1"


def test_prequential_counts_accuracy_window_and_log_loss():
    stats = Prequential(window=2)
    assert stats.update("1", "1", {"1": 0.5, "0": 0.5})
    assert not stats.update("1", "0", {"1": 0.25, "0": 0.75})
    assert not stats.update("1", None, {})
    assert stats.n == 3 and stats.accuracy == pytest.approx(1 / 3) and stats.window_accuracy == 0.0
    assert stats.log_loss == pytest.approx((0.6931471805599453 + 1.3862943611198906) / 2)


def test_the_margin_rule_promotes_a_clear_winner_and_drops_a_useless_challenger():
    contest = Contest("margin", promote_after=4, window=4, margin=0.25, max_shadow=6)
    for _ in range(3):
        contest.record(champion_hit=False, challenger_hit=True)
    assert contest.verdict() is None  # not enough shared examples yet
    contest.record(champion_hit=False, challenger_hit=True)
    assert contest.verdict() == "promote"

    tie = Contest("margin", promote_after=4, window=4, margin=0.25, max_shadow=6)
    for i in range(6):
        tie.record(champion_hit=True, challenger_hit=i % 2 == 0)
        assert tie.verdict() == (None if i < 5 else "drop")


def test_mcnemar_promotes_only_when_the_disagreements_are_conclusive():
    # 10 wins to 2 on the disagreements: a likelihood ratio of ~9, short of 1 / (1 - 0.99) = 100.
    contest = Contest("mcnemar", promote_after=20, window=100, margin=0.0, max_shadow=1000, confidence=0.99)
    for i in range(60):
        contest.record(champion_hit=True, challenger_hit=True)
    for i in range(10):
        contest.record(champion_hit=False, challenger_hit=True)
    for i in range(2):
        contest.record(champion_hit=True, challenger_hit=False)
    assert 5 < contest.evidence() < 100
    assert contest.verdict() is None
    for i in range(6):  # 16 to 2
        contest.record(champion_hit=False, challenger_hit=True)
    assert contest.evidence() >= 100 and contest.verdict() == "promote"
    report = contest.report()
    assert (report["challenger_wins"], report["champion_wins"]) == (16, 2)

    # The same lead in accuracy with many more disagreements both ways is noise, not a win.
    noisy = Contest("mcnemar", promote_after=20, window=100, margin=0.0, max_shadow=1000, confidence=0.99)
    for i in range(100):
        noisy.record(champion_hit=i % 2 == 0, challenger_hit=i % 2 == 1 or i % 10 == 0)
    assert noisy.challenger_accuracy > noisy.champion_accuracy and noisy.verdict() is None


def test_the_contest_keeps_its_level_however_often_it_is_looked_at():
    """Two equally good models, the contest asked after every example: a fixed-size 1% test asked
    that often promotes far more than 1% of such challengers; the sequential one may not."""
    rng = random.Random(3)
    promoted = 0
    for _ in range(200):
        contest = Contest("mcnemar", promote_after=100, window=500, margin=0.0, max_shadow=3000, confidence=0.99)
        while (verdict := contest.verdict()) is None:
            a, b = rng.random() < 0.7, rng.random() < 0.7
            contest.record(champion_hit=a, challenger_hit=b)
        promoted += verdict == "promote"
    assert promoted <= 6  # 1% of 200 is 2; room for chance, far below what peeking gives (tens)
