"""Feature definitions (pure logic): what each feature means, checked against direct computations."""

from __future__ import annotations

import math

import pytest

from driftline.features.definitions import FeatureSet, FeatureSpec, load_feature_set
from driftline.features.store import STALE_TEXT_FIELD, decode_state, encode_state


def run(fs: FeatureSet, events: list[tuple[float, dict[str, float]]]) -> tuple[list[dict], dict]:
    """Vectors of a sequence of (ts, fields) for one entity, and its final state."""
    state: dict = {}
    vectors = []
    for ts, fields in events:
        vectors.append(fs.vector(state, fields, ts))
        fs.apply_event(state, fields, ts)
    return vectors, state


def test_ewm_mean_and_variance_equal_the_directly_weighted_sums():
    alpha, xs = 0.3, [2.0, 5.0, -1.0, 4.0, 4.5, 10.0, 0.0]
    fs = FeatureSet(FeatureSpec(name="t", ewm_alphas=[alpha], ewm_fields=["x"], ewm_outputs=["mean", "std"]))
    _, state = run(fs, [(float(i), {"x": x}) for i, x in enumerate(xs)])
    # Weights of an exponentially weighted mean started at the first value: they sum to 1.
    n = len(xs) - 1
    weights = [(1 - alpha) ** n] + [alpha * (1 - alpha) ** (n - k) for k in range(1, n + 1)]
    assert sum(weights) == pytest.approx(1.0)
    mean = sum(w * x for w, x in zip(weights, xs))
    var = sum(w * (x - mean) ** 2 for w, x in zip(weights, xs))
    assert state[f"ewm:{alpha}:x"] == pytest.approx(mean, rel=1e-12)
    assert state[f"ewv:{alpha}:x"] == pytest.approx(var, rel=1e-12)
    # The vector of the next event reports the same statistics, from the state before it.
    x = fs.vector(state, {"x": 7.0}, ts=99.0)
    assert x[f"x_ewm{alpha}"] == pytest.approx(mean)
    assert x[f"x_ewstd{alpha}"] == pytest.approx(math.sqrt(var))


def test_ewm_dev_and_z_compare_the_event_with_the_state_before_it():
    fs = FeatureSet(FeatureSpec(name="t", ewm_alphas=[0.5], ewm_fields=["x"], ewm_outputs=["dev", "z"]))
    vectors, _ = run(fs, [(0.0, {"x": 1.0}), (1.0, {"x": 3.0}), (2.0, {"x": 6.0})])
    assert vectors[0] == {"x": 1.0, "x_dev0.5": 0.0, "x_z0.5": 0.0}  # no history: no deviation
    assert vectors[1] == {"x": 3.0, "x_dev0.5": 2.0, "x_z0.5": 0.0}  # std still 0: z is 0, not inf
    # after 1, 3: mean 2, variance 0.5 * (0 + 2 * 1) = 1
    assert vectors[2] == {"x": 6.0, "x_dev0.5": 4.0, "x_z0.5": 4.0}


def test_delta_count_and_since_last_come_from_the_previous_event():
    fs = FeatureSet(FeatureSpec(name="t", count=True, since_last=True, delta=["*"]))
    vectors, state = run(fs, [(100.0, {"a": 1.0, "b": 5.0}), (104.5, {"a": 3.0, "b": 5.0}), (110.0, {"a": 0.0, "b": 2.0})])
    assert vectors[0] == {"a": 1.0, "b": 5.0, "_count": 0.0, "_since_last": 0.0, "a_delta": 0.0, "b_delta": 0.0}
    assert vectors[1] == {"a": 3.0, "b": 5.0, "_count": math.log1p(1), "_since_last": 4.5, "a_delta": 2.0,
                          "b_delta": 0.0}
    assert vectors[2] == {"a": 0.0, "b": 2.0, "_count": math.log1p(2), "_since_last": 5.5, "a_delta": -3.0,
                          "b_delta": -3.0}
    assert state["n"] == 3 and state["ts"] == 110.0


def test_delta_of_named_fields_only_and_a_missing_field_gives_no_feature():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, delta=["a"]))
    vectors, _ = run(fs, [(0.0, {"a": 1.0, "b": 1.0}), (1.0, {"a": 4.0, "b": 9.0}), (2.0, {"b": 1.0})])
    assert vectors == [{"a_delta": 0.0}, {"a_delta": 3.0}, {}]


def test_since_last_never_goes_negative_for_an_event_out_of_time_order():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, since_last=True))
    vectors, _ = run(fs, [(10.0, {}), (4.0, {})])
    assert vectors[1] == {"_since_last": 0.0}


