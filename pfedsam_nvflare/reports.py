"""Pictures of a run: learning curves from the metrics file, and overlays of predicted and true masks.

Curves are drawn on the server from numbers the sites report; overlays are drawn at each site from its
own validation images and never leave it.
"""

from __future__ import annotations

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


def results_table(metrics: dict[str, Any]) -> str:
    """Per site: the untrained, personalized and final global Dice, the bytes sent per round and, where the site
    applied differential privacy, the ε it spent."""
    rounds = metrics["rounds"]
    first, last = rounds[0]["sites"], rounds[-1]["sites"]
    final = metrics["final"].get("SRV_FL_global_model.pt", {})
    spent = {
        site: update["privacy"]["epsilon"]
        for entry in rounds
        for site, update in entry.get("updates", {}).items()
        if "privacy" in update
    }
    header = f"{'site':<8} {'untrained Dice':>14} {'personalized Dice':>17} {'final global Dice':>17} {'bytes sent/round':>16}"
    lines = [header + (f" {'DP ε spent':>10}" if spent else "")]
    for site in sorted(last):
        row = (
            f"{site:<8} {_number(first.get(site, {}).get('global_dice')):>14} "
            f"{_number(last[site].get('personalized_dice')):>17} {_number(final.get(site, {}).get('global_dice')):>17} "
            f"{last[site]['bytes_sent']:>16,}"
        )
        lines.append(row + (f" {_number(spent.get(site), 2) if site in spent else 'no DP':>10}" if spent else ""))
    lines.append(
        f"untrained: the initial global model, before any training; personalized: after round {len(rounds)}; "
        "final global: the last aggregated global model"
    )
    return "\n".join(lines)


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
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_overlays(
    images: torch.Tensor, masks: torch.Tensor, predictions: torch.Tensor, path: Path, title: str, captions: Sequence[str]
) -> Path:
    """One column per image: the image with the true (green) and predicted (red) outline of every label."""
    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(3 * count, 3.3), squeeze=False)
    for column in range(count):
        axis = axes[0][column]
        axis.imshow(images[column].permute(1, 2, 0).squeeze(-1).cpu(), cmap="gray", vmin=0, vmax=1)
        for label in range(masks.shape[1]):
            for outline, colour in ((masks, "lime"), (predictions, "red")):
                plane = outline[column, label].float().cpu()
                if plane.any() and not plane.all():
                    axis.contour(plane, levels=[0.5], colors=colour, linewidths=1)
        axis.set_title(captions[column], fontsize=8)
        axis.axis("off")
    figure.suptitle(f"{title} (green: truth, red: prediction)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
