"""Each record's generated codec (avro_codegen.py) against fastavro, in one process, rounds
alternating: µs per record to write and to read, the median of the rounds. The records are what
the services write on raw Elec2 (8 features) and the payments stream (a KeyedEvents batch of 50).
Run: .venv/bin/python services/bench/probes/codec_ab.py [rounds]

2026-12-06, a quiet moment (µs per record, fastavro -> generated; fastavro's Outcome without the
union tags the learner used to add for it, ~12.7 with them): Event read 5.1 -> 3.0, write 5.6 -> 2.8;
FeatureVector 8.1 -> 4.2, 7.4 -> 3.6; Label 1.6 -> 0.5, 1.8 -> 0.4; Prediction 4.4 -> 2.2,
4.5 -> 1.8; Outcome 12.5 -> 6.5, 15.0 -> 5.6; KeyedEvents per event 8.9 -> 6.7, 7.9 -> 4.6.
2026-12-07, a slower host (fastavro ~40% slower than the day before), map keys written from a
cache of their bytes (generated write, before -> after, fastavro alike in both runs): FeatureVector
4.89 -> 4.08, Event 3.71 -> 3.32, Outcome 7.56 -> 6.84, KeyedEvents 6.23 -> 5.26; decoding keys
through a cache too was no faster (6.36 -> 6.43 for the FeatureVector) and was left out."""
import io
import statistics
import sys
import timeit

import fastavro

from driftline.shared.codec import HEADER_LEN, get_codec

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
codec = get_codec()
features = {"date": 0.1, "day": 2.0, "period": 0.3, "nswprice": 0.05, "nswdemand": 0.4, "vicprice": 0.003,
            "vicdemand": 0.4, "transfer": 0.41}
event = {"event_id": "b0", "entity_id": "card-1029", "ts": 1700000035.3111882,
         "fields": {"amount": 24.12, "merchant": "m-71", "hour": 0.0, "online": 0.0}, "published_ms": 1700000000000}
keyed = {**event, "features": {f"card_f{j}": j * 1.1 for j in range(9)}, "order_ts": event["ts"],
         "origin_partition": 1, "origin_offset": 5, "route": []}
RECORDS = {  # name -> (record, events in it)
    "Event": (event, 1),
    "FeatureVector": ({"event_id": "e1", "entity_id": "a", "ts": 1.0, "features": features, "feature_set": "raw@1",
                       "published_ms": 1700000000000}, 1),
    "Label": ({"event_id": "e-1", "label": "1", "ts": 1.7e9 + 60}, 1),
    "Prediction": ({"event_id": "run-12345", "entity_id": "run/e1", "ts": 1.0e9, "model": "default",
                    "model_version": 3, "role": "champion", "y_pred": "1", "proba": {"0": 0.3, "1": 0.7},
                    "source": "learner", "published_ms": None}, 1),
    "Outcome": ({"event_id": "run-12345", "entity_id": "run/e1", "model": "default", "model_version": 3,
                 "role": "champion", "y_true": "1", "y_pred": "1", "proba": {"0": 0.3, "1": 0.7}, "position": 12345,
                 "ts": 1e9, "features": features, "feature_set": "raw", "label_ts": 1e9, "label_partition": 0,
                 "label_offset": 123, "error": None, "known": 5}, 1),
    "KeyedEvents": ({"mark": 1.0, "idle": False, "events": [keyed] * 50}, 50),
}


def per_record(fn, per: int) -> float:
    n = max(1, 20_000 // per)
    return min(timeit.repeat(fn, number=n, repeat=3)) / n / per * 1e6


for name, (record, per) in RECORDS.items():
    generated, parsed = codec.by_name[name].specific, codec.by_name[name].parsed
    blob = generated.encode(record)
    body = blob[HEADER_LEN:]
    assert generated.decode(blob, HEADER_LEN) == (fastavro.schemaless_reader(io.BytesIO(body), parsed), len(blob))
    times: dict[str, list[float]] = {"fastavro read": [], "generated read": [], "fastavro write": [],
                                     "generated write": []}
    for _ in range(rounds):
        times["fastavro read"].append(per_record(lambda: fastavro.schemaless_reader(io.BytesIO(body), parsed), per))
        times["generated read"].append(per_record(lambda: generated.decode(blob, HEADER_LEN), per))
        times["fastavro write"].append(per_record(lambda: fastavro.schemaless_writer(io.BytesIO(), parsed, record), per))
        times["generated write"].append(per_record(lambda: generated.encode(record), per))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name:14} read {median['fastavro read']:6.2f} -> {median['generated read']:5.2f} µs   "
          f"write {median['fastavro write']:6.2f} -> {median['generated write']:5.2f} µs"
          f"{'  (per event of 50)' if per > 1 else ''}", flush=True)
