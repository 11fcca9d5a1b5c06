"""The model a site keeps: its file, its preprocessing round trip, and scoring whole cases with it."""

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from pfedsam_nvflare.data import Labels, SliceOptions, load_site
from pfedsam_nvflare.data.preprocess import from_model_grid, normalise, to_model_grid
from pfedsam_nvflare.data.synthetic import make_sites
from pfedsam_nvflare.inference import Segmenter
from pfedsam_nvflare.inference.keep import evaluate_model_file, keep_model
from pfedsam_nvflare.model import CheckpointError, ModelConfig
from pfedsam_nvflare.model.kept import KeptModelError, load_kept_model
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig

TINY = ModelConfig(backbone="tiny", adapted_blocks=2, decoder="lora")
OPTIONS = SliceOptions(image_size=64)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_the_model_grid_round_trip_restores_the_planes_own_size_and_place(shape):
    plane = np.zeros((1, *shape), np.float32)
    plane[0, 10:20, 12:25] = 1
    grid = to_model_grid(plane, 64, "bilinear")
    logits = (grid * 2 - 1).unsqueeze(0)  # positive inside the square, negative outside
    back = from_model_grid(logits, *shape)[0]
    assert back.shape == (1, *shape)
    assert ((back > 0).numpy() == plane.astype(bool)).mean() > 0.97


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_sites(root, sites=1, cases=5, size=48, depth=3, seed=2)
    work = tmp_path_factory.mktemp("site")
    data = load_site(root, "site-1", OPTIONS, split_file=work / "split.json")
    trainer = LocalTrainer(TINY, TrainerConfig(batch_size=4, lr_global=3e-3, lr_local=3e-3), data.train, data.val, work)
    received = trainer.global_state()
    trainer.run_round(received)
    return root, data, trainer, work


def test_keeping_a_model_fits_the_experts_and_leaves_the_trainer_as_it_was(site):
    root, data, trainer, work = site
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    received = {k: v + 0.01 for k, v in trainer.global_state().items()}
    kept = keep_model(trainer, received, data.labels, OPTIONS, about={"site": "site-1", "data_root": str(root)})
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the trainer's own state is untouched
    assert all(torch.equal(kept.global_state[k], received[k]) for k in received)
    assert any(not torch.equal(kept.local_state[k], trainer.local_state()[k]) for k in kept.local_state)  # refitted
    assert kept.backbone_sha256 is None and kept.preprocessing["labels"] == ["foreground"]


def test_the_global_path_of_a_model_with_a_personal_copy_runs_the_global_weights(site):
    """Ditto's two paths hold different weights in the same tensors, swapped between the passes; bfloat16 autocast
    keeps a cast copy of each weight while it is open, so a swap inside it scored the global path with the personal
    copy's weights."""
    _, data, trainer, _ = site
    kept = keep_model(trainer, trainer.global_state(), data.labels, OPTIONS, about={})
    generator = torch.Generator().manual_seed(0)
    personal = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in kept.global_state.items()}
    image = data.train.sample(0).image.numpy()
    both = Segmenter(replace(kept, personal_state=personal), precision="bfloat16").logits(image)
    alone = Segmenter(kept, precision="bfloat16").logits(image)
    torch.testing.assert_close(both["global"], alone["global"], atol=1e-6, rtol=0)
    assert not torch.allclose(both["personalized"], alone["personalized"], atol=1e-3)  # the personal copy counts


def test_the_file_holds_no_frozen_weight_and_its_two_paths_are_the_models(site, tmp_path):
    root, data, trainer, _ = site
    kept = keep_model(trainer, trainer.global_state(), data.labels, OPTIONS, about={})
    path = kept.save(tmp_path / "personalized_model.pt")
    saved = torch.load(path, weights_only=True)
    assert set(saved["global"]) == set(trainer.partition.global_keys)
    assert set(saved["local"]) == set(trainer.partition.local_keys)
    assert not set(trainer.partition.frozen_keys) & (set(saved["global"]) | set(saved["local"]))
    image = data.train.sample(0).image.numpy()  # one plane already on the model grid: no resize to undo
    logits = Segmenter(load_kept_model(path), precision="float32").logits(image, ("personalized", "global"))
    model, _ = load_kept_model(path).build()
    plane = torch.from_numpy(normalise(image, OPTIONS.clip_percentiles)).float()[None]
    with torch.no_grad():
        torch.testing.assert_close(logits["personalized"], model(plane)[0], atol=1e-5, rtol=1e-5)
        with model.global_only():
            torch.testing.assert_close(logits["global"], model(plane)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits["personalized"], logits["global"])  # the experts count
    case = data.split_cases("test")[0]
    summary = evaluate_model_file(path, {"test": [case]}, data.labels)["test"].summary()
    assert summary["cases"] == 1 and set(summary["personalized"]["dice"]) == {"foreground", "mean"}
    assert 0.0 <= summary["personalized"]["dice"]["mean"] <= 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_prediction_comes_back_in_the_cases_own_grid_plane_by_plane(site, axis):
    _, data, trainer, _ = site
    kept = keep_model(trainer, trainer.global_state(), data.labels, OPTIONS, about={})
    segmenter = Segmenter(kept)
    segmenter.axis, segmenter.clip_percentiles = axis, (0.0, 100.0)  # every plane spans [0, 1]: no rescaling
    volume = np.random.default_rng(0).random((1, 37, 52, 5)).astype(np.float32)
    volume[0, 0], volume[0, 1] = 0.0, 1.0  # min and max in every plane of every axis...
    volume[0, :, 0], volume[0, :, 1] = 0.0, 1.0
    volume[0, :, :, 0], volume[0, :, :, 1] = 0.0, 1.0
    logits = segmenter.logits(volume, ("global",))["global"]
    assert logits.shape == (1, 37, 52, 5)
    for index in (2, 4):  # ...so each plane's own logits, as a 2D image, land exactly where the plane was
        plane = np.take(volume, index, axis=axis + 1)
        alone = segmenter.logits(plane, ("global",))["global"]
        torch.testing.assert_close(torch.from_numpy(np.take(logits.numpy(), index, axis=axis + 1)), alone)


