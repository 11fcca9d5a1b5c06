"""Bytes each method sends before the models its sites keep reach a test Dice.

Reads comparisons of the same methods and settings run for different numbers of rounds (``pfedsam compare
--rounds R``, one output folder per R; each R is a job of its own, ending with the sites' kept models) and
prints, per method and target, the fewest rounds whose mean test Dice over sites (of the kept model) reaches the
target, and the bytes all sites sent until then.

    python benchmarks/bytes_to_dice.py benchmarks/results/l1-r1 benchmarks/results/l1-r2 benchmarks/results/l1 \
        --targets 0.7,0.8,0.9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folders: list[Path]) -> dict[str, dict[int, dict]]:
    """``{method: {rounds: mean}}`` of every completed run in the comparisons."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in folders:
        result = json.loads((folder / "comparison.json").read_text())
        for method, run in result["methods"].items():
            if run.get("status") == "completed":
                runs.setdefault(method, {})[result["rounds"]] = run["mean"]
    return runs


def table(runs: dict[str, dict[int, dict]], targets: list[float]) -> str:
    header = "| method | bytes per round (all sites) | " + " | ".join(f"to reach {t:.2f}" for t in targets)
    lines = [header + " | test Dice after R rounds |", "|---" * (len(targets) + 3) + "|"]
    for method, by_rounds in runs.items():
        ordered = sorted(by_rounds.items())
        per_round = ordered[0][1]["bytes_sent_total"] / ordered[0][0]
        cells = []
        for target in targets:
            reached = next((r for r, mean in ordered if (mean["personalized_dice"] or 0) >= target), None)
            if reached is None:
                cells.append("not reached")
            else:
                cells.append(f"{reached} round{'s' * (reached > 1)}, {reached * per_round / 1e6:,.1f} MB")
        curve = ", ".join(f"R={r}: {mean['personalized_dice']:.3f}" for r, mean in ordered)
        lines.append(f"| {method} | {per_round / 1e6:,.2f} MB | " + " | ".join(cells) + f" | {curve} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of pfedsam compare")
    parser.add_argument("--targets", default="0.7,0.8,0.9", help="comma-separated test Dice targets")
    args = parser.parse_args()
    print(table(load(args.folders), [float(t) for t in args.targets.split(",")]))


if __name__ == "__main__":
    main()
