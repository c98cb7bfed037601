"""The Avro schemas and their history: every released version of every record, and the rule that
says which writer versions the current reader can read.

    schemas/Event.avsc                 the current version: what driftline writes and reads into
    schemas/history/Event/1.avsc       every released version, numbered from 1; the highest one is
    schemas/history/Event/2.avsc       the current version, identical to schemas/Event.avsc
    schemas/history/RELEASED           each released version's fingerprint: released files never change

    >>> history = load_history()
    >>> [v.version for v in history["Label"]][:1]
    [1]
    >>> fingerprint_of(history["Event"][0].raw).hex()   # the 8 bytes after C3 01, as on the wire
    '8032500ce51666a5'

The rule (Avro's, checked by Apache Avro's own compatibility checker): the current version must
read every kept version ("backward transitive"): a field may be added with a default, a field with
a default may be removed, a type may be widened (int -> long -> float -> double, a union may gain
branches, string <-> bytes). `problems()` lists every breach and every changed schema whose new
version was not added to the history; the test suite fails on any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    raw: dict[str, Any]
    path: Path


def fingerprint_of(raw: dict[str, Any]) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of a schema's parsing canonical form, in the byte order of
    the single-object header (fastavro's hex already is that order: no integer round trip)."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))


def load_current(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, dict[str, Any]]:
    """Record name -> the current schema (schemas/<Name>.avsc)."""
    out = {}
    for path in sorted(schemas_dir.glob("*.avsc")):
        raw = json.loads(path.read_text())
        out[raw["name"]] = raw
    return out


def load_history(schemas_dir: Path = SCHEMAS_DIR) -> dict[str, list[SchemaVersion]]:
    """Record name -> its released versions, oldest first (schemas/history/<Name>/<n>.avsc)."""
    out: dict[str, list[SchemaVersion]] = {}
    root = schemas_dir / "history"
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        versions = []
        for path in folder.glob("*.avsc"):
            if not path.stem.isdigit():
                raise ValueError(f"{path}: a history file is named by its version number, e.g. 2.avsc")
            raw = json.loads(path.read_text())
            versions.append(SchemaVersion(raw["name"], int(path.stem), raw, path))
        out[folder.name] = sorted(versions, key=lambda v: v.version)
    return out


@lru_cache(maxsize=256)
def _incompatibility(reader_json: str, writer_json: str) -> str | None:
    import avro.schema
    from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

    result = ReaderWriterCompatibilityChecker().get_compatibility(
        avro.schema.parse(reader_json), avro.schema.parse(writer_json))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return None
    kinds = ", ".join(sorted({i.name for i in result.incompatibilities})) or "incompatible"
    return f"{kinds} ({', '.join(sorted(result.messages))}) at {', '.join(sorted(result.locations))}"


def incompatibility(reader: dict[str, Any], writer: dict[str, Any]) -> str | None:
    """None when a reader with schema `reader` can read data written with `writer` (Avro's schema
    resolution rules), else why not.

        >>> old = {"type": "record", "name": "L", "fields": [{"name": "a", "type": "int"}]}
        >>> incompatibility({**old, "fields": old["fields"] + [{"name": "b", "type": "string", "default": ""}]}, old)
        >>> incompatibility({**old, "fields": old["fields"] + [{"name": "b", "type": "string"}]}, old)
        'reader_field_missing_default_value (b) at /fields/1'
        >>> incompatibility({**old, "fields": [{"name": "a", "type": "long"}]}, old)   # int -> long widens
    """
    return _incompatibility(json.dumps(reader, sort_keys=True), json.dumps(writer, sort_keys=True))


def _without_docs(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _without_docs(v) for k, v in raw.items() if k != "doc"}
    if isinstance(raw, list):
        return [_without_docs(v) for v in raw]
    return raw


def problems(schemas_dir: Path = SCHEMAS_DIR) -> list[str]:
    """Every breach of the history rules, for a person to fix; empty when all is well."""
    out = []
    current = load_current(schemas_dir)
    history = load_history(schemas_dir)
    for name, raw in current.items():
        versions = history.get(name)
        if not versions:
            out.append(f"{name}: no schemas/history/{name}/1.avsc (every released version is kept there)")
            continue
        if [v.version for v in versions] != list(range(1, len(versions) + 1)):
            out.append(f"{name}: history versions must be 1, 2, ... without gaps, found "
                       f"{[v.version for v in versions]}")
        latest = versions[-1]
        if _without_docs(latest.raw) != _without_docs(raw):
            out.append(f"{name}: schemas/{name}.avsc differs from its latest released version "
                       f"{latest.version}: add it to the history as schemas/history/{name}/{latest.version + 1}.avsc")
        for v in versions:
            if v.name != name:
                out.append(f"{v.path}: holds a {v.name}, not a {name}")
                continue
            why = incompatibility(raw, v.raw)
            if why:
                out.append(f"{name}: the current version cannot read version {v.version}: {why}")
    for name in sorted(set(history) - set(current)):
        out.append(f"schemas/history/{name}/ has no current schemas/{name}.avsc")
    return out + _unreleased_or_changed(schemas_dir, history)


def _unreleased_or_changed(schemas_dir: Path, history: dict[str, list[SchemaVersion]]) -> list[str]:
    """Released versions never change and never go: schemas/history/RELEASED lists each one with its
    fingerprint, and every history file must match its line."""
    listed: dict[tuple[str, int], str] = {}
    for line in (schemas_dir / "history" / "RELEASED").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version, fp = line.split()
            listed[(name, int(version))] = fp
    files = {(name, v.version): fingerprint_of(v.raw).hex() for name, versions in history.items() for v in versions}
    out = []
    for (name, version), fp in sorted(listed.items()):
        if (name, version) not in files:
            out.append(f"{name} version {version} was released but schemas/history/{name}/{version}.avsc is gone: "
                       f"restore it (released versions are kept for ever)")
        elif files[(name, version)] != fp:
            out.append(f"schemas/history/{name}/{version}.avsc changed after its release (fingerprint "
                       f"{files[(name, version)]}, released as {fp}): restore it and add the change as a new version")
    for (name, version), fp in sorted(files.items()):
        if (name, version) not in listed:
            out.append(f"schemas/history/{name}/{version}.avsc is not in schemas/history/RELEASED: "
                       f"add the line `{name} {version} {fp}`")
    return out
