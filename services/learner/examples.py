"""The warm-start buffer: the last W labelled examples in Redis, each with the champion's answer.

    buffer = ExampleBuffer(redis_client, keys.example_buffer("default"), size=2000)
    buffer.add(position, x, y, champion_hit, champion_version)   # pushed with the batch's pipeline
    warm = buffer.since(change_point, position)                   # oldest first, for a new challenger

A challenger replays these test-then-train against the champion's recorded hits (`warm_start`),
so a retrain request that comes late costs no evidence. Examples learned in the current batch are
in memory until `queue_push`; `since` sees them too.
"""

from __future__ import annotations

import json


class ExampleBuffer:
    def __init__(self, client, key: str, size: int) -> None:
        self.r = client
        self.key = key
        self.size = size
        self.pending: list[str] = []  # learned in this batch, not pushed yet

    def add(self, position: int, x: dict, y: str, champion_hit: bool | None, champion_version: int) -> None:
        if self.size > 0:
            self.pending.append(json.dumps({"p": position, "x": x, "y": y, "h": champion_hit, "v": champion_version}))

    def queue_push(self, pipe) -> None:
        if self.pending:
            pipe.lpush(self.key, *self.pending)
            pipe.ltrim(self.key, 0, self.size - 1)
            self.pending = []

    def since(self, since_position: int | None, position: int) -> list[tuple[dict, str, bool | None, int | None]]:
        """The last `size` examples, oldest first, (x, y, champion hit, champion version); with
        `since_position` (the drift's estimated change point) only those of the new regime: a tree
        warm-started on pre-drift examples first learns the concept it is meant to replace."""
        if self.size <= 0:
            return []
        raw = self.r.lrange(self.key, 0, self.size - 1)
        pending = [json.loads(r) for r in self.pending]
        examples = ([json.loads(r) for r in reversed(raw)] + pending)[-self.size:]  # oldest first
        since = since_position if since_position is not None else -1
        return [(e["x"], e["y"], e.get("h"), e.get("v")) for e in examples if since <= e["p"] < position]

    def trim_after(self, position: int) -> None:
        """Drop buffered examples learned at or after `position` (they are about to be learned again)."""
        while True:
            head = self.r.lindex(self.key, 0)
            if head is None or json.loads(head)["p"] < position:
                return
            self.r.lpop(self.key)

    def clear(self) -> None:
        self.r.delete(self.key)
        self.pending = []
