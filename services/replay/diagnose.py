"""What a replay says when the pipeline stalls or does not run what the replay was asked for.

    diagnose(settings, prefix, labels_sent, accounted, idle_s)   # which service looks stuck, and why
    check_pipeline(settings, model, features, outcomes, console) # is the learner running `model`?
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaException

from ..shared import kafka
from ..shared.settings import Settings
from ..shared.topics import KEYED_PREFIX, Topics

PIPELINE = ("ingestion", "features", "learner")  # what a replay needs


def group_lag(settings: Settings, group: str, topic_names: list[str]) -> dict[str, int] | None:
    """Per topic the group has committed on, the messages it has not; None if it never committed.
    (A topic it never committed on is left out: labels.valid, for a feature set that does not read
    it.)"""
    c = kafka.consumer(settings, group)
    try:
        parts = [tp for t in topic_names for tp in kafka.partitions_of(settings, t)]
        committed = c.committed(parts, timeout=5)
        read = {tp.topic for tp in committed if tp.offset >= 0}
        if not read:
            return None
        lag = {t: 0 for t in topic_names if t in read}
        for tp in committed:
            if tp.topic in read:
                _low, high = c.get_watermark_offsets(tp, timeout=5)
                lag[tp.topic] += max(0, high - max(tp.offset, 0))
        return lag
    except KafkaException:
        return None
    finally:
        c.close()


def service_inputs(settings: Settings) -> dict[str, list[str]]:
    """The topics each pipeline service may read: the features service's include the key fields'
    internal topics there are (where a stuck stage of theirs shows), found on the broker."""
    topics = Topics(settings.namespace)
    internal = topics.name(KEYED_PREFIX)
    try:
        keyed = sorted((t for t in kafka.admin(settings).list_topics(timeout=5).topics if t.startswith(internal)),
                       key=lambda t: (t.rsplit(".", 2)[-2], int(t.rsplit(".", 1)[1])))
    except (KafkaException, ValueError):
        keyed = []
    return {
        "ingestion": [topics.events, topics.labels],
        "features": [topics.events_valid, topics.labels_valid, *keyed],
        "learner": [topics.features, topics.labels_valid],
    }


def diagnose(settings: Settings, prefix: str, labels_sent: int, accounted: set[str], idle_s: float) -> str:
    """Say what is missing and which service looks stuck: who does not answer /health, whose
    consumer group has a backlog (or never consumed)."""
    import httpx

    missing = sorted((i for i in range(labels_sent) if f"{prefix}{i}" not in accounted))
    topics = Topics(settings.namespace)
    lines = [
        f"the pipeline stalled: {len(missing):,} of {labels_sent:,} labels were neither learned nor dead-lettered "
        f"after {idle_s:.0f} s without progress (first missing: event ids "
        f"{', '.join(f'{prefix}{i}' for i in missing[:5])}).",
    ]
    inputs = service_inputs(settings)
    suspects = []
    for service in PIPELINE:
        url = f"http://{settings.host}:{settings.port_of(service)}/health"
        try:
            answer = httpx.get(url, timeout=2.0)
            ok = answer.status_code == 200
            health = "healthy" if ok else f"unhealthy (GET /health -> {answer.status_code})"
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
            # The learner's own account: active or standby, where it is, what it holds back.
            said = {k: body[k] for k in ("state", "position", "waiting_labels", "held_events") if k in body}
            if said:
                health += f" ({', '.join(f'{k} {v}' for k, v in said.items())})"
        except (httpx.HTTPError, ValueError):
            ok, health = False, f"not answering on {url}"
        lag = group_lag(settings, topics.group(service), inputs[service])
        if lag is None:
            backlog = "no committed offsets on its input topics"
        else:
            behind = {t: n for t, n in lag.items() if n}
            level = [t for t in lag if not lag[t]]
            backlog = "; ".join(filter(None, (
                behind and f"{sum(behind.values()):,} messages behind: " + ", ".join(
                    f"{n:,} on {name}" for name, n in zip(_named(topics, behind), behind.values())),
                level and f"nothing behind on {', '.join(_named(topics, level, collapse=True))}")))
        lines.append(f"  {service:<10} {health}; {backlog}")
        # The key fields' internal topics always have a few messages past the last commit (their
        # stages' watermarks, every 0.5 s): shown, but no sign of a stuck service by themselves.
        if not ok or (lag and any(n for t, n in lag.items() if not topics.base(t).startswith(KEYED_PREFIX))):
            suspects.append(service)
    if suspects:
        lines.append(f"looks stuck: {suspects[0]} (see its log; `driftline serve {suspects[0]}` runs it).")
    return "\n".join(lines)


def check_pipeline(settings: Settings, model: str, features: str, outcomes: list[dict], console) -> dict[str, Any]:
    """`--model` and `--features` cannot change running services: compare them with what the
    learner's champion was built from (registry) and what the features service computed (the
    snapshot of an event of this replay), and warn when they differ."""
    from ..features.definitions import load_feature_set
    from ..features.store import Snapshots
    from ..shared import redis_clients
    from ..shared.keys import Keys
    from ..shared.registry import ModelRegistry

    checks: dict[str, Any] = {}
    client = redis_clients.connect(settings.redis_url)
    keys = Keys(settings.namespace)
    try:
        registry = ModelRegistry(client, keys, settings.learner.model_name, settings.model_key.get_secret_value().encode())
        champion = registry.champion()
        running = registry.meta(champion).get("spec") if champion is not None else None
        checks["learner_model"] = running
        checks["model_matches"] = None if running is None else _same_spec(running, model)
    except Exception as exc:  # a report is still worth writing
        checks["learner_model"] = f"unknown ({exc.__class__.__name__})"
        checks["model_matches"] = None
    try:
        wanted = load_feature_set(features).name
        running = None
        for o in outcomes[:1]:
            fv = Snapshots(client, keys, service="replay").read_vectors([o["event_id"]]).get(o["event_id"])
            running = fv["feature_set"] if fv else None
        checks["features_running"] = running
        checks["features_match"] = None if running is None else running == wanted
    except Exception as exc:
        checks["features_running"] = f"unknown ({exc.__class__.__name__})"
        checks["features_match"] = None
    finally:
        client.close()
    if checks.get("model_matches") is False:
        console.print(f"[yellow]warning:[/] the learner runs {checks['learner_model']!r}, not {model!r}; "
                      "restart it with DRIFTLINE_LEARNER__MODEL to replay another model")
    if checks.get("features_match") is False:
        console.print(f"[yellow]warning:[/] the features service computes {checks['features_running']!r}, not "
                      f"{features!r}; restart it with DRIFTLINE_FEATURES__SET")
    return checks


def _named(topics: Topics, names, collapse: bool = False) -> list[str]:
    """Topic names without the namespace; `collapse`: a key field's internal topics as one,
    `features.by.merchant.*`.

        >>> _named(Topics("t"), ["t.events.valid", "t.features.by.merchant.0", "t.features.by.merchant.1"], True)
        ['events.valid', 'features.by.merchant.*']
    """
    out: list[str] = []
    for t in names:
        name = topics.base(t)
        if collapse and name.startswith(KEYED_PREFIX):
            name = name.rsplit(".", 1)[0] + ".*"
        if name not in out:
            out.append(name)
    return out


def _same_spec(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())
