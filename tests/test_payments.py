"""The synthetic payments stream and what windowed aggregates make of it (in-process, no Kafka):
the same seed gives the same stream, and the payments feature file lifts a model well above the
transaction's own fields and the default per-entity features."""

from __future__ import annotations

import itertools
from collections import deque
from pathlib import Path

from river import linear_model, metrics, preprocessing

from driftline.features.definitions import load_feature_set
from driftline.replay.datasets import load
from driftline.replay.payments import generate

PAYMENTS_FEATURES = str(Path(__file__).resolve().parents[1] / "services" / "features" / "payments.toml")


def test_the_stream_is_seeded_in_time_order_and_about_five_percent_fraud():
    first, again = list(itertools.islice(generate(seed=3), 500)), list(itertools.islice(generate(seed=3), 500))
    assert first == again and first != list(itertools.islice(generate(seed=4), 500))
    rows = list(generate())
    times = [ts for *_, ts in rows]
    assert times == sorted(times) and times[-1] < 3 * 86_400
    frauds = sum(label == "1" for _, label, _, _ in rows)
    assert 0.02 < frauds / len(rows) < 0.08
    assert {type(f["merchant"]) for f, *_ in rows} == {str} and len({c for _, _, c, _ in rows}) > 1000


def test_the_payments_dataset_names_its_times_its_second_entity_and_its_feature_file():
    ds = load("payments")
    assert ds.timed and ds.keys == ("merchant",) and load_feature_set(ds.features).keys == ("merchant",)
    assert next(iter(ds.rows())) == next(generate())


def prequential(features: str, rows: list, label_delay: int = 100) -> tuple[float, float]:
    """Test-then-train with each label learned `label_delay` events late, the vectors built as
    the features service builds them (state before the event, then fold): ROC AUC and F1."""
    fs = load_feature_set(features)
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    auc, f1 = metrics.ROCAUC(), metrics.F1()
    cards: dict = {}
    keyed: dict = {}
    waiting: deque = deque()
    for fields, label, card, ts in rows:
        state = cards.setdefault(card, {})
        named = {k: keyed.setdefault((k, v), {}) for k, v in fs.key_values(fields).items()}
        x = {k: v for k, v in fs.vector(state, fields, ts, keyed=named).items() if not isinstance(v, str)}
        p, y = model.predict_proba_one(x).get(True, 0.0), label == "1"
        auc.update(y, p)
        f1.update(y, p > 0.5)
        fs.apply_event(state, fields, ts)
        for key, key_state in named.items():
            fs.apply_keyed(key, key_state, fields, ts, card)
        waiting.append((x, y))
        if len(waiting) > label_delay:
            model.learn_one(*waiting.popleft())
    return auc.get(), f1.get()


def test_windowed_aggregates_over_the_card_and_the_merchant_lift_the_model():
    rows = list(generate())
    raw_auc, raw_f1 = prequential("raw", rows)
    default_auc, default_f1 = prequential("default", rows)
    windowed_auc, windowed_f1 = prequential(PAYMENTS_FEATURES, rows)
    assert windowed_auc > max(raw_auc, default_auc) + 0.1, (raw_auc, default_auc, windowed_auc)
    assert windowed_f1 > 2 * max(raw_f1, default_f1), (raw_f1, default_f1, windowed_f1)
