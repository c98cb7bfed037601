"""`driftline replay` and `driftline demo` (being built)."""

import typer


def replay(dataset: str = typer.Argument(..., help="elec2, agrawal-abrupt, ... or csv:PATH")) -> None:
    """Publish a dataset through Kafka to running services and write the report."""
    raise typer.Exit("replay is not built yet")


def demo(dataset: str = typer.Argument("elec2")) -> None:
    """infra up, serve all, replay, report, down."""
    raise typer.Exit("demo is not built yet")