def test_bad_model_files_are_refused_with_their_name(site, tmp_path):
    _, data, trainer, _ = site
    kept = keep_model(trainer, trainer.global_state(), data.labels, OPTIONS, about={})
    path = kept.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["local"]))
    payload["local"][key] = payload["local"][key] * float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(KeptModelError, match=f"nan.pt: local key '{key}' has non-finite values"):
        load_kept_model(tmp_path / "nan.pt")
    del payload["preprocessing"]
    torch.save(payload, tmp_path / "incomplete.pt")
    with pytest.raises(KeptModelError, match="incomplete.pt is incomplete"):
        load_kept_model(tmp_path / "incomplete.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(KeptModelError, match="cut.pt cannot be read"):
        load_kept_model(tmp_path / "cut.pt")
    kept.backbone_sha256 = "0" * 64  # trained on other backbone weights than these
    with pytest.raises(CheckpointError, match="this model was trained on 0000"):
        kept.build()


def test_the_spacing_of_a_nifti_file_reaches_the_scores_in_its_axis_order(tmp_path, monkeypatch):
    for folder in ("images", "masks"):
        (tmp_path / "s" / folder).mkdir(parents=True)
    mask = np.zeros((30, 40, 6), np.uint8)
    mask[10:20, 10:20, 2:4] = 1
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), tmp_path / "s" / "images" / "a.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), tmp_path / "s" / "masks" / "a.nii.gz")
    from pfedsam_nvflare.data import find_cases
    from pfedsam_nvflare.data.reading import read_case
    from pfedsam_nvflare.inference import evaluate_cases

    case = find_cases(tmp_path, "s")[0]
    assert read_case(case, Labels()).spacing == pytest.approx((0.5, 0.7, 3.0))

    class OneSliceTooFar:  # a segmenter whose prediction reaches one slice beyond the truth, along the third axis
        kept = type("Kept", (), {"labels": ["foreground"], "preprocessing": {"nested": False}})()

        def logits(self, image, paths, prompt_masks=None):
            shifted = torch.from_numpy(prompt_masks.copy())
            shifted[..., 4] = shifted[..., 3]
            return {path: shifted * 2 - 1 for path in paths}

    scores = evaluate_cases(OneSliceTooFar(), [case], Labels(), paths=("global",)).scores["global"]["a"]
    assert scores["hd95"][0] == pytest.approx(3.0)  # one slice of 3 mm, not 0.5 or 0.7
    assert scores["dice"][0] == pytest.approx(2 * 200 / (200 + 300))


def test_a_nifti_case_is_scored_in_millimetres(tmp_path, site):
    _, data, trainer, _ = site
    kept = keep_model(trainer, trainer.global_state(), data.labels, OPTIONS, about={})
    for folder in ("images", "masks"):
        (tmp_path / "s" / folder).mkdir(parents=True)
    image = np.zeros((40, 40, 3), np.float32)
    mask = np.zeros((40, 40, 3), np.uint8)
    mask[10:30, 10:30, 1] = 1
    image[mask.astype(bool)] = 1
    for spacing, name in ((1.0, "a"), (2.0, "b")):
        affine = np.diag([spacing, spacing, spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "s" / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / "s" / "masks" / f"{name}.nii.gz")
    from pfedsam_nvflare.data import find_cases
    from pfedsam_nvflare.inference import evaluate_cases

    evaluation = evaluate_cases(Segmenter(kept), find_cases(tmp_path, "s"), Labels())
    a, b = evaluation.scores["global"]["a"], evaluation.scores["global"]["b"]
    assert a["dice"] == b["dice"]  # the same voxels
    assert b["hd95"][0] == pytest.approx(2 * a["hd95"][0])  # twice the voxel size, twice the distance
