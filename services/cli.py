"""The `driftline` command line: infra, serve, replay, demo, bench, retrain, export, train, reproduce,
reference.

Each command is a thin shell over a function of its service's package; heavy imports happen
inside the commands so that `driftline --help` is instant.
"""

from __future__ import annotations

import inspect

import typer

from .bench.cli import bench
from .drift.cli import retrain
from .infra.cli import infra_app
from .offline import cli as offline
from .reference.cli import reference
from .replay.cli import demo, replay
from .serve import serve

app = typer.Typer(
    name="driftline",
    help="Real-time online machine learning: Kafka, Redis, river, drift detection, hot-swapped models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _settings_first() -> None:
    """Read the settings before any command: a DRIFTLINE_* name that no setting reads, or a value
    that does not parse, stops here with what is wrong instead of being ignored."""
    from pydantic import ValidationError

    from .shared.settings import InsecureSettings, get_settings

    try:
        get_settings()
    except (InsecureSettings, ValidationError) as exc:
        typer.echo(f"driftline: {exc}", err=True)
        raise typer.Exit(2) from None


app.add_typer(infra_app, name="infra")
app.command()(serve)
app.command()(replay)
app.command()(demo)
app.command()(bench)
app.command()(retrain)
app.command()(offline.export)
app.command()(offline.train)
app.command()(offline.reproduce)
app.command()(reference)


def one_line_summaries(typer_app: typer.Typer) -> None:
    """`driftline --help` lists each command with its docstring's first paragraph, and typer keeps
    that paragraph's line breaks there: each command gets it as one line instead."""
    for info in typer_app.registered_commands:
        if info.short_help is None and info.callback is not None:
            info.short_help = " ".join(inspect.cleandoc(info.callback.__doc__ or "").split("\n\n")[0].split())
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            one_line_summaries(group.typer_instance)


one_line_summaries(app)

if __name__ == "__main__":
    app()
