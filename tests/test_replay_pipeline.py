"""End to end: datasets replayed through the real ingestion, features and learner services."""

from __future__ import annotations

import pytest

from driftline.replay.datasets import FEATURES_DIR
from driftline.replay.publish import ReplayStalled
from pipeline import replay_report, start_pipeline

pytestmark = pytest.mark.e2e


def test_stalled_pipeline_gives_up_and_names_the_service_that_is_not_there(settings, run_service):
    start_pipeline(run_service, services=("ingestion", "features"))
    with pytest.raises(ReplayStalled) as err:
        replay_report(settings, "sea-stationary", limit=200, stall_timeout_s=4)
    message = str(err.value)
    assert "200 of 200 labels were neither learned nor dead-lettered" in message
    assert "learner    not answering" in message
    assert "looks stuck: learner" in message


def test_a_stall_report_lists_the_topics_each_service_reads_with_key_fields(settings, run_service):
    """With aggregates keyed by another field, the features service's line names its internal
    topics (where a stuck key stage shows), and not labels.valid, which that feature set never reads."""
    payments = str(FEATURES_DIR / "payments.toml")
    start_pipeline(run_service, services=("ingestion", "features"), features=payments)
    with pytest.raises(ReplayStalled) as err:
        replay_report(settings, "payments", limit=300, stall_timeout_s=6, features=payments)
    message = str(err.value)
    line = next(x for x in message.splitlines() if x.strip().startswith("features"))
    assert line.startswith("  features   healthy") and "labels.valid" not in line, line
    assert "features.by.merchant." in line and "features.by.entity_id." in line, line
    # its stages' watermarks past the last commit are no sign of being stuck: the missing learner is
    assert "looks stuck: learner" in message, message


def test_a_stall_report_gives_the_learners_own_account_of_where_it_is(settings, run_service):
    """The learner answers but learns nothing (no features service): the report says whether it
    is active, how far it has got and what it holds back, next to the service that is missing."""
    start_pipeline(run_service, services=("ingestion", "learner"))
    with pytest.raises(ReplayStalled) as err:
        replay_report(settings, "sea-stationary", limit=200, stall_timeout_s=4)
    message = str(err.value)
    assert "learner    healthy (state active, position 0, waiting_labels 200, held_events 0)" in message, message
    assert "ingestion  healthy; nothing behind on events, labels" in message, message
    assert "features   not answering" in message and "looks stuck: features" in message


LOGREG = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"


def river_prequential_accuracy(rows, spec: str, delay: int) -> float:
    """river's own answer: progressive_val_score with the label of row i revealed `delay` rows later."""
    from river import evaluate, metrics

    from driftline.learner.spec import parse_model

    stream = ((fields, int(label)) for fields, label, _ in rows)
    return evaluate.progressive_val_score(stream, parse_model(spec), metrics.Accuracy(), delay=delay).get()


# The whole of Elec2 (45,312 rows) takes ~5 minutes through the pipeline on the shared 2-core test
# machine, over this file's budget: the test replays the first 10,000 rows. The full stream was
# checked by hand (0.7762 pipeline vs 0.7699 river); `driftline demo` replays all of it.
PARITY_ROWS = 10_000


def test_elec2_replay_matches_river_progressive_validation_within_a_point(settings, run_service, tmp_path):
    from driftline.replay.datasets import load

    start_pipeline(run_service, model=LOGREG, features="raw")
    report = replay_report(settings, "elec2", limit=PARITY_ROWS, label_delay=100, model=LOGREG, features="raw",
                           report_dir=tmp_path)
    rows = list(load("elec2").rows())[:PARITY_ROWS]
    expected = river_prequential_accuracy(rows, LOGREG, delay=100)
    print(f"elec2[:{PARITY_ROWS}] raw LR delay 100: pipeline {report['prequential']['accuracy']:.4f} river "
          f"{expected:.4f}, wall {report['wall_s']} s, {report['throughput_events_per_s']} ev/s")
    assert report["examples_learned"] == report["labels_sent"] == len(rows) == PARITY_ROWS
    assert report["prequential"]["accuracy"] == pytest.approx(expected, abs=0.01)
    assert report["checks"]["model_matches"] is True and report["checks"]["features_match"] is True
    # The counts add up and the windows cover the stream.
    assert report["events_sent"] == report["events_valid"] + report["events_dlq"] == len(rows)
    assert report["examples_learned"] + report["labels_dlq"] == report["labels_sent"]
    assert report["outcome_duplicates"] == 0
    windows = report["prequential"]["windows"]
    assert [w["end"] for w in windows] == list(range(1000, PARITY_ROWS + 1, 1000))
    learned_correct = sum(round(w["accuracy"] * w["n"]) for w in windows)
    assert learned_correct == round(report["prequential"]["accuracy"] * PARITY_ROWS)
    assert (tmp_path / "report.json").exists() and (tmp_path / "report.png").stat().st_size > 10_000


def test_csv_replay_with_text_columns_and_entities_learns_every_label(settings, run_service, tmp_path):
    # 600 rows, three shops, a text column (one-hot encoded) and one amount too large for a double
    # (left out of that event's fields, so the event stays valid).
    lines = ["amount,weekday,shop,fraud"]
    for i in range(600):
        amount = "1e400" if i == 300 else f"{(i * 37) % 100 / 10:.1f}"
        lines.append(f"{amount},{('mon', 'tue', 'sun')[i % 3]},shop{i % 3},{int((i * 37) % 100 > 60)}")
    path = tmp_path / "tx.csv"
    path.write_text("\n".join(lines) + "\n")
    start_pipeline(run_service, model="tree.HoeffdingTreeClassifier()", features="default")
    # --model names a model the learner does not run: the replay warns and reports what ran.
    report = replay_report(settings, f"csv:{path}", target="fraud", entity="shop", label_delay=5, model=LOGREG)
    assert report["checks"]["model_matches"] is False and report["model"] == "HoeffdingTreeClassifier"
    assert report["dataset"] == f"csv:{path}" and report["events_sent"] == report["labels_sent"] == 600
    assert report["events_valid"] == 600 and report["events_dlq"] == report["labels_dlq"] == 0
    assert report["examples_learned"] == 600 and report["checks"]["features_match"] is True
    assert report["prequential"]["windows"][-1]["end"] == report["examples_learned"]
