"""driftline and a Confluent-compatible schema registry (`schema_registry_url`): the writer schema of
a Confluent-framed message, looked up by its id, and driftline's own schemas, registered.

    registry = SchemaRegistry("http://127.0.0.1:8081/apis/ccompat/v7")
    registry.decode(blob, expect="Event")       # either framing, in the current Event's shape
    registry.register(Topics(""))               # {"events": 1, "labels": 2, ...}, compatibility BACKWARD

The REST calls are confluent-kafka's `SchemaRegistryClient`. A writer schema is fetched once per id
and kept (up to 1,024 ids; the 404 of an id no registry knows is kept a minute), so the hot path
costs a dict lookup: a writer whose parsing canonical form is a version driftline ships is that
version (its bytes pass on as they are), any other is resolved to the current schema by Avro's
rules (`schemas.incompatibility` says whether it can be; `AvroCodec.read` does it).

What goes wrong is one of two kinds, never mixed up:
- the message: an id the registry does not know, a schema of another record, or one the current
  schema cannot read -> `DecodeError` (unknown_schema / wrong_schema / incompatible_schema), for
  the DLQ with its reason;
- the registry: down, timing out, 5xx, refusing our credentials -> `RegistryUnavailable`: the
  message must wait and be read again, never be dead-lettered for that. After a failure the
  registry is not asked again before a backoff (0.1 s doubling to 2 s) has passed, so a batch of
  such messages costs one request, not one each; `DEPS` shows it away meanwhile (/ready is 503).
"""

from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from typing import Any

import fastavro
from cachetools import TTLCache

from . import framing
from .codec import AvroCodec, DecodeError, RecordType, get_codec
from .deps import DEPS, OUTAGE_WAIT_S, backoff_delays
from .schemas import fingerprint_of, incompatibility
from .settings import Settings, redact_url
from .topics import SPEC_BY_NAME, Topics

log = logging.getLogger(__name__)

DEPENDENCY = "schema_registry"  # its name in DEPS, /health and /ready
COMPATIBILITY = "BACKWARD"
# The topics whose `<topic>-value` subject holds driftline's schema: where producers write, and
# the outputs that Confluent-world consumers read.
REGISTERED = ("events", "labels", "predictions", "outcomes")
NOT_FOUND_TTL_S = 60.0


class RegistryUnavailable(RuntimeError):
    """The registry did not answer usefully: the message waits and is read again later."""


class SchemaRegistry:
    def __init__(self, url: str, codec: AvroCodec | None = None, cache_size: int = 1024,
                 timeout_s: float = 5.0) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url
        # One quick retry inside the client; the backoff between outages is ours (no thread sleeps
        # for seconds inside a request while a stop is asked for).
        self.client = SchemaRegistryClient({"url": url, "timeout": timeout_s, "max.retries": 1,
                                            "retries.wait.ms": 100, "retries.max.wait.ms": 500,
                                            "cache.capacity": cache_size})
        self.codec = codec or get_codec()
        # A plain dict, oldest entry dropped past cache_size: its get is the hot path's only cost.
        self.writers: dict[int, RecordType] = {}
        self.cache_size = cache_size
        self.refused: TTLCache[int, DecodeError] = TTLCache(cache_size, NOT_FOUND_TTL_S)
        self.retry_at = 0.0
        self._delays = None
        self._last_error = ""

    # -- reading --------------------------------------------------------------------------------
    def identify(self, blob: bytes) -> RecordType:
        """The writer schema of a message in either framing (DecodeError, RegistryUnavailable)."""
        if framing.framing_of(blob) != "confluent":
            return self.codec.identify(blob)
        try:
            schema_id = framing.confluent_schema_id(blob)
        except ValueError as exc:
            raise DecodeError("not_avro", str(exc)) from None
        return self.writer(schema_id)

    def decode(self, blob: bytes, expect: str | None = None) -> dict[str, Any]:
        """The record in a message of either framing, in the current version of its schema."""
        return self.codec.read(self.identify(blob), blob, expect)

    def as_current(self, blob: bytes) -> bytes | None:
        """A decodable message as single-object bytes of the current version, by swapping its header
        alone; None when its writer is another version (the record must be encoded again)."""
        writer = self.identify(blob)
        if not writer.current:
            return None
        return blob if blob[:1] == b"\xc3" else framing.reframe(blob, self.codec.header(writer.name))

    def writer(self, schema_id: int) -> RecordType:
        """The writer schema registered as `schema_id`, as the codec reads it."""
        found = self.writers.get(schema_id)
        if found is not None:
            return found
        refused = self.refused.get(schema_id)
        if refused is not None:
            raise refused
        return self._fetch(schema_id)

    def _fetch(self, schema_id: int) -> RecordType:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if time.monotonic() < self.retry_at:
            raise RegistryUnavailable(f"schema registry unreachable, retried shortly: {self._last_error}")
        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                self._answered()
                refusal = DecodeError("unknown_schema", f"schema id {schema_id} is not in the schema registry "
                                                        f"({exc.error_message})")
                self.refused[schema_id] = refusal
                raise refusal from None
            raise self._unavailable(exc) from None  # 401/403 (our credentials), 5xx, 429: not the message's fault
        except Exception as exc:  # the client's transport errors (refused, reset, timed out, DNS)
            raise self._unavailable(exc) from None
        self._answered()
        writer = self._writer_of(schema_id, schema.schema_type, schema.schema_str, schema.references)
        self._keep(schema_id, writer)
        return writer

    def _keep(self, schema_id: int, writer: RecordType) -> None:
        if len(self.writers) >= self.cache_size:
            del self.writers[next(iter(self.writers))]
        self.writers[schema_id] = writer

    def _writer_of(self, schema_id: int, schema_type: str | None, text: str | None, references) -> RecordType:
        origin = f"registry schema id {schema_id}"
        if (schema_type or "AVRO").upper() != "AVRO":
            raise self._refuse(schema_id, "wrong_schema", f"{origin} is a {schema_type} schema, not Avro")
        if references:
            raise self._refuse(schema_id, "unknown_schema", f"{origin} refers to other schemas; driftline reads "
                                                            "self-contained Avro schemas only")
        try:
            raw = json.loads(text or "")
            parsed = fastavro.parse_schema(raw)
        except Exception as exc:  # not JSON, or not a schema fastavro accepts
            raise self._refuse(schema_id, "unknown_schema", f"{origin} does not parse as Avro: {exc}") from None
        fp = fingerprint_of(raw)
        known = self.codec.by_fingerprint.get(fp)
        if known is not None:  # a version driftline ships: read (and pass on) exactly as single-object
            return known
        name = raw.get("name", "").rsplit(".", 1)[-1] if isinstance(raw, dict) else ""
        current = self.codec.raw.get(name)
        why = incompatibility(current, raw) if current is not None else None
        return RecordType(name or f"<{raw.get('type') if isinstance(raw, dict) else raw}>", 0, parsed, fp,
                          False, why, origin)

    def _refuse(self, schema_id: int, reason: str, detail: str) -> DecodeError:
        refusal = DecodeError(reason, detail)
        self.refused[schema_id] = refusal
        return refusal

    def _answered(self) -> None:
        self._delays = None
        self.retry_at = 0.0
        DEPS.up(DEPENDENCY)

    def _unavailable(self, exc: BaseException) -> RegistryUnavailable:
        if self._delays is None:
            self._delays = backoff_delays()
        self.retry_at = time.monotonic() + next(self._delays)
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        DEPS.down(DEPENDENCY, f"{redact_url(self.url)}: {self._last_error}")
        return RegistryUnavailable(f"schema registry {redact_url(self.url)} did not answer: {self._last_error}")

    # -- registering driftline's own schemas ------------------------------------------------------
    def register(self, topics: Topics, bases: tuple[str, ...] = REGISTERED) -> dict[str, int]:
        """Register the current schema of each topic under `<topic>-value`, compatibility BACKWARD;
        the id of each (the registry's existing one when that schema is there already). A subject
        whose latest version (a producer's evolution) refuses driftline's schema is logged, not
        fatal: producers' schemas are read by id all the same."""
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        ids = {}
        for base in bases:
            subject = f"{topics.name(base)}-value"
            record = SPEC_BY_NAME[base].schema
            schema = Schema(json.dumps(self.codec.raw[record]), "AVRO")
            try:
                ids[base] = self.client.register_schema(subject, schema)
                self.client.set_compatibility(subject, COMPATIBILITY)
            except SchemaRegistryError as exc:
                if exc.http_status_code != 409:
                    raise
                log.warning("schema registry: %s refuses driftline's %s (%s); producers' schemas are read by id",
                            subject, record, exc)
                continue
            self._keep(ids[base], self.codec.by_name[record])
        return ids


