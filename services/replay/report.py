"""The replay report: what was sent, what was learned, how well, and what the drift machinery did.

    >>> outcomes = [{"position": 7, "y_true": "1", "y_pred": "1", "proba": {"1": 0.9}}]
    >>> r = build_report({"dataset": "elec2"}, outcomes, window=1000)
    >>> r["prequential"]["accuracy"], r["examples_learned"]
    (1.0, 1)

Beside accuracy, a classifier's figures say how much of it is skill: Cohen's kappa (against a
guess with the same class frequencies, river's `CohenKappa`) and Žliobaitė's kappa-temporal,
against the no-change classifier that answers each example with the label of the one before it
(on a stream of long runs of one class, such as Elec2, a high accuracy can be all persistence):

    >>> pq = prequential([{"y_true": y, "y_pred": p} for y, p in zip("0011", "0010")], window=4)
    >>> pq["no_change_accuracy"], round(pq["kappa_temporal"], 3)
    (0.5, 0.5)

A regressor's outcomes carry their error (Outcome v2): then the figures are MAE, RMSE and R²
(river's metrics) and each window has its MAE.

    >>> reg = [{"y_true": "10", "y_pred": "12.0", "error": 2.0}, {"y_true": "20", "y_pred": "19.0", "error": -1.0}]
    >>> pq = prequential(reg, window=1)
    >>> pq["task"], pq["mae"], [w["mae"] for w in pq["windows"]]
    ('regression', 1.5, [2.0, 1.0])

Positions count labelled examples of THIS replay in stream order, from 0: the learner's own
positions (which keep counting across replays in one namespace) are shifted by the position of
this replay's first outcome. This module only computes and prints; it never talks to Kafka.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

REPORT_KEYS = (
    "dataset", "events_sent", "events_valid", "events_dlq", "labels_sent", "examples_learned",
    "label_delay", "model", "prequential", "drift_events", "model_swaps", "wall_s",
    "throughput_events_per_s",
)


def short_model_name(spec: str) -> str:
    """'preprocessing.StandardScaler() | linear_model.LogisticRegression()' ->
    'StandardScaler | LogisticRegression' (arguments kept when there are some)."""
    parts = []
    for part in spec.split("|"):
        part = re.sub(r"\b[a-z_][a-z0-9_]*\.", "", part.strip())  # drop module prefixes
        parts.append(re.sub(r"\(\s*\)$", "", part))
    return " | ".join(parts)


def kappa_temporal(accuracy: float, no_change_accuracy: float) -> float | None:
    """Žliobaitė's kappa-temporal: 1 = always right, 0 = as good as answering the previous label,
    below 0 = worse than that. None when the no-change classifier is always right."""
    if no_change_accuracy >= 1.0:
        return None
    return (accuracy - no_change_accuracy) / (1.0 - no_change_accuracy)


def prequential(outcomes: list[dict], window: int = 1000) -> dict[str, Any]:
    """Accuracy, kappa, kappa-temporal (and log loss, where probabilities came) of predictions made
    before learning, over the whole stream and per window of `window` examples, with the no-change
    baseline. `outcomes` in stream order."""
    if any(o.get("error") is not None for o in outcomes):
        return _regression(outcomes, window)
    from river import metrics

    kappa = metrics.CohenKappa()
    correct = no_change = 0
    loss_sum, loss_n = 0.0, 0
    windows = []
    w_correct = w_no_change = w_n = 0
    previous = None  # the label before: the no-change classifier's answer
    for o in outcomes:
        hit = o.get("y_pred") is not None and o["y_pred"] == o["y_true"]
        kappa.update(o["y_true"], o.get("y_pred"))
        same = previous is not None and previous == o["y_true"]
        previous = o["y_true"]
        correct += hit
        no_change += same
        w_correct += hit
        w_no_change += same
        w_n += 1
        proba = o.get("proba") or {}
        if proba:
            p = min(max(float(proba.get(o["y_true"], 0.0)), 1e-15), 1.0)
            loss_sum -= math.log(p)
            loss_n += 1
        if w_n == window or o is outcomes[-1]:
            end = len(windows) * window + w_n
            windows.append({"end": end, "accuracy": w_correct / w_n, "no_change_accuracy": w_no_change / w_n,
                            "kappa_temporal": kappa_temporal(w_correct / w_n, w_no_change / w_n), "n": w_n})
            w_correct = w_no_change = w_n = 0
    n = len(outcomes)
    accuracy, baseline = (correct / n, no_change / n) if n else (0.0, 0.0)
    return {
        "task": "classification",
        "accuracy": accuracy,
        "kappa": kappa.get() if n else None,
        "kappa_temporal": kappa_temporal(accuracy, baseline) if n else None,
        "no_change_accuracy": baseline,
        "log_loss": loss_sum / loss_n if loss_n else None,
        "mae": None, "rmse": None, "r2": None,
        "window": window,
        "windows": windows,
    }


def _regression(outcomes: list[dict], window: int) -> dict[str, Any]:
    """MAE, RMSE, R² (river's metrics) over the outcomes with a prediction, and each window's MAE
    (windows of `window` outcomes, as for classification)."""
    from river import metrics

    mae, rmse, r2 = metrics.MAE(), metrics.RMSE(), metrics.R2()
    windows = []
    w_abs = 0.0
    w_n = w_scored = 0
    for o in outcomes:
        w_n += 1
        if o.get("error") is not None:
            y_true = float(o["y_true"])
            y_pred = y_true + float(o["error"])
            for m in (mae, rmse, r2):
                m.update(y_true, y_pred)
            w_abs += abs(float(o["error"]))
            w_scored += 1
        if w_n == window:
            windows.append({"end": len(windows) * window + w_n, "mae": w_abs / w_scored if w_scored else None,
                            "n": w_n})
            w_abs, w_n, w_scored = 0.0, 0, 0
    if w_n:
        windows.append({"end": len(outcomes), "mae": w_abs / w_scored if w_scored else None, "n": w_n})
    return {"task": "regression", "accuracy": None, "log_loss": None,
            "mae": mae.get(), "rmse": rmse.get(), "r2": r2.get(), "window": window, "windows": windows}


def build_report(
    meta: dict[str, Any],
    outcomes: list[dict],
    *,
    drift: list[dict] | None = None,
    swaps: list[dict] | None = None,
    events_dlq: list[dict] | None = None,
    labels_dlq: list[dict] | None = None,
    window: int = 1000,
) -> dict[str, Any]:
    """The report dict. `meta` carries what the replay knows (dataset, counts sent, timings);
    the lists are the decoded records it collected. Outcomes are champion outcomes, possibly with
    duplicates after a learner restart (the first one per event counts, the rest are reported)."""
    seen: set[str] = set()
    unique, duplicates = [], 0
    for o in sorted(outcomes, key=lambda o: o["position"]):
        key = o.get("event_id")
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        unique.append(o)
    base = unique[0]["position"] if unique else 0

    def rel(position: int) -> int:
        return int(position) - base

    # A learner that restarts takes the decisions since its checkpoint again and may publish an
    # alarm twice: the same drift_id (it follows from where it was taken), counted once.
    drift = list({d.get("drift_id") or id(d): d for d in reversed(drift or [])}.values())[::-1]
    drift_events = [_drift_entry(d, rel) for d in drift if d.get("level", "drift") == "drift"]
    warnings = [_drift_entry(d, rel) for d in drift if d.get("level", "drift") != "drift"]
    model_swaps = [
        {"position": rel(s["position"]), "from_version": s.get("from_version"), "to_version": s["to_version"],
         "reason": s.get("reason")}
        for s in swaps or []
    ]
    learned = len(unique)
    t_first = meta.get("t_first_published")
    t_last = meta.get("t_last_learned")
    wall_s = max(t_last - t_first, 1e-9) if (t_first is not None and t_last is not None and learned) else 0.0
    events_dlq = events_dlq or []
    labels_dlq = labels_dlq or []
    report: dict[str, Any] = {
        "dataset": meta.get("dataset"),
        "events_sent": meta.get("events_sent", 0),
        "events_valid": meta.get("events_valid", 0),
        "events_valid_copies": meta.get("events_valid_copies", 0),  # at-least-once copies, counted once above
        "events_dlq": len(events_dlq),
        "labels_sent": meta.get("labels_sent", 0),
        "labels_dlq": len(labels_dlq),
        "examples_learned": learned,
        "label_delay": meta.get("label_delay", 0),
        "model": short_model_name(meta.get("model_spec") or ""),
        "model_spec": meta.get("model_spec"),
        "features": meta.get("features"),
        "prequential": prequential(unique, window),
        "drift_events": drift_events,
        "drift_warnings": warnings,
        "model_swaps": model_swaps,
        "wall_s": round(wall_s, 3),
        "throughput_events_per_s": round(learned / wall_s, 1) if wall_s else 0.0,
        "known_drift_positions": meta.get("drift_positions", []),
        "drift_width": meta.get("drift_width", 0),
        "dataset_size": meta.get("dataset_size"),
        "rate": meta.get("rate", 0),
        "publish_s": meta.get("publish_s"),
        "events_dlq_reasons": dict(Counter(d.get("reason") for d in events_dlq)),
        "labels_dlq_reasons": dict(Counter(d.get("reason") for d in labels_dlq)),
        "outcome_duplicates": duplicates,
        "model_versions": sorted({int(o["model_version"]) for o in unique if "model_version" in o}),
        "namespace": meta.get("namespace"),
        "run_id": meta.get("run_id"),
        "checks": meta.get("checks", {}),
        "started_at": meta.get("started_at"),
    }
    return report


def _drift_entry(d: dict, rel) -> dict[str, Any]:
    return {
        "position": rel(d["position"]),
        "kind": d.get("kind"),
        "detector": d.get("detector"),
        "level": d.get("level"),
        "feature": d.get("feature"),
        "model_version": d.get("model_version"),
        "error_before": d.get("error_before"),
        "error_after": d.get("error_after"),
        "drift_id": d.get("drift_id"),
    }


def write_report(report: dict[str, Any], report_dir: Path) -> Path:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary_table(report: dict[str, Any]):
    """A rich Table of the headline figures."""
    from rich.table import Table

    pq = report["prequential"]
    table = Table(title=f"driftline replay: {report['dataset']}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("model", report["model"]),
        ("features", str(report.get("features"))),
        ("label delay", f"{report['label_delay']:,}"),
        ("events sent / valid / dlq", f"{report['events_sent']:,} / {report['events_valid']:,} / {report['events_dlq']:,}"),
        ("labels sent / dlq", f"{report['labels_sent']:,} / {report.get('labels_dlq', 0):,}"),
        ("examples learned", f"{report['examples_learned']:,}"),
        *([("prequential MAE / RMSE / R²", f"{pq['mae']:.4f} / {pq['rmse']:.4f} / {pq['r2']:.4f}")]
          if pq.get("task") == "regression" else
          [("prequential accuracy", f"{pq['accuracy']:.4f}"),
           ("kappa / kappa-temporal", f"{_fmt(pq.get('kappa'))} / {_fmt(pq.get('kappa_temporal'))}"),
           ("no-change baseline (previous label)", f"{_fmt(pq.get('no_change_accuracy'))}"),
           ("log loss", f"{pq['log_loss']:.4f}" if pq.get("log_loss") is not None else "-")]),
        ("drift events (warnings)", f"{len(report['drift_events'])} ({len(report.get('drift_warnings', []))})"),
        ("model swaps", ", ".join(f"v{s['from_version']}->v{s['to_version']}@{s['position']}"
                                  for s in report["model_swaps"]) or "none"),
        ("known drift at", ", ".join(f"{p:,}" for p in report.get("known_drift_positions", [])) or "-"),
        ("wall time", f"{report['wall_s']:.1f} s"),
        ("throughput", f"{report['throughput_events_per_s']:,.0f} examples/s"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    return table
