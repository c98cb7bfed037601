"""`driftline infra up|down|status|install|topics`: the local Kafka and Redis (and, when asked,
Prometheus)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from ..shared.settings import LOCAL_SECRETS, ensure_local_secrets, get_settings, redact_url, settings_view
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
    """Start Kafka and Redis on the configured host:ports and create every topic. Without
    DRIFTLINE_MODEL_KEY / DRIFTLINE_ADMIN_TOKEN, generates both once into <home>/secrets.json."""
    settings = ensure_local_secrets(get_settings())
    try:
        with console.status("starting Kafka and Redis" + (" and Prometheus" if with_prometheus else "")):
            timings = stack.up(settings, with_prometheus=with_prometheus)
    except stack.InfraError as exc:
        console.print(f"[red]infra up failed:[/] {exc}")
        raise typer.Exit(1) from None
    for name, seconds in timings.items():
        what = "already running" if seconds == 0.0 and name != "topics" else f"ready in {seconds:.1f}s"
        console.print(f"  {name}: {what}")
    console.print(f"[green]up[/]: Kafka {settings.kafka_bootstrap}, Redis {redact_url(settings.redis_url)}")
    if (settings.home / LOCAL_SECRETS).exists():
        console.print(f"  model key and admin token (where not set in the environment): {settings.home / LOCAL_SECRETS}")
    if with_prometheus:
        console.print(f"[green]Prometheus[/]: {stack.Prometheus(settings).url} (alerts: /alerts)")
    if settings.schema_registry_url:
        _register_schemas(settings)


@infra_app.command()
def topics() -> None:
    """Create every topic on the configured broker (one that runs already, e.g. in compose), and
    register driftline's schemas when a schema registry is configured."""
    from ..shared.kafka import ensure_topics

    settings = get_settings()
    try:
        created = ensure_topics(settings)
    except Exception as exc:  # the broker is not there or refuses: say so, no traceback
        console.print(f"[red]creating topics on {settings.kafka_bootstrap} failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"topics on {settings.kafka_bootstrap}: created {len(created)}"
                  + (f" ({', '.join(created)})" if created else "; all existed"))
    if settings.schema_registry_url:
        _register_schemas(settings)


def _register_schemas(settings) -> None:
    """driftline's schemas under `<topic>-value` (compatibility BACKWARD) in the configured registry."""
    from ..shared.schema_registry import register_waiting
    from ..shared.topics import Topics

    url = redact_url(settings.schema_registry_url)
    try:  # the registry may be starting beside us (compose): wait for it a while
        with console.status(f"registering driftline's schemas at {url}"):
            ids = register_waiting(settings.schema_registry_url, Topics(settings.namespace), wait_s=180)
    except Exception as exc:
        console.print(f"[red]registering driftline's schemas at {url} failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"schemas registered at {url}: " + ", ".join(f"{t}-value id {i}" for t, i in ids.items()))


@infra_app.command()
def down() -> None:
    """Stop the services, Prometheus, Redis and Kafka that driftline started."""
    from ..serve import stop_services

    settings = get_settings()
    stopped = stop_services(settings=settings) + stack.down(settings)
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
    return settings_view(settings)  # secrets redacted


def _flatten(data: dict, prefix: str = "DRIFTLINE_") -> list[tuple[str, object]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "detector_params":
            rows.extend(_flatten(value, f"{prefix}{key.upper()}__"))
        else:
            rows.append((f"{prefix}{key.upper()}", value))
    return rows
