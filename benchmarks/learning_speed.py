"""How fast LiteMedSAM learns prompt-free segmentation of one synthetic site, per decoder mode and learning
rate: validation Dice of the global model after each epoch (global-partition training only, as ``fedavg``).
This chose the job folders' settings (``decoder="lora"``, learning rate 3e-3). ``--cache-dtypes`` runs the job's
setting once per precision of the feature cache instead (the cache's float16 must not move validation Dice), and
``--precisions`` once per compute precision (bfloat16 autocast must not move it either).

    python benchmarks/learning_speed.py [--epochs 6] [--cache-dtypes float32 float16] [--precisions float32 bfloat16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

from pfedsam_nvflare.data.config import DataConfig, SyntheticConfig, resolve_root
from pfedsam_nvflare.data import load_site
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig

SETTINGS = (("full", 3e-3), ("full", 1e-3), ("lora", 3e-3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cache-dtypes", nargs="+", default=None, help="compare these feature-cache precisions")
    parser.add_argument("--precisions", nargs="+", default=None, help="compare these compute precisions")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    data = DataConfig(synthetic=SyntheticConfig(cases=5, depth=4))
    site = load_site(resolve_root(data), "site-1", data.slice_options(256))
    print(f"site-1 of the job's synthetic data: {len(site.train)} training, {len(site.val)} validation slices")
    runs = [(decoder, lr, "float16", "float32") for decoder, lr in SETTINGS]
    if args.cache_dtypes:
        runs = [("lora", 3e-3, dtype, "float32") for dtype in args.cache_dtypes]
    if args.precisions:
        runs = [("lora", 3e-3, "float16", precision) for precision in args.precisions]
    print(
        f"{'decoder':>8} {'lr':>7} {'cache':>7} {'compute':>8} "
        + " ".join(f"{'epoch ' + str(e + 1):>8}" for e in range(args.epochs)) + "  seconds"
    )
    for decoder, lr, dtype, precision in runs:
        began = time.perf_counter()
        trainer = LocalTrainer(
            ModelConfig(adapted_blocks=2, decoder=decoder),
            TrainerConfig(
                method="fedavg", lr_global=lr, batch_size=2, local_epochs=0, cache_dtype=dtype, precision=precision
            ),
            site.train,
            site.val,
            tempfile.mkdtemp(),
        )
        state, dice = trainer.global_state(), []
        for _ in range(args.epochs):
            result = trainer.run_round(state)
            state = {key: state[key] + result.global_diff[key] for key in state}
            dice.append(trainer.validate(paths=("global",))["global_dice"])
        print(f"{decoder:>8} {lr:>7g} {dtype:>7} {precision:>8} " + " ".join(f"{d:>8.3f}" for d in dice) + f"  {time.perf_counter() - began:7.0f}")


if __name__ == "__main__":
    main()
