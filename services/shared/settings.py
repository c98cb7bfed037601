"""All of driftline's settings, read once at start.

Sources, strongest first: constructor arguments, `DRIFTLINE_*` environment variables (nested
sections with `__`, e.g. `DRIFTLINE_LEARNER__CHECKPOINT_EVERY=500`), then `driftline.toml` in the
working directory (or the file named by `DRIFTLINE_CONFIG`), then the defaults below.

    >>> s = Settings(kafka_bootstrap="127.0.0.1:19092")
    >>> s.kafka_bootstrap
    '127.0.0.1:19092'

Nothing else in driftline reads `os.environ` for its configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .vocabulary import DRIFT_DETECTORS

# The key every copy of driftline used to ship with: it signs nothing in a real deployment.
PUBLISHED_KEYS = frozenset({"driftline-dev-key-change-me"})
MIN_KEY_BYTES = 32
LOCAL_SECRETS = "secrets.json"  # under the home: the zero-config key and admin token (mode 0600)
KAFKA_SECURITY_PREFIXES = ("sasl.", "ssl.")
# Secrets that may come from a file instead (`<name>_file`, DRIFTLINE_<NAME>_FILE: Docker's secrets).
SECRET_FILES = ("model_key", "admin_token", "ingest_tokens", "predict_tokens", "redis_url", "kafka_security")
# Read before the settings (which file to read), or by docker-compose.yml alone (it puts the Redis
# password into DRIFTLINE_REDIS_URL and Redis' requirepass): known, but no setting of their own.
EXTRA_ENV_NAMES = frozenset({"DRIFTLINE_CONFIG", "DRIFTLINE_REDIS_PASSWORD"})

DEFAULT_MODEL = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"
DriftDetectorName = Literal[tuple(DRIFT_DETECTORS)]  # type: ignore[valid-type]


def _check_rate_limit(value: str | None) -> str | None:
    """A rate in the `limits` package's notation ('100/second', '10 per minute', '5/2 seconds')."""
    if value is None:
        return None
    from limits import parse

    try:
        parse(value)
    except ValueError:
        raise ValueError("a rate limit reads like '100/second', '6000 per minute' or '5/2 seconds'") from None
    return value


RateLimit = Annotated[str, AfterValidator(_check_rate_limit)]

# Names of the metric's `client` label for callers that hold no known token: a client may not take them.
UNKNOWN_CLIENT, ANONYMOUS_CLIENT = "unknown", "anonymous"


class ClientToken(BaseModel):
    """One holder of a bearer token: a client of a door, or an admin. Its name is what metrics and
    the audit say (never the token); a bare token is named by its fingerprint.

        >>> ClientToken(name="shop", token="x").name, ClientToken(token="x").name
        ('shop', 'token-2d711642')
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9_.@-]{0,63})?$",
                      description="who holds it: letters, digits, _.@- (at most 64)")
    token: SecretStr = Field(description="the bearer token itself")
    rate_limit: RateLimit | None = Field(None, description="this client's own rate limit, instead of the door's")

    @model_validator(mode="after")
    def _named(self) -> "ClientToken":
        if not self.name:
            self.name = "token-" + hashlib.sha256(self.token.get_secret_value().encode()).hexdigest()[:8]
        if self.name in (UNKNOWN_CLIENT, ANONYMOUS_CLIENT):
            raise ValueError(f"{self.name!r} is the name of callers without a known token: choose another")
        return self


def parse_token_list(value: object) -> object:
    """A JSON list (or a list) of tokens or of {"name", "token"} objects, as ClientToken fields.

        >>> parse_token_list('["abc", {"name": "shop", "token": "def"}]')
        [{'token': 'abc'}, {'name': 'shop', 'token': 'def'}]
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list):  # the message never repeats the value: it holds secrets
        raise ValueError('must be a JSON list of tokens or of {"name": ..., "token": ...} objects')
    return [{"token": item} if isinstance(item, str) else item for item in value]


TokenList = Annotated[list[ClientToken] | None, NoDecode, BeforeValidator(parse_token_list)]


