"""FLARE's share of a round: the demo's job (LiteMedSAM, three simulated sites) run in FLARE's simulator, each
round's wall time on the server (task sent to aggregation done) against the slowest site's own work in that round
(validation before, the ``LocalTrainer`` round, validation after, timed inside the site process; in the first round
also the site's start: reading its data, building the model, filling the feature cache). What is left is FLARE's:
task scheduling, serialisation, filters, transfer and aggregation.

    python benchmarks/flare_overhead.py [--rounds 3] [--workspace DIR]
    python benchmarks/flare_overhead.py --metrics pfedsam_demo/pfedsam/server/simulate_job/pfedsam_metrics.json

``--metrics`` reads the rounds of a run already made (``pfedsam demo``'s, say) instead of running one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from pfedsam_nvflare.flare.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--metrics", type=Path, default=None, help="pfedsam_metrics.json of a run already made")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.metrics:
        metrics = json.loads(args.metrics.read_text())
    else:
        workspace = args.workspace or Path(tempfile.mkdtemp(prefix="pfedsam-overhead-"))
        metrics, _ = run_demo(workspace, num_rounds=args.rounds)
    print(f"{'round':>5} {'round s (FLARE job)':>19} {'slowest site s (in-process work)':>32} {'FLARE share':>11}")
    shares = []
    for record in metrics["rounds"]:
        work = max(site["task_seconds"] + (site.get("start_seconds") or 0) for site in record["sites"].values())
        share = 1 - work / record["seconds"]
        shares.append(share)
        print(f"{record['round'] + 1:>5} {record['seconds']:>19.1f} {work:>32.1f} {share:>11.1%}")
    print(f"mean FLARE share over {len(shares)} rounds: {sum(shares) / len(shares):.1%}")


if __name__ == "__main__":
    main()
