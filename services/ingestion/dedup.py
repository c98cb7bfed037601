"""First-seen test of event ids, in Redis: a re-sent or redelivered input is published once.

Each input claims its id with `SET seen-key marker NX GET EX ttl` (Redis >= 7.0), all claims of a
batch in ONE script call (one command with a batch's keys, not a command per input: building and
parsing a thousand pipelined commands cost the service more CPU than the commands cost Redis). On a
Redis Cluster a script only takes keys of one hash slot: one call per slot, in one pipeline.
The marker names the input (topic:partition:offset on the Kafka door, a request id and index on
the HTTP door), so

- the first input with an id wins (`SET` happens, the old value is nil);
- a later input with the same id, in the same batch or a later one, is a duplicate;
- the SAME input seen again (the process died after claiming but before committing, and Kafka
  redelivers the batch) finds its own marker and is published again instead of being lost;
- unless its output was acknowledged by Kafka: the Kafka door then marks its claims published
  (`mark_published`, marker + "!", before the commit), so a batch redelivered because a
  rebalance or a broker outage refused the commit is not published twice. Only a crash between
  Kafka's acknowledgement and that mark still publishes an input twice (at-least-once).

Ids are remembered for `ingestion.dedup_ttl_s`: memory stays bounded, and an id re-sent after
that is new again. This module never decides validity; it only answers "is this one the first?".

    dedup = Dedup(redis.Redis(), Keys(""), ttl_s=3600)
    dedup.claim([Claim(Keys("").seen_event("e1"), "events:0:17")])      # [True]: the first
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from ..shared import metrics
from ..shared.keys import Keys
from ..shared.redis_clients import eval_script, per_key, queue_script_per_slot, slot_groups

# Undo a claim only if it is still ours (a failed HTTP delivery must not block the client's retry).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


PUBLISHED = "!"  # appended to a marker once Kafka acknowledged its input's output

# 1 where the input owns its id: the id was free, or holds this same input's marker.
_CLAIM = """
local ttl, owned = ARGV[1], {}
for i = 1, #KEYS do
  local old = redis.call('SET', KEYS[i], ARGV[i + 1], 'NX', 'GET', 'EX', ttl)
  owned[i] = (old == false or old == ARGV[i + 1]) and 1 or 0
end
return owned
"""

_MARK_PUBLISHED = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i] .. '""" + PUBLISHED + """', 'XX', 'KEEPTTL') end
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class Claim:
    key: str  # Keys.seen_event(id) or Keys.seen_label(id)
    marker: str  # who claims it: the same input always sends the same marker


class Dedup:
    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, service: str = "ingestion") -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._seconds = metrics.REDIS_SECONDS.labels(service, "dedup")

    def claim(self, claims: list[Claim]) -> list[bool]:
        """For each claim in order: True when this input owns its id (first, or itself again)."""
        if not claims:
            return []
        started = time.perf_counter()
        owned = per_key(*self._per_slot(_CLAIM, claims, (self.ttl_s,)))
        self._seconds.observe(time.perf_counter() - started)
        return [flag == 1 for flag in owned]

    def _per_slot(self, script: str, claims: list[Claim], shared_args: tuple = ()) -> tuple[list[list[int]], list]:
        """Run a claims script: one call on one node; on a cluster one per hash slot, pipelined.
        Returns the claims' positions per call and the calls' replies."""
        keys = [c.key for c in claims]
        groups = slot_groups(self.client, keys)
        if len(groups) == 1:
            return groups, [eval_script(self.client, script, keys, [*shared_args, *(c.marker for c in claims)])]
        pipe = self.client.pipeline(transaction=False)
        groups = queue_script_per_slot(pipe, script, keys, [(c.marker,) for c in claims], shared_args)
        return groups, pipe.execute()

    def mark_published(self, claims: list[Claim]) -> None:
        """These inputs' outputs are acknowledged by Kafka: their claims say so, and the same
        inputs redelivered are duplicates, not published again. (A claim that expired meanwhile
        stays gone: XX.)"""
        if not claims:
            return
        self._per_slot(_MARK_PUBLISHED, claims)

    def release(self, claims: list[Claim]) -> None:
        """Forget claims that are still ours (their input was not delivered after all)."""
        if not claims:
            return
        pipe = self.client.pipeline(transaction=False)
        for c in claims:
            eval_script(pipe, _RELEASE, [c.key], [c.marker])
        pipe.execute()
