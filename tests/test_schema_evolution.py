"""Schema evolution: every released version is kept in schemas/history/, a reader resolves a known
older writer to the current version by Avro's rules, and the suite fails on a change that breaks
the rule or that was not added to the history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from driftline.ingestion import validate
from driftline.ingestion.service import Ingestor
from driftline.shared import kafka
from driftline.shared.codec import SCHEMAS_DIR, AvroCodec, DecodeError, get_codec
from driftline.shared.schemas import fingerprint_of, load_current, load_history, problems

LABEL = {"event_id": "e-1", "label": "1", "ts": 1.7e9}
EVENT = {"event_id": "e-1", "entity_id": "m-7", "ts": 1.7e9, "fields": {"a": 1.5}, "published_ms": None}


def test_every_schema_is_in_its_history_and_reads_every_kept_version():
    assert problems() == []
    assert set(load_history()) == set(load_current())


def evolve(tmp_path: Path, name: str, change) -> Path:
    """A copy of schemas/ where `name` gets a new version made by `change(raw)`, both as the current
    schema and as the next file of its history. Returns the copy's folder."""
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, root)
    raw = json.loads((root / f"{name}.avsc").read_text())
    new = change(json.loads(json.dumps(raw)))
    (root / f"{name}.avsc").write_text(json.dumps(new))
    version = load_history(root)[name][-1].version + 1
    (root / "history" / name / f"{version}.avsc").write_text(json.dumps(new))
    with open(root / "history" / "RELEASED", "a") as released:
        released.write(f"{name} {version} {fingerprint_of(new).hex()}\n")
    return root


def add_field(field: dict):
    def change(raw):
        raw["fields"].append(field)
        return raw
    return change


def test_an_older_writer_is_resolved_to_the_current_version(tmp_path):
    root = evolve(tmp_path, "Label", add_field({"name": "source", "type": "string", "default": "unknown"}))
    assert problems(root) == []
    v2 = AvroCodec(root)
    old_blob = get_codec().encode("Label", LABEL)  # what a version-1 producer (Java or ours) writes
    assert v2.decode(old_blob, expect="Label") == {**LABEL, "source": "unknown"}
    assert not v2.is_current(old_blob)
    assert v2.is_current(v2.encode("Label", {**LABEL, "source": "java"}))


def test_a_removed_field_with_a_default_and_a_widened_type_resolve(tmp_path):
    def change(raw):
        raw["fields"] = [f for f in raw["fields"] if f["name"] != "published_ms"]  # had a default
        for f in raw["fields"]:
            if f["name"] == "fields":
                f["type"] = {"type": "map", "values": ["double", "string"]}  # a union gains a branch
        return raw
    root = evolve(tmp_path, "Event", change)
    assert problems(root) == []
    decoded = AvroCodec(root).decode(get_codec().encode("Event", {**EVENT, "published_ms": 17}), expect="Event")
    assert decoded == {k: v for k, v in EVENT.items() if k != "published_ms"}


def test_a_field_added_without_a_default_fails_the_check_and_old_writers_go_to_the_dlq(tmp_path):
    root = evolve(tmp_path, "Label", add_field({"name": "source", "type": "string"}))
    assert any("Label: the current version cannot read version 1" in p and "source" in p for p in problems(root))
    with pytest.raises(DecodeError) as err:
        AvroCodec(root).decode(get_codec().encode("Label", LABEL), expect="Label")
    assert err.value.reason == "incompatible_schema"
    assert "version 1" in err.value.detail


def test_a_type_change_that_does_not_widen_fails_the_check(tmp_path):
    def change(raw):
        next(f for f in raw["fields"] if f["name"] == "ts")["type"] = "string"
        return raw
    found = problems(evolve(tmp_path, "Label", change))
    assert any("version 1" in p and "type_mismatch" in p for p in found), found


def test_a_changed_schema_that_was_not_added_to_the_history_fails_the_check(tmp_path):
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, root)
    raw = json.loads((root / "Label.avsc").read_text())
    raw["fields"].append({"name": "source", "type": "string", "default": "x"})
    (root / "Label.avsc").write_text(json.dumps(raw))
    assert problems(root) == ["Label: schemas/Label.avsc differs from its latest released version 1: "
                              "add it to the history as schemas/history/Label/2.avsc"]
    # a doc-only change needs no new version
    shutil.copy(SCHEMAS_DIR / "Label.avsc", root / "Label.avsc")
    raw = json.loads((root / "Label.avsc").read_text())
    raw["doc"] = "reworded"
    (root / "Label.avsc").write_text(json.dumps(raw))
    assert problems(root) == []


