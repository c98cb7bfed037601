"""Kafka clients configured the one way driftline uses them (confluent-kafka).

Every client gets `connection(settings)`: the bootstrap servers and the `kafka_security`
properties (security.protocol, sasl.*, ssl.*). Producers are idempotent with acks=all and small linger for batching; consumers never auto-commit
(each service commits after its side effects are durable). Topic creation is idempotent.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from .framing import OUTPUT
from .settings import Settings
from .topics import KEYED_PREFIX, SPEC_BY_NAME, Topics

log = logging.getLogger(__name__)


def connection(settings: Settings) -> dict[str, str]:
    """Where the broker is and how to authenticate to it (`kafka_security`: TLS, SASL): the part
    of the configuration that every producer, consumer and admin client shares."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_security}


def _on_error(err: KafkaError) -> None:
    """librdkafka's client-wide errors: a broker outage marks Kafka away (for /ready and /health);
    librdkafka reconnects by itself with backoff and already folds repeated errors into one line."""
    from .deps import DEPS

    if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE):
        DEPS.down("kafka", err)
    else:
        log.warning("kafka: %s", err)


def producer(settings: Settings, **overrides) -> Producer:
    config = {
        "error_cb": _on_error,
        **connection(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.kafka_linger_ms,
        "batch.num.messages": 10_000,
        "compression.type": settings.kafka_compression,
        "queue.buffering.max.messages": 500_000,
        "message.max.bytes": 2_000_000,
    }
    config.update(overrides)
    return Producer(config)


# For a consumer that merges its partitions in event-time order, pausing the ones running ahead:
# a resumed partition is fetched only after the fetch in flight, so that one must not be parked
# long (at 100 ms the learner's p95 at 1,000 ev/s went from ~100 ms to ~800 ms). Limiting what
# librdkafka prefetches per partition (queued.min.messages 2000) was tried too, and stalled the
# learner as badly (probably librdkafka's 1 s fetch.queue.backoff.ms for a partition whose queue
# is full).
MERGING_CONSUMER = {"fetch.wait.max.ms": 20}

# For the producers' topics (events, labels): a producer may write them in transactions, and the
# records of an aborted one must not be ingested. The broker answers a read_committed fetch parked
# at its end late, though: up to the whole fetch.wait.max.ms for ~5% of the records at 500 ms
# (produce -> poll p95 ~550 ms, services/bench/probes/fetch_isolation_latency.py), ~8 ms at 100.
INPUT_CONSUMER = {"isolation.level": "read_committed", "fetch.wait.max.ms": 100}
BATCHED_FETCH_BYTES = 64 * 1024


def batched_fetch(settings: Settings) -> dict[str, int]:
    """The hot path's consumers under `kafka_fetch_batch_ms`: the broker answers a fetch once 64 KiB
    are there or the time is up, instead of at the first record. Live traffic then comes in fewer,
    larger batches; every batch has fixed costs (a fetch round trip, a Redis round trip, commits).

        >>> batched_fetch(Settings(kafka_fetch_batch_ms=10))
        {'fetch.min.bytes': 65536, 'fetch.wait.max.ms': 10}
        >>> batched_fetch(Settings())
        {}
    """
    if not settings.kafka_fetch_batch_ms:
        return {}
    return {"fetch.min.bytes": BATCHED_FETCH_BYTES, "fetch.wait.max.ms": settings.kafka_fetch_batch_ms}


def consumer(settings: Settings, group: str, **overrides) -> Consumer:
    config = {
        "error_cb": _on_error,
        **connection(settings),
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        # Kafka's own default. A fetch parked at the broker returns as soon as a record arrives,
        # so this costs no latency; only an empty fetch waits it out. Empty fetches every 20 ms
        # are not free: with every consumer of the bench stack at 500 ms an idle broker used 0.05
        # cores, with the two merging ones at 20 ms (below) ~0.2. A consumer that pauses and
        # resumes partitions passes MERGING_CONSUMER: a resumed partition waits for the fetch in flight.
        "fetch.wait.max.ms": 500,
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 300_000,
        # driftline's own topics are written only by its idempotent, non-transactional producers:
        # read_committed would skip nothing there, and costs latency (see INPUT_CONSUMER).
        "isolation.level": "read_uncommitted",
    }
    config.update(overrides)
    return Consumer(config)


# How far in event time a service has got on an input partition, carried in its offset commit's
# metadata (Kafka keeps up to 4 KiB per commit): the next service reads it with the commit to know
# the least event time still on its way (a watermark, FlinkKafkaShuffle-style, without a record or
# topic of its own). Written by ingestion and features, read by the learner (learner/inputs.py).
EVENT_TIME_KEY = "event_time"


def event_time_metadata(ts: float) -> str:
    """The commit metadata saying: every record of this partition from the committed offset on has
    an event time at or after `ts` (as far as the partition keeps its own time order).

    >>> event_time_of(event_time_metadata(1700000000.25))
    1700000000.25
    >>> event_time_of(""), event_time_of(None), event_time_of("a note of another tool")
    (None, None, None)
    """
    return json.dumps({EVENT_TIME_KEY: ts})


def event_time_of(metadata: str | None) -> float | None:
    """The event time in a commit's metadata; None when it holds none (an older driftline, another
    tool's note, a commit made before the partition had a valid record)."""
    if not metadata:
        return None
    try:
        ts = json.loads(metadata)[EVENT_TIME_KEY]
    except (ValueError, TypeError, KeyError):
        return None
    return float(ts) if isinstance(ts, (int, float)) and math.isfinite(ts) else None


def admin(settings: Settings) -> AdminClient:
    return AdminClient(connection(settings))


def produce(p: Producer, topic: str, value: bytes, key: str | bytes | None = None, **kwargs) -> None:
    """Produce, waiting for room when the local queue is full instead of failing. An output topic
    that `schema_registry_output` names gets the message in the Confluent wire format (framing.OUTPUT)."""
    value = OUTPUT.frame(topic, value)
    while True:
        try:
            p.produce(topic, value=value, key=key, **kwargs)
            return
        except BufferError:
            p.poll(0.05)


def ensure_topics(settings: Settings, namespace: str | None = None, timeout: float = 30.0) -> list[str]:
    """Create every topic of docs/DESIGN.md in the namespace (the streams with
    `kafka_stream_partitions` partitions); existing ones are left as they are. Returns the topics
    that were created now."""
    topics = Topics(settings.namespace if namespace is None else namespace)
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(name, num_partitions=topics.spec(name).partition_count(settings.kafka_stream_partitions),
                 replication_factor=1)
        for name in topics.all()
        if name not in existing
    ]
    created = _create(client, wanted, timeout)
    _wait_for_leaders(client, topics.all(), None, timeout)
    return created


