"""Labels on the wire are strings; river wants Python values. This is the one mapping both ways.

    >>> to_river("1"), to_river("spam"), to_text(True), to_text(1), to_text(None)
    (1, 'spam', '1', '1', None)

Integer-looking labels become ints because river's binary classifiers learn 0/1 (or bools), not
"0"/"1"; model outputs come back as text (bool -> int first) so that y_true and y_pred compare as
strings everywhere downstream. Must never lose a label: anything not integer-looking stays a str.
"""

from __future__ import annotations

import re
from typing import Any

_INT = re.compile(r"[+-]?\d{1,18}")


def to_river(label: str) -> int | str:
    """The value river learns for a label string."""
    return int(label) if _INT.fullmatch(label) else label


def to_text(y: Any) -> str | None:
    """A model output as the label string it stands for (None stays None)."""
    if y is None:
        return None
    if isinstance(y, bool):
        return str(int(y))
    if isinstance(y, float) and y.is_integer():
        return str(int(y))
    if hasattr(y, "item") and not isinstance(y, str):  # numpy scalars
        return to_text(y.item())
    return str(y)


def proba_to_text(proba: dict[Any, float] | None) -> dict[str, float]:
    """predict_proba_one's answer with text keys (classes merged if two map to the same text)."""
    out: dict[str, float] = {}
    for k, v in (proba or {}).items():
        key = to_text(k)
        if key is not None:
            out[key] = out.get(key, 0.0) + float(v)
    return out


def argmax(proba: dict[str, float]) -> str | None:
    """The class with the highest probability (None when the model knows no class yet)."""
    return max(proba, key=proba.__getitem__) if proba else None
