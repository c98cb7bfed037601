"""docs/benchmarks.md: the headline figures of every result under reports/bench/, one table each,
with when, on which commit and under what load they were measured (`driftline bench` records it).

    >>> headline("pipeline", {"throughput": {"logreg": {"ratio": 0.061, "pipeline_events_per_s": 4900,
    ...     "processes": "serve all", "in_process_events_per_s": 80000, "aim_ratio": 0.1}}})[0]
    ('logreg, serve all: examples/s (ratio to river in-process)', '4,900 (0.061; aim 0.1)')
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..replay.report import short_model_name
from .configuration import table_cell

HEADER = """# Benchmarks

Generated from `reports/bench/*.json` by `driftline reference benchmarks --write`; each result
was written by `driftline bench NAME` (`make bench` runs them all), which starts its own Kafka,
Redis and services on free ports, measures, and stops them. Speed and memory targets are checked
here, never in timed tests. The machine is the development machine (2 cores, 24 GiB); on two
shared cores only ratios measured in one run compare, and each table says the load it ran under
and, since 2026-12-07, how fast the host ran Python before and after it
(`river_lr_events_per_s_before`/`_after`: river's logistic regression in process, Elec2): its pace
moves by 30% within minutes, and a result of a slow moment compares with one of a fast moment
through that figure.
"""

Rows = list[tuple[str, str]]


def _n(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}"
    return str(x)


def _pipeline(r: dict) -> Rows:
    rows: Rows = []
    for name, t in r.get("throughput", {}).items():
        what = t.get("processes", "ingestion, features, learner")
        rows.append((f"{name}, {what}: examples/s (ratio to river in-process)",
                     f"{_n(t['pipeline_events_per_s'])} ({t['ratio']}; aim {t.get('aim_ratio')})"))
        if t.get("hot_path"):
            hot = t["hot_path"]
            rows.append((f"{name}, hot path alone (ingestion, features, learner)",
                         f"{_n(hot['pipeline_events_per_s'])} ({hot['ratio']}); serve all / hot path "
                         f"{t.get('whole_over_hot_path')}"))
        if t.get("cpu_us_per_event"):
            rows.append((f"{name}, CPU µs per event", ", ".join(f"{k} {_n(v)}" for k, v in t["cpu_us_per_event"].items())))
        if "drift_events" in t:
            rows.append((f"{name}, drift events / swaps", f"{t['drift_events']} / {len(t.get('model_swaps', []))}"))
    for key, how in (("latency", ""), ("latency_few_partitions", ", streams of {} partitions")):
        lat = r.get(key) or {}
        steady = lat.get("steady_latency_ms") or lat.get("latency_ms")
        if steady:
            rows.append((f"publish → prediction at {_n(lat.get('rate_eps'))} ev/s"
                         f"{how.format(lat.get('stream_partitions'))}, p50 / p95 / p99 ms",
                         _p50_p95_p99(steady)))
    q = r.get("quality")
    if q:
        rows.append((f"quality: {q['dataset']}, {q['features']} features, delay {q['label_delay']}",
                     f"accuracy {q['accuracy']}, kappa-temporal {q.get('kappa_temporal', '-')} "
                     f"(no-change {q.get('no_change_accuracy', '-')})"))
    return rows


def _p50_p95_p99(percentiles: dict) -> str:
    """
        >>> _p50_p95_p99({"p50": 46.2, "p95": 71.8, "p99": 89.6, "max": 120.7})
        '46.2 / 71.8 / 89.6'
    """
    return f"{percentiles['p50']} / {percentiles['p95']} / {percentiles['p99']}"


def _ingest(r: dict) -> Rows:
    rows = [("events/s, ingestion → features end to end", _n(r.get("throughput_events_per_s"))),
            ("events/s, ingestion stage alone", _n(r.get("ingestion_stage_events_per_s")))]
    for key in ("latency", "latency_sustained"):
        lat = r.get(key) or {}
        if isinstance(lat, dict) and lat.get("ms"):
            lost = f", {_n(lat['lost'])} of {_n(lat['lost'] + lat['events'])} never came" if lat.get("lost") else ""
            queued = ", queueing (not sustained)" if lat.get("sustained") is False else ""
            rows.append((f"publish → feature vector at {_n(lat.get('rate_eps'))} ev/s, p50 / p95 / p99 ms",
                         _p50_p95_p99(lat["ms"]) + lost + queued))
    return rows


def _predict(r: dict) -> Rows:
    rows: Rows = []
    for conns in ("c16", "c64"):
        c = r.get(conns)
        if c:
            p = c["predict"]
            rows.append((f"/v1/predict, {conns[1:]} connections: req/s, p50 / p99 ms, server CPU ms/req",
                         f"{_n(p['requests_per_s'])}, {p['p50_ms']} / {p['p99_ms']}, "
                         f"{p.get('server_cpu_ms_per_request')}"))
            rows.append((f"{conns[1:]} connections: predict / health, health / bare FastAPI",
                         f"{c.get('ratio')} / {c.get('health_ratio')}"))
    return rows


def _drift(r: dict) -> Rows:
    rows: Rows = []
    for row in r.get("rows", []):
        model = short_model_name(row["model"])
        if "drift_at" in row:
            rows.append((f"{row['dataset']}, {model}: accuracy over the 10,000 rows after the drift "
                         f"(driftline / never retrained / HAT); swap after",
                         f"{row['accuracy_after']} / {row['accuracy_after_never_retrained']} / "
                         f"{row['accuracy_after_hat']}; {row['examples_to_swap']}"))
        else:
            rows.append((f"{row['dataset']}, {model}: accuracy (driftline / never retrained); false alarms",
                         f"{row['accuracy']} / {row['accuracy_never_retrained']}; {row['false_alarms']}"))
    for row in r.get("recurring_rows", []):
        model = short_model_name(row["model"])
        rows.append((f"{row['dataset']}, {model}, label delay {row['label_delay']}: accuracy (driftline / never "
                     f"retrained), kappa-temporal, swaps (restored)",
                     f"{row['accuracy']} / {row['accuracy_never_retrained']}, {row['kappa_temporal']} / "
                     f"{row['kappa_temporal_never_retrained']}, {row['swaps']} ({row['restored']})"))
    return rows


def _features(r: dict) -> Rows:
    """
        >>> _features({"events": 1000, "aggregates": 10, "keys": ["entity_id", "merchant"], "cpu_us_per_event": 159.4,
        ...     "aim_cpu_us_per_event": 100.0, "events_per_s": 5046.1, "stage_wall_us_per_event": {"decode": 23.4}})[0]
        ('10 aggregates over entity_id, merchant: CPU µs per event', '159.4 (aim 100.0)')
    """
    rows = [(f"{r.get('aggregates')} aggregates over {', '.join(r.get('keys', []))}: CPU µs per event",
             f"{r.get('cpu_us_per_event')} (aim {r.get('aim_cpu_us_per_event')})"),
            ("events/s, the worker alone on a backlog of its input", _n(r.get("events_per_s")))]
    stages = r.get("stage_wall_us_per_event") or {}
    if stages:
        rows.append(("wall µs per event by stage", ", ".join(f"{k} {v}" for k, v in stages.items())))
    return rows


def _serving(r: dict) -> Rows:
    """One row per HTTP-only loop: the served accuracy against river's own loop.

        >>> _serving({"runs": {"lr-phishing": {"model": "linear_model.LogisticRegression()", "dataset": "Phishing",
        ...     "served_accuracy": 0.8888, "river_accuracy": 0.8928, "points_behind_river": 0.4, "aim_points": 1.0,
        ...     "rows_per_s": 199.5, "behind_client": {"p50": 6}}}})[0][1]
        '0.8888 / 0.8928 (0.4 points; aim 1.0), 199.5 rows/s, 6 labels behind'
    """
    rows: Rows = []
    for run in r.get("runs", {}).values():
        model = short_model_name(run["model"])
        rows.append((f"{run['dataset']}, {model}: served / river's accuracy at delay {r.get('label_delay', 0)}",
                     f"{run['served_accuracy']} / {run['river_accuracy']} ({run['points_behind_river']} points; "
                     f"aim {run['aim_points']}), {run['rows_per_s']} rows/s, "
                     f"{_n((run.get('behind_client') or {}).get('p50'))} labels behind"))
    return rows


def _soak(r: dict) -> Rows:
    """
        >>> _soak({"minutes": 20.0, "rate_eps": 100.0, "events_sent": 120000, "examples_learned": 120000,
        ...     "services": {"learner": {"rss_mb_end": 200.2, "rss_growth_second_half_mb": -1.1, "lag_end": 1.0}}})[1]
        ('learner: RSS at the end, growth over the second half (MB); lag at the end', '200.2, -1.1; 1')
    """
    rows = [(f"{_n(r.get('minutes'), 1)} minutes at {_n(r.get('rate_eps'))} events/s: events sent / learned",
             f"{_n(r.get('events_sent'))} / {_n(r.get('examples_learned'))}")]
    for name, s in (r.get("services") or {}).items():
        rows.append((f"{name}: RSS at the end, growth over the second half (MB); lag at the end",
                     f"{s.get('rss_mb_end')}, {s.get('rss_growth_second_half_mb')}; {_n(s.get('lag_end'))}"))
    return rows


def _doors(r: dict) -> Rows:
    """
        >>> _doors({"calls_per_round": 1000, "us_per_request": {"open": 0.41, "100 tokens": 2.3}})
        [('the client door, µs per request: open', '0.41'), ('the client door, µs per request: 100 tokens', '2.3')]
    """
    return [(f"the client door, µs per request: {case}", str(us)) for case, us in r.get("us_per_request", {}).items()]


def _generic(r: dict) -> Rows:
    """Any other result: its top-level numbers and flags."""
    return [(k, _n(v, 3) if isinstance(v, float) else str(v)) for k, v in r.items()
            if isinstance(v, (int, float, bool, str)) and k not in ("plot", "table")][:12]


HEADLINES: dict[str, Callable[[dict], Rows]] = {"pipeline": _pipeline, "ingest": _ingest, "predict": _predict,
                                                "drift": _drift, "features": _features, "serving": _serving,
                                                "soak": _soak, "doors": _doors}


def headline(name: str, result: dict) -> Rows:
    return HEADLINES.get(name.split("-")[0], _generic)(result)


def _first(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def figures(folder: Path = Path("reports/bench")) -> Rows:
    """The README's figures: one row per result, the figure a reader asks for first."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}
    rows: Rows = []
    pipeline = results.get("pipeline", {})
    lr = pipeline.get("throughput", {}).get("logreg")
    if lr:
        hot = lr.get("hot_path")
        extra = (f"; hot path alone {hot['ratio']}, serve all / hot path {lr.get('whole_over_hot_path')}"
                 if hot else "")
        rows.append((f"throughput, {lr.get('processes', 'ingestion, features, learner')}, LR, Elec2 raw, label delay "
                     f"{pipeline.get('label_delay_throughput')}",
                     f"{_n(lr['pipeline_events_per_s'])} ev/s = **{lr['ratio']}** of river in-process{extra}"))
    lat = (pipeline.get("latency") or {}).get("steady_latency_ms")
    if lat:
        few = (pipeline.get("latency_few_partitions") or {})
        extra = (f" ({_p50_p95_p99(few['steady_latency_ms'])} with streams of {few['stream_partitions']} partitions)"
                 if few.get("steady_latency_ms") else "")
        rows.append((f"publish → prediction at {_n(pipeline['latency'].get('rate_eps'))} ev/s, p50 / p95 / p99",
                     f"{_p50_p95_p99(lat)} ms{extra}"))
    quality = pipeline.get("quality")
    if quality:
        kt = quality.get("kappa_temporal")
        rows.append(("Elec2, default features, label delay 0",
                     f"accuracy {quality['accuracy']}" + (f", kappa-temporal {kt}" if kt is not None else "")))
    drift = results.get("drift", {})
    abrupt = _first(drift.get("rows", []), dataset="agrawal-abrupt", model="tree.HoeffdingTreeClassifier()")
    if abrupt:
        rows.append(("abrupt drift (Agrawal, Hoeffding tree): accuracy after the change, driftline / HAT / never",
                     f"{abrupt['accuracy_after']} / {abrupt['accuracy_after_hat']} / "
                     f"{abrupt['accuracy_after_never_retrained']} (swap {abrupt['examples_to_swap']} rows after)"))
    for delay in (100, 0):
        rec = _first(drift.get("recurring_rows", []), dataset="elec2", label_delay=delay,
                     model="preprocessing.StandardScaler() | linear_model.LogisticRegression()")
        if rec:
            rows.append((f"recurring regimes (Elec2, raw LR, label delay {delay}): driftline / never retrained",
                         f"{rec['accuracy']} / {rec['accuracy_never_retrained']}"))
    ingest = results.get("ingest")
    if ingest:
        rows.append(("ingestion → features, default features, 1,000 entities",
                     f"{_n(ingest.get('throughput_events_per_s'))} ev/s"))
    payments = results.get("ingest-payments")
    if payments:
        rows.append(("ingestion → features, payments: 10 windowed aggregates over the card and the merchant",
                     f"{_n(payments.get('throughput_events_per_s'))} ev/s"))
    features = results.get("features")
    if features:
        rows.append(("features stage, payments aggregates: CPU per event",
                     f"{features.get('cpu_us_per_event')} µs"))
    predict = (results.get("predict") or {}).get("c16")
    if predict:
        rows.append(("/v1/predict, one worker, 16 connections: p99, req/s ÷ /health's",
                     f"{predict['predict']['p99_ms']} ms, {predict.get('ratio')}"))
    serving = (results.get("serving") or {}).get("runs") or {}
    if serving:
        behind = [r["points_behind_river"] for r in serving.values()]
        rows.append(("HTTP-only predict-then-label loop (Phishing, Bananas; LR, tree, ARF): points behind river's "
                     "own loop at delay 0", f"{min(behind)} to {max(behind)}"))
    return rows


README_START, README_END = "<!-- figures: driftline reference benchmarks --write -->", "<!-- /figures -->"


def table_rows(rows: Rows) -> list[str]:
    """(figure, value) pairs as the rows of a two-column Markdown table.

        >>> table_rows([("model", "A | B")])
        ['| model | A \\\\| B |']
    """
    return [f"| {table_cell(k)} | {table_cell(v)} |" for k, v in rows]


def readme_with_figures(readme: str, folder: Path = Path("reports/bench")) -> str:
    """The README with its figures table (between the markers) made from the results."""
    table = "\n".join(["| what | figure |", "|---|---|", *table_rows(figures(folder))])
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[:start] + "\n" + table + "\n" + readme[end:]


def render(folder: Path = Path("reports/bench")) -> str:
    lines = [HEADER]
    for path in sorted(Path(folder).glob("*.json")):
        result = json.loads(path.read_text())
        measured = result.get("measured", {})
        when = ", ".join(f"{k} {v}" for k, v in measured.items()) or "(not recorded)"
        lines += ["", f"## {path.stem}", "", f"[{path.name}](../reports/bench/{path.name}) — measured: {when}", "",
                  "| figure | value |", "|---|---|"]
        lines += table_rows(headline(path.stem, result))
    return "\n".join(lines) + "\n"
