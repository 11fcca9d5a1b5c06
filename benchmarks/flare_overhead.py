"""FLARE's share of a round: the demo's job (LiteMedSAM, three simulated sites) run in FLARE's simulator, each
round's wall time on the server (task sent to aggregation done) against the slowest site's own work in that round
(validation before, the ``LocalTrainer`` round, validation after, timed inside the site process). What is left is
FLARE's: task scheduling, serialisation, filters, transfer and aggregation.

    python benchmarks/flare_overhead.py [--rounds 3] [--workspace DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from pfedsam_nvflare.flare.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workspace", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="pfedsam-overhead-"))
    metrics, _ = run_demo(workspace, num_rounds=args.rounds)
    print(f"{'round':>5} {'round s (FLARE job)':>19} {'slowest site s (in-process work)':>32} {'FLARE share':>11}")
    shares = []
    for record in metrics["rounds"]:
        work = max(site["task_seconds"] for site in record["sites"].values())
        share = 1 - work / record["seconds"]
        shares.append(share)
        print(f"{record['round'] + 1:>5} {record['seconds']:>19.1f} {work:>32.1f} {share:>11.1%}")
    print(f"mean FLARE share over {len(shares)} rounds: {sum(shares) / len(shares):.1%}")


if __name__ == "__main__":
    main()
