"""The two ways an Avro message is framed on Kafka, told apart by the first byte.

    single-object   C3 01 | 8-byte CRC-64-AVRO fingerprint (little-endian) | body    (the Avro spec)
    Confluent       00    | 4-byte schema id (big-endian)                   | body    (a schema registry's)

The body is the same binary Avro in both: a message moves from one framing to the other by
swapping its header, without decoding it.

    >>> framing_of(b"\\xc3\\x01" + bytes(8)), framing_of(confluent_header(17) + b"body")
    ('single-object', 'confluent')
    >>> confluent_schema_id(confluent_header(17) + b"body")
    17
    >>> reframe(b"\\xc3\\x01" + bytes(8) + b"body", confluent_header(17)) == confluent_header(17) + b"body"
    True

`OUTPUT` says which output topics this process writes in the Confluent framing (the
`schema_registry_output` setting, filled in by `schema_registry.prepare_output`); `kafka.produce`
asks it for every message, so the services that write those topics need no code of their own.
Nothing here does I/O.
"""

from __future__ import annotations

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5
MAX_SCHEMA_ID = 2**31 - 1  # Confluent ids are Java ints


def framing_of(blob: bytes) -> str | None:
    """'single-object', 'confluent', or None when the first bytes are neither."""
    if blob[:2] == MAGIC:
        return "single-object"
    if blob[:1] == b"\x00":
        return "confluent"
    return None


def confluent_header(schema_id: int) -> bytes:
    """The 5 bytes in front of a body written with registry schema `schema_id`."""
    if not 0 <= schema_id <= MAX_SCHEMA_ID:
        raise ValueError(f"a schema id is a non-negative 32-bit int, got {schema_id}")
    return b"\x00" + schema_id.to_bytes(4, "big")


def confluent_schema_id(blob: bytes) -> int:
    """The schema id of a Confluent-framed message (ValueError when it is shorter than the header)."""
    if len(blob) < CONFLUENT_HEADER_LEN:
        raise ValueError(f"{len(blob)} bytes, shorter than the 5-byte Confluent header")
    return int.from_bytes(blob[1:CONFLUENT_HEADER_LEN], "big")


def body_start(blob: bytes) -> int:
    """Where the Avro body starts in a message of either framing."""
    return HEADER_LEN if blob[:1] == b"\xc3" else CONFLUENT_HEADER_LEN


def reframe(blob: bytes, header: bytes) -> bytes:
    """The message with its header (of either framing) replaced by `header`."""
    return header + blob[body_start(blob):]


class OutputFraming:
    """Broker topic -> the Confluent header of driftline's record on it, for the output topics this
    process writes in the Confluent framing; every other topic keeps single-object encoding."""

    def __init__(self) -> None:
        self.headers: dict[str, bytes] = {}

    def use(self, topic: str, schema_id: int) -> None:
        self.headers[topic] = confluent_header(schema_id)

    def frame(self, topic: str, blob: bytes) -> bytes:
        """A single-object message as it goes onto `topic`."""
        header = self.headers.get(topic) if self.headers else None
        return blob if header is None else header + blob[HEADER_LEN:]


OUTPUT = OutputFraming()
