"""`driftline bench drift`: how the drift policy and the champion/challenger rule behave on streams
with a known drift (and on stationary ones), next to the same model never retrained and to river's
HoeffdingAdaptiveTreeClassifier (HAT), all in-process.

What runs: IN-PROCESS, not through Kafka. Each stream is replayed with label delay 0 through the
very object the learner runs, `learner.adaptation.Adaptation` (the retraining policy on the
champion's errors and on the features, the warm start, the contests, promotion and the displaced
champion's way back), in the order the learner takes a replay (`simulate`), so the figures
measure the learner's logic, not a copy, and do not depend on the machine's load. It is the
reference the services are held to: tests/test_drift_determinism.py replays through the real
services at full speed and checks the same drift positions, swaps and predictions.

    result = run(Path("reports/bench"), quick=True)     # JSON + drift.md table + drift.png

Per (stream, model): detection delay, false alarms (concept drift alarms before the drift),
examples from the drift to the first promotion, accuracy over the 10,000 examples after the drift
for driftline / never retrained / HAT; on stationary streams the overall accuracies and alarms.

Recurring rows (Elec2: short regimes that come back): the loop against the same model never
retrained, at label delay 0 and 100, in accuracy and kappa-temporal, with its alarms, swaps and
restores -- where a retrain does not pay, the loop must not cost accuracy.

Regression rows (`friedman-abrupt`, `friedman-gradual`): the same policy on the champion's absolute
residuals and the learner's paired (Wilcoxon) contest; MAE over the 10,000 examples after the drift
for driftline / never retrained / river's HoeffdingAdaptiveTreeRegressor / ARFRegressor (in-process).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from ..learner.adaptation import Adaptation
from ..learner.champion import predict
from ..learner.labels import error, is_regressor, learn, to_river
from ..learner.spec import parse_model
from ..replay.datasets import load
from ..shared.settings import DriftSettings, LearnerSettings

TREE = "tree.HoeffdingTreeClassifier()"
LOGREG = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"
HAT = "tree.HoeffdingAdaptiveTreeClassifier(seed={seed})"
# HAT's bootstrap sampling is random, and one seed can be far from typical (agrawal-abrupt, 10,000
# rows after the drift: 0.665 to 0.834 over seeds 0-9 and 42). The reference is the mean of these.
HAT_SEEDS = (0, 1, 2, 3, 4)
DRIFTING = ("agrawal-abrupt", "sea-abrupt", "agrawal-gradual")
STATIONARY = ("agrawal-stationary", "sea-stationary")
AFTER = 10_000
LINREG = "preprocessing.StandardScaler() | linear_model.LinearRegression()"
TREE_R = "tree.HoeffdingTreeRegressor()"
ADAPTIVE_REGRESSORS = {"HATR": "tree.HoeffdingAdaptiveTreeRegressor(seed=42)",
                       "ARFR": "forest.ARFRegressor(n_models=5, seed=42)"}
REGRESSION = ("friedman-abrupt", "friedman-gradual")


def prequential_errors(dataset: str, spec: str, limit: int | None = None) -> list[float]:
    """Absolute error per example for a regressor that is never retrained by driftline (test-then-train)."""
    model = parse_model(spec)
    errors = []
    for x, y, _ in itertools.islice(load(dataset).rows(), limit):
        errors.append(abs(error(predict(model, x), y) or 0.0))
        learn(model, x, y)
    return errors


def prequential_hits(dataset: str, spec: str, limit: int | None = None, label_delay: int = 0,
                     rows: list | None = None) -> list[int]:
    """1/0 per example for a model that is never retrained: river's own loop, each example
    predicted, then the label of the one `label_delay` before it learned (test-then-train at 0).
    `rows` (as `simulate` takes them) instead of the dataset's."""
    model = parse_model(spec)
    hits, pending = [], deque()
    source = rows if rows is not None else load(dataset).rows()
    for x, y, _ in itertools.islice(source, limit):
        hits.append(int(predict(model, x) == y))
        pending.append((x, y))
        if len(pending) > label_delay:
            lx, ly = pending.popleft()
            model.learn_one(lx, to_river(ly))
    return hits


