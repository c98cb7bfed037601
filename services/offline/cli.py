"""`driftline export`, `driftline train`, `driftline reproduce`: the offline store's commands.

    $ driftline export --out /tmp/store --since 2026-01-01 --until 2026-02-01
    $ driftline export --out /tmp/store --from-offset 0 --to-offset 5000
"""

from __future__ import annotations

from pathlib import Path

import typer


def export(out: Path = typer.Option(..., help="folder to write the Parquet files under (the store's layout)"),
           since: str = typer.Option(None, help="event time from (epoch seconds or ISO date/time, UTC)"),
           until: str = typer.Option(None, help="event time before (epoch seconds or ISO date/time, UTC)"),
           from_offset: int = typer.Option(None, help="outcomes offset from"),
           to_offset: int = typer.Option(None, help="outcomes offset before")) -> None:
    """Write the offline store's rows from what Kafka still retains of `outcomes`."""
    from rich.console import Console

    from ..shared.settings import get_settings
    from .export import export as run, parse_time

    rows = run(get_settings(), out, since=parse_time(since), until=parse_time(until), from_offset=from_offset,
               to_offset=to_offset)
    Console().print(f"{rows} rows written under {out}")
