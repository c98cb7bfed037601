"""`bench ingest`'s events, without Kafka: a payments run never sends an event from the future
(ingestion would refuse it, and the latency phase would time only the few that came through)."""

import time

from driftline.bench.ingest import Events
from driftline.replay import payments
from driftline.shared.codec import get_codec


def test_a_payments_run_of_more_than_one_round_sends_no_event_from_the_future():
    rows = payments.size() * 2 + 1_000  # three rounds of the stream
    events = Events("payments", rows=rows)
    blobs = [blob for phase, n in (("w-", 5_000), ("t-", rows - 6_000), ("l-", 1_000))
             for _, _, blob in events.take(phase, n, time.time())]
    codec = get_codec()
    times = [codec.decode(blob)["ts"] for blob in blobs]
    assert len(times) == rows
    # the last is in the past, and within a round of now: the stream starts as far back as the
    # run needs (a fixed start would be in the future for a long enough run)
    assert time.time() - payments.DAYS * payments.DAY < max(times) <= time.time()
    assert times == sorted(times)  # one stream going on in time, phase after phase
