"""The offline store: every learned example in Parquet, partitioned by model and date, written by a
sink that reads `outcomes` effectively once (a kill -9 neither loses nor duplicates a row)."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from confluent_kafka import TopicPartition

from driftline.offline.export import export
from driftline.offline.store import FILE, OfflineStore, row_of
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.topics import Topics
from learner_harness import read_all
from pipeline import PIPELINE, replay_report, start_pipeline

DAY = 86400.0


def outcome(i: int, model: str = "default", ts: float | None = None) -> dict:
    return {"event_id": f"e{i}", "entity_id": f"a{i % 7}", "model": model, "model_version": 1 + i // 500,
            "role": "champion", "y_true": str(i % 2), "y_pred": str((i // 3) % 2), "proba": {"0": 0.25, "1": 0.75},
            "position": i, "ts": ts if ts is not None else 1.7e9 + i * 60.0, "features": {"x": float(i), "y": -1.0},
            "feature_set": "raw", "label_ts": 1.7e9 + i * 60.0 + 5, "label_partition": i % 6, "label_offset": i // 6}


def died_between_files_and_commit(settings, store: OfflineStore) -> None:
    """Put the sink's state where a kill lands between writing a batch and committing it (a window of
    milliseconds that random kills rarely hit): the last batch's offsets uncommitted again."""
    last = max((FILE.match(p.name) for p in store.files()), key=lambda m: int(m["last"]), default=None)
    if last is None:
        return
    topics = Topics(settings.namespace)
    c = kafka.consumer(settings, topics.group("offline"))
    try:
        c.commit(offsets=[TopicPartition(topics.outcomes, 0, int(last["first"]))], asynchronous=False)
    finally:
        c.close()


def read_rows(store: OfflineStore) -> list[dict]:
    if not store.files():
        return []
    return ds.dataset(store.files(), format="parquet").to_table().to_pylist()


