"""Images per second of pFedSAM on LiteMedSAM: one training step (forward + backward + AdamW step) and
inference, batch 1 and 4, for several choices of adapted encoder blocks.

Training steps start from the cached frozen prefix, as ``LocalTrainer`` runs them; the prefix itself is
computed once per image and timed separately. ``--blocks full`` is ``fedsam``'s full fine-tuning: nothing is
frozen, so its steps run from pixels. Inference runs from pixels. The model is placed as ``LocalTrainer``
places it (channels-last convolution weights) and every pass runs in the precision ``TrainerConfig(precision=
"auto")`` picks on this machine (bfloat16 autocast where the CPU has bfloat16 instructions, float32 elsewhere),
unless ``--precision`` says otherwise.

    python benchmarks/step_time.py [--repeats 3] [--blocks all 8 2 full] [--threads N] [--precision auto]
    python benchmarks/step_time.py --levers [--repeats 3]

``--levers`` times the job's setting (adapters in the last two blocks), each lever on top of the one before: the
mask decoder one image at a time (as SAM's own ``predict_masks`` runs) in float32, batched, then bfloat16 autocast,
channels-last memory and ``torch.compile``; the loss of the first step shows whether a lever changes the numbers.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch

from pfedsam_nvflare.model import ModelConfig, Partition, build_pfedsam
from pfedsam_nvflare.model import decoder as batched_decoder
from pfedsam_nvflare.training.compute import autocast, place, resolve_precision
from pfedsam_nvflare.training.losses import SegmentationLoss

JOB_SETTING = ModelConfig(backbone="lite_medsam", adapted_blocks=2, decoder="lora")
# each lever on top of the ones before it
LEVERS = ("per-image decoder", "batched decoder", "bf16 autocast", "channels_last", "torch.compile")
CPU = torch.device("cpu")


def _per_second(images: int, run, repeats: int) -> float:
    run()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    return images * repeats / (time.perf_counter() - began)


def _one_image_at_a_time(decoder, embeddings, image_pe, sparse, dense, num_masks):
    return torch.cat(
        [
            batched_decoder.predict_masks(decoder, embeddings[i : i + 1], image_pe, sparse[i : i + 1], dense[i : i + 1], num_masks)
            for i in range(embeddings.shape[0])
        ]
    )


@contextmanager
def _decoder(lever: str) -> Iterator[None]:
    if lever == "per-image decoder":
        with mock.patch("pfedsam_nvflare.model.pfedsam.predict_masks", _one_image_at_a_time):
            yield
    else:
        yield


def measure(config: ModelConfig, batch: int, repeats: int, precision: torch.dtype, lever: str | None = None) -> dict[str, float]:
    """Images per second of a training step from the cached prefix, of inference from pixels and of the prefix
    itself, in ``precision``, or with the levers up to ``lever``; the first step's loss; the partition's sizes."""
    applied = LEVERS[: LEVERS.index(lever) + 1] if lever else ()
    if lever:
        precision = torch.bfloat16 if "bf16 autocast" in applied else torch.float32
    model = build_pfedsam(config)
    partition = Partition.of(model)
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(batch, 1, 256, 256, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad(), autocast(CPU, precision):
        prefix = model.encode_prefix(images).float()
    if lever is None or "channels_last" in applied:  # as LocalTrainer places its model
        model = place(model, CPU)
    run = torch.compile(model) if "torch.compile" in applied else model
    loss_fn = SegmentationLoss()
    optimizer = torch.optim.AdamW(partition.parameters(model, "global"), lr=1e-4)
    losses = []

    def train_step() -> None:
        model.train()
        with model.global_only(), autocast(CPU, precision):
            loss = loss_fn(run(prefix=prefix).float(), masks)
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with autocast(CPU, precision):
            run(images)

    @torch.no_grad()
    def encode() -> None:
        with autocast(CPU, precision):
            model.encode_prefix(images)

    with _decoder("per-image decoder" if lever == "per-image decoder" else "batched decoder"):
        rates = {
            "prefix": _per_second(batch, encode, repeats),
            "train": _per_second(batch, train_step, repeats),
            "infer": _per_second(batch, infer, repeats),
        }
    return {
        **rates,
        "first_loss": losses[0],
        "cache_mb": prefix[0].numel() * prefix.element_size() / 2**20,
        "global_values": partition.num_values("global"),
        "local_values": partition.num_values("local"),
    }


def levers(batches: list[int], repeats: int) -> None:
    header = f"{'lever':>18} {'batch':>5} {'prefix img/s':>12} {'train img/s':>11} {'infer img/s':>11} {'first loss':>10}"
    print(f"adapters in the last 2 blocks, decoder LoRA (the job's setting)\n{header}\n{'-' * len(header)}")
    for batch in batches:
        for lever in LEVERS:
            try:
                row = measure(JOB_SETTING, batch, repeats, torch.float32, lever)
            except Exception as error:  # a lever this machine's torch cannot run is reported, not fatal
                print(f"{lever:>18} {batch:>5} failed: {type(error).__name__}: {str(error)[:80]}", flush=True)
                continue
            print(
                f"{lever:>18} {batch:>5} {row['prefix']:>12.2f} {row['train']:>11.2f} {row['infer']:>11.2f} "
                f"{row['first_loss']:>10.5f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--blocks", nargs="+", default=["all", "8", "2"], help="adapted last blocks, 'all', or 'full' (fine-tune all)"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", default="auto", help="auto, float32 or bfloat16 (TrainerConfig's)")
    parser.add_argument("--levers", action="store_true", help="time the speed levers on the job's setting")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    precision = resolve_precision(args.precision, CPU)
    print(
        f"LiteMedSAM 256x256, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, "
        f"{'levers' if args.levers else precision}"
    )
    if args.levers:
        levers(args.batches, args.repeats)
        return
    header = (
        f"{'adapted blocks':>14} {'batch':>5} {'global values':>13} {'local values':>12} {'cache MB/img':>12} "
        f"{'prefix img/s':>12} {'train img/s':>11} {'infer img/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for blocks in args.blocks:
        for batch in args.batches:
            if blocks == "full":
                config = ModelConfig(backbone="lite_medsam", full_finetune=True, num_experts=0)
            else:
                config = ModelConfig(backbone="lite_medsam", adapted_blocks=None if blocks == "all" else int(blocks))
            row = measure(config, batch, args.repeats, precision)
            print(
                f"{blocks:>14} {batch:>5} {row['global_values']:>13,} {row['local_values']:>12,} "
                f"{row['cache_mb']:>12.1f} {row['prefix']:>12.2f} {row['train']:>11.2f} {row['infer']:>11.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