class Ports(BaseModel):
    """HTTP port of each service (GET /health and /metrics on every one)."""

    prediction: int = Field(8000, description="HTTP port of the prediction service")
    ingestion: int = Field(8001, description="HTTP port of ingestion")
    features: int = Field(8002, description="HTTP port of the features service")
    learner: int = Field(8003, description="HTTP port of the learner")
    drift: int = Field(8004, description="HTTP port of the drift service")
    offline: int = Field(8005, description="HTTP port of the offline store's sink (health and metrics only)")


class IngestionSettings(BaseModel):
    max_event_bytes: int = Field(64 * 1024, description="larger Avro payloads go to the DLQ")
    max_fields: int = Field(512, description="more fields than this is an invalid event")
    max_id_chars: int = Field(256, description="longer event ids, entity ids, field names or labels are invalid")
    max_category_chars: int = Field(128, description="a text (categorical) field value longer than this is invalid")
    max_dead_letter_bytes: int = Field(
        512 * 1024, description="a dead letter keeps at most this much of the original payload (the rest is cut)"
    )
    max_http_body_bytes: int = Field(4 * 1024 * 1024, description="larger HTTP bodies get 413")
    max_http_items: int = Field(10_000, description="largest JSON array accepted by POST")
    allowed_fields: list[str] | None = Field(
        None, description="when set, the only field names an event (or a /v1/predict request) may carry"
    )
    dedup_ttl_s: int = Field(24 * 3600, description="how long an event_id is remembered")
    max_clock_skew_s: float = Field(24 * 3600, description="events further in the future are invalid")
    min_ts: float = Field(0.0, description="events before this epoch second are invalid")
    batch_size: int = Field(1000, description="most messages read and handled as one batch")
    commit_interval_s: float = Field(
        0.1, description="the Kafka door goes on reading while its output is acknowledged, and commits at "
                         "most this long after a batch (or when its input pauses); 0 = wait and commit "
                         "after every batch"
    )
    rate_limit: RateLimit | None = Field(
        None, description="requests per client to POST /v1/events and /v1/labels (e.g. '100/second'; 429 with "
                          "Retry-After beyond it, per process); unset = no limit"
    )
    _allowed: tuple | None = PrivateAttr(None)

    @property
    def allowed_set(self) -> frozenset[str] | None:
        """`allowed_fields` as a set, built once (checked for every field of every event)."""
        if self.allowed_fields is None:
            return None
        if self._allowed is None or self._allowed[0] is not self.allowed_fields:
            self._allowed = (self.allowed_fields, frozenset(self.allowed_fields))
        return self._allowed[1]


class FeatureSettings(BaseModel):
    set: str = Field("default", description="'default', 'raw' or a path to a features TOML/YAML")
    snapshot_ttl_s: int = Field(7 * 24 * 3600, description="how long an event's vector waits for its label")
    entity_ttl_s: int = Field(
        30 * 24 * 3600, description="an entity's state is forgotten after this long without events (0 = never)"
    )
    max_feature_names: int = Field(
        4096, description="distinct event field names one model may ever see; events with more go to the DLQ"
    )
    max_entity_fields: int = Field(
        1024, description="distinct event field names one entity's state may track; events with more go to the DLQ"
    )
    max_categories: int = Field(
        1000, description="distinct text values one field may take for one model; events with more go to the DLQ"
    )
    batch_size: int = Field(1000, description="most messages read and handled as one batch")
    commit_interval_s: float = Field(
        0.1, description="reads on while its output is acknowledged, and commits at most this long after a "
                         "batch (or when its input pauses); 0 = wait and commit after every batch"
    )
    max_reorder_wait_ms: int = Field(
        200, description="how long an event may wait for labels with earlier timestamps (less once none is on "
                         "its way through ingestion)"
    )
    keyed_hold_ms: int = Field(
        30_000, description="with aggregates keyed by another field (a merchant): how long an event waits at "
                            "its key's stage for a source that has stopped moving (its worker gone) before it "
                            "goes without it, its key aggregates then stale (docs/features.md)"
    )
    cache_entities: int = Field(
        100_000, description="entities (and, per key field, key entities) a features worker keeps decoded in memory "
                             "between batches: it is their only writer; the others are read from Redis when needed"
    )


