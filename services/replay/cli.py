"""`driftline replay` and `driftline demo`: thin shells over `publish.replay` and `demo.demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from .datasets import NAMES, REGRESSION

DATASET_HELP = (", ".join(f"{n} (regression)" if n in REGRESSION else n for n in NAMES[:-1])
                + f", or {NAMES[-1]} (with --target); payments comes with its feature file (payments.toml)")


def replay(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    limit: int = typer.Option(None, help="publish at most N rows"),
    rate: float = typer.Option(0.0, help="events per second (0 = as fast as it goes)"),
    label_delay: int = typer.Option(0, help="the label of event i is published right after event i+N"),
    model: str = typer.Option(None, help="model spec the learner should run (checked, not changed; default: settings)"),
    features: str = typer.Option(None, help="default|raw|PATH the features service should run (checked; default: settings)"),
    report: Path = typer.Option(Path("reports/replay"), help="folder for report.json and report.png"),
    target: str = typer.Option(None, help="csv: the label column"),
    entity: str = typer.Option(None, help="csv: the entity column (default: one entity)"),
    stall_timeout: float = typer.Option(60.0, help="give up when nothing comes back for this many seconds"),
) -> None:
    """Publish a dataset as events plus delayed labels through Kafka to running services, wait
    until every label is learned, and write report.json and report.png."""
    from rich.console import Console

    from ..shared.settings import get_settings
    from .datasets import DatasetError, load
    from .publish import ReplayStalled
    from .publish import replay as run_replay

    console = Console(stderr=True)
    try:
        ds = load(dataset, target=target, entity=entity)
        run_replay(get_settings(), ds, limit=limit, rate=rate, label_delay=label_delay, model=model,
                   features=features, report_dir=report, stall_timeout_s=stall_timeout, console=console)
    except (DatasetError, ReplayStalled, ValueError) as exc:
        console.print(f"[red]replay failed:[/] {exc}")
        raise typer.Exit(1) from None


def demo(
    dataset: str = typer.Argument("elec2", help=DATASET_HELP),
    limit: int = typer.Option(None, help="publish at most N rows"),
    rate: float = typer.Option(0.0, help="events per second (0 = as fast as it goes)"),
    label_delay: int = typer.Option(100, help="the label of event i is published right after event i+N"),
    model: str = typer.Option(None, help="river model spec for the learner (default: settings)"),
    features: str = typer.Option(None, help="default|raw|PATH (default: settings)"),
    report: Path = typer.Option(Path("reports/demo"), help="folder for report.json and report.png"),
    target: str = typer.Option(None, help="csv: the label column"),
    entity: str = typer.Option(None, help="csv: the entity column (default: one entity)"),
    stall_timeout: float = typer.Option(60.0, help="give up when nothing comes back for this many seconds"),
    keep: bool = typer.Option(False, help="keep the demo's topics and Redis keys afterwards"),
) -> None:
    """infra up, serve all (the five services and the offline sink), replay (Elec2 by default),
    report, and stop what it started."""
    from rich.console import Console

    from ..infra.stack import InfraError
    from .datasets import DatasetError, load
    from .demo import DemoError
    from .demo import demo as run_demo
    from .publish import ReplayStalled

    console = Console(stderr=True)
    try:
        ds = load(dataset, target=target, entity=entity)
        run_demo(ds, limit=limit, rate=rate, label_delay=label_delay, model=model, features=features,
                 report_dir=report, stall_timeout_s=stall_timeout, keep=keep, console=console)
    except (DatasetError, ReplayStalled, DemoError, InfraError, ValueError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; everything the demo started is stopped")
        raise typer.Exit(130) from None
