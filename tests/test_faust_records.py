"""driftline.faust_records: a real faust worker publishes events and labels and consumes predictions
and drift events on the real broker, with the real services in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from pipeline import metric, start_pipeline
from test_foundation_codec import SAMPLES

from driftline.faust_records import RECORDS
from driftline.shared.codec import get_codec


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_record_type_has_its_schema_fields_and_writes_driftlines_bytes(name):
    record = RECORDS[name]
    fields = [f["name"] for f in get_codec().by_name[name].parsed["fields"]]
    assert sorted(record._options.fields) == sorted(fields)
    value = record(**SAMPLES[name])
    assert value.dumps() == get_codec().encode(name, SAMPLES[name])


@pytest.mark.e2e
def test_a_faust_worker_publishes_events_and_labels_and_reads_predictions_and_drift(settings, run_service, tmp_path):
    n, flip = 800, 400
    procs = start_pipeline(run_service, ("ingestion", "features", "learner", "drift"), features="raw")
    out = tmp_path / "seen.json"
    app_file = tmp_path / "shop.py"
    app_file.write_text(textwrap.dedent(f"""
        import json, os, time
        import faust
        from driftline.faust_records import Event, Label, Prediction, DriftEvent, driftline_topic

        NS = "{settings.namespace}"
        app = faust.App(NS + "-shop", broker="kafka://{settings.kafka_bootstrap}", store="memory://",
                        web_enabled=False)
        events, labels = driftline_topic(app, "events", NS), driftline_topic(app, "labels", NS)
        predictions, drift = driftline_topic(app, "predictions", NS), driftline_topic(app, "drift.events", NS)
        seen = {{"predictions": [], "drift": []}}

        def dump():
            tmp = "{out}.tmp"
            with open(tmp, "w") as f:
                json.dump(seen, f)
            os.replace(tmp, "{out}")

        @app.task
        async def publish():
            base = time.time() - {n}
            for i in range({n}):
                x = (i * 37 % 100) / 100
                positive = (x > 0.5) != (i >= {flip})  # the concept flips half way
                eid = f"f-{{i}}"
                # Each record on the broker before the next is sent: from a producer's buffer a
                # label could otherwise reach the broker before an older event of another
                # partition, an order no service can know (and the learner's order check is kept).
                sent = await events.send(key=f"ent-{{i % 3}}", value=Event(
                    event_id=eid, entity_id=f"ent-{{i % 3}}", ts=base + i, fields={{"x": x}}))
                await sent
                sent = await labels.send(key=eid, value=Label(event_id=eid, label="1" if positive else "0", ts=base + i))
                await sent

        @app.agent(predictions)
        async def on_prediction(stream):
            async for p in stream:
                assert isinstance(p, Prediction)
                if p.role == "champion" and p.source == "learner":
                    seen["predictions"].append(p.event_id)
                    if len(seen["predictions"]) % 100 == 0:
                        dump()

        @app.agent(drift)
        async def on_drift(stream):
            async for d in stream:
                assert isinstance(d, DriftEvent)
                seen["drift"].append({{"kind": d.kind, "detector": d.detector, "position": d.position}})
                dump()

        if __name__ == "__main__":
            app.main()
    """))
    log = tmp_path / "faust.log"
    proc = subprocess.Popen([sys.executable, str(app_file), "worker", "-l", "warn"], cwd=tmp_path,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 240
        seen: dict = {}
        while not (len(set(seen.get("predictions", ()))) >= n and seen.get("drift")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (seen and {k: len(v) for k, v in seen.items()},
                                                 log.read_text()[-3000:])
            time.sleep(0.5)
            if out.exists():
                seen = json.loads(out.read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert set(seen["predictions"]) == {f"f-{i}" for i in range(n)}
    assert any(d["kind"] == "concept" for d in seen["drift"])
    assert metric(procs["ingestion"], "driftline_ingested_total", outcome="valid") == 2 * n
    while metric(procs["learner"], "driftline_examples_learned_total", role="champion") < n:
        assert time.monotonic() < deadline, procs["learner"].log_tail()
        time.sleep(0.5)


def test_the_documented_faust_snippet_declares_an_app_on_driftlines_topics():
    import faust
    from test_interop_java import docs_block

    scope: dict = {"__name__": "readme_faust"}  # faust names agents by their module
    exec(docs_block("architecture.md", "python", "driftline.faust_records"), scope)
    assert isinstance(scope["app"], faust.App)
    assert scope["events"].get_topic_name() == "events" and scope["predictions"].value_type is RECORDS["Prediction"]
