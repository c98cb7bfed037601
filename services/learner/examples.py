"""The warm-start buffer: the last W labelled examples, each with the champion's answer.

    >>> buffer = ExampleBuffer(size=3)
    >>> for position in range(5):
    ...     buffer.add(position, {"a": float(position)}, "1", position % 2 == 0, 1)
    >>> [x["a"] for x, y, hit, version in buffer.since(None, 5)]     # the last 3, oldest first
    [2.0, 3.0, 4.0]
    >>> [x["a"] for x, y, hit, version in buffer.since(3, 5)]        # only those since a change point
    [3.0, 4.0]

A challenger replays these test-then-train against the champion's recorded hits (`warm_start`),
so a retrain request that comes late costs no evidence. The buffer lives in the learner's memory
and in its checkpoint (`rows`), so a restart has the examples up to the checkpoint and re-learns
(re-adds) the rest. It used to be a Redis list with one JSON document per example, pushed with
every batch: ~6% of the learner's time at full speed for a buffer read once per retrain.
"""

from __future__ import annotations

import json
from collections import deque

Row = tuple[int, dict, str, "bool | None", "int | None"]  # position, x, y, champion hit, champion version


class ExampleBuffer:
    def __init__(self, size: int, rows: list[Row] = ()) -> None:
        self.size = size
        self._rows: deque[Row] = deque(rows, maxlen=max(size, 0))

    def add(self, position: int, x: dict, y: str, champion_hit: bool | None, champion_version: int) -> None:
        if self.size > 0:
            self._rows.append((position, x, y, champion_hit, champion_version))

    def since(self, since_position: int | None, position: int) -> list[tuple[dict, str, bool | None, int | None]]:
        """The last `size` examples, oldest first, (x, y, champion hit, champion version); with
        `since_position` (the drift's estimated change point) only those of the new regime: a tree
        warm-started on pre-drift examples first learns the concept it is meant to replace."""
        since = since_position if since_position is not None else -1
        return [(x, y, hit, version) for p, x, y, hit, version in self._rows if since <= p < position]

    def rows(self) -> list[Row]:
        """What a checkpoint keeps."""
        return list(self._rows)

    @classmethod
    def from_redis_list(cls, client, key: str, size: int, position: int) -> "ExampleBuffer":
        """The buffer of a checkpoint written before it moved into the checkpoint: the Redis list
        (newest first, one JSON document per example), up to the checkpoint's position."""
        raw = client.lrange(key, 0, size - 1) if size > 0 else []
        docs = [json.loads(r) for r in reversed(raw)]
        return cls(size, [(d["p"], d["x"], d["y"], d.get("h"), d.get("v")) for d in docs if d["p"] < position])
