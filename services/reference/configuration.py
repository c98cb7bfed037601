"""docs/configuration.md: every setting, from the settings class itself (name, default, meaning).

    >>> rows = list(settings_rows())
    >>> next(r for r in rows if r.variable == "DRIFTLINE_LEARNER__PROMOTE_AFTER").default
    '100'
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from ..shared.settings import Settings

PREFIX = "DRIFTLINE_"
HEADER = """# Configuration reference

Generated from `services/shared/settings.py` by `driftline reference configuration --write`
(`tests/test_reference.py` fails when this page and the class disagree). Every setting is read
from a `DRIFTLINE_*` environment variable (sections joined by `__`), then from `driftline.toml` in
the working directory (or the file `DRIFTLINE_CONFIG` names; the same names, lower-case, with
`[sections]`), then the default. A `DRIFTLINE_*` variable that no setting reads is an error at start.
Secrets also come from files: `<VARIABLE>_FILE` names a file holding the value (the Docker secrets
convention). `driftline infra status` prints what is in force, secrets redacted.
"""


@dataclass(frozen=True)
class Row:
    section: str
    variable: str
    default: str
    meaning: str


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, SecretStr) or value is None:
        return "(unset)"
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value).replace(str(Path.home()), "~")  # not this machine's home: the reader's


def settings_rows(model: type[BaseModel] = Settings, prefix: str = PREFIX, section: str = "") -> Iterator[Row]:
    """One row per leaf setting, sections depth-first in the class's order."""
    nested: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        meaning = " ".join((field.description or "").split())
        yield Row(section, prefix + name.upper(), _default(field), meaning)
    for name, annotation in nested:
        yield from settings_rows(annotation, f"{prefix}{name.upper()}__", name)


def table_cell(text: str) -> str:
    """Text for a Markdown table's cell: a `|` in it would end the cell.

        >>> table_cell("StandardScaler | LogisticRegression")
        'StandardScaler \\\\| LogisticRegression'
    """
    return str(text).replace("|", "\\|")


def render() -> str:
    lines = [HEADER]
    section = None
    for row in settings_rows():
        if row.section != section:
            section = row.section
            lines += ["", f"## {section or 'general'}", "", "| variable | default | meaning |", "|---|---|---|"]
        default = f"`{table_cell(row.default)}`" if row.default not in ("", "(unset)", "(required)") else row.default
        lines.append(f"| `{row.variable}` | {default} | {table_cell(row.meaning)} |")
    return "\n".join(lines) + "\n"