def test_a_batch_written_but_not_committed_is_deleted_and_read_again(tmp_path):
    store = OfflineStore(tmp_path)
    store.write_batch("outcomes", 0, 0, 9, [row_of(outcome(i), "outcomes", 0, i) for i in range(10)])
    # The next batch spans two models and two days: four files; the sink dies after two of them.
    rows = [row_of(outcome(i, model=("m", "n")[i % 2], ts=1.7e9 + (i % 4 // 2) * DAY), "outcomes", 0, i)
            for i in range(10, 20)]
    written = store.write_batch("outcomes", 0, 10, 19, rows)
    assert len(written) == 4
    for path in written[2:]:
        path.unlink()
    assert store.resume_offsets("outcomes", {0: 10}) == {0: 10}  # committed up to the first batch only
    assert len(read_rows(store)) == 10
    # Written and committed: kept, and reading goes on after it.
    store.write_batch("outcomes", 0, 10, 19, rows)
    assert store.resume_offsets("outcomes", {0: 20}) == {0: 20}
    assert sorted(r["offset"] for r in read_rows(store)) == list(range(20))
    # A half-written file never counts.
    (store.folder("m", "2023-11-14") / "part-0-000000000020-000000000029.parquet.tmp").write_bytes(b"PAR1 cut")
    assert store.resume_offsets("outcomes", {0: 20}) == {0: 20}
    assert not list(tmp_path.rglob("*.tmp"))


def test_files_are_partitioned_by_model_and_date_and_keep_the_exact_vector(tmp_path):
    store = OfflineStore(tmp_path)
    store.write_batch("outcomes", 0, 0, 1, [row_of(outcome(0, ts=1.7e9), "outcomes", 0, 0),
                                            row_of(outcome(1, model="a/b", ts=1.7e9 + DAY), "outcomes", 0, 1)])
    folders = sorted(str(p.parent.relative_to(tmp_path)) for p in store.files())
    assert folders == ["model=a%2Fb/date=2023-11-15", "model=default/date=2023-11-14"]
    table = ds.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    first = [r for r in table.to_pylist() if r["event_id"] == "e0"][0]
    assert dict(first["features"]) == {"x": 0.0, "y": -1.0}
    assert (first["model"], first["y_true"], first["label_ts"], first["offset"]) == ("default", "0", 1.7e9 + 5, 0)


def test_a_challengers_rows_are_read_with_the_vector_of_the_champions_row_of_the_same_example(tmp_path):
    """A challenger's outcome carries no vector (the champion's at the same position has it):
    reproduce reads a version's examples with it all the same, and an older row's own vector too."""
    from driftline.offline.reproduce import stored

    store = OfflineStore(tmp_path)
    champion = [outcome(i) for i in range(6)]
    challenger = [{**outcome(i), "model_version": 9, "role": "challenger", "features": None} for i in range(2, 5)]
    older = {**outcome(5), "model_version": 9, "role": "challenger", "features": {"x": 5.5}}  # its own, kept
    rows = [row_of(o, "outcomes", 0, n) for n, o in enumerate([*champion, *challenger, older])]
    store.write_batch("outcomes", 0, 0, len(rows) - 1, rows)
    assert stored(store, "model = ? AND model_version = ?", ["default", 9]) == [
        *(({"x": float(i), "y": -1.0}, str(i % 2), i) for i in range(2, 5)), ({"x": 5.5}, "1", 5)]
    assert stored(store, "model = ? AND model_version = ?", ["default", 9], limit=2) == [
        ({"x": float(i), "y": -1.0}, str(i % 2), i) for i in range(2, 4)]
    assert [p for _, _, p in stored(store, "model = ? AND role = 'champion' AND position >= ?", ["default", 4])] == [4, 5]


def rows_of_live_store(store, tries: int = 20) -> list[dict]:
    """read_rows of a store the sink is writing: right after a restart it replaces the files of
    the batch it had not committed, and a file listed a moment earlier may be gone (read again)."""
    for _ in range(tries - 1):
        try:
            return read_rows(store)
        except FileNotFoundError:
            time.sleep(0.2)
    return read_rows(store)


@pytest.mark.e2e
def test_kill_9_of_the_sink_neither_loses_nor_duplicates_a_row(settings, run_service):
    """Outcomes keep coming while the sink is killed with SIGKILL again and again, at random points
    (small batches, so that many kills land between a file and its commit or inside a write)."""
    codec, topics = get_codec(), Topics(settings.namespace)
    producer = kafka.producer(settings)
    total = 3000
    env = dict(DRIFTLINE_OFFLINE__FLUSH_ROWS="40", DRIFTLINE_OFFLINE__FLUSH_INTERVAL_S="0.05")
    sink = run_service("offline", **env)
    rnd = random.Random(7)
    sent = 0
    kills = 0
    while sent < total:
        for i in range(sent, min(total, sent + 250)):
            kafka.produce(producer, topics.outcomes,
                          codec.encode("Outcome", outcome(i, model=("m1", "m2")[i % 3 == 0], ts=1.7e9 + i * 40.0)),
                          f"a{i % 7}")
        producer.flush(10)
        sent = min(total, sent + 250)
        time.sleep(rnd.uniform(0.05, 0.6))
        sink.kill9()
        kills += 1
        if kills % 3 == 0:
            died_between_files_and_commit(settings, OfflineStore.from_settings(settings))
        # Batches after a restart need not end where they did before (timing decides; here the size).
        sink.env["DRIFTLINE_OFFLINE__FLUSH_ROWS"] = str(rnd.randint(25, 90))
        sink.restart()
    store = OfflineStore.from_settings(settings)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(rows_of_live_store(store)) < total:
        time.sleep(0.5)
    rows = rows_of_live_store(store)
    offsets = sorted(r["offset"] for r in rows)
    assert offsets == list(range(total)), f"{len(offsets)} rows, {len(set(offsets))} distinct, after {kills} kills"
    by_id = {r["event_id"]: r for r in rows}
    assert dict(by_id["e123"]["features"]) == {"x": 123.0, "y": -1.0}
    assert {p.parent.parent.name for p in store.files()} == {"model=m1", "model=m2"}


def readme_query() -> str:
    """docs/offline-store.md's point-in-time training set snippet (a python block that uses duckdb)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "offline-store.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "import duckdb" in b)


@pytest.mark.e2e
def test_every_learned_example_reaches_the_store_and_export_and_the_readme_query_agree(settings, run_service,
                                                                                      tmp_path):
    start_pipeline(run_service, (*PIPELINE, "offline"), model="tree.HoeffdingTreeClassifier()", features="raw",
                   DRIFTLINE_OFFLINE__FLUSH_INTERVAL_S="0.5")
    report = replay_report(settings, "sea-abrupt", limit=600, label_delay=5)
    assert report["examples_learned"] == 600
    store = OfflineStore.from_settings(settings)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(read_rows(store)) < 600:
        time.sleep(0.5)
    rows = sorted(read_rows(store), key=lambda r: r["offset"])
    champion = [r for r in rows if r["role"] == "champion"]
    assert len(champion) == 600 and len({r["event_id"] for r in champion}) == 600
    # The exact vector the learner scored: the features topic's record for that event.
    vectors = {fv["event_id"]: fv for fv in read_all(settings, Topics(settings.namespace).features, "FeatureVector",
                                                     until=lambda v: len(v) >= 600)}
    for r in champion:
        assert dict(r["features"]) == vectors[r["event_id"]]["features"]
        assert r["event_ts"] == vectors[r["event_id"]]["ts"] and r["label_ts"] >= 0 and r["label_offset"] >= 0
    by_position = {o["position"]: o for o in report["_outcomes"]}
    assert all(by_position[r["position"]]["y_pred"] == r["y_pred"] for r in champion)

    # export: the same rows from Kafka, in the same layout
    out = tmp_path / "export"
    assert export(settings, out) == len(rows)
    exported = sorted(read_rows(OfflineStore(out)), key=lambda r: r["offset"])
    assert exported == rows
    some = sorted(r["event_ts"] for r in champion)[100:200]
    assert export(settings, tmp_path / "range", since=some[0], until=some[-1]) == len(
        [r for r in rows if some[0] <= r["event_ts"] < some[-1]])

    # The documented DuckDB query, over this test's store and a range that covers its events
    code = readme_query().replace('".driftline/offline"', repr(str(store.root)))
    code = code.replace("2026-01-01", "1970-01-01").replace("2026-02-01", "2100-01-01")
    scope: dict = {}
    exec(compile(code, "docs/offline-store.md", "exec"), scope)
    assert [r[0] for r in scope["rows"]] == [r["event_id"] for r in sorted(champion, key=lambda r: r["event_ts"])]


def test_train_refuses_a_spec_that_cannot_learn_the_stored_labels(tmp_path):
    """A binary classifier over text classes: a clear error before anything is learned or registered."""
    from driftline.offline.train import train
    from driftline.shared.settings import OfflineSettings, Settings

    store = OfflineStore(tmp_path)
    rows = [row_of({**outcome(i), "y_true": "spam" if i % 2 else "ham"}, "outcomes", 0, i) for i in range(20)]
    store.write_batch("outcomes", 0, 0, 19, rows)
    settings = Settings(namespace="", home=tmp_path, offline=OfflineSettings(dir=tmp_path))
    with pytest.raises(ValueError, match="cannot learn the selection's labels: label 'ham' is not 0 or 1"):
        train(settings, since=None, until=None, spec="linear_model.LogisticRegression()")
