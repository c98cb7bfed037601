"""`driftline infra up|down|status|install|topics`: the local Kafka and Redis (and, when asked,
Prometheus)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from ..shared.settings import get_settings
from . import stack

infra_app = typer.Typer(help="The local single-node Kafka (KRaft) and Redis, under .driftline/.", no_args_is_help=True)
console = Console()


@infra_app.command()
def install() -> None:
    """Fetch the broker jars (once, cached) and install redis-server and prometheus if missing."""
    with console.status("fetching the Kafka broker jars and checking redis-server and prometheus"):
        stack.install(get_settings())
    console.print(f"[green]Kafka {stack.kafka_version()} jars, redis-server and prometheus are in place[/]")


@infra_app.command()
def up(
    with_prometheus: bool = typer.Option(
        False, "--with-prometheus",
        help="also run Debian's Prometheus (DRIFTLINE_PROMETHEUS_PORT) scraping the five services, with the alert rules",
    ),
) -> None:
    """Start Kafka and Redis on the configured host:ports and create every topic."""
    settings = get_settings()
    try:
        with console.status("starting Kafka and Redis" + (" and Prometheus" if with_prometheus else "")):
            timings = stack.up(settings, with_prometheus=with_prometheus)
    except stack.InfraError as exc:
        console.print(f"[red]infra up failed:[/] {exc}")
        raise typer.Exit(1) from None
    for name, seconds in timings.items():
        what = "already running" if seconds == 0.0 and name != "topics" else f"ready in {seconds:.1f}s"
        console.print(f"  {name}: {what}")
    console.print(f"[green]up[/]: Kafka {settings.kafka_bootstrap}, Redis {settings.redis_url}")
    if with_prometheus:
        console.print(f"[green]Prometheus[/]: {stack.Prometheus(settings).url} (alerts: /alerts)")


@infra_app.command()
def topics() -> None:
    """Create every topic on the configured broker (one that runs already, e.g. in compose)."""
    from ..shared.kafka import ensure_topics

    settings = get_settings()
    try:
        created = ensure_topics(settings)
    except Exception as exc:  # the broker is not there or refuses: say so, no traceback
        console.print(f"[red]creating topics on {settings.kafka_bootstrap} failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"topics on {settings.kafka_bootstrap}: created {len(created)}"
                  + (f" ({', '.join(created)})" if created else "; all existed"))


@infra_app.command()
def down() -> None:
    """Stop the services, Prometheus, Redis and Kafka that driftline started."""
    stopped = stack.down(get_settings())
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@infra_app.command()
def status(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """What runs, where, and the settings in force."""
    settings = get_settings()
    state = stack.status(settings)
    if as_json:
        typer.echo(json.dumps({"components": state, "settings": _settings_view(settings)}, indent=2, default=str))
        return
    table = Table(title="driftline infra")
    for col in ("component", "address", "running", "answers", "pid", "log"):
        table.add_column(col)
    for name, info in state.items():
        label = f"{name} {info.get('version', '')}".strip()
        table.add_row(label, info["address"], _yes(info["running"]), _yes(info["answers"]),
                      str(info["pid"] or "-"), info["log"])
    console.print(table)
    settings_table = Table(title="settings in force")
    settings_table.add_column("setting")
    settings_table.add_column("value")
    for key, value in _flatten(_settings_view(settings)):
        settings_table.add_row(key, str(value))
    console.print(settings_table)


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _settings_view(settings) -> dict:
    data = settings.model_dump(mode="json")
    data["admin_token"] = "(set)" if settings.admin_token else "(not set: admin routes closed)"
    data["model_key"] = ("(default dev key: set DRIFTLINE_MODEL_KEY)"
                         if settings.model_key.get_secret_value().startswith("driftline-dev-key") else "(set)")
    return data


def _flatten(data: dict, prefix: str = "DRIFTLINE_") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "detector_params":
            rows.extend(_flatten(value, f"{prefix}{key.upper()}__"))
        else:
            rows.append((f"{prefix}{key.upper()}", value))
    return rows