def test_last_label_numeric_is_a_number_and_a_known_flag():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, last_label=True))
    state: dict = {}
    assert fs.vector(state, {}, 0.0) == {"_last_label_known": 0.0}
    assert fs.apply_label(state, "1", event_ts=5.0)
    assert fs.vector(state, {}, 6.0) == {"_last_label_known": 1.0, "_last_label": 1.0}


def test_last_label_text_is_one_hot():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, last_label=True))
    state: dict = {}
    fs.apply_label(state, "spam", event_ts=1.0)
    assert fs.vector(state, {}, 2.0) == {"_last_label_known": 1.0, "_last_label=spam": 1.0}
    fs.apply_label(state, "ham", event_ts=2.0)
    assert fs.vector(state, {}, 3.0) == {"_last_label_known": 1.0, "_last_label=ham": 1.0}


def test_a_label_of_an_earlier_event_never_replaces_a_later_one_and_repeats_change_nothing():
    fs = FeatureSet(FeatureSpec(name="t", last_label=True))
    state: dict = {}
    assert fs.apply_label(state, "0", event_ts=20.0)
    assert not fs.apply_label(state, "1", event_ts=10.0)  # arrived late, belongs to an older event
    assert state == {"label": "0", "label_ts": 20.0}
    assert fs.apply_label(state, "0", event_ts=20.0)  # the same label again: same state
    assert state == {"label": "0", "label_ts": 20.0}


def test_labels_change_nothing_when_the_set_has_no_label_feature():
    fs = load_feature_set("raw")
    state: dict = {}
    assert not fs.apply_label(state, "1", 1.0) and state == {}


def test_raw_is_the_fields_alone_and_stateless():
    fs = load_feature_set("raw")
    assert not fs.stateful
    assert fs.vector({"n": 9, "label": "1"}, {"a": 1.5}, 3.0) == {"a": 1.5}


def test_default_adds_online_features_to_the_fields():
    fs = load_feature_set("default")
    assert fs.stateful
    x = fs.vector({}, {"a": 1.5}, 3.0)
    assert x["a"] == 1.5
    assert {"_count", "_since_last", "a_delta", "a_dev0.5", "a_z0.04", "_last_label_known"} <= set(x)


