"""`driftline bench [NAME...]`: the benchmarks, each writing `reports/bench/NAME.json`.

Benchmarks are where speed and memory targets are checked (never in timed tests). Each one
starts what it needs (its own Kafka, Redis and services on free ports), measures, and stops it.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

BENCHMARKS = ("ingest", "features", "pipeline", "predict", "serving", "drift", "doors")
EXTRA = ("soak",)  # long: only when named (`driftline bench soak`)
console = Console()


def host_speed() -> float:
    """How fast this host runs Python now: river's logistic regression in this process, events/s
    (predict then learn, the fastest of three passes over Elec2's first 20,000 rows). A shared
    host's speed moves by 30% within minutes, so each result carries this figure from before and
    after it: results of different moments compare through it, and a run whose two figures differ
    much was measured while the host changed pace."""
    from ..shared.settings import DEFAULT_MODEL
    from .pipeline import in_process_rate

    return round(in_process_rate(DEFAULT_MODEL, 20_000))


def summary(name: str, result: dict) -> Table:
    """The headline figures of a result (what docs/benchmarks.md shows of it), for the console: the
    JSON file has them all, with each phase's progress.

        >>> summary("predict", {"c16": {"predict": {"requests_per_s": 4000, "p50_ms": 3.8, "p99_ms": 7.3,
        ...     "server_cpu_ms_per_request": 0.25}, "ratio": 0.56, "health_ratio": 0.82}}).row_count
        2
    """
    from ..reference.benchmarks import headline

    table = Table(title=f"bench {name}", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("figure", justify="right")
    for what, figure in headline(name, result):
        table.add_row(what, figure)
    return table


def measured_under(quick: bool) -> dict:
    """When, on which commit, under what load and at what host speed (`host_speed`) a result was
    measured (docs/benchmarks.md shows it)."""
    import datetime as dt
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "cores": os.cpu_count(), "load_average_before": round(os.getloadavg()[0], 1), "quick": quick,
            "river_lr_events_per_s_before": host_speed()}


def bench(
    names: list[str] = typer.Argument(None, help=f"which of {', '.join(BENCHMARKS)} (default: all)"),
    out: Path = typer.Option(Path("reports/bench"), help="folder for the JSON results"),
    quick: bool = typer.Option(False, help="smaller runs, for a smoke test"),
    minutes: float = typer.Option(None, help="soak: how long (default 20; 1 with --quick)"),
    rate: float = typer.Option(None, help="soak: events per second (default 100)"),
    framing: str = typer.Option("single-object", help="ingest: the events' framing, single-object or confluent "
                                "(a local schema registry; the result goes to ingest-confluent.json)"),
    redis_cluster: bool = typer.Option(False, "--redis-cluster",
                                       help="pipeline: the throughput phase through a local Redis Cluster too "
                                            "(3 primaries + 3 replicas), beside one node's"),
    profile: bool = typer.Option(False, help="features: record the worker with py-spy into OUT/profiles/"),
    dataset: str = typer.Option("synthetic", help="ingest: synthetic (default features) or payments "
                                "(payments.toml; the result goes to ingest-payments.json)"),
) -> None:
    """Run the benchmarks and write their JSON results (`soak` only when named)."""
    chosen = names or list(BENCHMARKS)
    unknown = [n for n in chosen if n not in BENCHMARKS + EXTRA]
    if unknown:
        raise typer.BadParameter(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS + EXTRA}")
    if framing not in ("single-object", "confluent"):
        raise typer.BadParameter(f"--framing is single-object or confluent, not {framing!r}")
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        module = importlib.import_module(f"driftline.bench.{name}")
        console.rule(f"bench {name}")
        extra = {"minutes": minutes, "rate": rate} if name == "soak" else {}
        if name == "ingest":
            extra["framing"] = framing
            extra["dataset"] = dataset
        if name == "features":
            extra["profile"] = profile
        before = measured_under(quick)
        if name == "pipeline" and redis_cluster:
            extra["redis_cluster"] = True
        result = module.run(out_dir=out, quick=quick, **extra)
        result["measured"] = {**before, "load_average_after": round(os.getloadavg()[0], 1),
                              "river_lr_events_per_s_after": host_speed()}
        suffix = "".join(f"-{v}" for v, default in ((framing, "single-object"), (dataset, "synthetic")) if v != default)
        path = out / (f"{name}{suffix}.json" if name == "ingest" else f"{name}.json")
        path.write_text(json.dumps(result, indent=2))
        console.print(summary(path.stem, result))
        console.print(f"[green]wrote {path}[/] (every figure, and each phase's progress)")
