"""Using a kept model: ``pfedsam predict`` on scans in their own geometry (NIfTI with an oblique affine, PNG, a
DICOM series), ``pfedsam export`` to a plain SAM state dict, and bad model files refused by every command."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dicom import write_series
from PIL import Image

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.data import SliceOptions, load_site
from pfedsam_nvflare.data.preprocess import model_input, normalise, planes, to_model_grid
from pfedsam_nvflare.data.reading import read_volume
from pfedsam_nvflare.data.synthetic import make_sites
from pfedsam_nvflare.inference import Segmenter
from pfedsam_nvflare.inference.export import merged_state_dict
from pfedsam_nvflare.inference.keep import keep_model
from pfedsam_nvflare.inference.predict import predict
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.model.backbones import build_tiny_sam
from pfedsam_nvflare.model.kept import load_kept_model
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig

TINY = ModelConfig(backbone="tiny", decoder="full")  # the full decoder learns the generated objects in two rounds
OPTIONS = SliceOptions(image_size=64)
OBLIQUE = np.array(
    [[0.78, -0.14, 0.05, -40.0], [0.13, 1.27, -0.3, 12.5], [-0.02, 0.25, 2.95, 7.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on generated sites, kept as a file; and the generated site's cases."""
    root = tmp_path_factory.mktemp("data")
    make_sites(root, sites=1, cases=10, size=64, depth=5, seed=3)
    work = tmp_path_factory.mktemp("site")
    data = load_site(root, "site-1", OPTIONS, split_file=work / "split.json")
    config = TrainerConfig(batch_size=4, lr_global=3e-3, lr_local=3e-3, global_epochs=2)
    trainer = LocalTrainer(TINY, config, data.train, data.val, work)
    state = trainer.global_state()
    for _ in range(2):
        result = trainer.run_round(state)
        state = {key: state[key] + result.global_diff[key] for key in state}
    kept = keep_model(trainer, state, data.labels, OPTIONS, about={"site": "site-1", "data_root": str(root)})
    return kept.save(work / "personalized_model.pt"), data.split_cases("test") + data.split_cases("val")


def _case_arrays(case):
    image = np.asarray(nib.load(case.image).dataobj, dtype=np.float32)
    mask = np.asarray(nib.load(case.mask).dataobj).astype(np.uint8)
    return image, mask


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else 2 * (prediction & truth).sum() / total


