"""Every Prometheus metric driftline exports, defined once (names start with `driftline_`).

Labels are bounded: service, topic (docs/DESIGN.md's name, without namespace), reason codes from a
fixed set, model name, model version (one live series per active version; retired versions are
removed), role (champion | challenger). The README's metric table lists these same objects.

    >>> MESSAGES_IN.labels(service="ingestion", topic="events").inc()
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

# -- pipeline ------------------------------------------------------------------------------
MESSAGES_IN = Counter(
    "driftline_messages_in_total", "Messages consumed from Kafka or received over HTTP.", ["service", "topic"]
)
MESSAGES_OUT = Counter("driftline_messages_out_total", "Messages produced to Kafka.", ["service", "topic"])
DEAD_LETTERS = Counter(
    "driftline_dead_letters_total", "Inputs sent to a DLQ, by reason code.", ["service", "topic", "reason"]
)
DUPLICATES = Counter(
    "driftline_duplicates_total", "Inputs dropped as already seen (same event_id).", ["service", "topic"]
)
INGESTED = Counter(
    "driftline_ingested_total",
    "Inputs the ingestion service decided on, by door (kafka|http), topic (events|labels) and outcome "
    "(valid|dead_letter|duplicate); received = the sum over outcomes.",
    ["door", "topic", "outcome"],
)
PROCESSING_SECONDS = Histogram(
    "driftline_processing_seconds",
    "Time to process one consumed batch, by stage.",
    ["service", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "driftline_batch_size", "Messages per processed batch.", ["service"],
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
CONSUMER_LAG = Gauge(
    "driftline_consumer_lag", "High watermark minus the consumer's position.", ["service", "topic", "partition"]
)
REDIS_SECONDS = Histogram(
    "driftline_redis_seconds", "Redis round-trip time, by operation.", ["service", "op"], buckets=REDIS_BUCKETS
)
# -- windowed aggregates (docs/features.md) ----------------------------------------------------
LATE_EVENTS = Counter(
    "driftline_features_late_events_total",
    "Events older than their key entity's newest one, by key field and handling: placed (by event time) "
    "or dropped (older than the key's lateness: folded into nothing).",
    ["key", "handling"],
)
KEYED_CONFLICTS = Counter(
    "driftline_features_keyed_conflicts_total",
    "Writes of a key entity's state that found another worker's version (two owners of one key "
    "partition during a rebalance): the worker reads them again and starts its loop over.",
)
KEYED_STALENESS = Histogram(
    "driftline_features_keyed_staleness_seconds",
    "Per event read at a key field's stage: how far in event time a source that stopped was behind it "
    "(0 when every source had got past it: the value is exact; docs/features.md).",
    ["key"],
    buckets=(0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
)
KEYED_STALE = Counter(
    "driftline_features_keyed_stale_total",
    "Events read at a key field's stage before a source that stopped (features.keyed_hold_ms without "
    "moving) had got past them: their key aggregates may miss that source's events.",
    ["key"],
)
END_TO_END_SECONDS = Histogram(
    "driftline_event_to_prediction_seconds",
    "From the event's publication by its producer to its prediction by the learner.",
    buckets=LATENCY_BUCKETS,
)

# -- learning ------------------------------------------------------------------------------
EXAMPLES_LEARNED = Counter(
    "driftline_examples_learned_total", "Labels learned, by model and role.", ["model", "role"]
)
LABELS_OUT_OF_ORDER = Counter(
    "driftline_labels_out_of_order_total",
    "Labels learned after a label or an event of a later ts was: the learning order left the stream's (a labels.valid partition idle for learner.label_idle_s came back with older labels, or a label reached Kafka after a later event).",
    ["model"],
)
SCORED_AHEAD = Counter(
    "driftline_scored_ahead_of_labels_total",
    "Events scored by a model that had already learned a label later than the event (its own, or one the stream order says it cannot know yet). Always 0 unless order was given up.",
    ["model"],
)
PREDICTIONS = Counter(
    "driftline_predictions_total", "Predictions made, by service, model and role.", ["service", "model", "role"]
)
ACCURACY = Gauge(
    "driftline_model_accuracy", "Prequential accuracy since the version was created.", ["model", "version", "role"]
)
WINDOW_ACCURACY = Gauge(
    "driftline_model_window_accuracy", "Prequential accuracy over the last window of examples.",
    ["model", "version", "role"],
)
LOG_LOSS = Gauge("driftline_model_log_loss", "Prequential log loss since the version was created.",
                 ["model", "version", "role"])
MAE = Gauge("driftline_model_mae", "Regression: prequential mean absolute error since the version was created.",
            ["model", "version", "role"])
RMSE = Gauge("driftline_model_rmse", "Regression: prequential root mean squared error since the version was created.",
             ["model", "version", "role"])
R2 = Gauge("driftline_model_r2", "Regression: prequential R² since the version was created.", ["model", "version", "role"])
WINDOW_MAE = Gauge("driftline_model_window_mae", "Regression: prequential MAE over the last window of examples.",
                   ["model", "version", "role"])
# A learner exports the prequential figures of its model's task only (learner/telemetry.py), so a
# dashboard panel that reads one of these belongs to that task (tests/test_dashboards.py).
TASK_GAUGES = {
    "classification": (ACCURACY, WINDOW_ACCURACY, LOG_LOSS),
    "regression": (MAE, RMSE, R2, WINDOW_MAE),
}
MODEL_VERSION = Gauge("driftline_model_version", "Version currently in each role (0 = none).", ["model", "role"])
CHECKPOINTS = Counter("driftline_checkpoints_total", "Learner checkpoints written.", ["model"])
MODEL_UPDATES = Counter("driftline_model_updates_total", "model.updates published.", ["model"])

# -- drift and retraining ------------------------------------------------------------------
DRIFT_EVENTS = Counter(
    "driftline_drift_events_total", "Drift alarms, by kind, level and detector.", ["model", "kind", "level", "detector"]
)
RETRAIN_REQUESTS = Counter("driftline_retrain_requests_total", "Retrain requests, by reason.", ["model", "reason"])
RETRAINS_SUPPRESSED = Counter(
    "driftline_retrains_suppressed_total", "Retrain triggers held back by the cooldown.", ["model", "reason"]
)
MODEL_SWAPS = Counter("driftline_model_swaps_total", "Champion changes, by reason.", ["model", "reason"])
CHALLENGERS_DROPPED = Counter(
    "driftline_challengers_dropped_total", "Challengers dropped without winning.", ["model"]
)
ERROR_RATE = Gauge("driftline_drift_error_rate", "Error rate the drift detector sees.", ["model", "version"])

# -- serving and HTTP ----------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "driftline_http_requests_total", "HTTP requests, by route and status.", ["service", "route", "method", "status"]
)
HTTP_SECONDS = Histogram(
    "driftline_http_request_seconds", "HTTP request latency, by route.", ["service", "route"],
    buckets=LATENCY_BUCKETS,
)
CLIENT_REQUESTS = Counter(
    "driftline_client_requests_total",
    "Requests a client door let in, by client: the name of the token (anonymous when the door is open).",
    ["service", "client"],
)
CLIENT_REJECTIONS = Counter(
    "driftline_client_rejections_total",
    "Requests a client door turned away, by client (unknown: no token or an unknown one) and reason "
    "(missing|invalid|rate_limited).",
    ["service", "client", "reason"],
)
SERVING_VERSION = Gauge("driftline_serving_model_version", "Champion version this replica serves.", ["model"])
MODEL_READY = Gauge("driftline_model_ready", "1 when the service has a model and its dependencies answer.",
                    ["service"])
PREDICTION_LOG_DROPPED = Counter(
    "driftline_prediction_log_dropped_total", "Served predictions that could not be logged to Kafka.", ["reason"]
)
SWAP_SECONDS = Histogram(
    "driftline_swap_seconds", "From a model.swaps/model.updates message to the new model serving.",
    buckets=LATENCY_BUCKETS,
)
# How far the served models are behind the learner (prediction/follower.py; docs/serving.md).
SERVING_LAG_EXAMPLES = Gauge(
    "driftline_serving_lag_examples",
    "Examples the learner has learned (of the outcomes this worker has read) that the model it serves in this role "
    "has not.", ["model", "role"])
SERVING_LAG_SECONDS = Gauge(
    "driftline_serving_lag_seconds",
    "How long ago the learner learned the first example the model this worker serves in this role has not (0: none).",
    ["model", "role"])
SERVING_LEARN_DELAY = Histogram(
    "driftline_serving_learn_delay_seconds",
    "From the learner publishing an example's outcome to this worker's champion learning it.",
    buckets=LATENCY_BUCKETS,
)
SERVING_RELOADS = Counter(
    "driftline_serving_reloads_total",
    "Artifacts a worker loaded to serve, by reason: start, swap (another champion), promotion (its canary challenger "
    "became champion, no load), canary, update (a version the learner took up again, or a worker that fell behind), "
    "rewind (the learner's positions went back).", ["model", "reason"])

# -- offline store ----------------------------------------------------------------------------
OFFLINE_ROWS = Counter("driftline_offline_rows_total", "Learned examples written to the offline store.", ["model"])

# -- canary routing (prediction) ---------------------------------------------------------------
CANARY_REQUESTS = Counter("driftline_canary_requests_total", "Predictions served, by arm (champion | challenger).",
                          ["model", "arm"])
CANARY_SECONDS = Histogram("driftline_canary_request_seconds", "Time to score one prediction, by arm.",
                           ["model", "arm"], buckets=LATENCY_BUCKETS)
CANARY_ACCURACY = Gauge("driftline_canary_served_accuracy",
                        "Accuracy of the predictions an arm served, over its last labels (this replica).",
                        ["model", "arm"])
CANARY_SHARE = Gauge("driftline_canary_share", "Share of /v1/predict routed to the challenger.", ["model"])
CANARY_ROLLBACKS = Counter("driftline_canary_rollbacks_total", "Canaries rolled back for a worse served error rate.",
                           ["model"])

# -- series exported at 0 from the start ------------------------------------------------------
# A labelled series appears at its first increment otherwise, and rate()/increase() cannot see
# the step from nothing to 1: a first dead letter or a first drift would fire no alert and panels
# would say "No data" instead of 0. Each service creates its known series at start.
DECODE_REASONS = ("not_avro", "unknown_schema", "incompatible_schema", "wrong_schema", "corrupt_avro")  # codec.DecodeError
INPUTS = {  # service -> (topics it consumes, topics it produces)
    "ingestion": (("events", "labels"), ("events.valid", "labels.valid", "events.dlq", "labels.dlq")),
    "features": (("events.valid", "labels.valid"), ("features", "events.dlq", "labels.dlq")),
    "learner": (("features", "labels.valid", "retrain.requests", "model.swaps"),
                ("outcomes", "model.updates", "model.swaps", "labels.dlq")),
    "drift": (("outcomes", "model.swaps", "features"), ("drift.events", "retrain.requests")),
    "prediction": (("outcomes", "model.swaps", "model.updates"), ("predictions", "model.swaps")),
}
SWAP_REASONS = ("initial", "promotion", "rollback", "manual")  # ModelSwap.avsc
ROLES = ("champion", "challenger")
RELOAD_REASONS = ("start", "swap", "promotion", "canary", "update", "rewind")


def start_at_zero(service: str, settings) -> None:
    """Create at 0 every labelled series of `service` that a dashboard or alert reads, for its
    known label values (reason codes, topics, roles, detectors). Idempotent.

        >>> from driftline.shared.settings import Settings
        >>> start_at_zero("ingestion", Settings())
        >>> DEAD_LETTERS.labels("ingestion", "events", "not_avro")._value.get()
        0.0
    """
    model = settings.learner.model_name
    consumed, produced = INPUTS.get(service, ((), ()))
    for topic in consumed:
        MESSAGES_IN.labels(service, topic)
    for topic in produced:
        MESSAGES_OUT.labels(service, topic)
    if service == "ingestion":
        from .deadletter import REASONS

        for topic in ("events", "labels"):
            DUPLICATES.labels(service, topic)
            for reason in REASONS:
                DEAD_LETTERS.labels(service, topic, reason)
            for door in ("kafka", "http"):
                for outcome in ("valid", "dead_letter", "duplicate"):
                    INGESTED.labels(door, topic, outcome)
    elif service in ("features", "drift", "learner"):
        if service == "features":
            DUPLICATES.labels(service, "events.valid")
        if service == "learner":  # a vector published again, and a label
            DUPLICATES.labels(service, "features")
            DUPLICATES.labels(service, "labels.valid")
        for topic in consumed:
            if topic in ("events.valid", "labels.valid", "outcomes", "features"):
                for reason in DECODE_REASONS:
                    DEAD_LETTERS.labels(service, topic, reason)
    if service == "learner":
        DEAD_LETTERS.labels(service, "labels.valid", "unknown_event")
        DUPLICATES.labels(service, "labels.valid")
        LABELS_OUT_OF_ORDER.labels(model)
        CHALLENGERS_DROPPED.labels(model)
        CHECKPOINTS.labels(model)
        MODEL_UPDATES.labels(model)
        for role in ROLES:
            EXAMPLES_LEARNED.labels(model, role)
            PREDICTIONS.labels(service, model, role)
    if service in ("learner", "prediction"):
        for reason in SWAP_REASONS:
            MODEL_SWAPS.labels(model, reason)
    if service == "prediction":
        PREDICTIONS.labels(service, model, "champion")
        for reason in RELOAD_REASONS:
            SERVING_RELOADS.labels(model, reason)
        CANARY_ROLLBACKS.labels(model)
        CANARY_SHARE.labels(model)
        for role in ROLES:
            CANARY_REQUESTS.labels(model, role)
    if service == "offline":
        OFFLINE_ROWS.labels(model)
        for reason in ("timeout", "delivery_failed", "shutdown"):
            PREDICTION_LOG_DROPPED.labels(reason)
    if service in ("learner", "drift"):  # the learner decides from the stream, drift on demand and schedule
        from .vocabulary import RETRAIN_REASONS

        for level in ("warning", "drift"):
            DRIFT_EVENTS.labels(model, "concept", level, settings.drift.detector)
        DRIFT_EVENTS.labels(model, "data", "drift", "PSI")
        for reason in RETRAIN_REASONS:
            RETRAIN_REQUESTS.labels(model, reason)
            RETRAINS_SUPPRESSED.labels(model, reason)
