"""A seeded synthetic payments stream: cards paying merchants, with the two frauds whose signal
is a rate over time, not any single transaction.

    >>> rows = list(itertools.islice(generate(seed=7), 3))
    >>> sorted(rows[0][0]), rows[0][2].startswith("card-"), rows[0][3] <= rows[1][3] <= rows[2][3]
    (['amount', 'hour', 'merchant', 'online'], True, True)

Each row is `(fields, label, card, seconds since the start)`, in time order; the label is "1" for
fraud. What is in it (all of it drawn from one seeded numpy Generator, so the same seed gives the
same stream):
- **cards** pay mostly at a handful of favourite merchants (popularity is Zipf-like), at a rate
  of their own that follows the time of day, amounts log-normal around the card's own median;
- **busy hours**: popular merchants have benign rushes (many cards within minutes): a merchant's
  rate alone is not fraud;
- **card-testing attacks**: a fraudster runs tiny online payments with many stolen cards through
  one small merchant within minutes (the merchant's count and distinct cards in 10 minutes jump,
  its mean amount drops);
- **account takeovers**: a stolen card pays several unusual merchants, large amounts, within an
  hour (the card's count and spend in the last hour jump against its own week);
- **delayed labels**: fraud is known late (chargebacks); replay with `--label-delay N`
  (the demo's default, 100 events) so that a label comes N events after its transaction.

The transaction alone (amount, hour, online) says little; windowed aggregates over the card and
the merchant (`services/features/payments.toml`) say much more: tests/test_payments_lift.py shows it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

DAY = 86_400.0
CARDS = 1_500
MERCHANTS = 400
DAYS = 3
# The hour-of-day profile of ordinary payments (quiet nights, a lunch and an evening peak).
HOURLY = np.array([0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 0.9, 1.2, 1.3, 1.4, 1.6,
                   2.0, 1.8, 1.4, 1.3, 1.4, 1.6, 1.9, 2.0, 1.7, 1.2, 0.7, 0.4])

Row = tuple[dict[str, float | str], str, str, float]


def generate(seed: int = 42, cards: int = CARDS, merchants: int = MERCHANTS, days: int = DAYS) -> Iterator[Row]:
    """The stream, in time order."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, merchants + 1) ** 1.1
    popularity /= popularity.sum()
    online = rng.random(merchants) < 0.3
    events: list[tuple[float, str, str, float, int]] = []  # ts, card, merchant, amount, fraud

    medians = np.exp(rng.normal(3.3, 0.6, cards))  # a card's typical amount (~27)
    rates = np.exp(rng.normal(np.log(4.0), 0.6, cards)) / DAY  # payments per second (~4 a day)
    hourly = HOURLY / HOURLY.mean()
    for c in range(cards):
        favourites = rng.choice(merchants, size=rng.integers(3, 9), replace=False, p=popularity)
        n = rng.poisson(rates[c] * days * DAY * 1.6)
        ts = np.sort(rng.uniform(0, days * DAY, n))
        keep = rng.random(n) < hourly[((ts % DAY) // 3600).astype(int)] / hourly.max()
        for t in ts[keep]:
            m = rng.choice(favourites) if rng.random() < 0.85 else rng.choice(merchants, p=popularity)
            events.append((float(t), f"card-{c}", f"m-{m}", float(medians[c] * rng.lognormal(0, 0.5)), 0))

    # Benign rushes: a popular merchant, many ordinary cards within 20 minutes.
    for _ in range(days * 6):
        m, start = rng.integers(0, 20), rng.uniform(0, days * DAY - 3600)
        for c in rng.choice(cards, size=rng.integers(20, 60), replace=False):
            events.append((float(start + rng.uniform(0, 1200)), f"card-{c}", f"m-{m}",
                           float(medians[c] * rng.lognormal(0, 0.5)), 0))

    # Card testing: tiny online payments, many stolen cards, one small merchant, a few minutes.
    small = np.arange(merchants // 2, merchants)
    for _ in range(days * 4):
        m, start = rng.choice(small), rng.uniform(0, days * DAY - 3600)
        for c in rng.choice(cards, size=rng.integers(25, 70), replace=False):
            events.append((float(start + rng.uniform(0, 600)), f"card-{c}", f"m-{m}",
                           float(np.round(rng.uniform(0.5, 3.0), 2)), 1))
            online[m] = True

    # Account takeover: one card, unusual merchants, large amounts, within the hour.
    for c in rng.choice(cards, size=days * 15, replace=False):
        start = rng.uniform(0, days * DAY - 3600)
        for _ in range(rng.integers(4, 12)):
            m = rng.choice(merchants)
            events.append((float(start + rng.uniform(0, 3600)), f"card-{c}", f"m-{m}",
                           float(medians[c] * rng.uniform(3, 10)), 1))

    events.sort(key=lambda e: e[0])
    noise = rng.random(len(events)) < 0.003  # a few wrong labels, as chargebacks have
    for (ts, card, merchant, amount, fraud), flip in zip(events, noise):
        hour = float(int(ts % DAY // 3600))
        is_online = float(online[int(merchant[2:])])
        label = str(fraud ^ int(flip))
        yield {"amount": round(amount, 2), "merchant": merchant, "hour": hour, "online": is_online}, label, card, ts


def endless(t0: float, seed: int = 42) -> Iterator[tuple[str, dict[str, float | str], float]]:
    """(card, fields, epoch seconds) of the stream again and again from `t0`, each round DAYS
    later: as long a stream as a benchmark asks for, in time order, the same cards and merchants.

        >>> first = next(endless(1.7e9))
        >>> first[0].startswith("card-"), first[2] >= 1.7e9
        (True, True)
    """
    for round_ in itertools.count():
        for fields, _label, card, ts in generate(seed):
            yield card, fields, t0 + round_ * DAYS * DAY + ts


def size(seed: int = 42) -> int:
    """How many rows `generate(seed)` yields (it is cheap to count: a second or two)."""
    return sum(1 for _ in generate(seed))

