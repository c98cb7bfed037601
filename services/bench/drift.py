"""`driftline bench drift`: how the drift policy and the champion/challenger rule behave on streams
with a known drift (and on stationary ones), next to the same model never retrained and to river's
HoeffdingAdaptiveTreeClassifier (HAT), all in-process.

What runs: IN-PROCESS, not through Kafka. Each stream is replayed with label delay 0 through the
same code the services run -- `drift.policy.RetrainPolicy` (detector, error-went-up gate, cooldown)
fed with the champion's errors, and the learner's own `learner.champion.Roles` (both roles' test-then-
train, the contest, promotion) and `warm_start` (test-then-train since the change point) -- so the
figures measure the learner's logic, not a copy, and do not depend on the machine's load. The end-to-end tests
(tests/test_drift_e2e.py) check the same behaviour through the real services.

    result = run(Path("reports/bench"), quick=True)     # JSON + drift.md table + drift.png

Per (stream, model): detection delay, false alarms (concept drift alarms before the drift),
examples from the drift to the first promotion, accuracy over the 10,000 examples after the drift
for driftline / never retrained / HAT; on stationary streams the overall accuracies and alarms.

Regression rows (`friedman-abrupt`, `friedman-gradual`): the same policy on the champion's absolute
residuals and the learner's paired (Wilcoxon) contest; MAE over the 10,000 examples after the drift
for driftline / never retrained / river's HoeffdingAdaptiveTreeRegressor / ARFRegressor (in-process).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..drift.policy import RetrainPolicy
from ..learner.champion import Contest, Roles, Slot, predict, warm_start
from ..learner.labels import error, is_regressor, learn, to_river
from ..learner.prequential import Prequential
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


def prequential_hits(dataset: str, spec: str, limit: int | None = None) -> list[int]:
    """1/0 per example for a model that is never retrained (test-then-train)."""
    model = parse_model(spec)
    hits = []
    for x, y, _ in itertools.islice(load(dataset).rows(), limit):
        hits.append(int(predict(model, x) == y))
        model.learn_one(x, to_river(y))
    return hits


def hat_hits(dataset: str, limit: int | None = None) -> list[float]:
    """Per example, the share of HAT_SEEDS' adaptive trees that got it right (test-then-train)."""
    runs = [prequential_hits(dataset, HAT.format(seed=seed), limit) for seed in HAT_SEEDS]
    return [sum(hits) / len(runs) for hits in zip(*runs)]


def simulate(dataset: str, spec: str, drift: DriftSettings | None = None,
             learner: LearnerSettings | None = None) -> dict[str, Any]:
    """The champion's hits with driftline's policy and the learner's roles, contest and warm start
    (`learner.champion.Roles`, `warm_start`), plus what happened."""
    drift = drift or DriftSettings()
    learner = learner or LearnerSettings()
    policy = RetrainPolicy(drift, model="bench", clock=lambda: 0.0)
    roles = Roles(Slot("champion", 1, parse_model(spec), Prequential(learner.window)))
    policy.swap(roles.champion.version)
    buffer: deque = deque(maxlen=max(1, learner.warm_start))  # (position, x, y, champion hit, its version)
    regression = is_regressor(roles.champion.model)
    hits, alarms, requests, swaps, dropped = [], [], [], [], []
    for position, (x, y, _) in enumerate(load(dataset).rows()):
        answers = roles.score(x)  # label delay 0: each example is scored, then learned at once
        version = roles.champion.version
        if regression:  # the champion's absolute error stands for its hit (policy, contest, curves)
            hit = abs(error(answers["champion"]["y_pred"], y) or 0.0)
            hits.append(hit)
            observed = policy.observe(position, False, version, error=hit)
        else:
            hit = answers["champion"]["y_pred"] == y
            hits.append(int(hit))
            observed = policy.observe(position, hit, version)
        for action in observed:
            if action.kind == "drift":
                alarms.append({k: action.record[k] for k in ("position", "level", "error_before", "error_after")})
            elif action.kind == "retrain":
                requests.append(position)
                if roles.challenger is None:  # as the learner does: warm start test-then-train since the change
                    since = action.record.get("since_position")
                    model, contest = parse_model(spec), Contest.from_settings(learner)
                    warm_start(model, ((bx, by, bhit, bversion) for bp, bx, by, bhit, bversion in buffer
                                       if since is None or bp >= since), version, contest)
                    roles.start(Slot("challenger", version + 1, model, Prequential(learner.window)), contest)
        learned = roles.learn(x, y, answers)
        buffer.append((position, x, y, hit, version))
        verdict = learned.verdict
        if verdict is None and roles.contest is not None and len(learned.hits) < 2:
            verdict = roles.contest.verdict()  # a challenger made on this row may win on its replayed record
        if verdict == "promote":
            roles.promote()
            policy.swap(roles.champion.version)
            swaps.append(position)
        elif verdict == "drop":
            roles.drop()
            dropped.append(position)
    return {"hits": hits, "alarms": alarms, "requests": requests, "swaps": swaps, "dropped": dropped}


def mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def evaluate(dataset: str, spec: str, hat_reference: list[float] | None = None) -> dict[str, Any]:
    ds = load(dataset)
    started = time.perf_counter()
    sim = simulate(dataset, spec)
    never = prequential_hits(dataset, spec)
    hat = hat_reference if hat_reference is not None else hat_hits(dataset)
    concept = [a for a in sim["alarms"] if a["level"] == "drift"]
    row: dict[str, Any] = {"dataset": dataset, "model": spec, "examples": len(sim["hits"]),
                           "alarms": [a["position"] for a in concept], "retrain_requests": sim["requests"],
                           "swaps": sim["swaps"], "challengers_dropped": sim["dropped"]}
    if ds.drift_positions:
        at = ds.drift_positions[0]
        start = at - ds.drift_width // 2  # a gradual drift starts half its width early
        after = [a["position"] for a in concept if a["position"] >= start]
        later_swaps = [s for s in sim["swaps"] if s >= start]
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
    concept = [a for a in sim["alarms"] if a["level"] == "drift"]
    at = ds.drift_positions[0]
    start = at - ds.drift_width // 2
    after = [a["position"] for a in concept if a["position"] >= start]
    later_swaps = [s for s in sim["swaps"] if s >= start]
    window = slice(at, at + AFTER)
    row: dict[str, Any] = {
        "dataset": dataset, "model": spec, "task": "regression", "examples": len(sim["hits"]),
        "alarms": [a["position"] for a in concept], "retrain_requests": sim["requests"], "swaps": sim["swaps"],
        "challengers_dropped": sim["dropped"], "drift_at": at,
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows) + "\n\n" + regression_table(regression_rows)
    (out_dir / "drift.md").write_text(table + "\n")
    plot(rows, out_dir / "drift.png")
    print(table)
    settings = DriftSettings()
    return {
        "mode": "in-process: drift.policy.RetrainPolicy + learner Contest/warm start (not through Kafka)",
        "detector": settings.detector, "cooldown": settings.cooldown,
        "min_error_increase": settings.min_error_increase,
        "learner": {k: getattr(LearnerSettings(), k) for k in ("warm_start", "promotion_rule", "promote_after",
                                                                 "promote_window", "promote_margin",
                                                                 "promote_confidence", "max_shadow")},
        "hat": f"mean of {len(HAT_SEEDS)} seeds of {HAT.format(seed='s')}",
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "regression_rows": regression_rows,
        "adaptive_regressors": ADAPTIVE_REGRESSORS,
        "table": str(out_dir / "drift.md"), "plot": str(out_dir / "drift.png"),
    }


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
