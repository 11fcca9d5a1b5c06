"""Images per second of pFedSAM on LiteMedSAM: one training step (forward + backward + AdamW step) and
inference, batch 1 and 4, for several choices of adapted encoder blocks.

Training steps start from the cached frozen prefix, as ``LocalTrainer`` runs them; the prefix itself is
computed once per image and timed separately. Inference runs from pixels.

    python benchmarks/step_time.py [--repeats 3] [--blocks all 8 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from pfedsam_nvflare.model import ModelConfig, Partition, build_pfedsam
from pfedsam_nvflare.training.losses import SegmentationLoss


def _per_second(images: int, run, repeats: int) -> float:
    run()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    return images * repeats / (time.perf_counter() - began)


def measure(adapted_blocks: int | None, batch: int, repeats: int) -> dict[str, float]:
    model = build_pfedsam(ModelConfig(backbone="lite_medsam", adapted_blocks=adapted_blocks))
    partition = Partition.of(model)
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(batch, 1, 256, 256) > 0.5).float()
    loss_fn = SegmentationLoss()
    optimizer = torch.optim.AdamW(partition.parameters(model, "global"), lr=1e-4)
    with torch.no_grad():
        prefix = model.encode_prefix(images)

    def train_step() -> None:
        model.train()
        with model.global_only():
            loss = loss_fn(model(prefix=prefix), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        model(images)

    @torch.no_grad()
    def encode() -> None:
        model.encode_prefix(images)

    return {
        "cache_mb": prefix[0].numel() * prefix.element_size() / 2**20,
        "prefix": _per_second(batch, encode, repeats),
        "train": _per_second(batch, train_step, repeats),
        "infer": _per_second(batch, infer, repeats),
        "global_values": partition.num_values("global"),
        "local_values": partition.num_values("local"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", nargs="+", default=["all", "8", "2"], help="adapted last blocks, or 'all'")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"LiteMedSAM 256x256, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    header = (
        f"{'adapted blocks':>14} {'batch':>5} {'global values':>13} {'local values':>12} {'cache MB/img':>12} "
        f"{'prefix img/s':>12} {'train img/s':>11} {'infer img/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for blocks in args.blocks:
        for batch in args.batches:
            row = measure(None if blocks == "all" else int(blocks), batch, args.repeats)
            print(
                f"{blocks:>14} {batch:>5} {row['global_values']:>13,} {row['local_values']:>12,} "
                f"{row['cache_mb']:>12.1f} {row['prefix']:>12.2f} {row['train']:>11.2f} {row['infer']:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
