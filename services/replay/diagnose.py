"""What a replay says when the pipeline stalls or does not run what the replay was asked for.

    diagnose(settings, prefix, labels_sent, accounted, idle_s)   # which service looks stuck, and why
    check_pipeline(settings, model, features, outcomes, console) # is the learner running `model`?
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaException

from ..shared import kafka
from ..shared.settings import Settings
from ..shared.topics import Topics

PIPELINE = ("ingestion", "features", "learner")  # what a replay needs


def group_lag(settings: Settings, group: str, topic_names: list[str]) -> int | None:
    """Messages a consumer group has not committed on these topics; None if it never committed."""
    c = kafka.consumer(settings, group)
    try:
        parts = [tp for t in topic_names for tp in kafka.partitions_of(settings, t)]
        committed = c.committed(parts, timeout=5)
        if all(tp.offset < 0 for tp in committed):
            return None
        lag = 0
        for tp in committed:
            _low, high = c.get_watermark_offsets(tp, timeout=5)
            lag += max(0, high - max(tp.offset, 0))
        return lag
    except KafkaException:
        return None
    finally:
        c.close()


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
    inputs = {
        "ingestion": [topics.events, topics.labels],
        "features": [topics.events_valid, topics.labels_valid],
        "learner": [topics.features, topics.labels_valid],
    }
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
        backlog = ("no committed offsets on its input topics" if lag is None else f"{lag:,} messages behind on "
                   f"{', '.join(topics.base(t) for t in inputs[service])}")
        lines.append(f"  {service:<10} {health}; {backlog}")
        if not ok or lag:
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


def _same_spec(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())
