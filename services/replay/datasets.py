"""The streams `driftline replay` can publish: Elec2, river's generators with known drift
positions, and any CSV file.

    >>> ds = load("sea-abrupt")
    >>> ds.drift_positions, ds.size
    ((10000,), 20000)
    >>> fields, label, entity = next(iter(ds.rows()))

Every row is `(fields, label, entity_id)`: a dict of finite floats (and text, for a CSV's
categorical columns), the true class or the regression target as text (the
contract's labels are strings: `"1"`, `"0"`, `"spam"`), and whose row it is. A `timed` dataset
(`payments`) adds a fourth item, the row's time in seconds from the stream's start; the others
are one second apart. `rows()` starts the
stream afresh and yields the same rows every time (generators are seeded). A dataset never
touches Kafka or Redis: publishing is `publish.py`'s business.

Sizes are chosen so that a drift test sees a settled model before the drift (10,000 rows) and
10,000 rows after it, yet a replay of the whole stream stays short.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

Row = tuple[dict[str, float], str, str]
DATA_DIR = Path(__file__).resolve().parent / "datasets"
ELEC2_PATH = DATA_DIR / "elec2.csv.gz"
MISSING = {"", "na", "nan", "null", "none", "?"}


class DatasetError(ValueError):
    """A dataset that cannot be replayed; the message says what to change."""


@dataclass(frozen=True)
class Dataset:
    name: str
    rows: Callable[[], Iterator[Row]] = field(repr=False)
    size: int | None  # number of rows, when known
    drift_positions: tuple[int, ...] = ()  # rows (from 0) where the concept changes
    drift_width: int = 0  # 0 = abrupt; else the width of the change (rows)
    description: str = ""
    target: str = "class"
    timed: bool = False  # rows carry their own time (seconds from the start) as a fourth item
    keys: tuple[str, ...] = ()  # fields naming other entities (a replay makes them its own, as entity ids)
    features: str | None = None  # the feature definition file that suits it (the demo's default)

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "drift_positions": list(self.drift_positions),
            "drift_width": self.drift_width,
            "description": self.description,
            "target": self.target,
        }


def label_text(y) -> str:
    """The contract's label string: bools as 0/1, integral numbers without '.0'."""
    if isinstance(y, bool):
        return str(int(y))
    if isinstance(y, float) and y.is_integer():
        return str(int(y))
    return str(y)


def _numeric(x: dict) -> dict[str, float]:
    # river's generators name features by int (SEA, Hyperplane) and give ints (Agrawal's elevel).
    return {str(k): float(v) for k, v in x.items()}


def _river_rows(make: Callable[[], Iterator], size: int, entity: str) -> Callable[[], Iterator[Row]]:
    def rows() -> Iterator[Row]:
        for x, y in itertools.islice(make(), size):
            yield _numeric(x), label_text(y), entity

    return rows


def _switch(make_before: Callable, make_after: Callable, position: int) -> Callable[[], Iterator]:
    """An abrupt drift: the first `position` rows from one concept, the rest from another.
    (river's ConceptDriftStream with width 1 overflows `math.exp`; a switch is exact.)"""
    return lambda: itertools.chain(itertools.islice(iter(make_before()), position), iter(make_after()))


def _agrawal(function: int, seed: int):
    from river.datasets import synth

    return synth.Agrawal(classification_function=function, seed=seed)


def _sea(variant: int, seed: int):
    from river.datasets import synth

    return synth.SEA(variant=variant, seed=seed)


# Agrawal 0 -> 5 is the pair whose labels disagree most (71% of rows), so a model that does not
# adapt loses a lot; SEA 0 -> 3 moves the threshold furthest (8 -> 9.5).
DRIFT_AT = 10_000
SIZE = 20_000
GRADUAL_WIDTH = 2_000


