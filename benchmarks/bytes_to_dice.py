"""Bytes each method sends before the models its sites keep reach a test Dice.

Reads comparisons of the same methods and settings run for different numbers of rounds (``pfedsam compare
--rounds R``, one output folder per R; each R is a job of its own, ending with the sites' kept models), or run in
parts (``--part-rounds``: each part also ends with the kept models, so each gives a point), and prints, per method
and target, the fewest rounds whose mean test Dice over sites (of the kept model) reaches the target, and the
bytes all sites sent until then. ``--at`` keeps only the given rounds, so that methods measured at every round
and methods measured at a few are read on the same rounds.

    python benchmarks/bytes_to_dice.py benchmarks/results/l1-r1 benchmarks/results/l1-r2 benchmarks/results/l1 \
        --targets 0.7,0.8,0.9 --at 1,2,12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folders: list[Path]) -> dict[str, dict[int, dict]]:
    """``{method: {rounds: {"personalized_dice", "bytes_per_round"}}}`` of every completed run and of every part
    of one in the comparisons."""
    runs: dict[str, dict[int, dict]] = {}
    for folder in folders:
        result = json.loads((folder / "comparison.json").read_text())
        for method, run in result["methods"].items():
            if run.get("status") != "completed":
                continue
            per_round = run["mean"]["bytes_sent_total"] / result["rounds"]
            points = run.get("parts") or [{"rounds_done": result["rounds"], **run["mean"]}]
            for point in points:
                runs.setdefault(method, {})[point["rounds_done"]] = {
                    "personalized_dice": point["personalized_dice"], "bytes_per_round": per_round,
                }
    return runs


def table(runs: dict[str, dict[int, dict]], targets: list[float], at: set[int] | None = None) -> str:
    header = "| method | bytes per round (all sites) | " + " | ".join(f"to reach {t:.2f}" for t in targets)
    lines = [header + " | test Dice after R rounds |", "|---" * (len(targets) + 3) + "|"]
    for method, by_rounds in runs.items():
        ordered = sorted((r, mean) for r, mean in by_rounds.items() if at is None or r in at)
        if not ordered:
            raise SystemExit(f"{method} was measured after {sorted(by_rounds)} rounds, none of --at {sorted(at)}")
        per_round = ordered[0][1]["bytes_per_round"]
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
    parser.add_argument("--at", help="comma-separated rounds to read (default: every round measured)")
    args = parser.parse_args()
    at = {int(r) for r in args.at.split(",")} if args.at else None
    print(table(load(args.folders), [float(t) for t in args.targets.split(",")], at))


if __name__ == "__main__":
    main()
