"""`driftline retrain` (being built)."""

import typer


def retrain(reason: str = typer.Option("demand")) -> None:
    """Ask the learner for a challenger now."""
    raise typer.Exit("retrain is not built yet")
