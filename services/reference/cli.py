"""`driftline reference configuration|benchmarks [--write]`: print or write a generated page."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Page(str, Enum):
    configuration = "configuration"
    benchmarks = "benchmarks"


def reference(page: Page = typer.Argument(..., help="configuration (from the settings class) or benchmarks "
                                                    "(from reports/bench/*.json)"),
              write: bool = typer.Option(False, help="write docs/<page>.md (and, for benchmarks, the README's "
                                                     "figures) instead of printing it")) -> None:
    """Generate a reference page of the docs from the code or the benchmark results."""
    from . import benchmarks, configuration

    text = configuration.render() if page is Page.configuration else benchmarks.render()
    if write:
        path = Path("docs") / f"{page.value}.md"
        path.write_text(text)
        typer.echo(f"wrote {path}")
        if page is Page.benchmarks:
            readme = Path("README.md")
            readme.write_text(benchmarks.readme_with_figures(readme.read_text()))
            typer.echo(f"wrote the figures of {readme}")
    else:
        typer.echo(text, nl=False)
