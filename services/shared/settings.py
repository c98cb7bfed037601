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

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .vocabulary import DRIFT_DETECTORS

DEFAULT_MODEL = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"
DriftDetectorName = Literal[tuple(DRIFT_DETECTORS)]  # type: ignore[valid-type]


class Ports(BaseModel):
    """HTTP port of each service (GET /health and /metrics on every one)."""

    prediction: int = 8000
    ingestion: int = 8001
    features: int = 8002
    learner: int = 8003
    drift: int = 8004
    offline: int = 8005  # the offline store's sink (health and metrics only)


class IngestionSettings(BaseModel):
    max_event_bytes: int = Field(64 * 1024, description="larger Avro payloads go to the DLQ")
    max_fields: int = Field(512, description="more fields than this is an invalid event")
    max_id_chars: int = Field(256, description="longer event ids, entity ids, field names or labels are invalid")
    max_dead_letter_bytes: int = Field(
        512 * 1024, description="a dead letter keeps at most this much of the original payload (the rest is cut)"
    )
    max_http_body_bytes: int = Field(4 * 1024 * 1024, description="larger HTTP bodies get 413")
    max_http_items: int = Field(10_000, description="largest JSON array accepted by POST")
    dedup_ttl_s: int = Field(24 * 3600, description="how long an event_id is remembered")
    max_clock_skew_s: float = Field(24 * 3600, description="events further in the future are invalid")
    min_ts: float = Field(0.0, description="events before this epoch second are invalid")
    batch_size: int = 1000


class FeatureSettings(BaseModel):
    set: str = Field("default", description="'default', 'raw' or a path to a features TOML/YAML")
    snapshot_ttl_s: int = Field(7 * 24 * 3600, description="how long an event's vector waits for its label")
    batch_size: int = 1000
    max_reorder_wait_ms: int = Field(
        200, description="how long an event may wait for labels with earlier timestamps"
    )


class LearnerSettings(BaseModel):
    model: str = DEFAULT_MODEL
    model_name: str = Field("default", description="one active learner per model name")
    checkpoint_every: int = Field(1000, description="labels between checkpoints")
    checkpoint_interval_s: float = 5.0
    update_every: int = Field(1000, description="labels between model.updates to serving")
    update_interval_s: float = 2.0
    label_grace_s: float = Field(
        30.0, description="how long a label waits for its event's vector before it is dead-lettered"
    )
    window: int = Field(1000, description="examples per prequential accuracy window")
    label_idle_s: float = Field(
        3.0, description="a labels.valid partition with no new label for this long stops holding events back"
    )
    lease_ttl_s: float = Field(5.0, description="a standby takes over this long after the active learner dies")
    warm_start: int = Field(2000, description="challenger warm-up on the last W labelled examples (0 = fresh)")
    promotion_rule: Literal["mcnemar", "margin"] = Field(
        "mcnemar", description="mcnemar: exact test on the examples where the two disagree; margin: accuracy lead alone"
    )
    promote_after: int = Field(200, description="shared examples before a challenger may be promoted")
    promote_window: int = Field(500, description="the contest compares the last K shared examples")
    promote_margin: float = Field(0.01, description="accuracy the challenger must win by")
    promote_confidence: float = Field(0.99, description="mcnemar: one-sided confidence that the challenger is better")
    max_shadow: int = Field(5000, description="a challenger that has not won after this many is dropped")


class DriftSettings(BaseModel):
    detector: DriftDetectorName = "ADWIN"
    detector_params: dict[str, float] = Field(default_factory=dict)
    cooldown: int = Field(1000, description="labelled examples between two retrain requests")
    min_error_increase: float = Field(
        0.02, description="a concept drift counts only if the error rate rose by at least this"
    )
    data_drift: bool = True
    data_drift_retrains: bool = False
    data_drift_sample: int = Field(10, description="look at one features message in N (the topic is the firehose)")
    data_drift_window: int = Field(1000, description="values per feature in the reference and the recent window")
    data_drift_psi: float = Field(0.25, description="PSI between reference and recent window that counts as data drift")
    data_drift_ignore: list[str] = Field(
        default_factory=lambda: ["_count", "_since_last"],
        description="features (fnmatch patterns) left out of data drift: counters and time-since move by construction",
    )
    on_schedule_s: float = Field(0.0, description="retrain every T seconds (0 = off)")
    on_new_data: int = Field(0, description="retrain every N labels (0 = off)")
    on_accuracy_below: float = Field(0.0, description="retrain when rolling accuracy drops under this (0 = off)")
    accuracy_window: int = 500


class PredictionSettings(BaseModel):
    max_batch: int = 1000
    max_body_bytes: int = 1024 * 1024
    log_queue: int = Field(100_000, description="predictions waiting for Kafka before they are counted as lost")
    log_timeout_ms: int = Field(10_000, description="a prediction Kafka has not taken by then is dropped (counted)")
    workers: int = 1
    canary_share: float = Field(0.0, ge=0.0, le=1.0, description="share of /v1/predict routed to the challenger "
                                "(sticky by entity id); the admin route POST /v1/canary changes it at run time")
    canary_min_labels: int = Field(200, description="served labels per arm before the canary is judged")
    canary_window: int = Field(1000, description="served labels per arm the canary is judged on (the last N)")
    canary_max_error_increase: float = Field(
        0.05, description="a canary whose served error rate is worse than the champion's by more is rolled back")


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
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field(
        "", description="prefix for topics, consumer groups and Redis keys (several pipelines on one broker)"
    )
    home: Path = Field(Path(".driftline"), description="local state: broker and Redis data, logs, pids")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "driftline", description="downloaded broker jars, shared by every clone"
    )
    host: str = "127.0.0.1"
    prometheus_port: int = Field(9090, description="`driftline infra up --with-prometheus` listens here (on host)")
    admin_token: SecretStr | None = None
    model_key: SecretStr = SecretStr("driftline-dev-key-change-me")
    log_level: str = "INFO"

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

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka_bootstrap.split(",")[0].rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def redis_host_port(self) -> tuple[str, int]:
        url = urlparse(self.redis_url)
        return url.hostname or "127.0.0.1", url.port or 6379

    def port_of(self, service: str) -> int:
        return getattr(self.ports, service)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def settings_env(settings: Settings) -> dict[str, str]:
    """The DRIFTLINE_* environment that reproduces `settings` in a child process."""
    env: dict[str, str] = {}

    def put(prefix: str, data: dict) -> None:
        for key, value in data.items():
            name = f"{prefix}{key.upper()}"
            if isinstance(value, dict) and key != "detector_params":
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
    put("DRIFTLINE_", data)
    return env