def _generators() -> dict[str, Dataset]:
    from river.datasets import synth

    def gradual():
        return synth.ConceptDriftStream(
            stream=_agrawal(0, 42), drift_stream=_agrawal(5, 43),
            position=DRIFT_AT, width=GRADUAL_WIDTH, seed=7,
        )

    def hyperplane():
        return synth.Hyperplane(seed=42, n_features=10, n_drift_features=4, mag_change=0.001,
                                noise_percentage=0.05, sigma=0.1)

    def friedman(drift_type: str):
        # 'gra': the whole concept switches at position[0] (and back at position[1], past the end);
        # 'gsg': old and new concepts mix for transition_window rows from position[0].
        def make():
            if drift_type == "gra":
                return synth.FriedmanDrift(drift_type="gra", position=(DRIFT_AT, SIZE + 1), seed=42)
            return synth.FriedmanDrift(drift_type="gsg", position=(DRIFT_AT - GRADUAL_WIDTH // 2, SIZE + 1),
                                       transition_window=GRADUAL_WIDTH, seed=42)
        return make

    specs = [
        ("agrawal-abrupt", _switch(lambda: _agrawal(0, 42), lambda: _agrawal(5, 43), DRIFT_AT), (DRIFT_AT,), 0,
         "river Agrawal, classification function 0 then 5 from row 10,000 (abrupt)"),
        ("agrawal-gradual", gradual, (DRIFT_AT,), GRADUAL_WIDTH,
         "river ConceptDriftStream: Agrawal function 0 to 5 centred on row 10,000, width 2,000"),
        ("sea-abrupt", _switch(lambda: _sea(0, 42), lambda: _sea(3, 43), DRIFT_AT), (DRIFT_AT,), 0,
         "river SEA, variant 0 (threshold 8) then variant 3 (threshold 9.5) from row 10,000 (abrupt)"),
        ("hyperplane", hyperplane, (), 0,
         "river Hyperplane: 10 features, 4 drifting continuously (mag_change 0.001, 5% noise)"),
        ("agrawal-stationary", lambda: _agrawal(0, 42), (), 0, "river Agrawal, function 0 throughout (no drift)"),
        ("sea-stationary", lambda: _sea(0, 42), (), 0, "river SEA, variant 0 throughout (no drift)"),
        ("friedman-abrupt", friedman("gra"), (DRIFT_AT,), 0,
         "regression: river FriedmanDrift, global abrupt drift at row 10,000"),
        ("friedman-gradual", friedman("gsg"), (DRIFT_AT,), GRADUAL_WIDTH,
         "regression: river FriedmanDrift, global gradual drift over rows 9,000 to 11,000"),
    ]
    return {
        name: Dataset(name, _river_rows(make, SIZE, name), SIZE, positions, width, text)
        for name, make, positions, width, text in specs
    }


GENERATORS = ("agrawal-abrupt", "agrawal-gradual", "sea-abrupt", "hyperplane", "agrawal-stationary", "sea-stationary",
              "friedman-abrupt", "friedman-gradual")
REGRESSION = ("friedman-abrupt", "friedman-gradual")  # datasets whose labels are numbers
NAMES = ("elec2", *GENERATORS, "payments", "csv:PATH")
FEATURES_DIR = Path(__file__).resolve().parents[1] / "features"


def payments() -> Dataset:
    """The seeded synthetic card payments of payments.py, with the feature file that suits them."""
    from . import payments as gen

    return Dataset("payments", lambda: gen.generate(), None, description=(
        "synthetic card payments (seeded): cards, merchants, busy hours, card-testing attacks and account "
        "takeovers over 3 days; label 1 = fraud"), target="fraud", timed=True, keys=("merchant",),
        features=str(FEATURES_DIR / "payments.toml"))


def load(spec: str, target: str | None = None, entity: str | None = None) -> Dataset:
    """The dataset a command line names: `elec2`, a generator, or `csv:PATH` (with `target`)."""
    if spec == "elec2":
        return csv_dataset(ELEC2_PATH, target="class", entity=None, name="elec2",
                           description="Elec2 (NSW electricity market, 1996-1998), rows in order, one entity")
    if spec.startswith("csv:"):
        if not target:
            raise DatasetError("a csv: dataset needs --target COLUMN (the column holding the label)")
        return csv_dataset(Path(spec[4:]), target=target, entity=entity)
    if spec == "payments":
        return payments()
    generators = _generators()
    if spec in generators:
        return generators[spec]
    raise DatasetError(f"unknown dataset {spec!r}; choose one of {', '.join(NAMES)}")


def _open(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def _cell(column: str, value: str, into: dict[str, float | str]) -> None:
    """Numbers stay numbers; a missing value is left out (river models take missing keys);
    text stays text: a categorical field (Event v2), which the model one-hot encodes or splits on."""
    text = value.strip()
    if text.lower() in MISSING:
        return
    try:
        number = float(text)
    except ValueError:
        into[column] = text
        return
    if math.isfinite(number):
        into[column] = number


def csv_dataset(path: Path, target: str, entity: str | None, name: str | None = None,
                description: str = "") -> Dataset:
    """Rows of a CSV file in file order. Every column but the target (and the entity column) is an
    input; text values stay text (categories), empty ones are left out. A numeric target serves a
    regressor as well (`--target price`): labels are the numbers as text. Checks the header and counts the
    rows up front so that a mistake is reported before anything is published."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with _open(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{path}: empty file (a header row is required)")
        size = sum(1 for _ in reader)
    header = [h.strip() for h in header]
    for role, column in (("--target", target), ("--entity", entity)):
        if column is not None and column not in header:
            raise DatasetError(f"{path}: {role} column {column!r} is not in the header {header}")
    t_index = header.index(target)
    e_index = header.index(entity) if entity else None
    inputs = [(i, h) for i, h in enumerate(header) if i not in (t_index, e_index)]
    default_entity = name or path.stem.split(".")[0]

    def rows() -> Iterator[Row]:
        with _open(path) as f:
            reader = csv.reader(f)
            next(reader)
            for n, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DatasetError(f"{path}:{n}: {len(row)} cells, the header has {len(header)}")
                label = row[t_index].strip()
                if label.lower() in MISSING:
                    raise DatasetError(f"{path}:{n}: no label in column {target!r}")
                fields: dict[str, float] = {}
                for i, column in inputs:
                    _cell(column, row[i], fields)
                who = row[e_index].strip() if e_index is not None else default_entity
                yield fields, label_text(_maybe_number(label)), who or default_entity

    return Dataset(name or f"csv:{path}", rows, size, (), 0, description or f"CSV file {path}", target)


def _maybe_number(text: str):
    """'1.0' and '1' are the same class; anything else stays as written."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text
