"""Peak memory of one site against its size: for each N, a generated site of N slices (256x256, 20 slices per
NIfTI case, 80 % of the cases for training) trains one round with the job's settings (LiteMedSAM, adapters in its
last two blocks, decoder LoRA) and validates, in a fresh process; its peak RSS is printed after the feature cache
is filled and after the round, with the growth per slice between the smallest and the largest site.

    python benchmarks/memory.py [--slices 250 500 2000] [--work DIR] [--backbone lite_medsam]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

DEPTH = 20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one_site(slices: int, work: Path, backbone: str) -> dict:
    """Build the site, train one round, validate; the figures of this process."""
    from pfedsam_nvflare.data import load_site
    from pfedsam_nvflare.data.preprocess import SliceOptions
    from pfedsam_nvflare.data.synthetic import make_sites
    from pfedsam_nvflare.flare.jobs import JOB_MODEL, JOB_TRAINER
    from pfedsam_nvflare.model.backbones import INPUT_SIZES
    from pfedsam_nvflare.training import LocalTrainer

    root = work / f"data-{slices}"
    if not (root / "site-1").exists():
        make_sites(root, sites=1, cases=math.ceil(slices / DEPTH), size=256, depth=DEPTH, seed=0)
    began = time.perf_counter()
    data = load_site(root, "site-1", SliceOptions(image_size=INPUT_SIZES[backbone]), val_fraction=0.1, test_fraction=0.1)
    trainer = LocalTrainer(
        replace(JOB_MODEL, backbone=backbone), JOB_TRAINER, data.train, data.val, work / f"site-{slices}"
    )
    cached = _peak_mib()
    filled = time.perf_counter() - began
    trainer.run_round(trainer.global_state())
    trainer.validate()
    cache = trainer.train_samples.cache.folder
    return {
        "slices": slices,
        "train": len(data.train),
        "val": len(data.val),
        "peak_after_cache_mib": round(cached, 1),
        "peak_after_round_mib": round(_peak_mib(), 1),
        "cache_on_disk_mib": round(sum(f.stat().st_size for f in cache.rglob("*.pt")) / 2**20, 1),
        "cache_seconds": round(filled, 1),
        "round_seconds": round(time.perf_counter() - began - filled, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", nargs="+", type=int, default=[250, 500, 2000])
    parser.add_argument("--work", type=Path, default=None, help="data and caches (default: a temporary folder)")
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pfedsam-memory-"))
    if args.one is not None:
        print(json.dumps(one_site(args.one, work, args.backbone)))
        return
    header = (
        f"{'slices':>6} {'train':>5} {'val':>4} {'peak RSS cached (MiB)':>21} {'peak RSS round (MiB)':>20} "
        f"{'cache on disk (MiB)':>19} {'cache s':>7} {'round s':>7}"
    )
    print(f"{args.backbone}, job settings, one round + validation per site, work folder {work}\n{header}")
    rows = []
    for slices in args.slices:
        command = [sys.executable, __file__, "--one", str(slices), "--work", str(work), "--backbone", args.backbone]
        row = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
        rows.append(row)
        print(
            f"{row['slices']:>6} {row['train']:>5} {row['val']:>4} {row['peak_after_cache_mib']:>21,.0f} "
            f"{row['peak_after_round_mib']:>20,.0f} {row['cache_on_disk_mib']:>19,.0f} {row['cache_seconds']:>7.0f} "
            f"{row['round_seconds']:>7.0f}",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last["peak_after_round_mib"] - first["peak_after_round_mib"]) / (last["slices"] - first["slices"])
        print(f"peak RSS growth: {growth * 1024:.1f} KiB per slice between {first['slices']} and {last['slices']} slices")


if __name__ == "__main__":
    main()