def test_a_custom_toml_file_defines_the_set(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[features]\ncount = true\ndelta = ["a"]\n')
    fs = load_feature_set(str(path))
    assert fs.spec == FeatureSpec(name="mine", count=True, delta=["a"])
    assert fs.name.startswith("mine@")
    assert fs.vector({}, {"a": 2.0, "b": 1.0}, 0.0) == {"a": 2.0, "b": 1.0, "_count": 0.0, "a_delta": 0.0}


def test_a_custom_yaml_file_defines_the_set(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: y\nfields: false\nsince_last: true\n")
    assert load_feature_set(str(path)).spec == FeatureSpec(name="y", fields=False, since_last=True)


def test_the_example_file_loads():
    from pathlib import Path

    import driftline.features as pkg

    fs = load_feature_set(str(Path(pkg.__file__).parent / "example.toml"))
    assert fs.spec.name == "example" and fs.stateful


def test_unknown_keys_in_a_feature_file_are_an_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("count = true\newm_alpha = [0.1]\n")
    with pytest.raises(ValueError, match="unknown keys \\['ewm_alpha'\\]"):
        load_feature_set(str(path))


def test_a_set_that_is_neither_a_preset_nor_a_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not 'default', 'raw' or a readable file"):
        load_feature_set(str(tmp_path / "nope.toml"))


def test_the_name_carries_a_hash_of_the_definitions():
    a = FeatureSet(FeatureSpec(name="s", count=True))
    b = FeatureSet(FeatureSpec(name="s", count=False))
    assert a.name != b.name and a.name.startswith("s@")
    assert a.name == FeatureSet(FeatureSpec(name="s", count=True)).name


def as_stored(encoded: dict) -> dict[bytes, bytes]:
    """`encode_state`'s fields as HGETALL returns them."""
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encoded.items()}


def test_state_survives_the_redis_hash_encoding_exactly():
    fs = load_feature_set("default")
    _, state = run(fs, [(0.1, {"a": 1 / 3, "b": -2.5e-9}), (7.3, {"a": 1e300, "b": 0.1 + 0.2})])
    fs.apply_label(state, "spam", 7.3)
    state["_off"], state["_p"] = 41, 3
    encoded = encode_state(state)
    stored = as_stored(encoded)
    assert decode_state(stored) == state
    assert fs.vector(decode_state(stored), {"a": 2.0, "b": 1.0}, 9.0) == fs.vector(state, {"a": 2.0, "b": 1.0}, 9.0)
    # The numbers are packed (two fields, not one each); counters, the label and its time stay text.
    assert {"_x", "_xn", "n", "label", "label_ts", "_off", "_p"} == set(encoded)
    assert encoded["label_ts"] == "7.3"  # the label script compares it as a number


def test_a_state_stored_with_numbers_as_text_still_reads_and_its_next_write_drops_them():
    # What a driftline before the packing wrote: every number its own text field.
    fs = load_feature_set("default")
    _, state = run(fs, [(0.1, {"a": 1 / 3, "b": -2.5e-9}), (7.3, {"a": 1e300, "b": 0.1 + 0.2})])
    old = {k.encode(): repr(v).encode() if isinstance(v, (int, float)) else v.encode() for k, v in state.items()}
    decoded = decode_state(old)
    stale = decoded.pop(STALE_TEXT_FIELD)
    assert decoded == state
    assert sorted(stale) == sorted(k for k, v in state.items() if isinstance(v, float))
    # Half-migrated (text copies beside the packed numbers): the packed ones win.
    newer = {**state, "ts": 99.0}
    both = {**old, **as_stored(encode_state(newer))}
    assert {k: v for k, v in decode_state(both).items() if k != STALE_TEXT_FIELD} == newer
    assert STALE_TEXT_FIELD not in encode_state(decode_state(both))  # never written back


def test_packed_numbers_that_are_not_whole_doubles_are_left_out_not_a_crash():
    assert decode_state({b"n": b"2", b"_xn": b"a", b"_x": b"\x00" * 7}) == {"n": 2}


def test_a_number_whose_name_holds_a_nul_stays_a_text_field():
    encoded = encode_state({"a\0b": 1.5, "c": 2.5})
    assert encoded["a\0b"] == "1.5" and encoded["_xn"] == "c"
    stored = as_stored(encoded)
    assert decode_state(stored) == {"a\0b": 1.5, "c": 2.5}


# -- windowed aggregates ---------------------------------------------------------------------
PAYMENTS = [
    {"key": "card", "fn": "count", "window": "10m", "name": "card_count_10m"},
    {"fn": "sum", "field": "amount", "window": "1h", "name": "entity_amount_1h"},
    {"key": "merchant", "fn": "mean", "field": "amount", "window": "1h", "name": "merchant_mean_1h"},
    {"key": "merchant", "fn": "distinct", "field": "card", "window": "1h", "name": "merchant_cards_1h"},
]


def test_aggregates_read_the_state_before_the_event_and_fold_after_it():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, aggregate=PAYMENTS))
    entity, cards, merchants = {}, {}, {}
    stream = [(0.0, "c1", "m1", 10.0), (60.0, "c1", "m1", 20.0), (120.0, "c2", "m1", 30.0), (700.0, "c1", "m2", 5.0)]
    seen = []
    for ts, card, merchant, amount in stream:
        fields = {"card": card, "merchant": merchant, "amount": amount}
        card_state, merchant_state = cards.setdefault(card, {}), merchants.setdefault(merchant, {})
        seen.append(fs.vector(entity, fields, ts, keyed={"card": card_state, "merchant": merchant_state}))
        fs.apply_event(entity, fields, ts)
        fs.apply_keyed("card", card_state, fields, ts)
        fs.apply_keyed("merchant", merchant_state, fields, ts)
    assert seen == [
        {"card_count_10m": 0.0, "entity_amount_1h": 0.0, "merchant_cards_1h": 0.0},
        {"card_count_10m": 1.0, "entity_amount_1h": 10.0, "merchant_mean_1h": 10.0, "merchant_cards_1h": 1.0},
        {"card_count_10m": 0.0, "entity_amount_1h": 30.0, "merchant_mean_1h": 15.0, "merchant_cards_1h": 1.0},
        # 700 s: c1's events at 0 and 60 left its 10-minute window; m2 is new
        {"card_count_10m": 0.0, "entity_amount_1h": 60.0, "merchant_cards_1h": 0.0},
    ]


def test_key_fields_are_identifiers_not_features():
    fs = FeatureSet(FeatureSpec(name="t", delta=["*"], ewm_alphas=[0.5], ewm_fields=["*"], ewm_outputs=["mean"],
                                aggregate=[{"key": "merchant", "fn": "count", "window": "1h", "name": "m_n"}]))
    x = fs.vector({}, {"merchant": 17.0, "amount": 3.0}, 0.0, keyed={"merchant": {}})
    assert x == {"amount": 3.0, "amount_delta": 0.0, "amount_ewm0.5": 3.0, "m_n": 0.0}
    state: dict = {}
    fs.apply_event(state, {"merchant": 17.0, "amount": 3.0}, 0.0)
    assert "prev:merchant" not in state and fs.key_values({"merchant": 17.0}) == {"merchant": "17"}


