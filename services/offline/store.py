"""The offline store's layout, defined once: Parquet files of learned examples, partitioned by model
and date, each file named by the range of `outcomes` offsets it holds.

    >>> import tempfile
    >>> store = OfflineStore(Path(tempfile.mkdtemp()))
    >>> o = {"event_id": "e1", "entity_id": "a", "model": "m", "model_version": 1, "role": "champion",
    ...      "y_true": "1", "y_pred": "0", "proba": {"0": 0.6, "1": 0.4}, "position": 0, "ts": 0.0,
    ...      "features": {"x": 1.0}, "label_ts": 5.0}
    >>> [p.name for p in store.write_batch("outcomes", 0, 7, 7, [row_of(o, "outcomes", 0, 7)])]
    ['part-0-000000000007-000000000007.parquet']
    >>> store.resume_offsets("outcomes", {0: 8}), store.resume_offsets("outcomes", {})
    ({0: 8}, {0: 7})

Layout: `<root>/model=<name>/date=<YYYY-MM-DD of event time, UTC>/part-<partition>-<first>-<last>.parquet`
(hive partitioning: DuckDB and pyarrow read `model` and `date` as columns). One *batch* is the
outcomes read from `first` to `last` of one partition; it becomes one file per (model, date).

Effectively once, without a journal: a batch's files are each written to a temporary name, fsynced
and renamed; only then is the batch's end committed to Kafka, and the next batch starts only after
that. So after a crash at most the *last* batch can be partial, and it is the one whose files end at
or after the committed offset: `resume_offsets` deletes it and resumes from its first offset (the
same rows are written again, whole). Nothing here ever writes to Kafka or Redis: this is not the hot path.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

FILE = re.compile(r"^part-(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)\.parquet$")

# One learned example as stored (model and date are the partition folders, not columns of the file).
SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("entity_id", pa.string()),
    ("model_version", pa.int32()),
    ("role", pa.string()),
    ("features", pa.map_(pa.string(), pa.float64())),  # the numeric part of the scored vector
    ("categories", pa.map_(pa.string(), pa.string())),  # its text (categorical) part
    ("feature_set", pa.string()),
    ("y_true", pa.string()),
    ("y_pred", pa.string()),
    ("proba", pa.map_(pa.string(), pa.float64())),
    ("error", pa.float64()),  # regression: y_pred - y_true
    ("position", pa.int64()),
    ("event_ts", pa.float64()),
    ("label_ts", pa.float64()),
    ("label_partition", pa.int32()),
    ("label_offset", pa.int64()),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
])


def row_of(outcome: dict, topic: str, partition: int, offset: int) -> dict:
    """The stored row of one Outcome record read at (topic, partition, offset). Parquet maps have
    one value type, so the vector is kept as its numbers and its categories; `vector_of` joins them."""
    vector = outcome.get("features")
    numbers = None if vector is None else {k: v for k, v in vector.items() if not isinstance(v, str)}
    texts = None if vector is None else {k: v for k, v in vector.items() if isinstance(v, str)}
    return {
        "model": outcome["model"],
        "event_id": outcome["event_id"],
        "entity_id": outcome["entity_id"],
        "model_version": outcome["model_version"],
        "role": outcome["role"],
        "features": numbers,
        "categories": texts,
        "feature_set": outcome.get("feature_set"),
        "y_true": outcome["y_true"],
        "y_pred": outcome.get("y_pred"),
        "proba": outcome["proba"],
        "error": outcome.get("error"),
        "position": outcome["position"],
        "event_ts": outcome["ts"],
        "label_ts": outcome.get("label_ts"),
        "label_partition": outcome.get("label_partition"),
        "label_offset": outcome.get("label_offset"),
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }


def vector_of(features, categories) -> dict:
    """The scored vector of a stored row (its `features` and `categories` columns, as DuckDB or
    pyarrow return maps: a dict or a list of pairs).

    >>> vector_of([("x", 1.0)], {"country": "KR"})
    {'x': 1.0, 'country': 'KR'}
    """
    return {**dict(features or {}), **dict(categories or {})}


@functools.lru_cache(maxsize=64)
def _day(days_since_epoch: int) -> str:
    return dt.datetime.fromtimestamp(days_since_epoch * 86400, dt.timezone.utc).strftime("%Y-%m-%d")


def day_of(ts: float) -> str:
    """The UTC date of an epoch time (cached by day: it is asked once per stored row).

    >>> day_of(0.0), day_of(86399.9), day_of(1.7e9)
    ('1970-01-01', '1970-01-01', '2023-11-14')
    """
    return _day(int(ts // 86400))


class OfflineStore:
    """Parquet files under `root`; the only code that knows their names and folders."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings) -> "OfflineStore":
        root = settings.offline.dir or settings.home / "offline"
        return cls(root / settings.namespace if settings.namespace else root)

    def folder(self, model: str, day: str) -> Path:
        return self.root / f"model={quote(model, safe='')}" / f"date={day}"

    def files(self, model: str | None = None) -> list[Path]:
        """Every data file (of one model), in (partition, offset) order."""
        pattern = f"model={quote(model, safe='')}/*/part-*.parquet" if model else "model=*/*/part-*.parquet"
        found = [p for p in self.root.glob(pattern) if FILE.match(p.name)]
        return sorted(found, key=lambda p: (int(FILE.match(p.name)["partition"]), int(FILE.match(p.name)["first"]),
                                            p.parent.parent.name))

    def write_batch(self, topic: str, partition: int, first: int, last: int, rows: Iterable[dict]) -> list[Path]:
        """Write one batch (the rows read from offsets first..last of a partition) durably, one file
        per (model, date). Returns the files written."""
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for row in rows:
            groups[(row["model"], day_of(row["event_ts"]))].append(row)
        written = []
        for (model, day), group in sorted(groups.items()):
            folder = self.folder(model, day)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"part-{partition}-{first:012d}-{last:012d}.parquet"
            # Column by column: from_pylist converts dict by dict, ~15% of the sink's time.
            table = pa.Table.from_pydict({name: [row[name] for row in group] for name in SCHEMA.names},
                                         schema=SCHEMA)
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(table, tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(folder)
            written.append(path)
        return written

    def resume_offsets(self, topic: str, committed: dict[int, int]) -> dict[int, int]:
        """Where to read each partition from after a start (crash or not), given Kafka's committed
        offsets: the batch whose files end at or past the commit (written, not committed: perhaps
        partial) is deleted and read again. Partitions with neither files nor a commit are left out."""
        for tmp in self.root.glob("model=*/*/part-*.parquet.tmp"):
            tmp.unlink()  # a file that was being written when the sink died
        last: dict[int, tuple[int, int]] = {}
        for path in self.files():
            m = FILE.match(path.name)
            p, first, end = int(m["partition"]), int(m["first"]), int(m["last"])
            if p not in last or end > last[p][1]:
                last[p] = (first, end)
        resume = dict(committed)
        for p, (first, end) in last.items():
            if committed.get(p, -1) > end:
                continue
            for path in self.files():
                m = FILE.match(path.name)
                if int(m["partition"]) == p and int(m["first"]) == first and int(m["last"]) == end:
                    path.unlink()
            resume[p] = first
        return resume

    def glob(self) -> str:
        """The files as one DuckDB/pyarrow glob."""
        return str(self.root / "model=*" / "date=*" / "part-*.parquet")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_of(path: Path) -> str:
    """The model whose folder holds a data file."""
    return unquote(path.parent.parent.name.removeprefix("model="))
