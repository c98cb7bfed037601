"""Sliding windows over event time with bounded memory: the state behind windowed aggregates.

One `Series` holds what one key entity (a card, a merchant) needs for the aggregates of one
(field, window) pair: its newest `TAIL` events exactly, and the older ones compacted into tiles
of `window / tiles` seconds. A value for an event at time t covers the folded events with a time
in (t - window, t]: the events *before* it (point-in-time), never later ones.

    >>> s = Series.new(SeriesSpec(field="amount", window_s=600.0))
    >>> for ts, amount in ((0.0, 5.0), (100.0, 7.0), (650.0, 1.0)):
    ...     _ = s.fold(ts, amount)
    >>> summary = s.summary(699.0)                 # (99, 699]: the events at 100 and 650
    >>> summary.n, summary.total, summary.mean, summary.low, summary.last
    (2, 8.0, 4.0, 1.0, 1.0)

Exactness and its bound:
- while a key has at most `TAIL` events within reach, every value is exact;
- a busier key's older events live in tiles. A tile counts whole or not at all: a tile that
  straddles the old edge of the window (its oldest event at or before t - window) is left out,
  so the value covers at least the last `window - window / tiles` seconds and never more than the
  window: at most one tile's events are missing, and never an event older than the window;
- a late event (older than its key's newest) is placed by its own time, in the tail or its tile.
  Its value counts the tail events at or before it exactly; a tile holding events after it is
  left out (no later event ever counts). An event more than `lateness` (at most one window)
  behind its key's newest event is not placed: it folds into nothing (`DROPPED`), and the
  caller counts it. Tiles are kept for the window and the lateness, so an event that is placed
  is read against a whole window too.

`distinct` keeps, per tile, the `SKETCH` smallest 52-bit hashes of the values (a K-minimum-values
sketch): exact while no tile saw more than `SKETCH` distinct values, else estimated from the
`SKETCH` smallest hashes of the union, with a relative standard error of about
1 / sqrt(SKETCH - 2) (about 13%).

Memory per series is bounded whatever the input: at most `TAIL` events, `retained_tiles` tiles
(and `SKETCH` hashes per tile for `distinct`), encoded as one binary field (`to_bytes`).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from array import array
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

TAIL = 32  # newest events kept exactly, per series
SKETCH = 64  # hashes kept per tile for `distinct`
DEFAULT_TILES = 20  # tiles per window: the error bound is one tile (a twentieth of the window)
HASH_BITS = 52  # a hash fits a double exactly
FORMAT = 1.0

IN_ORDER, LATE, DROPPED = 0, 1, 2  # what `fold` did with an event
# What a summary must compute (the aggregates of a series ask for only what they need).
SUMS, SQUARES, EXTREMES, LAST = 1, 2, 4, 8
EVERYTHING = SUMS | SQUARES | EXTREMES | LAST

_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_window(text: str) -> float:
    """A window's length in seconds: a positive number followed by s, m, h or d.

    >>> parse_window("30s"), parse_window("10m"), parse_window("1h"), parse_window("7d")
    (30.0, 600.0, 3600.0, 604800.0)
    """
    m = _WINDOW.match(str(text))
    if not m or float(m[1]) <= 0:
        raise ValueError(f"window {text!r}: a positive number then s, m, h or d (\"30s\", \"10m\", \"1h\", \"7d\")")
    return float(m[1]) * _UNIT_S[m[2]]


def key_text(value: float | str) -> str:
    """The text that names a key entity: text as it is, an integral number without '.0', so that
    a merchant sent as 17 by one producer and "17" by another is one merchant.

    >>> key_text("m-17"), key_text(17.0), key_text(2.5)
    ('m-17', '17', '2.5')
    """
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


@lru_cache(maxsize=65_536)  # the same merchants and cards come again and again
def value_hash(value: float | str) -> float:
    """A stable 52-bit hash of a value (the same in every process), as an exact double."""
    digest = hashlib.blake2b(key_text(value).encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> (64 - HASH_BITS))


@dataclass(frozen=True)
class SeriesSpec:
    """What one series keeps: the events of one field (None: every event, for `count`) over one
    window, as numbers (count, sum, mean, std, min, max, last) or as hashes (distinct)."""

    field: str | None
    window_s: float
    tiles: int = DEFAULT_TILES
    distinct: bool = False
    lateness_s: float = 300.0

    @cached_property
    def id(self) -> str:
        """Its field name in the entity's hash: the spec in short, so a changed definition starts afresh."""
        return f"w:{self.field or ''}:{self.window_s:g}:{self.tiles}:{'d' if self.distinct else 'n'}"

    @cached_property
    def width(self) -> float:
        return self.window_s / self.tiles

    @cached_property
    def lateness(self) -> float:
        """How far behind its key's newest event an event may be and still be placed (at most a window)."""
        return min(self.lateness_s, self.window_s)

    @cached_property
    def reach(self) -> float:
        """How far back from its newest event a series keeps anything: the window and the lateness."""
        return self.window_s + self.lateness

    @cached_property
    def retained_tiles(self) -> int:
        """At most this many tiles: the window's, and those a late event may still need."""
        return self.tiles + math.ceil(self.lateness / self.width) + 1


