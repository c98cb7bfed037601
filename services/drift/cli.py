"""`driftline retrain`: ask the learner for a challenger now (publishes a RetrainRequest).

    $ driftline retrain                  # reason demand, to retrain.requests of the configured namespace
    $ driftline retrain --reason schedule

On-demand requests are never held back by the drift service's cooldown. The command reads the
champion version and the current position from Redis when it can; it never waits for a learner.
"""

from __future__ import annotations

import typer

from ..shared.vocabulary import RETRAIN_REASONS as REASONS


def retrain(reason: str = typer.Option("demand", help=f"one of {', '.join(REASONS)}")) -> None:
    """Ask the learner for a challenger now (published to retrain.requests)."""
    import getpass
    import socket

    from rich.console import Console

    from ..shared import audit, kafka
    from ..shared.codec import get_codec
    from ..shared.settings import get_settings
    from ..shared.topics import Topics
    from .policy import retrain_request

    if reason not in REASONS:
        raise typer.BadParameter(f"unknown reason {reason!r}; choose from {', '.join(REASONS)}")
    settings = get_settings()
    model = settings.learner.model_name
    version, position = _champion_and_position(settings, model)
    record = retrain_request(model, reason, version=version, position=position)
    producer = kafka.producer(settings)
    topic = Topics(settings.namespace).retrain_requests
    kafka.produce(producer, topic, get_codec().encode("RetrainRequest", record), key=model)
    acknowledged = producer.flush(15) == 0
    # Straight to Kafka (its ACLs guard it), so the audit record is this command's own, as the OS user.
    audit.write(audit.record(service="cli", action="retrain", who=f"os:{getpass.getuser()}", client=socket.gethostname(),
                             path="driftline retrain", target={"reason": reason}, status=202 if acknowledged else 503,
                             detail=None if acknowledged else "Kafka did not acknowledge", answer=record),
                settings.audit_log)
    if not acknowledged:
        raise typer.Exit(f"Kafka at {settings.kafka_bootstrap} did not acknowledge the request")
    Console().print(f"retrain request {record['request_id']} ({reason}) sent to {topic} "
                    f"for model {model} v{version} at position {record['position']}")


def _champion_and_position(settings, model: str) -> tuple[int | None, int]:
    """Best effort: the registry's champion and the drift service's position (None, 0 without Redis)."""
    from ..shared import redis_clients
    from ..shared.keys import Keys

    keys = Keys(settings.namespace)
    try:
        client = redis_clients.connect(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        champion = client.hget(keys.registry_roles(model), "champion")
        position = client.hget(keys.drift_state(model), "position")
        return (int(champion) if champion else None), max(0, int(position or 0))
    except (*redis_clients.UNAVAILABLE, ValueError):
        return None, 0
