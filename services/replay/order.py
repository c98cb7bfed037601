"""Did the pipeline learn in the order Kafka received the stream? A replay's outcomes checked
against the order the broker acknowledged its events and labels in.

The replay publishes label k right after event k + delay (`publish.schedule`), so an event j
scored in the stream's order knows exactly `labels_before(j, delay)` labels. A producer batches
each partition apart, though: a label sent before an event can reach the broker after it (its
partition's batch left later, or a loaded host delayed it). The pipeline cannot wait for a label
that is not in Kafka yet (a partition read to its end holds nothing back), so such a label may be
learned after the events that followed it, and a correct pipeline may still have learned it in
time if it came soon enough. What it must never do:

- score event j without a label older than it that Kafka had before it had event j (`missing`);
- score event j knowing a label that is not older than it (leakage);
- score events out of their own order (an event's `known` below the one before it).

`check` says which rows broke those rules and what the pipeline did learn when it scored each
event (`learned_before`), so that a test can rebuild river's predictions in that very order.

    >>> acks = [("event", 0), ("event", 1), ("event", 2), ("label", 0), ("label", 1), ("event", 3),
    ...         ("label", 2), ("label", 3)]   # label 0 was sent before event 2 and reached Kafka after it
    >>> outcomes = {0: {"known": 0, "position": 0}, 1: {"known": 0, "position": 1},
    ...             2: {"known": 0, "position": 2}, 3: {"known": 2, "position": 3}}
    >>> result = check(outcomes, acks, n=4, delay=1)
    >>> result.broken, result.late_in_kafka, result.learned_late
    ([], [0], [0])
    >>> result.learned_before
    [0, 0, 0, 2]
    >>> outcomes[3]["known"] = 1       # label 1 came before event 3 and was not learned before it
    >>> check(outcomes, acks, n=4, delay=1).broken
    [(3, 'scored without label 1, which Kafka had before it')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .publish import labels_before


@dataclass
class Order:
    broken: list[tuple[int, str]] = field(default_factory=list)  # (row, what was wrong)
    late_in_kafka: list[int] = field(default_factory=list)  # labels Kafka received after a later event
    learned_late: list[int] = field(default_factory=list)  # labels learned after a later event or label
    learned_before: list[int] = field(default_factory=list)  # per row: labels learned when it was scored
    by_position: list[int] = field(default_factory=list)  # the rows of the labels, in learning order


def check(outcomes: Mapping[int, Mapping[str, Any]], acks: Sequence[tuple[str, int]], n: int,
          delay: int) -> Order:
    """`outcomes`: row -> its champion outcome (`known`, `position`); `acks`: ("event" | "label",
    row) in the order Kafka acknowledged them (`replay(..., keep_outcomes=True)["_acks"]`)."""
    order = Order()
    acked = {item: i for i, item in enumerate(acks)}
    positions = sorted((outcomes[row]["position"], row) for row in range(n))
    if [p for p, _ in positions] != list(range(n)):
        order.broken.append((-1, "the learning positions are not 0..n-1, each once"))
        return order
    order.by_position = [row for _, row in positions]
    position = {row: p for p, row in positions}

    # Labels learned after a later label (the labels' ts follow their rows).
    newest = -1
    late: set[int] = set()
    for row in order.by_position:
        if row < newest:
            late.add(row)
        newest = max(newest, row)

    late_in_kafka: set[int] = set()
    unlearned: set[int] = set()  # labels older than the event at hand, not learned before it
    older = 0  # labels_before of the event at hand
    learned = 0  # labels learned so far, walking the events in their order
    newest_learned = -1
    for j in range(n):
        known = outcomes[j]["known"]
        order.learned_before.append(known)
        if known is None or known < learned:
            order.broken.append((j, f"scored knowing {known} labels after an earlier event knew {learned}"))
            continue
        for row in order.by_position[learned:known]:
            newest_learned = max(newest_learned, row)
        learned = known
        for row in range(older, labels_before(j, delay)):
            if acked[("label", row)] > acked[("event", j)]:
                late_in_kafka.add(row)
            unlearned.add(row)
        older = labels_before(j, delay)
        if newest_learned >= older:
            when = ("the event reached Kafka after it" if acked[("event", j)] > acked[("label", newest_learned)]
                    else "Kafka had the event first")
            order.broken.append((j, f"scored knowing label {newest_learned}, not older than it ({when})"))
        unlearned = {row for row in unlearned if position[row] >= known}
        for row in sorted(unlearned):
            late.add(row)
            if acked[("label", row)] < acked[("event", j)]:
                order.broken.append((j, f"scored without label {row}, which Kafka had before it"))
                break
    order.late_in_kafka = sorted(late_in_kafka)
    order.learned_late = sorted(late)
    return order
