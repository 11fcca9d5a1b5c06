"""Bad input to the ``pfedsam`` command: each call ends with one line that names the argument or the file, exit
code 2, no traceback, and nothing half-written left behind."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.data.checks import report


def _prostate_with_a_corrupt_mask(root):
    site = root / "BIDMC"
    site.mkdir(parents=True)
    for case in ("Case00", "Case01"):
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 3).astype(np.float32), np.eye(4)), site / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.uint8), np.eye(4)), site / f"{case}_segmentation.nii.gz")
    (site / "Case01_segmentation.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return root


def _fundus_with_an_unreadable_image(root):
    images, masks = root / "Domain1" / "train" / "image", root / "Domain1" / "train" / "mask"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / f"{name}.png")
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / f"{name}.png")
    (images / "b.png").write_bytes(b"not a png")
    return root


def _poc(root, project):
    root.mkdir()
    (root / "project.yml").write_text(project)
    return root


CALLS = {
    "make-data into a file": (lambda t: ["make-data", "--out", str(t / "afile")], "Not a directory: {t}/afile"),
    "make-data --seed -1": (lambda t: ["make-data", "--out", str(t / "d"), "--seed", "-1"], "argument --seed: -1 is below 0"),
    "make-data --cases 0": (lambda t: ["make-data", "--out", str(t / "d"), "--cases", "0"], "argument --cases: 0 is below 1"),
    "convert prostate, corrupt mask": (
        lambda t: ["convert", "prostate", str(_prostate_with_a_corrupt_mask(t / "src")), str(t / "out")],
        "{t}/src/BIDMC/Case01_segmentation.nii.gz cannot be read",
    ),
    "convert fundus, unreadable image": (
        lambda t: ["convert", "fundus", str(_fundus_with_an_unreadable_image(t / "src")), str(t / "out")],
        "{t}/src/Domain1/train/image/b.png cannot be read",
    ),
    "convert into a file": (
        lambda t: ["convert", "fundus", str(_fundus_with_an_unreadable_image(t / "src")), str(t / "afile")],
        "exists and is not an empty folder; choose a new one: {t}/afile",
    ),
    "demo in a file": (lambda t: ["demo", "--workspace", str(t / "afile")], "Not a directory: {t}/afile"),
    "export-jobs into a file": (lambda t: ["export-jobs", "--out", str(t / "afile")], "File exists: {t}/afile"),
    "allow-list on a file": (lambda t: ["allow-list", str(t / "afile")], "{t}/afile is a file, not a site's local/ folder"),
    "allow-list, resources.json a list": (
        lambda t: ["allow-list", str(t / "local")], "{t}/local/resources.json holds a JSON list, not the object"
    ),
    "submit, broken project.yml": (
        lambda t: ["submit", "jobs/pfedsam", "--poc-workspace", str(_poc(t / "poc", "name: x\nparticipants: [\n"))],
        "the POC project file {t}/poc/project.yml is broken (ParserError",
    ),
    "submit, incomplete project.yml": (
        lambda t: ["submit", "jobs/pfedsam", "--poc-workspace", str(_poc(t / "poc", "name: x\n"))],
        "the POC project file {t}/poc/project.yml is broken (KeyError: 'participants')",
    ),
    "submit --timeout -5": (
        lambda t: ["submit", "jobs/pfedsam", "--poc-workspace", str(t), "--timeout", "-5"], "argument --timeout: -5 is below 0.0"
    ),
    "predict --batch-size 0": (
        lambda t: ["predict", "--model", "m.pt", "--input", ".", "--out", "o", "--batch-size", "0"], "argument --batch-size: 0 is below 1"
    ),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_bad_call_ends_with_one_line_naming_what_is_wrong(tmp_path, capsys, call):
    make, expected = CALLS[call]
    (tmp_path / "afile").write_text("a file where a folder is expected")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "resources.json").write_text("[]")
    argv = make(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's refusal of an option
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected.format(t=tmp_path) in error, error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_check_data_names_a_4d_volume_and_a_constant_one(tmp_path):
    from pfedsam_nvflare.data.synthetic import make_sites

    make_sites(tmp_path, sites=1, cases=3, size=16, depth=3, seed=0)
    images = tmp_path / "site-1" / "images"
    first, second = sorted(images.glob("*.nii.gz"))[:2]
    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 3, 2).astype(np.float32), np.eye(4)), first)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.float32), np.eye(4)), second)
    text, fit = report(tmp_path)
    assert not fit
    assert f"{first}: a 4D image of 2 frames or channels" in text
    assert f"{second}: every voxel has the value 0; an empty or broken scan" in text


def test_a_split_file_whose_sets_are_not_lists_is_refused_naming_it(tmp_path):
    from pfedsam_nvflare.data.layout import DataError
    from pfedsam_nvflare.data.splits import SiteSplit

    path = tmp_path / "split.json"
    path.write_text(json.dumps({"site": "s", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.2, "train_cases": "case001"}))
    with pytest.raises(DataError, match=f"{path}: train_cases must be a list of case names, got str 'case001'"):
        SiteSplit.read(path)


def test_the_demo_help_names_every_method_a_job_can_run(capsys):
    """The help lists the methods by hand (the table lives beside FLARE, which the command does not import to start)."""
    from pfedsam_nvflare.flare.recipe import RECIPE_METHODS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    listed = help_text.split("--method METHOD")[-1].split("--rounds")[0]
    assert sorted(word.strip(",()") for word in listed.split() if word.strip(",()") in RECIPE_METHODS) == sorted(
        RECIPE_METHODS
    )
