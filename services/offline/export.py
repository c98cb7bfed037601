"""`driftline export --out DIR`: the offline store's rows, rebuilt from what Kafka still retains of
`outcomes` (the same layout, the same rows as the sink writes), for a range of event time or of offsets.

    export(settings, Path("/tmp/x"), since=1.7e9, until=1.8e9)    # -> rows written

It reads up to the end the topic had when it started, commits nothing, and leaves the sink alone.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from ..shared import kafka
from ..shared.codec import DecodeError, get_codec
from ..shared.settings import Settings
from ..shared.topics import Topics
from .store import OfflineStore, row_of


def parse_time(text: str | None) -> float | None:
    """Epoch seconds, or an ISO date/time (UTC unless it says otherwise).

    >>> parse_time("1700000000"), parse_time("2023-11-14"), parse_time(None)
    (1700000000.0, 1699920000.0, None)
    """
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def export(settings: Settings, out: Path, *, since: float | None = None, until: float | None = None,
           from_offset: int | None = None, to_offset: int | None = None, batch_rows: int = 100_000) -> int:
    """Write the outcomes with event time in [since, until) and offset in [from_offset, to_offset)
    under `out`; returns the number of rows."""
    topic = Topics(settings.namespace).outcomes
    store, codec = OfflineStore(out), get_codec()
    c = kafka.consumer(settings, f"driftline.export.{uuid.uuid4().hex[:8]}")
    written = 0
    try:
        parts = kafka.partitions_of(settings, topic)
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        if to_offset is not None:
            ends = {p: min(end, to_offset) for p, end in ends.items()}
        start = OFFSET_BEGINNING if from_offset is None else from_offset
        c.assign([TopicPartition(topic, tp.partition, start) for tp in parts])
        pending = {p for p, end in ends.items() if end > (from_offset or 0)}
        rows: dict[int, list[dict]] = {}
        span: dict[int, list[int]] = {}

        def flush(p: int) -> None:
            nonlocal written
            if p in span:
                store.write_batch(topic, p, span[p][0], span[p][1], rows.get(p, []))
                written += len(rows.get(p, []))
                rows.pop(p, None), span.pop(p)

        while pending:
            m = c.poll(1.0)
            if m is None or m.error() is not None:
                continue
            p, off = m.partition(), m.offset()
            if off >= ends[p]:
                pending.discard(p)
                continue
            span.setdefault(p, [off, off])[1] = off
            try:
                o = codec.decode(m.value(), expect="Outcome")
            except DecodeError:
                o = None
            if o is not None and (since is None or o["ts"] >= since) and (until is None or o["ts"] < until):
                rows.setdefault(p, []).append(row_of(o, m.topic(), p, off))
            if len(rows.get(p, [])) >= batch_rows:
                flush(p)
            if off + 1 >= ends[p]:
                pending.discard(p)
        for p in list(span):
            flush(p)
    finally:
        c.close()
    return written