def _grid_dice(model_file, image: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the personalized path on the model's own grid: every plane padded and resized, as in training."""
    segmenter = Segmenter(load_kept_model(model_file), device="auto")
    image_planes = list(planes(normalise(image, segmenter.clip_percentiles), segmenter.axis))
    mask_planes = list(planes(mask[None], segmenter.axis))
    inputs = torch.stack([model_input(plane, segmenter.image_size) for plane in image_planes])
    found = segmenter.grid_logits(inputs, ("personalized",))["personalized"] > 0
    truth = torch.stack([to_model_grid(plane.astype(np.float32), segmenter.image_size, "nearest") for plane in mask_planes])
    return _dice(found.numpy(), truth.numpy() > 0.5)


def test_predict_writes_each_scan_in_its_own_geometry_with_the_models_dice(trained, tmp_path):
    model_file, cases = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    truths = {}
    # (a) NIfTI of odd, non-square shape with an oblique affine
    image, mask = _case_arrays(cases[0])
    image, mask = image[1:62, 9:56, :], mask[1:62, 9:56, :]
    nib.save(nib.Nifti1Image(image.astype(np.int16), OBLIQUE), scans / "oblique.nii.gz")
    truths["oblique.nii.gz"] = (image[None], mask)
    # (b) PNG: one plane, 8-bit
    image, mask = _case_arrays(cases[1])
    plane = image[5:58, 2:63, 2]
    png = np.round(255 * (plane - plane.min()) / (plane.max() - plane.min())).astype(np.uint8)
    Image.fromarray(png).save(scans / "plane.png")
    truths["plane.png"] = (png[None].astype(np.float32), mask[5:58, 2:63, 2])
    # (c) a DICOM series (rows, columns, slices); MONAI reads it as (columns, rows, slices)
    image, mask = _case_arrays(cases[2])
    write_series(scans / "series", image[4:60, 12:52, :])
    truths["series"] = (image[4:60, 12:52, :].transpose(1, 0, 2)[None], mask[4:60, 12:52, :].transpose(1, 0, 2))

    run = predict(model_file, scans, tmp_path / "out", progress=False)

    outputs = {p.scan.name: p.output for p in run.outputs}
    assert sorted(outputs) == sorted(truths)
    assert outputs["oblique.nii.gz"].name == "oblique_seg.nii.gz" and outputs["plane.png"].name == "plane_seg.png"
    written = nib.load(outputs["oblique.nii.gz"])
    assert written.shape == (61, 47, 5) and np.allclose(written.affine, OBLIQUE, atol=1e-5)
    series = read_volume(scans / "series")
    written_series = nib.load(outputs["series"])
    assert written_series.shape == series.array.shape[1:] and np.allclose(written_series.affine, series.affine, atol=1e-5)
    with Image.open(outputs["plane.png"]) as picture:
        assert picture.size == (61, 53)
    for name, (image, mask) in truths.items():
        output = outputs[name]
        predicted = np.asarray(Image.open(output)) if output.name.endswith(".png") else np.asarray(nib.load(output).dataobj)
        assert set(np.unique(predicted)) <= {0, 1}, name
        dice = _dice(predicted, mask)
        assert 0.3 < dice, f"{name}: the model should segment the object (Dice {dice:.3f})"
        # the same prediction up to resampling: only boundary pixels may change, which moves the Dice of the smallest
        # scan (one 61x53 PNG plane) by up to a few hundredths; a misplaced or transposed output would cost far more
        assert dice == pytest.approx(_grid_dice(model_file, image, mask), abs=0.03), name


def test_predict_never_overwrites_a_scan_and_names_what_it_cannot_read(trained, tmp_path):
    model_file, cases = trained
    scans = tmp_path / "scans"
    scans.mkdir()
    image, _ = _case_arrays(cases[0])
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), scans / "a.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), scans / "a_seg.nii.gz")  # where a's output would go
    with pytest.raises(ValueError, match="refusing to overwrite input scan"):
        predict(model_file, scans, scans, progress=False)
    (scans / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(ValueError, match="broken.nii.gz: cannot be read as an image"):
        predict(model_file, scans, tmp_path / "out", progress=False)


def test_export_merges_the_lora_into_weights_the_backbones_own_builder_loads(trained, tmp_path):
    model_file, _ = trained
    kept = load_kept_model(model_file)
    model, _ = kept.build()
    assert any(a.adapter.up.abs().sum() > 0 for a in model.adapted)  # trained: the LoRA changes the weights
    path = tmp_path / "sam_tiny.pt"
    torch.save(merged_state_dict(model), path)
    plain = build_tiny_sam(checkpoint=path).sam.eval()  # the builder's strict loading: every key, every shape
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.global_only():
        expected = model.eval()(images)
        x = (images - model.pixel_mean) / model.pixel_std
        sparse, dense = plain.prompt_encoder(points=None, boxes=None, masks=None)
        actual = []
        for embedding in plain.image_encoder(x):
            low, _ = plain.mask_decoder(
                image_embeddings=embedding[None], image_pe=plain.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            actual.append(F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)[0])
    torch.testing.assert_close(torch.stack(actual), expected, atol=1e-4, rtol=1e-4)


def test_every_command_refuses_a_missing_truncated_or_foreign_model_file_by_name(trained, tmp_path, capsys):
    model_file, _ = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_file.read_bytes()[:2000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    for bad in (tmp_path / "missing.pt", truncated, foreign):
        for command in (
            ["predict", "--model", str(bad), "--input", str(tmp_path), "--out", str(tmp_path / "out")],
            ["evaluate", "--model", str(bad)],
            ["export", "--model", str(bad), "--out", str(tmp_path / "exported.pt")],
        ):
            assert main(command) == 2, command
            error = capsys.readouterr().err
            assert error.startswith(f"pfedsam {command[0]}: error: ") and str(bad) in error, (command, error)
