"""`report.png`: windowed prequential accuracy (MAE for a regressor) over the stream, with the
no-change classifier's accuracy beside it and kappa-temporal in the title (how much of the
accuracy is skill), the known drift positions shaded, concept drift events as red lines, data
drift events as grey ticks, model swaps as green triangles.

    plot_report(report, Path("reports/demo/report.png"))

Headless (matplotlib's Agg backend); reads only the report dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_report(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pq = report["prequential"]
    windows = pq["windows"]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    regression = pq.get("task") == "regression"
    what, overall = ("MAE", pq.get("mae") or 0.0) if regression else ("accuracy", pq["accuracy"])
    windows = [w for w in windows if w.get(what.lower()) is not None]
    ends = [w["end"] for w in windows]
    accs = [w[what.lower()] for w in windows]
    ax.plot(ends, accs, marker="o", markersize=2.5, linewidth=1.2, color="#1f77b4",
            label=f"{what} per {pq.get('window', 1000):,} examples")
    ax.axhline(overall, color="#1f77b4", linestyle=":", linewidth=1, label=f"overall {overall:.3f}")
    if not regression and windows and windows[0].get("no_change_accuracy") is not None:
        ax.plot(ends, [w["no_change_accuracy"] for w in windows], linewidth=1.0, color="#7f7f7f",
                label=f"no-change classifier (previous label), overall {pq['no_change_accuracy']:.3f}")
    width = max(int(report.get("drift_width") or 0), 0)
    for i, p in enumerate(report.get("known_drift_positions", [])):
        half = max(width / 2, 150)
        ax.axvspan(p - half, p + half, color="orange", alpha=0.25, label="known drift" if i == 0 else None)
    drift = report.get("drift_events", [])
    concept = sorted({d["position"] for d in drift if d.get("kind") != "data"})
    data = sorted({d["position"] for d in drift if d.get("kind") == "data"})
    for i, p in enumerate(concept):
        ax.axvline(p, color="red", linewidth=1.2, alpha=0.85, label="concept drift detected" if i == 0 else None)
    if data:  # per-feature alarms: short grey ticks along the bottom, so they do not hide the curve
        ax.plot(data, [0.0] * len(data), linestyle="none", marker="|", markersize=14, color="grey",
                transform=ax.get_xaxis_transform(), label="data drift (a feature)")
    swaps = report.get("model_swaps", [])
    if swaps:
        top = ax.get_xaxis_transform()  # swaps along the top, whatever the y scale
        ax.scatter([s["position"] for s in swaps], [0.98] * len(swaps), marker="v", color="green", s=50,
                   zorder=5, label="model swap", transform=top)
        for s in swaps:
            ax.annotate(f"v{s['to_version']}", (s["position"], 0.98), xycoords=top, textcoords="offset points",
                        xytext=(3, -12), fontsize=7, color="green")
    ax.set_xlim(0, max(ends[-1] if ends else 1, 1))
    if regression:  # an error: lower is better, from 0
        ax.set_ylim(0.0, max(accs + [overall]) * 1.1 + 1e-9)
    else:
        baseline = [w["no_change_accuracy"] for w in windows if w.get("no_change_accuracy") is not None]
        low = min(accs + baseline) if accs else 0.0
        ax.set_ylim(max(0.0, min(low, overall) - 0.05), 1.03)
    ax.set_xlabel("labelled examples (stream order)")
    ax.set_ylabel(f"prequential {what}")
    skill = ""
    if not regression and pq.get("kappa_temporal") is not None:
        skill = f" · kappa {pq['kappa']:.3f}, kappa-temporal {pq['kappa_temporal']:.3f}"
    ax.set_title(f"{report['dataset']} · {report['model']} · features {report.get('features')} · "
                 f"label delay {report['label_delay']}{skill}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, ncol=3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
