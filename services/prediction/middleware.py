"""Moved to `driftline.shared.bodylimit` (every service has the body limit now)."""

from ..shared.bodylimit import BodyLimit

__all__ = ["BodyLimit"]