@dataclass(slots=True)
class Summary:
    """The events of one series within a window, as the aggregates need them."""

    n: int = 0
    shift: float = 0.0
    shifted_sum: float = 0.0  # sums of (x - shift): the variance stays exact for large values
    shifted_squares: float = 0.0
    low: float | None = None
    high: float | None = None
    last: float | None = None
    distinct: float = 0.0

    @property
    def total(self) -> float:
        return self.shifted_sum + self.n * self.shift

    @property
    def mean(self) -> float | None:
        return self.shift + self.shifted_sum / self.n if self.n else None

    @property
    def std(self) -> float | None:
        """Population standard deviation (0 for one event)."""
        if not self.n:
            return None
        m = self.shifted_sum / self.n
        return math.sqrt(max(self.shifted_squares / self.n - m * m, 0.0))


class Series:
    """The window state of one key entity for one `SeriesSpec`. Use `Series.new` or `Series.decode`."""

    __slots__ = ("spec", "shift", "newest", "ts", "xs", "tile")

    def __init__(self, spec: SeriesSpec) -> None:
        self.spec = spec
        self.shift: float | None = None
        self.newest = -math.inf  # the latest event time folded
        self.ts: list[float] = []  # the tail, sorted by time (equal times in folding order)
        self.xs: list[float] = []  # its values (hashes for distinct)
        # Tiles, columnar and sorted by index (tile k holds times in [k * width, (k + 1) * width)):
        # index, events, then per kind (numbers) shifted sum, shifted squares, min, max, last;
        # (distinct) a saturated flag and its sorted hashes (a list of arrays); both end with the
        # oldest and newest time. Arrays of doubles, not lists: what is written to Redis after every
        # batch is their bytes as they are (to_bytes, decode), not a float object at a time.
        self.tile: dict[str, Any] = {name: [] if name == "hashes" else array("d")
                                     for name in (_DISTINCT_COLUMNS if spec.distinct else _NUMERIC_COLUMNS)}

    @classmethod
    def new(cls, spec: SeriesSpec) -> "Series":
        return cls(spec)

    # -- folding -------------------------------------------------------------------------------
    def fold(self, ts: float, value: float) -> int:
        """Fold one event in (a value for numbers, a `value_hash` for distinct, anything for
        count). Returns IN_ORDER, LATE (placed by its time) or DROPPED (older than retained)."""
        spec = self.spec
        times = self.ts
        late = ts < self.newest
        if late:
            if ts < self.newest - spec.lateness:
                return DROPPED
            at = bisect_right(times, ts)
            times.insert(at, ts)
            self.xs.insert(at, value)
        else:  # the newest yet (most events): after every tail event, equal times included
            self.newest = ts
            times.append(ts)
            self.xs.append(value)
        if self.shift is None and not spec.distinct:
            self.shift = value
        if len(times) > TAIL:
            self._compact(times.pop(0), self.xs.pop(0))
        if late:
            return LATE
        self._prune()  # what is kept reaches back from the newest event: only a newer one moves that edge
        return IN_ORDER

    def _compact(self, ts: float, value: float) -> None:
        t = self.tile
        k = math.floor(ts / self.spec.width)
        idx = t["idx"]
        at = bisect_left(idx, k)
        if at == len(idx) or idx[at] != k:
            for name, column in t.items():
                column.insert(at, _EMPTY[name])
            idx[at] = k
            t["lo"][at], t["hi"][at] = ts, ts
            if self.spec.distinct:
                t["hashes"][at] = array("d")
        t["n"][at] += 1
        if self.spec.distinct:
            hashes = t["hashes"][at]
            if value not in hashes:
                if len(hashes) < SKETCH:
                    insort(hashes, value)
                elif value < hashes[-1]:
                    hashes.pop()
                    insort(hashes, value)
                    t["saturated"][at] = 1.0
                else:
                    t["saturated"][at] = 1.0
        else:
            d = value - self.shift
            t["sum"][at] += d
            t["squares"][at] += d * d
            t["min"][at] = min(t["min"][at], value)
            t["max"][at] = max(t["max"][at], value)
            if ts >= t["hi"][at]:
                t["last"][at] = value
        t["lo"][at] = min(t["lo"][at], ts)
        t["hi"][at] = max(t["hi"][at], ts)

    def _prune(self) -> None:
        """Forget what no event within the lateness can need (bounded memory)."""
        spec = self.spec
        cutoff = self.newest - spec.reach
        idx, ts = self.tile["idx"], self.ts
        if idx and (idx[0] + 1) * spec.width <= cutoff:
            cut = bisect_left(idx, math.floor(cutoff / spec.width))
            for column in self.tile.values():
                del column[:cut]
        if ts and ts[0] < cutoff:
            cut = bisect_left(ts, cutoff)
            del ts[:cut], self.xs[:cut]

    # -- reading -------------------------------------------------------------------------------
    def summary(self, t: float, needs: int = EVERYTHING) -> Summary:
        """The events within (t - window, t], from the tail exactly and from the tiles that lie
        wholly inside (see the module's error bound). `needs` (SUMS | SQUARES | EXTREMES | LAST)
        says what to compute beyond the count."""
        spec = self.spec
        start = t - spec.window_s
        times = self.ts
        a, b = bisect_right(times, start), len(times) if t >= self.newest else bisect_right(times, t)
        out = Summary(shift=self.shift or 0.0)
        tiles = self._tiles_within(start, t) if self.tile["idx"] else None
        if spec.distinct:
            return self._distinct(out, a, b, tiles)
        out.n = b - a
        if b > a and needs:
            xs = self.xs[a:b]
            if needs & (SUMS | SQUARES):
                shift = out.shift
                ds = [x - shift for x in xs] if shift else xs
                out.shifted_sum = sum(ds)
                if needs & SQUARES:
                    out.shifted_squares = sum([d * d for d in ds])
            if needs & EXTREMES:
                out.low, out.high = min(xs), max(xs)
            out.last = xs[-1]
        if tiles is not None:
            self._add_tiles(out, tiles, needs, last=b <= a)
        return out

    def count(self, t: float) -> int:
        """`summary(t).n` of a series of numbers, and nothing else: all a `count` aggregate asks
        (four of the payments set's nine series), without building a summary.

            >>> s = Series.new(SeriesSpec(field=None, window_s=600.0))
            >>> for ts in (0.0, 100.0, 650.0):
            ...     _ = s.fold(ts, 0.0)
            >>> s.count(699.0), s.summary(699.0).n
            (2, 2)
        """
        start = t - self.spec.window_s
        times = self.ts
        n = (len(times) if t >= self.newest else bisect_right(times, t)) - bisect_right(times, start)
        if self.tile["idx"]:
            i, j, edges = self._tiles_within(start, t)
            counts = self.tile["n"]
            if j > i:
                n += int(sum(counts[i:j]))
            for e in edges:
                n += int(counts[e])
        return n

    def _add_tiles(self, out: Summary, tiles: tuple[int, int, list[int]], needs: int, last: bool) -> None:
        t_ = self.tile
        i, j, edges = tiles
        ranges = [(i, j)] + [(e, e + 1) for e in edges]
        for lo, hi in ranges:
            if lo >= hi:
                continue
            out.n += int(sum(t_["n"][lo:hi]))
            if needs & (SUMS | SQUARES):
                out.shifted_sum += sum(t_["sum"][lo:hi])
                out.shifted_squares += sum(t_["squares"][lo:hi])
            if needs & EXTREMES:
                low, high = min(t_["min"][lo:hi]), max(t_["max"][lo:hi])
                out.low = low if out.low is None else min(out.low, low)
                out.high = high if out.high is None else max(out.high, high)
        if last:  # no tail event in the window: the newest included tile has the last value
            newest = max((k for lo, hi in ranges for k in range(lo, hi)), key=lambda k: t_["hi"][k], default=None)
            if newest is not None:
                out.last = t_["last"][newest]

    def _tiles_within(self, start: float, t: float) -> tuple[int, int, list[int]]:
        """Tiles wholly within (start, t]: a slice [i, j) of tiles strictly inside by their
        index, and the (at most two) edge tiles whose oldest and newest times say they are inside."""
        idx = self.tile["idx"]
        width = self.spec.width
        first, last = math.floor(start / width), math.floor(t / width)
        i, j = bisect_right(idx, first), bisect_left(idx, last)
        edges = []
        lo, hi = self.tile["lo"], self.tile["hi"]
        for k in {bisect_left(idx, first), j}:
            if k < len(idx) and idx[k] in (first, last) and lo[k] > start and hi[k] <= t:
                edges.append(k)
        return i, max(i, j), edges

    def _distinct(self, out: Summary, a: int, b: int, tiles) -> Summary:
        seen = set(self.xs[a:b])
        saturated = False
        if tiles is not None:
            i, j, edges = tiles
            for k in list(range(i, j)) + edges:
                seen.update(self.tile["hashes"][k])
                saturated = saturated or bool(self.tile["saturated"][k])
        out.n = len(seen)
        if saturated and len(seen) >= SKETCH:
            kth = heapq.nsmallest(SKETCH, seen)[-1]
            out.distinct = (SKETCH - 1) / ((kth + 1.0) / 2.0 ** HASH_BITS)
        else:
            out.distinct = float(len(seen))
        return out

    # -- encoding: one binary field per series ------------------------------------------------
    def to_bytes(self) -> bytes:
        """header (format, shift, newest, tail length, tile count), the tail's times and values,
        then the tile columns (distinct: then each tile's hashes)."""
        t = self.tile
        n_tiles = len(t["idx"])
        parts = [array("d", (FORMAT, self.shift if self.shift is not None else math.nan, self.newest,
                             len(self.ts), n_tiles)), array("d", self.ts), array("d", self.xs)]
        for name in (_DISTINCT_COLUMNS if self.spec.distinct else _NUMERIC_COLUMNS):
            if name == "hashes":
                parts.append(array("d", [len(h) for h in t["hashes"]]))
                parts += t["hashes"]
            else:
                parts.append(t[name])
        return b"".join(parts)  # arrays are bytes-like: joined as they are, not copied to bytes each first

    @classmethod
    def decode(cls, spec: SeriesSpec, blob: bytes | None) -> "Series":
        """A series from `to_bytes` (an empty one for None, or for what this version cannot read)."""
        s = cls(spec)
        if not blob or len(blob) % 8:
            return s
        data = array("d")
        data.frombytes(blob)
        if len(data) < 5 or data[0] != FORMAT:
            return s
        s.shift = None if math.isnan(data[1]) else data[1]
        s.newest = data[2]
        n_tail, n_tiles = int(data[3]), int(data[4])
        at = 5
        s.ts, s.xs = data[at:at + n_tail].tolist(), data[at + n_tail:at + 2 * n_tail].tolist()
        at += 2 * n_tail
        for name in (_DISTINCT_COLUMNS if spec.distinct else _NUMERIC_COLUMNS):
            if name == "hashes":
                sizes = [int(v) for v in data[at:at + n_tiles]]
                at += n_tiles
                hashes = []
                for size in sizes:
                    hashes.append(data[at:at + size])
                    at += size
                s.tile["hashes"] = hashes
            else:
                s.tile[name] = data[at:at + n_tiles]
                at += n_tiles
        return s


_NUMERIC_COLUMNS = ("idx", "n", "sum", "squares", "min", "max", "last", "lo", "hi")
_DISTINCT_COLUMNS = ("idx", "n", "saturated", "lo", "hi", "hashes")
_EMPTY = {"idx": 0, "n": 0.0, "sum": 0.0, "squares": 0.0, "min": math.inf, "max": -math.inf, "last": 0.0,
          "lo": 0.0, "hi": 0.0, "saturated": 0.0, "hashes": None}