def recurring(dataset: str, spec: str, label_delay: int) -> dict[str, Any]:
    """A stream of short regimes that come back (Elec2): the loop against never retraining, in
    accuracy and in kappa-temporal (Žliobaitė's skill over the no-change classifier)."""
    from ..replay.report import prequential

    rows = [y for _, y, _ in load(dataset).rows()]
    sim = simulate(dataset, spec, label_delay=label_delay)
    never = prequential_hits(dataset, spec, label_delay=label_delay)
    ours = prequential([{"y_true": y, "y_pred": p} for y, p in zip(rows, sim["predictions"])])
    theirs = sum(never) / len(never)
    return {"dataset": dataset, "model": spec, "label_delay": label_delay, "accuracy": round(ours["accuracy"], 4),
            "accuracy_never_retrained": round(theirs, 4), "kappa": round(ours["kappa"], 4),
            "kappa_temporal": round(ours["kappa_temporal"], 4), "no_change_accuracy": round(ours["no_change_accuracy"], 4),
            "kappa_temporal_never_retrained": round((theirs - ours["no_change_accuracy"]) /
                                                    (1 - ours["no_change_accuracy"]), 4),
            "alarms": sum(1 for a in sim["alarms"] if a["level"] == "drift" and a["kind"] == "concept"),
            "swaps": len(sim["swaps"]), "restored": len(sim["restored"])}


