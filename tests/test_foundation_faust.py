"""faust-streaming (aiokafka) works against the pinned broker: a real faust worker consumes what
confluent-kafka produced, through a faust-created topic and consumer group."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from driftline.shared import kafka
from driftline.shared.codec import get_codec


def test_a_faust_worker_consumes_from_the_pinned_broker(settings, tmp_path):
    topic = f"{settings.namespace}.faust-probe"
    done_file = tmp_path / "done"
    app_file = tmp_path / "probe_app.py"
    app_file.write_text(textwrap.dedent(f"""
        import faust
        from driftline.shared.codec import get_codec

        app = faust.App("{settings.namespace}-probe", broker="kafka://{settings.kafka_bootstrap}",
                        store="memory://", web_enabled=False, topic_partitions=3)
        source = app.topic("{topic}", value_serializer="raw", partitions=3)
        seen = set()

        @app.agent(source)
        async def consume(stream):
            async for events in stream.take_events(50, within=0.5):
                for event in events:
                    seen.add(get_codec().decode(event.value, expect="Label")["event_id"])
                if len(seen) >= 40:
                    open("{done_file}", "w").write(str(len(seen)))

        if __name__ == "__main__":
            app.main()
    """))
    # As in production, topics exist before the workers start (`driftline infra up` creates them).
    from confluent_kafka.admin import NewTopic

    admin = kafka.admin(settings)
    for future in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        future.result()
    proc = subprocess.Popen(
        [sys.executable, str(app_file), "worker", "-l", "warn"], cwd=tmp_path,
        stdout=open(tmp_path / "faust.log", "wb"), stderr=subprocess.STDOUT, env=os.environ.copy(),
    )
    try:
        producer = kafka.producer(settings)
        codec = get_codec()
        deadline = time.monotonic() + 60
        for i in range(40):
            kafka.produce(producer, topic, codec.encode("Label", {"event_id": f"e{i}", "label": "1", "ts": 0.0}),
                          key=f"e{i}")
        producer.flush(10)
        while not done_file.exists():
            assert time.monotonic() < deadline, (tmp_path / "faust.log").read_text()[-3000:]
            assert proc.poll() is None, (tmp_path / "faust.log").read_text()[-3000:]
            time.sleep(0.3)
        assert done_file.read_text() == "40"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
