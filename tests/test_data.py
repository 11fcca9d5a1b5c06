import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image

from pfedsam_nvflare.cli import main
from pfedsam_nvflare.data import DataError, Labels, SiteSplit, SliceOptions, load_site
from pfedsam_nvflare.data.checks import check_root
from pfedsam_nvflare.data.converters import convert_fundus, convert_prostate
from pfedsam_nvflare.data.synthetic import SITE_STYLES, make_sites
from pfedsam_nvflare.model import ModelConfig
from pfedsam_nvflare.training import LocalTrainer, TrainerConfig


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    make_sites(root, sites=3, cases=5, size=48, depth=4, seed=3)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_sites_train_with_the_core_trainer(generated, tmp_path):
    options = SliceOptions(image_size=64)
    for site in ("site-1", "site-2", "site-3"):
        data = load_site(generated, site, options, val_fraction=0.4, seed=1, split_file=tmp_path / site / "split.json")
        split = data.split
        assert len(split.train_cases) == 2 and len(split.val_cases) == 2 and len(split.test_cases) == 1
        assert sorted(split.train_cases + split.val_cases + split.test_cases) == [f"case{i:03d}" for i in range(1, 6)]
        assert set(data.train.cases) == set(data.split.train_cases) and set(data.val.cases) == set(data.split.val_cases)
        assert len(data.split.val_cases) == 2 and len(data.val) == 2 * 4  # two cases of four slices
        image, mask = data.train[0]
        assert image.shape == (1, 64, 64) and mask.shape == (1, 64, 64)
        assert float(image.min()) >= 0 and float(image.max()) <= 1 and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert json.loads((tmp_path / site / "split.json").read_text())["val_cases"] == data.split.val_cases
    trainer = LocalTrainer(ModelConfig(backbone="tiny"), TrainerConfig(), data.train, data.val, tmp_path / "site")
    result = trainer.run_round(trainer.global_state())
    assert result.num_samples == len(data.train)
    assert np.isfinite(trainer.validate()["personalized_dice"])


def test_the_split_is_reused_and_a_changed_one_is_refused_with_what_changed(generated, tmp_path):
    split_file = tmp_path / "split.json"
    first = load_site(generated, "site-1", SliceOptions(image_size=32), seed=5, split_file=split_file)
    assert json.loads(split_file.read_text())["test_fraction"] == 0.2 and len(first.split.test_cases) == 1
    again = load_site(generated, "site-1", SliceOptions(image_size=32), seed=5, split_file=split_file)
    assert again.split == first.split
    with pytest.raises(DataError, match="split.json: the split no longer matches .*seed was 5, is now 99"):
        load_site(generated, "site-1", SliceOptions(image_size=32), seed=99, split_file=split_file)
    with pytest.raises(DataError, match="test_fraction was 0.2, is now 0.4"):
        load_site(generated, "site-1", SliceOptions(image_size=32), seed=5, test_fraction=0.4, split_file=split_file)
    changed = tmp_path / "changed"
    shutil.copytree(generated, changed)
    for folder in ("images", "masks"):
        (changed / "site-1" / folder / "case005.nii.gz").unlink()
    with pytest.raises(DataError, match="cases removed: case005"):
        load_site(changed, "site-1", SliceOptions(image_size=32), seed=5, split_file=split_file)