def _create(client: AdminClient, wanted: list[NewTopic], timeout: float) -> list[str]:
    """Create these topics; one made meanwhile by someone else is fine. Returns those made now."""
    created = []
    if wanted:
        for name, future in client.create_topics(wanted, operation_timeout=timeout).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
    return created


def _wait_for_leaders(client: AdminClient, names: list[str], partitions: int | None, timeout: float) -> bool:
    """Metadata propagates asynchronously: wait until the broker lists them all (with `partitions`
    each, if given) and every partition has a leader (a loaded broker lists a topic before its
    leaders are elected, and producing then fails with NOT_LEADER). False: not within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = client.list_topics(timeout=timeout).topics
        if all(n in listed and listed[n].partitions
               and (partitions is None or len(listed[n].partitions) == partitions)
               and all(p.leader >= 0 for p in listed[n].partitions.values()) for n in names):
            return True
        time.sleep(0.1)
    return False


def ensure_internal_topics(settings: Settings, names: list[str], partitions: int, timeout: float = 30.0) -> None:
    """Create a service's internal topics (features.by.<key>.<source>) with `partitions` each, as
    Kafka Streams creates its repartition topics; one that exists with another count is an error
    (its partitions would no longer line up with events.valid's)."""
    client = admin(settings)
    listed = client.list_topics(timeout=timeout).topics
    wrong = {n: len(listed[n].partitions) for n in names if n in listed and len(listed[n].partitions) != partitions}
    if wrong:
        raise RuntimeError(f"internal topics {sorted(wrong)} have {sorted(set(wrong.values()))} partitions, not "
                           f"{partitions} (events.valid's): delete them (they are rebuilt from events.valid)")
    _create(client, [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in listed],
            timeout)
    if not _wait_for_leaders(client, names, partitions, timeout):
        raise TimeoutError(f"internal topics {names[:3]}... not ready within {timeout:.0f} s")


def ends(client: AdminClient, partitions: Iterable[TopicPartition], timeout: float) -> dict[tuple[str, int], int]:
    """(topic, partition) -> its end as the broker says now, all in one ListOffsets request (one
    round trip; asked a partition at a time, such questions were most of a live learner's latency).
    Raises what the broker or the timeout raised."""
    wanted = {TopicPartition(tp.topic, tp.partition): OffsetSpec.latest() for tp in partitions}
    if not wanted:
        return {}
    asked = client.list_offsets(wanted, request_timeout=timeout)
    return {(tp.topic, tp.partition): f.result(timeout=timeout).offset for tp, f in asked.items()}


def close_quietly(c: Consumer) -> None:
    """Close a consumer made only to read commits or ends: one that never joined a group has
    nothing to lose, so a failure is logged at debug level and not raised."""
    try:
        c.close()
    except Exception:
        log.debug("closing a consumer failed", exc_info=True)


def partitions_of(settings: Settings, topic: str, timeout: float = 10) -> list[TopicPartition]:
    meta = admin(settings).list_topics(topic, timeout=timeout).topics[topic]
    return [TopicPartition(topic, p) for p in sorted(meta.partitions)]


def lag_of(c: Consumer, assignment: Iterable[TopicPartition] | None = None) -> list[tuple[str, int, int]]:
    """(topic, partition, lag) for each assigned partition: high watermark minus position.

    Uses the watermarks the consumer's own fetches brought back (no broker round trip per
    partition); a partition not fetched yet is left out."""
    out = []
    parts = list(assignment if assignment is not None else c.assignment())
    if not parts:
        return out
    for tp in c.position(parts):
        _low, high = c.get_watermark_offsets(tp, cached=True)
        if high < 0:
            continue
        pos = tp.offset if tp.offset >= 0 else high
        out.append((tp.topic, tp.partition, max(0, high - pos)))
    return out


@functools.lru_cache(maxsize=1024)  # asked per message; a process sees a handful of topics
def base_topic(name: str) -> str:
    """docs/DESIGN.md name of a topic (without a namespace) when it is one of ours; the longest
    that fits, since one name ends another (`ns.drift.events` is drift.events, not events).

        >>> base_topic("t1.drift.events"), base_topic("events"), base_topic("elsewhere")
        ('drift.events', 'events', 'elsewhere')
        >>> base_topic("t1.features.by.merchant.2")
        'features.by.merchant.2'
    """
    keyed = name.find(KEYED_PREFIX)
    if keyed >= 0 and (keyed == 0 or name[keyed - 1] == "."):  # the features service's internal topics
        return name[keyed:]
    found = name
    for spec_name in SPEC_BY_NAME:
        if (name == spec_name or name.endswith("." + spec_name)) and (found == name or len(spec_name) > len(found)):
            found = spec_name
    return found


def aiokafka_options(settings: Settings) -> dict:
    """`kafka_security` as aiokafka keyword arguments (for faust-streaming / aiokafka clients):
    the same broker, the same credentials as the confluent-kafka clients.

        >>> aiokafka_options(Settings(kafka_bootstrap="b:9092", kafka_security={
        ...     "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
        ...     "sasl.username": "app", "sasl.password": "pw"}))["sasl_plain_username"]
        'app'
    """
    sec = settings.kafka_security
    options: dict = {"bootstrap_servers": settings.kafka_bootstrap}
    if "security.protocol" in sec:
        options["security_protocol"] = sec["security.protocol"].upper()
    if "sasl.mechanism" in sec or "sasl.mechanisms" in sec:
        options["sasl_mechanism"] = sec.get("sasl.mechanism") or sec["sasl.mechanisms"]
    if "sasl.username" in sec:
        options["sasl_plain_username"] = sec["sasl.username"]
    if "sasl.password" in sec:
        options["sasl_plain_password"] = sec["sasl.password"]
    if options.get("security_protocol", "").endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        options["ssl_context"] = create_ssl_context(
            cafile=sec.get("ssl.ca.location"), certfile=sec.get("ssl.certificate.location"),
            keyfile=sec.get("ssl.key.location"), password=sec.get("ssl.key.password"))
    return options


def faust_broker_options(settings: Settings) -> dict:
    """`faust.App(..., **faust_broker_options(settings))`: broker URL and credentials."""
    import faust

    opts = aiokafka_options(settings)
    out: dict = {"broker": "kafka://" + ";".join(opts["bootstrap_servers"].split(","))}
    if "sasl_mechanism" in opts:
        out["broker_credentials"] = faust.SASLCredentials(
            username=opts.get("sasl_plain_username"), password=opts.get("sasl_plain_password"),
            mechanism=opts["sasl_mechanism"], ssl_context=opts.get("ssl_context"))
    elif "ssl_context" in opts:
        out["broker_credentials"] = faust.SSLCredentials(opts["ssl_context"])
    return out
