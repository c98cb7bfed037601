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


def train(since: str = typer.Option(None, help="event time from (epoch seconds or ISO date/time, UTC)"),
          until: str = typer.Option(None, help="event time before (epoch seconds or ISO date/time, UTC)"),
          model: str = typer.Option(None, "--model", help="river model spec (default: the learner's)"),
          challenge: bool = typer.Option(False, help="enter it into the champion/challenger contest")) -> None:
    """Build a candidate from the offline store (test-then-train in event-time order), register it
    with its lineage and, with --challenge, make it the learner's challenger."""
    import json

    from ..shared.settings import get_settings
    from .export import parse_time
    from .train import train as run

    try:
        result = run(get_settings(), since=parse_time(since), until=parse_time(until), spec=model,
                     challenge=challenge)
    except ValueError as exc:
        raise typer.Exit(f"driftline train: {exc}") from None
    typer.echo(json.dumps(result, indent=2))


def reproduce(model: str = typer.Argument(..., help="model name"),
              version: int = typer.Argument(..., help="registered version")) -> None:
    """Rebuild a registered version from its lineage and prove it (identical pickle bytes, or
    identical predictions on the next 1,000 examples). Exit status 1 when it is not proven."""
    import json

    from ..shared.settings import get_settings
    from .reproduce import NotReproducible, reproduce as run

    try:
        result = run(get_settings(), model, version)
    except NotReproducible as exc:
        typer.echo(f"driftline reproduce: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result, indent=2))
    if not result["reproduced"]:
        raise typer.Exit(1)
