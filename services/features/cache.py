"""The states a features worker owns, kept decoded in memory between batches (bounded, least
recently used out first): its entities' (events.valid partition k is only its) and its key
entities' (key partition k is only its). Redis stays the record (for /v1/predict and restarts);
this only spares reading and decoding what this worker wrote itself. It must be emptied whenever
the worker may no longer be the only writer: partitions taken away, its loop started over.

    >>> cache = StateCache(limit=2)
    >>> cache.put("a", {"n": 1}); cache.put("b", {"n": 2}); cache.put("c", {"n": 3})
    >>> cache.get("a"), cache.get("c")
    (None, {'n': 3})
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class StateCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.states: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, name: str) -> dict[str, Any] | None:
        state = self.states.get(name)
        if state is not None:
            self.states.move_to_end(name)
        return state

    def put(self, name: str, state: dict[str, Any]) -> None:
        self.states[name] = state
        self.states.move_to_end(name)
        while len(self.states) > self.limit:
            self.states.popitem(last=False)

    def clear(self) -> None:
        self.states.clear()

    def __len__(self) -> int:
        return len(self.states)