def test_the_three_way_split_is_by_case_deterministic_and_needs_enough_cases():
    cases = [f"c{i}" for i in range(10)]
    split = SiteSplit.of("a", cases, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(split.train_cases), len(split.val_cases), len(split.test_cases)) == (7, 1, 2)
    assert split == SiteSplit.of("a", list(reversed(cases)), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert split != SiteSplit.of("a", cases, val_fraction=0.1, test_fraction=0.2, seed=1)
    five = SiteSplit.of("a", cases[:5], val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(five.train_cases), len(five.val_cases), len(five.test_cases)) == (3, 1, 1)
    with pytest.raises(DataError, match=r"site a has 2 case\(s\); .* needs at least 3"):
        SiteSplit.of("a", cases[:2], val_fraction=0.1, test_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be below 1, got 0.6 \\+ 0.5"):
        SiteSplit.of("a", cases, val_fraction=0.6, test_fraction=0.5, seed=0)
    assert SiteSplit.of("a", cases, val_fraction=0.1, test_fraction=0, seed=0).test_cases == []  # 0: no test set


def test_make_data_is_byte_identical(tmp_path):
    for run in ("a", "b"):
        assert main(["make-data", "--out", str(tmp_path / run), "--sites", "2", "--cases", "2", "--size", "32", "--seed", "4"]) == 0
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    main(["make-data", "--out", str(tmp_path / "c"), "--sites", "2", "--cases", "2", "--size", "32", "--seed", "5"])
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "c")


def test_sites_differ_as_documented(generated):
    styles = json.loads((generated / "sites.json").read_text())["sites"]
    stats = {}
    for site in ("site-1", "site-2", "site-3"):
        images = [np.asarray(nib.load(p).dataobj, dtype=float) for p in sorted((generated / site / "images").iterdir())]
        masks = [np.asarray(nib.load(p).dataobj) > 0 for p in sorted((generated / site / "masks").iterdir())]
        inside = np.concatenate([i[m] for i, m in zip(images, masks)]).mean()
        outside = np.concatenate([i[~m] for i, m in zip(images, masks)]).mean()
        stats[site] = inside, outside
        assert np.sign(inside - outside) == np.sign(styles[site]["contrast"])  # site-3's objects are darker
    assert styles["site-3"]["contrast"] < 0 < styles["site-1"]["contrast"]
    # site-2's gamma 0.6 brightens its background against site-1's gamma 1.0
    assert styles["site-2"]["gamma"] < styles["site-1"]["gamma"] and stats["site-2"][1] > stats["site-1"][1] + 50
    assert [styles[f"site-{i + 1}"]["noise"] for i in range(3)] == [s.noise for s in SITE_STYLES[:3]]


def test_png_format_with_nested_labels(tmp_path):
    make_sites(tmp_path, sites=1, cases=3, size=40, seed=0, fmt="png", labels=2)
    assert Labels.of_root(tmp_path) == Labels(("outer", "inner"), nested=True)
    data = load_site(tmp_path, "site-1", SliceOptions(image_size=32), val_fraction=0.34, test_fraction=0)
    image, mask = data.train[0]
    assert image.shape == (1, 32, 32) and mask.shape == (2, 32, 32)
    assert mask[1].sum() > 0 and bool((mask[1] <= mask[0]).all())  # the inner label lies within the outer one


def test_slicing_axis_and_empty_slice_fraction(tmp_path):
    root = tmp_path / "root"
    for folder in ("images", "masks"):
        (root / "s" / folder).mkdir(parents=True)
    volume = np.random.default_rng(0).random((20, 30, 10)).astype(np.float32)
    labels = np.zeros((20, 30, 10), np.uint8)
    labels[5:15, 5:25, 2:4] = 1  # foreground in two of the ten axial slices
    for case in ("a", "b"):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "s" / "images" / f"{case}.nii")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "s" / "masks" / f"{case}.nii")
    data = load_site(root, "s", SliceOptions(image_size=16), val_fraction=0.5, test_fraction=0)
    assert len(data.train) == len(data.val) == 10
    sideways = load_site(root, "s", SliceOptions(image_size=16, axis=0), val_fraction=0.5, test_fraction=0)
    assert len(sideways.train) == 20
    fewer = load_site(root, "s", SliceOptions(image_size=16, empty_slice_fraction=0.25), val_fraction=0.5, test_fraction=0)
    assert len(fewer.train) == 2 + 2  # both foreground slices and a quarter of the eight empty ones
    assert sum(bool(mask.any()) for _, mask in fewer.train) == 2


