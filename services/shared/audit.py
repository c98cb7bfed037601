"""The admin audit trail: one record per admin request -- who, what, when, the answer -- refused
ones too. It must never hold a token, and never be silenced by the log level.

Each record is a JSON object, one line, on the `driftline.audit` logger (in the service's log:
`... INFO driftline.audit: {...}`) and, when `audit_log` names a file, appended to that file alone:

    >>> print(json.dumps(record(service="prediction", action="promote", who="alice", client="10.0.0.7",
    ...       path="/v1/models/3/promote", target={"version": 3}, status=200, detail=None, answer=None,
    ...       ts=1700000000.0)))
    {"ts": "2023-11-14T22:13:20.000000Z", "service": "prediction", "action": "promote", "who": "alice", "client": "10.0.0.7", "path": "/v1/models/3/promote", "target": {"version": 3}, "status": 200, "outcome": "done", "detail": null, "answer": null}

`outcome`: `done` (2xx), `refused` (401/403: no, a wrong or no configured token; `who` is then
`unknown`) or `failed` (any other answer: 404 no such version, 409, 422, 503, ...).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOGGER = "driftline.audit"
log = logging.getLogger(LOGGER)
log.setLevel(logging.INFO)  # the audit is not a debug aid: a WARNING log level keeps it


def record(*, service: str, action: str, who: str, client: str | None, path: str, target: dict[str, Any],
           status: int, detail: str | None, answer: Any, ts: float | None = None) -> dict[str, Any]:
    """An audit record in its one shape (the keys and their order are a contract: docs/security.md)."""
    when = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    outcome = "done" if 200 <= status < 300 else "refused" if status in (401, 403) else "failed"
    if hasattr(answer, "model_dump"):  # a route's response model
        answer = answer.model_dump(mode="json")
    return {"ts": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "service": service, "action": action, "who": who,
            "client": client, "path": path, "target": target, "status": status, "outcome": outcome,
            "detail": detail, "answer": answer}


def write(entry: dict[str, Any], trail: Path | None = None) -> None:
    """Log the record, and append it to `trail` (one write of one line, O_APPEND: several worker
    processes may share the file). A trail that cannot be written is logged as an error."""
    line = json.dumps(entry, default=str)
    log.info(line)
    if trail is None:
        return
    try:
        fd = os.open(trail, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("could not append the record above to the audit log %s: %s", trail, exc.strerror)


def open_trail(trail: Path | None) -> None:
    """Check at start that the audit log can be appended to (creating it, mode 0600): a service
    does not start with an audit trail it cannot write."""
    if trail is None:
        return
    trail.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(trail, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