def test_a_released_version_edited_in_place_or_removed_or_not_listed_fails_the_check(tmp_path):
    root = tmp_path / "schemas"
    shutil.copytree(SCHEMAS_DIR, root)
    for path in (root / "Label.avsc", root / "history" / "Label" / "1.avsc"):  # "just fix version 1"
        raw = json.loads(path.read_text())
        raw["fields"].append({"name": "source", "type": "string", "default": "x"})
        path.write_text(json.dumps(raw))
    found = problems(root)
    assert len(found) == 1 and "Label/1.avsc changed after its release" in found[0]

    root = evolve(tmp_path / "two", "Label", add_field({"name": "source", "type": "string", "default": "x"}))
    (root / "history" / "RELEASED").write_text((SCHEMAS_DIR / "history" / "RELEASED").read_text())
    assert [p.split(":")[0] for p in problems(root)] == ["schemas/history/Label/2.avsc is not in schemas/history/RELEASED"]

    (root / "history" / "Event" / "1.avsc").unlink()
    assert any("Event version 1 was released but" in p for p in problems(root))


def test_a_writer_version_that_is_not_in_the_history_is_refused_as_unknown(tmp_path):
    newer = AvroCodec(evolve(tmp_path, "Label", add_field({"name": "source", "type": "string", "default": "x"})))
    with pytest.raises(DecodeError) as err:
        get_codec().decode(newer.encode("Label", {**LABEL, "source": "x"}), expect="Label")
    assert err.value.reason == "unknown_schema"
    assert newer.by_name["Label"].fingerprint.hex() in err.value.detail


def test_data_written_before_the_fingerprint_fix_is_named_as_such():
    blob = get_codec().encode("Label", LABEL)
    with pytest.raises(DecodeError) as err:
        get_codec().decode(blob[:2] + blob[2:10][::-1] + blob[10:])
    assert err.value.reason == "unknown_schema"
    assert "Label's with its bytes reversed" in err.value.detail


class FakeMessage:
    """What ingestion reads of a confluent-kafka Message."""

    def __init__(self, topic, value, key=None):
        self._topic, self._value, self._key = topic, value, key

    def topic(self): return self._topic
    def value(self): return self._value
    def key(self): return self._key
    def partition(self): return 0
    def offset(self): return 7
    def timestamp(self): return (1, 1_700_000_000_123)


def test_ingestion_passes_an_older_version_on_as_the_current_one(tmp_path, settings, redis_client, monkeypatch):
    """events.valid / labels.valid carry the current version only: downstream services never see an
    old layout (and the published_ms splice stays valid)."""
    root = evolve(tmp_path, "Event", add_field({"name": "channel", "type": "string", "default": "web"}))
    v2 = AvroCodec(root)
    monkeypatch.setattr(validate, "get_codec", lambda: v2)
    ingestor = Ingestor(settings, kafka.producer(settings), redis_client)
    ingestor.codec = v2
    old = get_codec().encode("Event", EVENT)
    decision = ingestor.decide_message(FakeMessage(ingestor.events.source, old, b"m-7"), 1.7e9)
    assert decision.claim is not None
    assert v2.is_current(decision.value)
    assert v2.decode(decision.value, expect="Event") == {**EVENT, "channel": "web", "published_ms": 1_700_000_000_123}


def test_ingestion_dead_letters_an_incompatible_version_with_the_reason(tmp_path, settings, redis_client, monkeypatch):
    v2 = AvroCodec(evolve(tmp_path, "Label", add_field({"name": "source", "type": "string"})))
    monkeypatch.setattr(validate, "get_codec", lambda: v2)
    ingestor = Ingestor(settings, kafka.producer(settings), redis_client)
    ingestor.codec = v2
    old = get_codec().encode("Label", LABEL)
    decision = ingestor.decide_message(FakeMessage(ingestor.labels.source, old, b"e-1"), 1.7e9)
    assert decision.claim is None and decision.reason == "incompatible_schema"
    letter = v2.decode(decision.value, expect="DeadLetter")
    assert letter["reason"] == "incompatible_schema" and "source" in letter["detail"]
    assert letter["payload"] == old  # the original bytes, for a replay after a fix
