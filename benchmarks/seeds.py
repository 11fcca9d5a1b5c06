"""Mean ± spread over seeds of a comparison whose variants differ only in the seed.

Reads ``comparison.json`` of ``pfedsam compare --ablate seed=0,1,2`` (runs may be added one at a time with
``--resume``) and prints, per method, the test Dice of the kept model and of the global model alone: the mean over
sites of each seed's run, as mean ± sample standard deviation over the seeds with the lowest and highest of
them, the same for each label where there are several, and each site's mean over seeds. Seeds whose run did not
complete are named under the table.

    python benchmarks/seeds.py benchmarks/results/l2-seeds
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SEED = re.compile(r"\[seed=(\d+)\]$")


def by_method(result: dict) -> tuple[dict[str, dict[int, dict]], list[str]]:
    """``{method: {seed: run}}`` of the completed runs, and the labels of the others; a variant that is not a seed
    of a method is an error."""
    runs: dict[str, dict[int, dict]] = {}
    incomplete = []
    for label, run in result["methods"].items():
        match = SEED.search(label)
        if match is None:
            raise ValueError(f"variant {label!r} is not '<method>[seed=N]': this comparison does not ablate the seed")
        if run.get("status") == "completed":
            runs.setdefault(label[: match.start()], {})[int(match.group(1))] = run
        else:
            incomplete.append(f"{label}: {run.get('status', 'no status')}")
    return runs, incomplete


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f} (one seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _label_dice(run: dict, label: str) -> float:
    """The kept model's test Dice of ``label``, mean over the run's sites."""
    return statistics.mean(site["test"]["personalized"]["dice"][label] for site in run["sites"].values())


def table(runs: dict[str, dict[int, dict]], labels: list[str]) -> str:
    sites = sorted({site for seeds in runs.values() for run in seeds.values() for site in run["sites"]})
    per_label = labels if len(labels) > 1 else []
    header = ["method", "seeds", "kept: mean over sites", *(f"kept `{label}`" for label in per_label), "global alone",
              *(f"{site} kept" for site in sites)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method, seeds in runs.items():
        ordered = [seeds[seed] for seed in sorted(seeds)]
        cells = [
            method,
            ", ".join(map(str, sorted(seeds))),
            spread([run["mean"]["personalized_dice"] for run in ordered]),
            *(spread([_label_dice(run, label) for run in ordered]) for label in per_label),
            spread([run["mean"]["global_dice"] for run in ordered]),
        ]
        for site in sites:
            values = [run["sites"][site]["test"]["personalized"]["dice"]["mean"] for run in ordered if site in run["sites"]]
            cells.append(f"{statistics.mean(values):.3f}" if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", type=Path, help="a comparison folder (with comparison.json)")
    args = parser.parse_args()
    result = json.loads((args.comparison / "comparison.json").read_text())
    print(f"{result['data']['root']}, {result['rounds']} rounds; test Dice (mean over labels)")
    runs, incomplete = by_method(result)
    print(table(runs, result["data"]["labels"]))
    if incomplete:
        print("not completed, left out: " + "; ".join(incomplete))


if __name__ == "__main__":
    main()