def registry_for(settings: Settings) -> SchemaRegistry | None:
    """The registry the settings name, or None."""
    return SchemaRegistry(settings.schema_registry_url) if settings.schema_registry_url else None


def prepare_output(settings: Settings, wait_s: float = OUTAGE_WAIT_S) -> None:
    """With `schema_registry_output`: register driftline's schemas, frame those output topics with
    the registry's ids (`framing.OUTPUT`, used by `kafka.produce`) and let this process's codec read
    them back. Waits for a registry that is away (with backoff, up to `wait_s`): a service cannot
    write those topics without their ids. A no-op otherwise, and once per process and settings."""
    if settings.schema_registry_output:
        _prepare(settings.schema_registry_url, settings.namespace, tuple(settings.schema_registry_output), wait_s)


def register_waiting(url: str, topics: Topics, bases: tuple[str, ...] = REGISTERED,
                     wait_s: float = OUTAGE_WAIT_S) -> dict[str, int]:
    """`SchemaRegistry.register`, waiting with backoff for a registry that is not there yet (one
    starting beside driftline) for up to `wait_s`; then RegistryUnavailable."""
    registry = SchemaRegistry(url)
    deadline, delays = time.monotonic() + wait_s, backoff_delays(0.5, 5.0)
    while True:
        try:
            ids = registry.register(topics, bases)
            DEPS.up(DEPENDENCY)
            return ids
        except Exception as exc:
            DEPS.down(DEPENDENCY, f"{redact_url(url)}: {exc}")
            if time.monotonic() >= deadline:
                raise RegistryUnavailable(f"could not register driftline's schemas at {redact_url(url)} "
                                          f"within {wait_s:.0f} s: {exc}") from exc
            time.sleep(next(delays))


@lru_cache(maxsize=16)
def _prepare(url: str, namespace: str, outputs: tuple[str, ...], wait_s: float) -> None:
    topics = Topics(namespace)
    ids = register_waiting(url, topics, tuple(dict.fromkeys(REGISTERED + outputs)), wait_s)
    codec = get_codec()
    for base in outputs:
        if base not in ids:
            raise RuntimeError(f"the schema registry refused driftline's schema for {topics.name(base)}-value: "
                               "its output cannot be framed with a registry id")
        framing.OUTPUT.use(topics.name(base), ids[base])
        codec.learn_confluent_id(ids[base], SPEC_BY_NAME[base].schema)
    log.info("schema registry %s: %s written in the Confluent wire format (ids %s)", redact_url(url),
             ", ".join(outputs), {b: ids[b] for b in outputs})