class LearnerSettings(BaseModel):
    model: str = Field(DEFAULT_MODEL, description="the river model: a safely parsed expression of river classes, literal arguments and |")
    model_name: str = Field("default", description="one active learner per model name")
    max_classes: int = Field(1000, description="distinct labels a classifier may learn; a label that would be "
                                               "one more goes to the DLQ (every class costs memory in every leaf)")
    # Mostly time-driven, as Flink's and Kafka Streams' commits are: a checkpoint flushes the
    # producer and pickles what is held, so one every 1,000 labels cost ~10% of the learner at
    # thousands of labels/s. The count bounds the work a restart replays at higher rates.
    checkpoint_every: int = Field(20_000, description="labels between checkpoints (at most)")
    checkpoint_interval_s: float = Field(5.0, description="seconds between checkpoints while learning")
    update_every: int = Field(50_000, description="labels between snapshots for serving (model.updates), at most")
    update_interval_s: float = Field(10.0, description="seconds between snapshots for serving while learning: where "
                                     "a prediction worker starts or catches up from (freshness comes from the "
                                     "outcomes it learns, docs/serving.md)")
    update_max_share: float = Field(0.05, description="snapshots never take more than this share of the learner's "
                                    "time (a slow-to-pickle model is saved less often)")
    label_grace_s: float = Field(
        30.0, description="how long a label waits for its event's vector before it is dead-lettered"
    )
    window: int = Field(1000, description="examples per prequential accuracy window")
    label_idle_s: float = Field(
        3.0, description="a labels.valid partition with no new label for this long stops holding events back"
    )
    max_held_events: int = Field(
        20_000, description="events waiting for older labels before the features partitions running ahead are paused"
    )
    max_waiting_labels: int = Field(
        20_000, description="labels waiting for their events before the labels.valid partitions running ahead are paused"
    )
    keep_versions: int = Field(
        20, ge=1, description="registry retention: the artifacts of the newest N versions are kept, beside those "
                              "a role or a shadowing champion needs, or what rollbacks from them go back to; older ones "
                              "are deleted (their lineage stays)")
    keep_records: int = Field(
        1000, ge=1, description="registry retention of lineage records: beyond the newest N, the records of versions "
                                "whose artifacts were deleted (keep_versions) and that no role or line of "
                                "promotions needs are deleted too, with their retrain requests' index entries")
    lease_ttl_s: float = Field(5.0, description="a standby takes over this long after the active learner dies")
    warm_start: int = Field(2000, description="challenger warm-up on the last W labelled examples (0 = fresh)")
    promotion_rule: Literal["mcnemar", "margin"] = Field(
        "mcnemar", description="mcnemar: an anytime-valid sequential test on the examples where the two disagree, "
                               "plus the margin; margin: the accuracy lead alone"
    )
    promote_after: int = Field(100, description="shared examples, answered by both at event time, before a "
                                                "challenger may be promoted")
    promote_window: int = Field(500, description="the margin is measured over the last K shared examples")
    promote_margin: float = Field(0.01, description="accuracy the challenger must lead by (regressors: relative MAE)")
    promote_confidence: float = Field(0.99, description="mcnemar: the evidence a promotion needs is "
                                                        "1 / (1 - confidence) (a likelihood ratio)")
    max_shadow: int = Field(5000, description="a challenger that has not won after this many shared examples is "
                                              "dropped; a displaced champion shadows this long for its way back")
    keep_baseline: bool = Field(True, description="the model the loop started from (never retrained) keeps learning "
                                                  "and shadowing for good once displaced, and comes back whenever it "
                                                  "wins its contest: the loop is held to never retraining (costs one "
                                                  "more model's learning per label after the first promotion)")
    max_ensemble: int = Field(100, description="largest n_models (or list of models) a model spec may ask for")


class DriftSettings(BaseModel):
    detector: DriftDetectorName = Field("ADWIN", description="river detector on the champion's errors: "
                                                           + ", ".join(DRIFT_DETECTORS))
    detector_params: dict[str, float] = Field(default_factory=dict, description="the detector's arguments (JSON object), e.g. {\"delta\": 0.001}")
    cooldown: int = Field(1000, description="labelled examples between two retrain requests")
    min_error_increase: float = Field(
        0.02, description="a concept drift counts only if the error rate rose by at least this"
    )
    data_drift: bool = Field(True, description="watch the features' distributions (PSI per feature) and publish data drift events")
    data_drift_retrains: bool = Field(False, description="whether data drift alone asks for a challenger")
    data_drift_sample: int = Field(10, description="one scored event in N feeds the data-drift monitor")
    data_drift_window: int = Field(1000, description="values per feature in the reference and the recent window")
    data_drift_psi: float = Field(0.25, description="PSI between reference and recent window that counts as data drift")
    data_drift_ignore: list[str] = Field(
        default_factory=lambda: ["_count", "_since_last"],
        description="features (fnmatch patterns) left out of data drift: counters and time-since move by construction",
    )
    on_schedule_s: float = Field(0.0, description="retrain every T seconds (0 = off)")
    on_new_data: int = Field(0, description="retrain every N labels (0 = off)")
    on_accuracy_below: float = Field(0.0, description="retrain when rolling accuracy drops under this (0 = off)")
    accuracy_window: int = Field(500, description="labels of the rolling accuracy the performance trigger watches")