def test_an_event_without_the_key_field_has_none_of_its_aggregates_and_folds_nothing_there():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, aggregate=PAYMENTS[2:3]))
    assert fs.vector({}, {"amount": 3.0}, 0.0) == {}
    assert fs.key_values({"amount": 3.0}) == {}


def test_text_in_a_numeric_aggregates_field_is_left_out_of_it():
    fs = FeatureSet(FeatureSpec(name="t", fields=False, aggregate=[
        {"fn": "max", "field": "amount", "window": "1h", "name": "max_1h"},
        {"fn": "count", "window": "1h", "name": "n_1h"}]))
    state: dict = {}
    for ts, amount in ((0.0, 4.0), (1.0, "n/a"), (2.0, 2.0)):
        fs.apply_event(state, {"amount": amount}, ts)
    assert fs.vector(state, {}, 3.0) == {"max_1h": 4.0, "n_1h": 3.0}


def test_window_state_survives_the_redis_hash_encoding_exactly():
    fs = FeatureSet(FeatureSpec(name="t", count=True, aggregate=PAYMENTS[1:2] + [
        {"fn": "std", "field": "amount", "window": "30s", "name": "amount_std_30s", "tiles": 3}]))
    state: dict = {}
    for i in range(100):
        fs.apply_event(state, {"amount": float(i % 13)}, i * 0.7)
    encoded = encode_state(state)
    stored = as_stored(encoded)
    assert fs.vector(decode_state(stored), {"amount": 1.0}, 71.0) == fs.vector(state, {"amount": 1.0}, 71.0)


def test_a_feature_file_holds_aggregates_beside_or_without_the_features_table(tmp_path):
    with_table = tmp_path / "a.toml"
    with_table.write_text('[features]\ncount = true\n\n[[aggregate]]\nkey = "merchant"\nfn = "count"\n'
                          'window = "10m"\nname = "merchant_count_10m"\n')
    bare = tmp_path / "b.yaml"
    bare.write_text("aggregate:\n  - {fn: max, field: amount, window: 1h, name: amount_max_1h, tiles: 12}\n")
    a, b = load_feature_set(str(with_table)), load_feature_set(str(bare))
    assert a.spec.count and a.keys == ("merchant",) and a.stateful
    assert b.keys == () and b.stateful and b.aggregates[0].tiles == 12


@pytest.mark.parametrize("entry, message", [
    ({"fn": "median", "field": "x", "window": "1h", "name": "a"}, "fn 'median'"),
    ({"fn": "sum", "window": "1h", "name": "a"}, "sum needs a field"),
    ({"fn": "count", "field": "x", "window": "1h", "name": "a"}, "count takes no field"),
    ({"fn": "count", "window": "an hour", "name": "a"}, "window"),
    ({"fn": "count", "window": "1h"}, "missing"),
    ({"fn": "count", "window": "1h", "name": "a", "step": "1m"}, "unknown keys"),
    ({"fn": "count", "window": "1h", "name": "a", "tiles": 0}, "tiles"),
    ({"key": "card", "fn": "distinct", "field": "card", "window": "1h", "name": "a"}, "itself"),
])
def test_a_bad_aggregate_is_refused_with_what_is_wrong(tmp_path, entry, message):
    path = tmp_path / "f.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"aggregate": [entry]}))
    with pytest.raises(ValueError, match=message):
        load_feature_set(str(path))


def test_two_aggregates_may_not_share_a_name():
    with pytest.raises(ValueError, match="unique"):
        FeatureSet(FeatureSpec(aggregate=[PAYMENTS[0], {**PAYMENTS[1], "name": "card_count_10m"}]))


@pytest.mark.parametrize("key", ["merchant id", "shop.name", "", "ü"])
def test_a_key_field_must_be_a_name_an_internal_topic_can_carry(key):
    with pytest.raises(ValueError, match="key must name an event field"):
        FeatureSet(FeatureSpec(aggregate=[{"key": key, "fn": "count", "window": "1h", "name": "n"}]))


def test_the_packed_numbers_read_back_with_the_standard_library_struct():
    # An independent reader of the layout (docs/features.md): NUL-joined names, little-endian doubles.
    import struct
    encoded = encode_state({"n": 4, "ts": 1700000000.25, "prev:x": -2.5e-9, "ewm:0.5:x": 1e300})
    names = encoded["_xn"].split("\0")
    assert dict(zip(names, struct.unpack(f"<{len(names)}d", encoded["_x"]))) == {
        "ts": 1700000000.25, "prev:x": -2.5e-9, "ewm:0.5:x": 1e300}
