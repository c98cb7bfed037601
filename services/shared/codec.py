"""The one Avro codec every service uses.

Each message is Avro single-object encoded exactly as the Avro specification defines it: the two
magic bytes C3 01, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's parsing
canonical form, then the binary body; so Java's `BinaryMessageEncoder`/`BinaryMessageDecoder` and
any other Avro library read and write driftline's topics.

    >>> codec = get_codec()
    >>> blob = codec.encode("Label", {"event_id": "e1", "label": "1", "ts": 0.0})
    >>> blob[:10].hex()        # magic, then Label's fingerprint as the spec orders its bytes
    'c30192bb930573dee98c'
    >>> codec.decode(blob, expect="Label")["label"]
    '1'

Writing always uses the current schema (`schemas/<Name>.avsc`). Reading looks the writer's
fingerprint up among every released version (`schemas/history/<Name>/<n>.avsc`, see `schemas.py`)
and resolves an older version to the current one with Avro's rules (fastavro, given both schemas):
the caller always gets a record of the current shape. A fingerprint that is none of them, a record
of another type, or a version the current one cannot read is refused with a reason code
(`DecodeError.reason`) for the DLQ, never misread.

With a schema registry (`schema_registry.py`), a message may also come in the Confluent wire format
(`framing.py`: 00, a 4-byte schema id, the same body). The codec reads those whose id it was taught
(`learn_confluent_id`: driftline's own schemas, registered at start), so every service reads the
output topics that `schema_registry_output` frames so; a producer's id is the registry reader's to
resolve (`SchemaRegistry.writer`), and `read` decodes any writer the same way.

Schemas are parsed once, at first use. Encoding and decoding, the hot path of every service, run
code generated for each current schema (`avro_codegen.py`: the same bytes, 1.3-4x faster than
fastavro's interpreter), and fastavro's schemaless reader and writer whenever that code does not
answer: older writers, values or bodies off its road, and the errors. On fastavro's road a nullable
map or array field (Outcome's `features`) is written with its branch named (its tuple notation):
otherwise fastavro validates the whole value against each branch to choose one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro

from .avro_codegen import SpecificCodec, Unsupported, compile_record
from .framing import HEADER_LEN, MAGIC, body_start, confluent_schema_id, framing_of
from .schemas import SCHEMAS_DIR, fingerprint_of, incompatibility, load_current, load_history

__all__ = ["SCHEMAS_DIR", "MAGIC", "HEADER_LEN", "DecodeError", "RecordType", "AvroCodec", "get_codec"]

# DecodeError reasons, for DLQs and metrics.
REASONS = ("not_avro", "unknown_schema", "wrong_schema", "incompatible_schema", "corrupt_avro")


class DecodeError(ValueError):
    """A message that is not one of our records. `reason` is a short code for DLQs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def nullable_collections(schema: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(field, "map" | "array") of each top-level field typed ["null", <map|array>]: the fields
    whose non-null value `AvroCodec.encode` names the branch of.

        >>> nullable_collections({"type": "record", "name": "R", "fields": [
        ...     {"name": "a", "type": ["null", {"type": "map", "values": "double"}]},
        ...     {"name": "b", "type": ["null", "string"]},
        ...     {"name": "c", "type": [{"type": "array", "items": "int"}, "null"]}]})
        (('a', 'map'), ('c', 'array'))
    """
    named = []
    for field in schema["fields"]:
        branches = field["type"]
        if isinstance(branches, list) and len(branches) == 2 and "null" in branches:
            other = branches[1] if branches[0] == "null" else branches[0]
            kind = other.get("type") if isinstance(other, dict) else None
            if kind in ("map", "array"):
                named.append((field["name"], kind))
    return tuple(named)


@dataclass(frozen=True)
class RecordType:
    """One version of one record schema: the current one (what we write) or an older writer."""

    name: str
    version: int
    parsed: Any
    fingerprint: bytes  # 8 bytes, exactly as on the wire after C3 01
    current: bool
    incompatible: str | None = None  # why the current version cannot read this one, if it cannot
    origin: str | None = None  # where a writer that is no released version came from ("registry schema id 7")
    named_branches: tuple[tuple[str, str], ...] = ()  # nullable_collections of the schema
    specific: SpecificCodec | None = None  # the current version's generated codec (avro_codegen.py)

    @property
    def described(self) -> str:
        return self.origin or f"version {self.version}"


class AvroCodec:
    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.by_name: dict[str, RecordType] = {}
        self.by_fingerprint: dict[bytes, RecordType] = {}
        self.raw = current = load_current(schemas_dir)  # name -> the current schema's JSON
        history = load_history(schemas_dir)
        for name, raw in current.items():
            fp = fingerprint_of(raw)
            versions = history.get(name, [])
            number = versions[-1].version if versions else 1
            for old in versions:
                old_fp = fingerprint_of(old.raw)
                if old_fp != fp:
                    self.by_fingerprint[old_fp] = RecordType(name, old.version, fastavro.parse_schema(old.raw),
                                                             old_fp, False, incompatibility(raw, old.raw))
            record = RecordType(name, number, fastavro.parse_schema(raw), fp, True,
                                named_branches=nullable_collections(raw), specific=_specific(raw, MAGIC + fp))
            self.by_name[name] = self.by_fingerprint[fp] = record
        # What driftline wrote before the fingerprint fix: its 8 bytes reversed. Named in the
        # refusal so an operator recognises old data (see README, "Upgrading").
        self._pre_fix = {fp[::-1]: r.name for fp, r in self.by_fingerprint.items()}
        self._current = frozenset(r.fingerprint for r in self.by_name.values())
        self.by_confluent_id: dict[int, RecordType] = {}

    def learn_confluent_id(self, schema_id: int, record_name: str) -> None:
        """Read Confluent-framed messages with `schema_id` as the current `record_name` (the id a
        registry gave driftline's own schema)."""
        self.by_confluent_id[schema_id] = self.by_name[record_name]

    def encode(self, record_name: str, value: dict[str, Any]) -> bytes:
        record = self.by_name[record_name]
        if record.specific is not None:
            try:
                return record.specific.encode(value)
            except Exception:  # noqa: BLE001 (off the generated code's road: fastavro writes it, or says why not)
                pass
        for field, branch in record.named_branches:
            found = value.get(field)
            if found is not None and not isinstance(found, tuple):
                value = {**value, field: (branch, found)}
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(record.fingerprint)
        fastavro.schemaless_writer(buf, record.parsed, value)
        return buf.getvalue()

    def identify(self, blob: bytes) -> RecordType:
        """The schema version a message was written with, or DecodeError."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise DecodeError("not_avro", "message shorter than the single-object header")
        if self.by_confluent_id and framing_of(blob) == "confluent":
            return self.confluent_writer(blob)
        if len(blob) < HEADER_LEN:
            raise DecodeError("not_avro", "message shorter than the single-object header")
        if blob[:2] != MAGIC:
            if framing_of(blob) == "confluent":
                raise DecodeError("not_avro", "starts with 00 like the Confluent wire format (00, a schema id), "
                                              "which is read only with a schema registry (DRIFTLINE_SCHEMA_REGISTRY_URL)")
            raise DecodeError("not_avro", "missing the Avro single-object magic bytes C3 01")
        fp = bytes(blob[2:HEADER_LEN])
        record = self.by_fingerprint.get(fp)
        if record is None:
            hint = ""
            if fp in self._pre_fix:
                hint = f" (it is {self._pre_fix[fp]}'s with its bytes reversed: written by driftline before 0.2)"
            raise DecodeError("unknown_schema", f"writer schema fingerprint {fp.hex()} is not a version in "
                                                f"schemas/history/{hint}")
        return record

    def confluent_writer(self, blob: bytes) -> RecordType:
        """Driftline's own record type of a Confluent-framed message (`learn_confluent_id`)."""
        try:
            schema_id = confluent_schema_id(blob)
        except ValueError as exc:
            raise DecodeError("not_avro", str(exc)) from None
        record = self.by_confluent_id.get(schema_id)
        if record is None:
            raise DecodeError("unknown_schema", f"Confluent schema id {schema_id} is not one of driftline's own "
                                                "registered schemas")
        return record

    def decode(self, blob: bytes, expect: str | None = None) -> dict[str, Any]:
        """The record in `blob`, in the current version of its schema; with `expect`, refuse any
        other record type."""
        return self.read(self.identify(blob), blob, expect)

    def read(self, writer: RecordType, blob: bytes, expect: str | None = None) -> dict[str, Any]:
        """The body of `blob` (either framing), written with `writer`, in the current version."""
        if expect is not None and writer.name != expect:
            raise DecodeError("wrong_schema", f"expected a {expect}, got a {writer.name}")
        if writer.incompatible:
            raise DecodeError("incompatible_schema", f"{writer.name} {writer.described} cannot be read as "
                                                     f"version {self.by_name[writer.name].version}: {writer.incompatible}")
        start = body_start(blob)
        if writer.specific is not None:
            try:
                value, end = writer.specific.decode(blob, start)
                if end == len(blob):
                    return value
            except Exception:  # noqa: BLE001 (fastavro reads it, or gives the reason it cannot)
                pass
        buf = io.BytesIO(blob)
        buf.seek(start)
        reader = None if writer.current else self.by_name[writer.name].parsed
        try:
            value = fastavro.schemaless_reader(buf, writer.parsed, reader)
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError("corrupt_avro", f"{writer.name} body does not decode: {exc!r}") from None
        if buf.tell() != len(blob):
            raise DecodeError("corrupt_avro", f"{len(blob) - buf.tell()} trailing bytes after the {writer.name}")
        return value

    def is_current(self, blob: bytes) -> bool:
        """Whether a single-object message that decodes was written with the current version (its
        bytes can be passed on as they are; an older version's are re-encoded)."""
        return bytes(blob[2:HEADER_LEN]) in self._current

    def header(self, record_name: str) -> bytes:
        """The single-object header of the current `record_name`."""
        return MAGIC + self.by_name[record_name].fingerprint


def _specific(schema: dict[str, Any], header: bytes) -> SpecificCodec | None:
    """The generated codec of a current schema (None: fastavro alone writes and reads it)."""
    try:
        return compile_record(schema, header)
    except Unsupported:
        return None


@lru_cache(maxsize=1)
def get_codec() -> AvroCodec:
    """The process-wide codec (schemas parsed once)."""
    return AvroCodec()
