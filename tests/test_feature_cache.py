"""The disk cache of model inputs: on disk, exact where it should be, never stale."""

import logging

import pytest
import torch
from sites import make_site

from pfedsam_nvflare.model import ModelConfig, build_backbone, build_pfedsam
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig
from pfedsam_nvflare.training.feature_cache import FeatureCache
from pfedsam_nvflare.training.samples import SampleStore

TINY = ModelConfig(backbone="tiny", adapted_blocks=2)


def _entries(folder):
    return sorted(folder.rglob("*.pt"))


def test_the_samples_live_on_disk_and_come_back_as_computed(tmp_path):
    model = build_pfedsam(TINY).eval()
    data = make_site(6, seed=1)
    store = SampleStore(data, model, FeatureCache(tmp_path, model, model.cache_start, "float32"), name="training")
    assert len(_entries(store.cache.folder)) == 6
    assert all(isinstance(key, str) for key in store.keys)  # the store itself holds no tensors
    assert not [value for value in vars(store).values() if isinstance(value, torch.Tensor)]
    images = torch.stack([image for image, _ in data]).expand(-1, 3, -1, -1)
    masks = torch.stack([mask for _, mask in data])
    batches = list(store.batches(4))
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([b.prefix for b in batches]), model.encode_prefix(images), rtol=0, atol=0)
    assert torch.equal(torch.cat([b.masks for b in batches]), masks)
    half = SampleStore(data, model, FeatureCache(tmp_path, model, model.cache_start, "float16"), name="training")
    assert half.cache.folder != store.cache.folder
    with torch.no_grad():
        reference = model.encode_prefix(images)
        torch.testing.assert_close(torch.cat([b.prefix for b in half.batches(6)]), reference, rtol=1e-2, atol=1e-2)


def test_a_second_trainer_reuses_the_cache_and_a_changed_setting_does_not(tmp_path, caplog):
    data = make_site(4, seed=2)
    site = tmp_path / "site"
    caplog.set_level(logging.INFO, logger="pfedsam_nvflare.training.samples")

    def computed():
        messages = [r.getMessage() for r in caplog.records if "training set" in r.getMessage()]
        caplog.clear()
        return messages[-1]

    first = LocalTrainer(TINY, TrainerConfig(), data, None, site)
    assert "of 4 computed now, 0 found" in computed()
    LocalTrainer(TINY, TrainerConfig(), data, None, site)
    assert "of 0 computed now, 4 found" in computed()
    # the prefix ends elsewhere: other entries
    deeper = LocalTrainer(ModelConfig(backbone="tiny", adapted_blocks=1), TrainerConfig(), data, None, site)
    assert "of 4 computed now" in computed() and deeper.train_samples.cache.folder != first.train_samples.cache.folder
    # the same settings but other frozen weights (a user's checkpoint): other entries
    weights = build_backbone("tiny").sam.state_dict()
    weights["image_encoder.patch_embed.proj.weight"] += 0.01
    checkpoint = tmp_path / "other.pth"
    torch.save(weights, checkpoint)
    LocalTrainer(ModelConfig(backbone="tiny", adapted_blocks=2, checkpoint=str(checkpoint)), TrainerConfig(), data, None, site)
    assert "of 4 computed now" in computed()
    # a changed mask is another sample
    changed = [(image, 1 - mask) if index == 0 else (image, mask) for index, (image, mask) in enumerate(data)]
    LocalTrainer(TINY, TrainerConfig(), changed, None, site)
    assert "of 1 computed now, 3 found" in computed()


def test_without_a_cached_prefix_the_images_are_stored(tmp_path):
    model = build_pfedsam(ModelConfig(backbone="tiny", full_finetune=True))
    assert model.cache_start == 0
    data = make_site(3, seed=3)
    store = SampleStore(data, model, FeatureCache(tmp_path, model, model.cache_start, "float32"), name="training")
    batch = next(store.batches(3))
    assert batch.prefix is None and batch.images.shape == (3, 3, 64, 64)
    assert torch.equal(batch.images[:, :1], torch.stack([image for image, _ in data]))


def test_an_unreadable_entry_is_named(tmp_path):
    model = build_pfedsam(TINY)
    store = SampleStore(make_site(2, seed=4), model, FeatureCache(tmp_path, model, model.cache_start), name="training")
    broken = store.cache.path(store.keys[0])
    broken.write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match=rf"feature cache entry {broken} is unreadable"):
        list(store.batches(2))
