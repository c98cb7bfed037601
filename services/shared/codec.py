"""The one Avro codec every service uses.

Each message is Avro single-object encoded: the two magic bytes C3 01, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form, then the binary body. A consumer
looks the fingerprint up among the schemas in `schemas/` and refuses what it does not know, or what
is not the record it expects, instead of misreading it.

    >>> codec = get_codec()
    >>> blob = codec.encode("Label", {"event_id": "e1", "label": "1", "ts": 0.0})
    >>> codec.decode(blob, expect="Label")["label"]
    '1'

Schemas are parsed once, at first use; encoding and decoding are fastavro's schemaless reader and
writer, which is the hot path of every service.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class DecodeError(ValueError):
    """A message that is not one of our records. `reason` is a short code for DLQs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RecordType:
    name: str
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian, as on the wire


class AvroCodec:
    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.by_name: dict[str, RecordType] = {}
        self.by_fingerprint: dict[bytes, RecordType] = {}
        for path in sorted(schemas_dir.glob("*.avsc")):
            raw = json.loads(path.read_text())
            parsed = fastavro.parse_schema(raw)
            canonical = to_parsing_canonical_form(raw)
            fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")
            record = RecordType(raw["name"], parsed, fp)
            self.by_name[record.name] = record
            self.by_fingerprint[fp] = record

    def encode(self, record_name: str, value: dict[str, Any]) -> bytes:
        record = self.by_name[record_name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(record.fingerprint)
        fastavro.schemaless_writer(buf, record.parsed, value)
        return buf.getvalue()

    def identify(self, blob: bytes) -> RecordType:
        """The record type a message claims to be, or DecodeError."""
        if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < HEADER_LEN:
            raise DecodeError("not_avro", "message shorter than the single-object header")
        if blob[:2] != MAGIC:
            raise DecodeError("not_avro", "missing the Avro single-object magic bytes C3 01")
        fp = bytes(blob[2:HEADER_LEN])
        record = self.by_fingerprint.get(fp)
        if record is None:
            hex_fp = struct.unpack("<Q", fp)[0]
            raise DecodeError("unknown_schema", f"schema fingerprint {hex_fp:016x} is not one of schemas/")
        return record

    def decode(self, blob: bytes, expect: str | None = None) -> dict[str, Any]:
        """The record in `blob`; with `expect`, refuse any other record type."""
        record = self.identify(blob)
        if expect is not None and record.name != expect:
            raise DecodeError("wrong_schema", f"expected a {expect}, got a {record.name}")
        buf = io.BytesIO(blob)
        buf.seek(HEADER_LEN)
        try:
            value = fastavro.schemaless_reader(buf, record.parsed, None)
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError("corrupt_avro", f"{record.name} body does not decode: {exc!r}") from None
        if buf.tell() != len(blob):
            raise DecodeError("corrupt_avro", f"{len(blob) - buf.tell()} trailing bytes after the {record.name}")
        return value


@lru_cache(maxsize=1)
def get_codec() -> AvroCodec:
    """The process-wide codec (schemas parsed once)."""
    return AvroCodec()