def hat_hits(dataset: str, limit: int | None = None) -> list[float]:
    """Per example, the share of HAT_SEEDS' adaptive trees that got it right (test-then-train).
    The seeds are independent runs: on several cores they run side by side, in processes of their
    own (spawned: the caller may hold threads, librdkafka's, that a fork would copy mid-lock)."""
    specs = [HAT.format(seed=seed) for seed in HAT_SEEDS]
    workers = min(len(specs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = list(pool.map(partial(prequential_hits, dataset, limit=limit), specs))
    else:
        runs = [prequential_hits(dataset, spec, limit) for spec in specs]
    return [sum(hits) / len(runs) for hits in zip(*runs)]


def simulate(dataset: str, spec: str, drift: DriftSettings | None = None,
             learner: LearnerSettings | None = None, label_delay: int = 0, limit: int | None = None,
             rows: list | None = None) -> dict[str, Any]:
    """The champion's hits under the learner's own drift loop (`learner.adaptation.Adaptation`:
    the policy, the warm start, the contests, the displaced champion's way back), in the order the
    learner takes a replay with this label delay: event j is scored, then the label of event
    j - label_delay is learned. This is the reference the services must match, decision for
    decision (tests/test_drift_determinism.py)."""
    drift = drift or DriftSettings()
    learner = learner or LearnerSettings()
    loop = Adaptation.fresh(spec, learner, drift, "bench")
    regression = is_regressor(loop.roles.champion.model)
    hits, predictions = [], []
    events: dict[str, list] = {"alarms": [], "requests": [], "swaps": [], "dropped": [], "restored": []}

    def note(changes) -> None:
        for change in changes:
            if change.kind == "alarm":
                events["alarms"].append({k: change.record[k] for k in ("position", "kind", "level", "error_before",
                                                                        "error_after", "feature")})
            elif change.kind == "request":
                events["requests"].append(change.record["position"])
            elif change.kind in ("promoted", "restored"):
                events["swaps"].append({"position": change.position, "from_version": change.other.version,
                                        "to_version": change.slot.version, "reason": change.kind})
                if change.kind == "restored":
                    events["restored"].append(change.position)
            elif change.kind == "dropped":
                events["dropped"].append(change.position)

    pending: deque = deque()
    source = rows if rows is not None else load(dataset).rows()
    for x, y, _ in itertools.islice(source, limit):
        answers, changes = loop.score(x)
        note(changes)
        predictions.append(answers["champion"]["y_pred"])
        pending.append((x, y, answers))
        while len(pending) > label_delay:
            lx, ly, la = pending.popleft()
            champion_answer = la["champion"]["y_pred"]
            hits.append(abs(error(champion_answer, ly) or 0.0) if regression else int(champion_answer == ly))
            note(loop.learn(lx, ly, la, len(hits) - 1).changes)
    while pending:
        lx, ly, la = pending.popleft()
        champion_answer = la["champion"]["y_pred"]
        hits.append(abs(error(champion_answer, ly) or 0.0) if regression else int(champion_answer == ly))
        note(loop.learn(lx, ly, la, len(hits) - 1).changes)
    return {"hits": hits, "predictions": predictions, **events,
            "swap_positions": [s["position"] for s in events["swaps"]]}


def mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def evaluate(dataset: str, spec: str, hat_reference: list[float] | None = None) -> dict[str, Any]:
    ds = load(dataset)
    started = time.perf_counter()
    sim = simulate(dataset, spec)
    never = prequential_hits(dataset, spec)
    hat = hat_reference if hat_reference is not None else hat_hits(dataset)
    concept = [a for a in sim["alarms"] if a["level"] == "drift" and a["kind"] == "concept"]
    row: dict[str, Any] = {"dataset": dataset, "model": spec, "examples": len(sim["hits"]),
                           "alarms": [a["position"] for a in concept], "retrain_requests": sim["requests"],
                           "swaps": sim["swap_positions"], "restored": sim["restored"],
                           "challengers_dropped": sim["dropped"]}
    if ds.drift_positions:
        at = ds.drift_positions[0]
        start = at - ds.drift_width // 2  # a gradual drift starts half its width early
        after = [a["position"] for a in concept if a["position"] >= start]
        later_swaps = [s for s in sim["swap_positions"] if s >= start]
        window = slice(at, at + AFTER)
        row.update({
            "drift_at": at,
            "detection_delay": after[0] - at if after else None,
            "false_alarms": sum(1 for a in concept if a["position"] < start),
            "examples_to_swap": later_swaps[0] - at if later_swaps else None,
            "accuracy_after": mean(sim["hits"][window]),
            "accuracy_after_never_retrained": mean(never[window]),
            "accuracy_after_hat": mean(hat[window]),
            "accuracy_before": mean(sim["hits"][max(0, at - AFTER):at]),
        })
    else:
        row.update({
            "false_alarms": len(concept),
            "accuracy": mean(sim["hits"]),
            "accuracy_never_retrained": mean(never),
            "accuracy_hat": mean(hat),
        })
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["_curves"] = {"driftline": sim["hits"], "never": never, "hat": hat}
    return row


def evaluate_regression(dataset: str, spec: str, references: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """A regression row: detection delay, false alarms, examples to the swap, and MAE after the drift
    for driftline, the same model never retrained, and river's adaptive regressors."""
    ds = load(dataset)
    started = time.perf_counter()
    sim = simulate(dataset, spec)
    never = prequential_errors(dataset, spec)
    references = references if references is not None else {
        name: prequential_errors(dataset, ref) for name, ref in ADAPTIVE_REGRESSORS.items()}
    concept = [a for a in sim["alarms"] if a["level"] == "drift" and a["kind"] == "concept"]
    at = ds.drift_positions[0]
    start = at - ds.drift_width // 2
    after = [a["position"] for a in concept if a["position"] >= start]
    later_swaps = [s for s in sim["swap_positions"] if s >= start]
    window = slice(at, at + AFTER)
    row: dict[str, Any] = {
        "dataset": dataset, "model": spec, "task": "regression", "examples": len(sim["hits"]),
        "alarms": [a["position"] for a in concept], "retrain_requests": sim["requests"],
        "swaps": sim["swap_positions"], "restored": sim["restored"], "challengers_dropped": sim["dropped"],
        "drift_at": at,
        "detection_delay": after[0] - at if after else None,
        "false_alarms": sum(1 for a in concept if a["position"] < start),
        "examples_to_swap": later_swaps[0] - at if later_swaps else None,
        "mae_before": mean(sim["hits"][max(0, at - AFTER):at]),
        "mae_after": mean(sim["hits"][window]),
        "mae_after_never_retrained": mean(never[window]),
        **{f"mae_after_{name.lower()}": mean(errors[window]) for name, errors in references.items()},
    }
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def regression_table(rows: list[dict]) -> str:
    lines = ["| stream | model | delay | false alarms | to swap | MAE after (driftline / never / HATR / ARFR) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mae = (f"{r['mae_after']:.3f} / {r['mae_after_never_retrained']:.3f} / {r['mae_after_hatr']:.3f} / "
               f"{r['mae_after_arfr']:.3f}")
        lines.append(f"| {r['dataset']} | {short(r['model'])} | {r['detection_delay']} | {r['false_alarms']} | "
                     f"{r['examples_to_swap']} | {mae} |")
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    datasets = ("agrawal-abrupt", "sea-stationary") if quick else DRIFTING + STATIONARY
    models = (TREE,) if quick else (TREE, LOGREG)
    rows = []
    for dataset in datasets:
        hat = hat_hits(dataset)  # the same for both models
        for spec in models:
            rows.append(evaluate(dataset, spec, hat))
    regression_rows = []
    for dataset in (("friedman-abrupt",) if quick else REGRESSION):
        references = {name: prequential_errors(dataset, ref) for name, ref in ADAPTIVE_REGRESSORS.items()}
        for spec in ((LINREG,) if quick else (LINREG, TREE_R)):
            regression_rows.append(evaluate_regression(dataset, spec, references))
    recurring_rows = [recurring("elec2", spec, delay) for spec in (LOGREG,) + (() if quick else (TREE,))
                      for delay in ((100,) if quick else (0, 100))]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = (markdown_table(rows) + "\n\n" + regression_table(regression_rows) + "\n\n" +
             recurring_table(recurring_rows))
    (out_dir / "drift.md").write_text(table + "\n")
    plot(rows, out_dir / "drift.png")
    print(table)
    settings = DriftSettings()
    return {
        "mode": "in-process: learner.adaptation.Adaptation, the learner's own drift loop (not through Kafka)",
        "detector": settings.detector, "cooldown": settings.cooldown,
        "min_error_increase": settings.min_error_increase,
        "learner": {k: getattr(LearnerSettings(), k) for k in ("warm_start", "promotion_rule", "promote_after",
                                                                 "promote_window", "promote_margin",
                                                                 "promote_confidence", "max_shadow")},
        "hat": f"mean of {len(HAT_SEEDS)} seeds of {HAT.format(seed='s')}",
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "regression_rows": regression_rows,
        "recurring_rows": recurring_rows,
        "adaptive_regressors": ADAPTIVE_REGRESSORS,
        "table": str(out_dir / "drift.md"), "plot": str(out_dir / "drift.png"),
    }


def recurring_table(rows: list[dict]) -> str:
    lines = ["| stream | model | label delay | accuracy (driftline / never retrained) | kappa-temporal (driftline / never) "
             "| no-change | alarms | swaps (restored) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {short(r['model'])} | {r['label_delay']} | {r['accuracy']:.4f} / "
                     f"{r['accuracy_never_retrained']:.4f} | {r['kappa_temporal']:.3f} / "
                     f"{r['kappa_temporal_never_retrained']:.3f} | {r['no_change_accuracy']:.3f} | {r['alarms']} | "
                     f"{r['swaps']} ({r['restored']}) |")
    return "\n".join(lines)


def short(spec: str) -> str:
    return {TREE: "HoeffdingTree", LOGREG: "LogReg", LINREG: "LinReg", TREE_R: "HoeffdingTreeRegressor"}.get(spec, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| stream | model | delay | false alarms | to swap | acc. after (driftline / never / HAT, mean of seeds) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "drift_at" in r:
            acc = f"{r['accuracy_after']:.3f} / {r['accuracy_after_never_retrained']:.3f} / {r['accuracy_after_hat']:.3f}"
            lines.append(f"| {r['dataset']} | {short(r['model'])} | {r['detection_delay']} | {r['false_alarms']} | "
                         f"{r['examples_to_swap']} | {acc} |")
        else:
            acc = f"{r['accuracy']:.3f} / {r['accuracy_never_retrained']:.3f} / {r['accuracy_hat']:.3f} (whole stream)"
            lines.append(f"| {r['dataset']} | {short(r['model'])} | - | {r['false_alarms']} | "
                         f"{r['swaps'][0] if r['swaps'] else '-'} | {acc} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, window: int = 500) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.3 * len(rows)), dpi=100, sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        for name, color in (("driftline", "#1f77b4"), ("never", "#7f7f7f"), ("hat", "#2ca02c")):
            hits = r["_curves"][name]
            xs = list(range(window, len(hits) + 1, window))
            ax.plot(xs, [sum(hits[x - window:x]) / window for x in xs], color=color, linewidth=1.1,
                    label={"driftline": "driftline", "never": "never retrained", "hat": "HAT"}[name])
        if r.get("drift_at") is not None:
            ax.axvline(r["drift_at"], color="orange", linewidth=3, alpha=0.4)
        for a in r["alarms"]:
            ax.axvline(a, color="red", linewidth=0.8)
        for s in r["swaps"]:
            ax.scatter([s], [1.0], marker="v", color="green", s=30, zorder=5)
        ax.set_title(f"{r['dataset']} — {short(r['model'])}", fontsize=9)
        ax.set_ylim(0.3, 1.02)
        ax.set_ylabel("accuracy")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[-1, 0].set_xlabel(f"examples (accuracy per {window})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