class PredictionSettings(BaseModel):
    max_batch: int = Field(1000, description="rows a /v1/predict/batch request may carry")
    max_body_bytes: int = Field(1024 * 1024, description="largest request body of the prediction service (413 beyond)")
    log_queue: int = Field(100_000, description="predictions waiting for Kafka before they are counted as lost")
    log_timeout_ms: int = Field(10_000, description="a prediction Kafka has not taken by then is dropped (counted)")
    workers: int = Field(1, description="uvicorn worker processes of the prediction service")
    canary_share: float = Field(0.0, ge=0.0, le=1.0, description="share of /v1/predict routed to the challenger "
                                "(sticky by entity id); the admin route POST /v1/canary changes it at run time")
    canary_min_labels: int = Field(200, description="served labels per arm before the canary is judged")
    canary_window: int = Field(1000, description="served labels per arm the canary is judged on (the last N)")
    canary_max_error_increase: float = Field(
        0.05, description="a canary whose served error rate is worse than the champion's by more is rolled back")
    rate_limit: RateLimit | None = Field(
        None, description="requests per client to POST /v1/predict and /v1/predict/batch (e.g. '1000/second'; 429 "
                          "with Retry-After beyond it, per worker process); unset = no limit"
    )
    catch_up_from_snapshots: bool = Field(
        True, description="a worker further behind the learner than loading its newer snapshot costs loads it; "
                          "false: it always learns the examples in between (docs/serving.md)")


class OfflineSettings(BaseModel):
    dir: Path | None = Field(None, description="the offline store's Parquet files (default: <home>/offline)")
    flush_rows: int = Field(5000, description="outcomes per written batch of files")
    flush_interval_s: float = Field(10.0, description="a batch is written at least this often while outcomes come")