def test_nrrd_files_are_read(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "s" / folder).mkdir(parents=True)
    header = {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    for case in ("a", "b"):
        labels = np.zeros((12, 12, 3), np.uint8)
        labels[3:8, 3:8] = 1
        nrrd.write(str(tmp_path / "s" / "images" / f"{case}.nrrd"), np.random.default_rng(1).random((12, 12, 3)), header)
        nrrd.write(str(tmp_path / "s" / "masks" / f"{case}.nrrd"), labels, header)
    data = load_site(tmp_path, "s", SliceOptions(image_size=16), val_fraction=0.5, test_fraction=0)
    assert len(data.train) == 3 and data.train[0][1].sum() > 0


# --- converters ---


def test_prostate_converter(tmp_path):
    source = tmp_path / "prostate"
    for site, stem in (("BIDMC", "Case00"), ("HK", "case01"), ("ISBI_1.5", "Case02")):
        (source / site).mkdir(parents=True)
        for index in range(2):
            name = f"{stem[:-1]}{index}"
            labels = np.zeros((16, 16, 3), np.uint8)
            labels[4:10, 4:10, 1] = 1 if site != "HK" else 2  # some sites mark zones with 2
            suffix = "_segmentation" if site != "HK" else "_Segmentation"
            nib.save(nib.Nifti1Image(np.random.default_rng(index).random((16, 16, 3)).astype(np.float32), np.eye(4)), source / site / f"{name}.nii.gz")
            nib.save(nib.Nifti1Image(labels, np.eye(4)), source / site / f"{name}{suffix}.nii.gz")
    out = tmp_path / "sites"
    assert main(["convert", "prostate", str(source), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["BIDMC", "HK", "ISBI_1.5"]
    assert sorted(p.name for p in (out / "HK" / "images").iterdir()) == ["Case00.nii.gz", "Case01.nii.gz"]  # from case00, case01
    assert Labels.of_root(out) == Labels(("prostate",))
    summaries, problems = check_root(out)
    assert problems == [] and [s.cases for s in summaries] == [2, 2, 2]
    mask = np.asarray(nib.load(out / "HK" / "masks" / "Case00.nii.gz").dataobj)
    assert set(np.unique(mask).tolist()) == {0, 1}
    (source / "UCL").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), source / "UCL" / "Case07.nii.gz")
    with pytest.raises(DataError, match=r"UCL/Case07.nii.gz: case Case07 has no Case07_segmentation.nii.gz"):
        convert_prostate(source, tmp_path / "again")


def test_fundus_converter(tmp_path):
    source = tmp_path / "fundus"
    for site in ("Domain1", "Domain2"):
        for part in ("train", "test"):
            (source / site / part / "ROIs" / "image").mkdir(parents=True)
            (source / site / part / "ROIs" / "mask").mkdir(parents=True)
            image = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            mask = np.full((24, 24), 255, np.uint8)
            mask[6:18, 6:18] = 128
            mask[9:15, 9:15] = 0
            Image.fromarray(image).save(source / site / part / "ROIs" / "image" / "n001.png")
            Image.fromarray(mask).save(source / site / part / "ROIs" / "mask" / "n001.png")
    out = tmp_path / "sites"
    assert convert_fundus(source, out) == {"Domain1": 2, "Domain2": 2}
    assert sorted(p.name for p in (out / "Domain1" / "images").iterdir()) == ["test_ROIs_n001.png", "train_ROIs_n001.png"]
    data = load_site(out, "Domain1", SliceOptions(image_size=24), val_fraction=0.5, test_fraction=0)
    image, mask = data.train[0]
    assert image.shape == (3, 24, 24) and mask.shape == (2, 24, 24)
    assert int(mask[0].sum()) == 144 and int(mask[1].sum()) == 36  # disc includes the cup
    Image.fromarray(np.full((24, 24), 77, np.uint8)).save(source / "Domain2" / "test" / "ROIs" / "mask" / "n001.png")
    with pytest.raises(DataError, match=r"n001.png: fundus mask values \[77\]"):
        convert_fundus(source, tmp_path / "again")


# --- bad data: every case from the loader and from check-data ---


def _good_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_sites(root, sites=2, cases=2, size=24, depth=2, seed=0)
    return root


def _break(root: Path, problem: str) -> tuple[str, str]:
    """Damage ``root`` in one way; returns the site to load and the text the error must contain."""
    image, mask = root / "site-1" / "images" / "case001.nii.gz", root / "site-1" / "masks" / "case001.nii.gz"
    if problem == "unreadable file":
        image.write_bytes(b"not an image at all")
        return "site-1", "case001.nii.gz: cannot be read as an image"
    if problem == "size mismatch":
        nib.save(nib.Nifti1Image(np.zeros((10, 10, 2), np.uint8), np.eye(4)), mask)
        return "site-1", "masks/case001.nii.gz: mask size (10, 10, 2) differs from image size (24, 24, 2)"
    if problem == "values outside the label set":
        nib.save(nib.Nifti1Image(np.full((24, 24, 2), 3, np.uint8), np.eye(4)), mask)
        return "site-1", "masks/case001.nii.gz: mask values [3] are outside the label set [0, 1]"
    if problem == "case without mask":
        mask.unlink()
        return "site-1", "images/case001.nii.gz: case 'case001' has no mask"
    if problem == "site without cases":
        for path in (root / "site-2" / "images").iterdir():
            path.unlink()
        for path in (root / "site-2" / "masks").iterdir():
            path.unlink()
        return "site-2", "site site-2 has no cases"
    if problem == "empty root":
        shutil.rmtree(root)
        root.mkdir()
        return "site-1", f"data root {root} is empty"
    raise AssertionError(problem)


PROBLEMS = ["unreadable file", "size mismatch", "values outside the label set", "case without mask", "site without cases", "empty root"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_data_is_named_by_the_loader_and_by_check_data(tmp_path, problem, capsys):
    root = _good_root(tmp_path)
    site, expected = _break(root, problem)
    with pytest.raises(DataError, match=re.escape(expected)):
        if problem == "empty root":
            from pfedsam_nvflare.data import list_sites

            list_sites(root)
        else:
            load_site(root, site, SliceOptions(image_size=32), val_fraction=0.5, test_fraction=0)
    assert main(["check-data", str(root)]) == 1
    printed = capsys.readouterr().out
    assert expected in printed and "problem(s):" in printed


def test_check_data_reports_every_problem_not_only_the_first(tmp_path, capsys):
    root = _good_root(tmp_path)
    _break(root, "values outside the label set")
    _break(root, "site without cases")
    assert main(["check-data", str(root)]) == 1
    assert "2 problem(s)" in capsys.readouterr().out


def test_check_data_on_a_generated_root(tmp_path):
    root = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "pfedsam_nvflare.cli", "make-data", "--out", str(root), "--sites", "2", "--cases", "2", "--size", "32"],
        check=True,
        capture_output=True,
    )
    completed = subprocess.run(["pfedsam", "check-data", str(root)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[1].split()[:3] == ["site", "cases", "slices"]
    assert lines[2].split()[:4] == ["site-1", "2", "16", "100%"]
    assert lines[-1] == "no problems found"
