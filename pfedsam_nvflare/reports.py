"""Pictures of a run: learning curves from the metrics file, and overlays of predicted and true masks.

Curves are drawn on the server from numbers the sites report; overlays are drawn at each site from its
own validation images and never leave it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

CURVES = (
    ("personalized_dice", "personalized Dice (after the round's training)"),
    ("global_dice", "global-model Dice (received model, before training)"),
    ("global_loss", "global-phase training loss"),
    ("bytes_sent", "bytes sent per round"),
)


def _number(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


FINAL_MODEL = "SRV_FL_global_model.pt"  # the final global partition, as GlobalModelEval names it


def _score(report: dict[str, Any], path: str, metric: str, label: str) -> float | None:
    return report.get("test", {}).get(path, {}).get(metric, {}).get(label)


def results_table(metrics: dict[str, Any]) -> str:
    """Per site (and label, where there are several): test Dice and HD95 of the model the site keeps (the final
    global partition with the site's own part) and of the final global model alone, the bytes sent per round and,
    where the site applied differential privacy, the ε it spent."""
    rounds = metrics["rounds"]
    last = rounds[-1]["sites"]
    final = metrics["final"].get(FINAL_MODEL, {})
    spent = {
        site: update["privacy"]["epsilon"]
        for entry in rounds
        for site, update in entry.get("updates", {}).items()
        if "privacy" in update
    }
    labels = next((report["test"]["labels"] for report in final.values() if "test" in report), ["foreground"])
    rows_of = labels if len(labels) == 1 else [*labels, "mean"]
    header = (
        f"{'site':<8} {'label':<12} {'test cases':>10} {'kept Dice':>9} {'global Dice':>11} {'kept HD95':>9} "
        f"{'global HD95':>11} {'bytes sent/round':>16}"
    )
    lines = [header + (f" {'DP ε spent':>10}" if spent else "")]
    for site in sorted(set(last) | set(final)):
        report = final.get(site, {})
        for label in rows_of:
            row = (
                f"{site:<8} {label:<12} {report.get('test', {}).get('cases', 0):>10} "
                f"{_number(_score(report, 'personalized', 'dice', label)):>9} "
                f"{_number(_score(report, 'global', 'dice', label)):>11} "
                f"{_number(_score(report, 'personalized', 'hd95', label), 2):>9} "
                f"{_number(_score(report, 'global', 'hd95', label), 2):>11} "
                f"{last.get(site, {}).get('bytes_sent', 0):>16,}"
            )
            lines.append(row + (f" {_number(spent.get(site), 2) if site in spent else 'no DP':>10}" if spent else ""))
    lines.append(
        f"test cases only, each scored whole (every slice) in its own geometry; HD95 in mm (pixels for PNG). kept: "
        f"the model the site "
        f"keeps after {len(rounds)} rounds (the final global partition with the site's own part fitted to it, in "
        "personalized_model.pt at the site); global: the final global partition alone"
    )
    return "\n".join(lines)


def evaluation_table(evaluation: Any, title: str) -> str:
    """Per case and label, Dice and HD95 of both paths of a kept model, then the means."""
    labels, scores = evaluation.labels, evaluation.scores
    paths = list(scores)
    header = f"{'case':<24} {'label':<12}" + "".join(f" {p + ' Dice':>17} {p + ' HD95':>17}" for p in paths)
    lines = [title, header]
    cases = sorted(next(iter(scores.values())))
    for case in cases:
        for k, label in enumerate(labels):
            cells = "".join(f" {scores[p][case]['dice'][k]:>17.3f} {scores[p][case]['hd95'][k]:>17.2f}" for p in paths)
            lines.append(f"{case:<24} {label:<12}{cells}")
    summary = evaluation.summary()
    for label in [*labels, "mean"] if len(labels) > 1 else labels:
        cells = "".join(
            f" {_number(summary[p]['dice'][label]):>17} {_number(summary[p]['hd95'][label], 2):>17}" for p in paths
        )
        lines.append(f"{'mean of ' + str(len(cases)) + ' cases':<24} {label:<12}{cells}")
    lines.append("Dice and HD95 per whole case (every slice), HD95 in mm (pixels for PNG)")
    return "\n".join(lines)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def site_series(metrics: dict[str, Any], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{site: (rounds, values)}`` of one metric from the metrics file's rounds."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in metrics.get("rounds", []):
        for site, values in entry.get("sites", {}).items():
            if key in values:
                rounds, points = series.setdefault(site, ([], []))
                rounds.append(entry["round"] + 1)
                points.append(values[key])
    return series


def plot_learning_curves(metrics: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for axis, (key, title) in zip(axes, CURVES):
        for site, (rounds, values) in sorted(site_series(metrics, key).items()):
            axis.plot(rounds, values, marker="o", label=site)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{metrics.get('job', 'pfedsam')}: method {metrics.get('method', '?')}")
    return _save(figure, path)


def plot_overlays(
    images: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    predictions: Sequence[torch.Tensor],
    path: Path,
    title: str,
    captions: Sequence[str],
) -> Path:
    """One column per image (C, H, W) in [0, 1], with the true (green) and predicted (red) outline of every label
    of its masks (K, H, W); the images may differ in size."""
    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(max(3 * count, 4), 3.6), squeeze=False)
    for column in range(count):
        axis = axes[0][column]
        axis.imshow(images[column].permute(1, 2, 0).squeeze(-1).cpu(), cmap="gray", vmin=0, vmax=1)
        for label in range(masks[column].shape[0]):
            for outline, colour in ((masks, "lime"), (predictions, "red")):
                plane = outline[column][label].float().cpu()
                if plane.any() and not plane.all():
                    axis.contour(plane, levels=[0.5], colors=colour, linewidths=1)
        axis.set_title(captions[column], fontsize=8)
        axis.axis("off")
    figure.suptitle(f"{title}\n(green: truth, red: prediction)", fontsize=10)
    return _save(figure, path)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _completed(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {label: run for label, run in result["methods"].items() if run.get("status") == "completed"}


def _site_cell(run: dict[str, Any], site: str, path: str, labels: list[str]) -> tuple[float | None, str]:
    """The mean test Dice of a site's ``path`` model, and its cell: Dice (per label where there are several)."""
    test = run["sites"][site]["test"][path]
    mean = test["dice"]["mean"]
    text = _number(mean)
    if len(labels) > 1:
        text += " (" + ", ".join(f"{label} {_number(test['dice'][label])}" for label in labels) + ")"
    return mean, text


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as Markdown: per site × method the test Dice of the kept model and of the global model (the
    best kept model of each site in bold), HD95, bytes and time; failed methods are listed with their reason."""
    sites, labels = result["data"]["sites"], result["data"]["labels"]
    runs = _completed(result)
    lines = [
        f"Data: {result['data']['root']} (sites {', '.join(sites)}; labels {', '.join(labels)}); "
        f"{result['rounds']} rounds. Test cases only, each scored whole in its own geometry; the kept model is the "
        "final global partition with the site's own part fitted to it.",
        "",
    ]
    if runs:
        methods = list(runs)
        titles = {"personalized": "Test Dice of the kept model", "global": "Test Dice of the global model"}
        for path, title in titles.items():
            lines += [f"**{title}**", "", "| site | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
            for site in sites:
                cells = [_site_cell(runs[m], site, path, labels) for m in methods]
                best = max((c[0] for c in cells if c[0] is not None), default=None)
                row = [f"**{text}**" if value is not None and value == best else text for value, text in cells]
                lines.append(f"| {site} | " + " | ".join(row) + " |")
            means = [runs[m]["mean"][f"{path}_dice"] for m in methods]
            lines += ["| mean over sites | " + " | ".join(_number(v) for v in means) + " |", ""]
        lines += [
            "**HD95 (mm; pixels for PNG; mean over sites and labels), bytes and time**",
            "",
            "| method | kept validation Dice | kept HD95 | global HD95 | bytes sent per site and round "
            "| bytes sent in all | wall time (min) | validation Dice stops improving (round: global / site model) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, run in runs.items():
            mean = run["mean"]
            plateaus = [plateau_round(mean_curve(run, sites, key)) for key in ("global_dice", "personalized_dice")]
            validation = [
                run["sites"][site].get("val", {}).get("personalized", {}).get("dice", {}).get("mean") for site in sites
            ]
            lines.append(
                f"| {method} | {_number(None if None in validation else sum(validation) / len(validation))} | "
                f"{_number(mean['personalized_hd95'], 2)} | {_number(mean['global_hd95'], 2)} | "
                f"{int(mean['bytes_sent_per_round']):,} | {int(mean['bytes_sent_total']):,} | "
                f"{run['wall_seconds'] / 60:.1f} | {plateaus[0]} / {plateaus[1]} |"
            )
        lines += [
            "",
            "Kept validation Dice: the kept models on the sites' validation cases (mean over sites), the number to "
            "choose settings by. Validation Dice stops improving: the first round after which the mean over sites of "
            "the per-round "
            "validation Dice (on slices) never rises by more than 0.01; the received global model lags the site "
            f"model by one aggregation. A value of {result['rounds']} means it was still rising.",
        ]
    failed = {label: run for label, run in result["methods"].items() if run.get("status") != "completed"}
    if failed:
        lines += ["", "**Failed**", ""]
        lines += [f"- {label}: {run.get('error', 'unknown error')}" for label, run in failed.items()]
    return "\n".join(lines)


def mean_curve(run: dict[str, Any], sites: list[str], key: str) -> list[float]:
    """A per-round validation curve (``global_dice``: the received global model; ``personalized_dice``: the site's
    model after the round's training) averaged over sites."""
    series = [run["sites"][site]["curve"][key] for site in sites]
    length = min(len(s) for s in series) if series else 0
    return [sum(_or_nan(s[i]) for s in series) / len(series) for i in range(length)]


def plateau_round(curve: list[float], tolerance: float = 0.01) -> int | None:
    """The first round (1-based) after which the curve never rises more than ``tolerance`` above its value there."""
    for index, value in enumerate(curve):
        if all(later <= value + tolerance for later in curve[index + 1 :]):
            return index + 1
    return None


def _bar_floor(values: list[float]) -> float:
    """Where the Dice axis starts: 0, unless every bar is above 0.5; then 0.05 below the lowest, so that
    differences of a few hundredths can be seen (the axis's numbers say where it starts)."""
    finite = [value for value in values if math.isfinite(value)]
    lowest = min(finite, default=0.0)
    return 0.0 if lowest < 0.5 else math.floor(lowest * 20) / 20 - 0.05


def plot_comparison(result: dict[str, Any], path: Path) -> Path:
    """Left: per-site bars of the kept model's test Dice, one bar per method. Right: the per-round validation Dice,
    averaged over sites, of the received global model (solid) and of the site's model after the round's training
    (dashed): training curves."""
    runs = _completed(result)
    sites = result["data"]["sites"]
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 5.5))
    width = 0.8 / max(len(runs), 1)
    for index, (method, run) in enumerate(runs.items()):
        values = [_or_nan(run["sites"][site]["test"]["personalized"]["dice"]["mean"]) for site in sites]
        bars.bar([s + index * width for s in range(len(sites))], values, width, label=method)
        colour = f"C{index}"
        for key, style in (("global_dice", "-"), ("personalized_dice", "--")):
            curve = mean_curve(run, sites, key)
            curves.plot(range(1, len(curve) + 1), curve, style, marker="o", markersize=3, color=colour,
                        label=method if key == "global_dice" else None)
    bars.set_xticks([s + 0.4 - width / 2 for s in range(len(sites))], sites)
    bars.set_ylabel("test Dice")
    bars.set_title("the model each site keeps, on its test cases", fontsize=10)
    bars.set_ylim(_bar_floor([bar.get_height() for bar in bars.patches]), 1)
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=max(1, min(len(runs), 4)))
    curves.set_xlabel("round")
    curves.set_ylabel("validation Dice (mean over sites)")
    curves.set_title("received global model (solid), site model after training (dashed)", fontsize=10)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    figure.suptitle(f"{len(sites)} sites, {result['rounds']} rounds", fontsize=11)
    return _save(figure, path)