class Settings(BaseSettings):
    """Everything driftline can be told. `driftline infra status` prints what is in force."""

    model_config = SettingsConfigDict(
        env_prefix="DRIFTLINE_",
        env_nested_delimiter="__",
        toml_file=os.environ.get("DRIFTLINE_CONFIG", "driftline.toml"),
        extra="ignore",
        hide_input_in_errors=True,  # a refused value may be a password: errors name the field only
    )

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="one Redis node (redis:// or rediss://), or a Redis Cluster: "
                    "redis+cluster://[:password@]host:port[,host:port...] (rediss+cluster:// over TLS); "
                    "see docs/scaling.md",
    )
    namespace: str = Field(
        "", description="prefix for topics, consumer groups and Redis keys (several pipelines on one broker)"
    )
    home: Path = Field(Path(".driftline"), description="local state: broker and Redis data, logs, pids")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "driftline", description="downloaded broker jars, shared by every clone"
    )
    host: str = Field("127.0.0.1", description="where the services listen (0.0.0.0 in containers)")
    prometheus_port: int = Field(9090, description="`driftline infra up --with-prometheus` listens here (on host)")
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin routes; unset or empty = those routes are closed (403)"
    )
    model_key: SecretStr = Field(
        SecretStr(""), description=f"HMAC key that signs model artifacts: at least {MIN_KEY_BYTES} bytes, never published"
    )
    kafka_fetch_batch_ms: int = Field(
        0, ge=0, le=500,
        description="0 = the hot path's consumers (ingestion, features, learner) fetch as soon as a record is "
                    "there; N = the broker holds each of their fetches until 64 KiB or N ms: fewer, larger "
                    "batches under steady live traffic for more empty fetches when idle (docs/operations.md)",
    )
    service_nice: int = Field(
        10, ge=0, le=19,
        description="CPU priority of the services off the critical path (ingestion, features, drift, the offline "
                    "sink) below the learner's and the prediction service's, as Unix nice (and, for a service "
                    "`serve all` started, its Linux autogroup's): on a shared host behind a backlog the learner, "
                    "which learns in stream order on one core, gets the CPU first; 0 turns it off (docs/operations.md)",
    )
    kafka_linger_ms: int = Field(
        5, ge=0, le=1000,
        description="how long driftline's producers wait to fill a batch (librdkafka linger.ms): each hop of an "
                    "event through the services may wait this long at live rates; 0 sends at once, for more "
                    "and smaller produce requests (docs/operations.md)",
    )
    kafka_compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = Field(
        "lz4",
        description="compression of the batches driftline's producers write (librdkafka compression.type): "
                    "some CPU in every producer, consumer and the broker for less network and disk; on one "
                    "host, alternating serve all replays with lz4 and none did not tell them apart",
    )
    kafka_stream_partitions: int = Field(
        6, ge=1, le=1000,
        description="partitions of each stream topic (events, labels, their .valid, features, predictions) that "
                    "driftline creates: at most this many replicas of ingestion or features share a stream. Fewer "
                    "cost the broker fewer requests and the learner fewer label partitions to wait for at live "
                    "rates (docs/operations.md). Topics that exist keep theirs",
    )
    kafka_security: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka properties for every Kafka client: security.protocol, sasl.*, ssl.* (JSON object)",
    )
    ingest_tokens: TokenList = Field(
        None, description='bearer tokens of POST /v1/events and /v1/labels: a JSON list of tokens or of {"name", '
                          '"token"} objects (and an optional "rate_limit"); unset = open to any caller')
    predict_tokens: TokenList = Field(
        None, description="bearer tokens of POST /v1/predict and /v1/predict/batch, as ingest_tokens; unset = open "
                          "to any caller")
    audit_log: Path | None = Field(
        None, description="also append every admin request's audit record here (one JSON object a line)")
    # Docker's secrets convention: a secret read from a file (e.g. /run/secrets/...) instead of the environment.
    model_key_file: Path | None = Field(None, description="read DRIFTLINE_MODEL_KEY from this file")
    admin_token_file: Path | None = Field(None, description="read DRIFTLINE_ADMIN_TOKEN from this file")
    ingest_tokens_file: Path | None = Field(None, description="read DRIFTLINE_INGEST_TOKENS from this file")
    predict_tokens_file: Path | None = Field(None, description="read DRIFTLINE_PREDICT_TOKENS from this file")
    redis_url_file: Path | None = Field(None, description="read DRIFTLINE_REDIS_URL (with its password) from this file")
    kafka_security_file: Path | None = Field(None, description="read DRIFTLINE_KAFKA_SECURITY from this file")
    log_level: str = Field("INFO", description="log level of every service")
    schema_registry_url: str | None = Field(
        None, description="a Confluent-compatible Schema Registry REST API (user:password@ in the URL for basic "
                          "auth): events and labels then also accept the Confluent wire format; unset = single-object only")
    schema_registry_output: list[Literal["predictions", "outcomes"]] = Field(
        default_factory=list, description="output topics written in the Confluent wire format (the registry's ids) "
                                          "instead of single-object encoding; needs schema_registry_url")

    ports: Ports = Ports()
    ingestion: IngestionSettings = IngestionSettings()
    features: FeatureSettings = FeatureSettings()
    learner: LearnerSettings = LearnerSettings()
    drift: DriftSettings = DriftSettings()
    prediction: PredictionSettings = PredictionSettings()
    offline: OfflineSettings = OfflineSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: object) -> object:
        """`<secret>_file`: the secret is that file's text (without its final newline)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in SECRET_FILES:
            path = data.get(f"{name}_file")
            if not path:
                continue
            variable = f"DRIFTLINE_{name.upper()}"
            if data.get(name) is not None:
                raise ValueError(f"{variable} and {variable}_FILE are both set: give one of them")
            try:
                text = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{variable}_FILE: cannot read {path}: {exc.strerror}") from None
            try:
                data[name] = json.loads(text) if name == "kafka_security" else text
            except ValueError:
                raise ValueError(f"{variable}_FILE: {path} does not hold a JSON object") from None
        return data

    @field_validator("admin_token")
    @classmethod
    def _admin_list(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().lstrip().startswith("["):
            admin_holders(value)  # a malformed list stops here, as a malformed door list does
        return value

    @field_validator("kafka_security")
    @classmethod
    def _only_security_properties(cls, value: dict[str, str]) -> dict[str, str]:
        # Only the connection's security: the delivery guarantees (acks, idempotence, commits)
        # are driftline's and must not be overridden from the environment.
        wrong = [k for k in value if k != "security.protocol" and not k.startswith(KAFKA_SECURITY_PREFIXES)]
        if wrong:
            raise ValueError(f"not a security property: {', '.join(sorted(wrong))} "
                             "(allowed: security.protocol, sasl.*, ssl.*)")
        return {k: str(v) for k, v in value.items()}

    @model_validator(mode="after")
    def _output_framing_needs_a_registry(self) -> "Settings":
        if self.schema_registry_output and not self.schema_registry_url:
            raise ValueError("schema_registry_output names topics to write in the Confluent wire format: "
                             "that needs schema_registry_url (DRIFTLINE_SCHEMA_REGISTRY_URL)")
        return self

    @model_validator(mode="after")
    def _local_secrets(self) -> "Settings":
        """The zero-config path: a key and token generated into the home by `ensure_local_secrets`
        stand in for the ones not given explicitly (by argument, environment or driftline.toml)."""
        if "model_key" in self.model_fields_set and "admin_token" in self.model_fields_set:
            return self
        path = self.home / LOCAL_SECRETS
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return self
        if "model_key" not in self.model_fields_set and stored.get("model_key"):
            self.model_key = SecretStr(stored["model_key"])
        if "admin_token" not in self.model_fields_set and stored.get("admin_token"):
            self.admin_token = SecretStr(stored["admin_token"])
        return self

    @property
    def admin_holders(self) -> list[ClientToken]:
        """Who holds an admin token: `admin` alone, or the names of a list (empty: admin routes closed)."""
        return admin_holders(self.admin_token)

    @property
    def signing_key(self) -> bytes:
        return self.model_key.get_secret_value().encode()

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def redis_host_port(self) -> tuple[str, int]:
        """The Redis node (a cluster's first seed node) the URL names."""
        from .redis_clients import parse

        return parse(self.redis_url).host_port

    def port_of(self, service: str) -> int:
        return getattr(self.ports, service)


def admin_holders(token: SecretStr | None) -> list[ClientToken]:
    """DRIFTLINE_ADMIN_TOKEN's holders: one token (named `admin`), or a JSON list like the door
    tokens' that names each operator (the audit then says who).

        >>> [h.name for h in admin_holders(SecretStr('[{"name": "alice", "token": "t1"}, {"name": "bob", "token": "t2"}]'))]
        ['alice', 'bob']
        >>> [h.name for h in admin_holders(SecretStr("t0"))], admin_holders(SecretStr(""))
        (['admin'], [])
    """
    value = token.get_secret_value() if token is not None else ""
    if not value:
        return []
    if not value.lstrip().startswith("["):
        return [ClientToken(name="admin", token=SecretStr(value))]
    from pydantic import TypeAdapter

    return TypeAdapter(TokenList, config=ConfigDict(hide_input_in_errors=True)).validate_python(value) or []


class InsecureSettings(ValueError):
    """Settings a service must not start with; the message names the variable to set."""


def check_model_key(settings: Settings) -> None:
    """Refuse an empty, short or published model key: whoever knows the key can forge a model
    artifact, and loading one is code execution."""
    key = settings.signing_key
    if not key:
        problem = "is not set"
    elif settings.model_key.get_secret_value() in PUBLISHED_KEYS:
        problem = "is the published development key"
    elif len(key) < MIN_KEY_BYTES:
        problem = f"is {len(key)} bytes, shorter than {MIN_KEY_BYTES}"
    else:
        return
    raise InsecureSettings(
        f"DRIFTLINE_MODEL_KEY {problem}: it signs the model artifacts, so it must be a secret of at least "
        f"{MIN_KEY_BYTES} bytes (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`); "
        "`driftline infra up` generates one into the local home for development")


MIN_TOKEN_CHARS = 24
MIN_TOKEN_DISTINCT = 6  # 24 random characters of any alphabet have (far) more: fewer is a pattern
# RFC 6750's b64token: what an `Authorization: Bearer` header carries as it is
BEARER_CHARS = re.compile(r"[A-Za-z0-9._~+/-]+=*")
TOKEN_HINT = "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"


def token_weakness(token: str) -> str | None:
    """Why a bearer token will not do, or None.

        >>> token_weakness("0123456789abcdefghijklmnop") is None
        True
        >>> token_weakness("s3cret"), token_weakness("a" * 30)
        ('is too short (6 of at least 24 characters)', 'is too regular to be random (6 different characters at least)')
    """
    if not BEARER_CHARS.fullmatch(token):
        return "has characters a bearer token cannot carry (letters, digits and -._~+/ then = only)"
    if len(token) < MIN_TOKEN_CHARS:
        return f"is too short ({len(token)} of at least {MIN_TOKEN_CHARS} characters)"
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        return f"is too regular to be random ({MIN_TOKEN_DISTINCT} different characters at least)"
    return None


def token_lists(settings: Settings) -> dict[str, list[ClientToken] | None]:
    """Every configured list of bearer tokens by its variable; None = that door is open."""
    return {"DRIFTLINE_ADMIN_TOKEN": settings.admin_holders, "DRIFTLINE_INGEST_TOKENS": settings.ingest_tokens,
            "DRIFTLINE_PREDICT_TOKENS": settings.predict_tokens}


def tokens_problem(settings: Settings, variable: str) -> str | None:
    """What is wrong with one list of tokens (`token_lists`' variable), or None. Refused: an empty
    door list (a door nobody can open, or a typo for an open one), a token too short or too regular
    to be secret, one token for two holders, a client holding an admin token, one name with two
    different rate limits. The answer names holders, never a token."""
    lists = token_lists(settings)
    holders = lists[variable]
    if holders is None:
        return None
    if not holders and variable != "DRIFTLINE_ADMIN_TOKEN":  # an empty admin token closes the admin routes
        return f"{variable} lists no token: unset it to leave the door open, or list the clients' tokens"
    admin = {h.token.get_secret_value() for h in lists["DRIFTLINE_ADMIN_TOKEN"]}
    owners: dict[str, str] = {}
    limits: dict[str, str | None] = {}
    for holder in holders:
        token = holder.token.get_secret_value()
        weakness = token_weakness(token)
        if weakness:
            return f"{variable}: the token of {holder.name!r} {weakness}; {TOKEN_HINT}"
        if token in owners:
            return f"{variable}: {owners[token]!r} and {holder.name!r} hold the same token"
        if token in admin and variable != "DRIFTLINE_ADMIN_TOKEN":
            return f"{variable}: {holder.name!r} holds an admin token; give clients tokens of their own"
        if limits.setdefault(holder.name, holder.rate_limit) != holder.rate_limit:
            return f"{variable}: {holder.name!r} is listed twice with different rate limits"
        owners[token] = holder.name
    return None


def check_tokens(settings: Settings) -> None:
    for variable in token_lists(settings):
        problem = tokens_problem(settings, variable)
        if problem:
            raise InsecureSettings(problem)


def check_secrets(settings: Settings) -> None:
    """What a service checks before it listens: the model key and every token."""
    check_model_key(settings)
    check_tokens(settings)


def env_names(model: type[BaseModel] = Settings, prefix: str = "DRIFTLINE_") -> set[str] | None:
    """Every DRIFTLINE_* name the settings read (upper case). A name under a dict-valued setting
    may go on (`DRIFTLINE_DRIFT__DETECTOR_PARAMS__DELTA`): those are matched by prefix."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        names.add(env)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= env_names(annotation, env + "__")
        elif getattr(annotation, "__origin__", None) is dict:
            names.add(env + "__*")
    return names


def unknown_env_names(environ: dict[str, str] | None = None) -> list[str]:
    """DRIFTLINE_* variables that no setting reads (a typo would otherwise be silently ignored)."""
    environ = os.environ if environ is None else environ
    known = env_names() | EXTRA_ENV_NAMES
    prefixes = tuple(n[:-1] for n in known if n.endswith("__*"))
    return sorted(name for name in environ if name.upper().startswith("DRIFTLINE_")
                  and name.upper() not in known and not name.upper().startswith(prefixes))


def check_env_names(environ: dict[str, str] | None = None) -> None:
    unknown = unknown_env_names(environ)
    if unknown:
        raise InsecureSettings(f"unknown setting{'s' if len(unknown) > 1 else ''} in the environment: "
                               f"{', '.join(unknown)} (`driftline infra status` lists every DRIFTLINE_* name)")


def ensure_local_secrets(settings: Settings) -> Settings:
    """The zero-config path (`make demo`, `driftline infra up`), like Jupyter's token: a random model
    key and admin token written once to `<home>/secrets.json` (mode 0600) and used from then on by
    every command run with this home. Keys given explicitly win; returns the settings to use."""
    path = settings.home / LOCAL_SECRETS
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole to a private temporary file, then linked into place: a concurrent first
        # run reads either nothing or the complete file, and only one of them wins.
        tmp = path.with_name(f".{LOCAL_SECRETS}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"model_key": secrets.token_urlsafe(48), "admin_token": secrets.token_urlsafe(32)}, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    stored = json.loads(path.read_text())
    update = {}
    if not settings.model_key.get_secret_value():
        update["model_key"] = SecretStr(stored["model_key"])
    if settings.admin_token is None:
        update["admin_token"] = SecretStr(stored["admin_token"])
    return settings.model_copy(update=update) if update else settings


def redact_url(url: str) -> str:
    """A URL with its password (if any) replaced by ***."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


SECRET_WORDS = ("password", "secret", "key", "token")


def settings_view(settings: Settings) -> dict:
    """The settings as JSON-able data with every secret redacted: what may be printed or logged."""
    data = settings.model_dump(mode="json")
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    data["admin_token"] = "(set)" if token else "(not set: admin routes closed)"
    try:
        check_model_key(settings)
        data["model_key"] = "(set)"
    except InsecureSettings as exc:
        data["model_key"] = f"(refused: {str(exc).split(':')[0]})"
    data["redis_url"] = redact_url(settings.redis_url)
    data["schema_registry_url"] = settings.schema_registry_url and redact_url(settings.schema_registry_url)
    data["kafka_security"] = {k: ("***" if any(w in k for w in SECRET_WORDS) else v)
                              for k, v in settings.kafka_security.items()}
    if settings.admin_token is not None and settings.admin_token.get_secret_value().lstrip().startswith("["):
        data["admin_token"] = "(set: " + ", ".join(h.name for h in settings.admin_holders) + ")"
    for name in ("ingest_tokens", "predict_tokens"):
        holders = getattr(settings, name)
        data[name] = ("(not set: open to any caller)" if holders is None else
                      f"({len(holders)} tokens: " + ", ".join(dict.fromkeys(h.name for h in holders)) + ")")
    for variable in token_lists(settings):
        problem = tokens_problem(settings, variable)
        if problem:
            data[variable.removeprefix("DRIFTLINE_").lower()] = f"(refused: {problem})"
    return data


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; an unknown DRIFTLINE_* name is an error."""
    check_env_names()
    return Settings()


def settings_env(settings: Settings) -> dict[str, str]:
    """The DRIFTLINE_* environment that reproduces `settings` in a child process."""
    env: dict[str, str] = {}

    def put(prefix: str, data: dict) -> None:
        for key, value in data.items():
            name = f"{prefix}{key.upper()}"
            if isinstance(value, dict) and key not in ("detector_params", "kafka_security"):
                put(name + "__", value)
            elif value is None:
                continue
            elif isinstance(value, (dict, list)):
                import json

                env[name] = json.dumps(value)
            else:
                env[name] = str(value)

    data = settings.model_dump()
    data["admin_token"] = settings.admin_token.get_secret_value() if settings.admin_token else None
    data["model_key"] = settings.model_key.get_secret_value()
    for name in ("ingest_tokens", "predict_tokens"):
        holders = getattr(settings, name)
        data[name] = None if holders is None else [
            {"name": h.name, "token": h.token.get_secret_value(), **({"rate_limit": h.rate_limit} if h.rate_limit else {})}
            for h in holders]
    for name in SECRET_FILES:  # read from a file: the child reads the same file
        if data.get(f"{name}_file"):
            data[name] = None
    put("DRIFTLINE_", data)
    return env
