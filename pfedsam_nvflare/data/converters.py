"""Converters from the public multi-site layouts used by federated SAM papers into the site layout."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from ..atomic import staged_folder
from .layout import DataError, Labels

PROSTATE_SITES = ("BIDMC", "HK", "I2CVB", "ISBI", "ISBI_1.5", "UCL")
_PROSTATE_IMAGE = re.compile(r"^(case\d+)\.nii\.gz$", re.IGNORECASE)

# Fundus masks: 255 background, 128 optic disc (outside the cup), 0 optic cup.
FUNDUS_MASK_VALUES = {255: 0, 128: 1, 0: 2}
_FUNDUS_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif")


def convert_prostate(source: str | Path, out: str | Path) -> dict[str, int]:
    """The 6-site prostate MRI set (``<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz``, any case of
    ``case``/``Segmentation``) into the site layout. Prostate zones, where a mask has them, are merged into one
    label. Returns the number of cases per site."""
    source, out = Path(source), Path(out)
    sites = [site for site in PROSTATE_SITES if (source / site).is_dir()]
    if not sites:
        raise DataError(f"{source} holds none of the prostate sites {', '.join(PROSTATE_SITES)}")
    counts = {}
    with staged_folder(out) as staging:
        for site in sites:
            files = {path.name.lower(): path for path in (source / site).iterdir()}
            images = sorted(
                (m.group(1), path) for path in (source / site).iterdir() if (m := _PROSTATE_IMAGE.match(path.name))
            )
            if not images:
                raise DataError(f"site {site}: {source / site} has no CaseNN.nii.gz images")
            for folder in ("images", "masks"):
                (staging / site / folder).mkdir(parents=True, exist_ok=True)
            for case, image_path in images:
                mask_path = files.get(f"{case.lower()}_segmentation.nii.gz")
                if mask_path is None:
                    raise DataError(f"{image_path}: case {case} has no {case}_segmentation.nii.gz")
                name = f"Case{case[4:]}"
                shutil.copyfile(image_path, staging / site / "images" / f"{name}.nii.gz")
                with _naming(mask_path):
                    mask = nib.load(mask_path)
                    binary = (np.asarray(mask.dataobj) > 0).astype(np.uint8)
                nib.save(nib.Nifti1Image(binary, mask.affine, mask.header), staging / site / "masks" / f"{name}.nii.gz")
            counts[site] = len(images)
        Labels(("prostate",)).write(staging)
    return counts


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Whatever a reader raises for a damaged file becomes a DataError that names it."""
    try:
        yield
    except DataError:
        raise
    except Exception as error:  # nibabel, zlib and PIL raise unrelated types for a damaged file
        raise DataError(f"{path} cannot be read ({type(error).__name__}: {error}); nothing was written") from error


def _fundus_label_map(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        mask = np.asarray(opened.convert("L"))
    found = set(np.unique(mask).tolist())
    unknown = found - set(FUNDUS_MASK_VALUES)
    if unknown:
        raise DataError(
            f"{path}: fundus mask values {sorted(unknown)[:5]} are not background 255, disc 128 or cup 0"
        )
    label_map = np.zeros(mask.shape, dtype=np.uint8)
    for value, label in FUNDUS_MASK_VALUES.items():
        label_map[mask == value] = label
    return label_map


def convert_fundus(source: str | Path, out: str | Path) -> dict[str, int]:
    """The 4-site fundus set (per site, images in folders named ``image`` and masks of the same name in the
    sibling ``mask`` folders, at any depth) into the site layout with two nested labels, disc and cup.
    Case names keep the folders between the site and the image (``train_ROIs_x``) so that nothing collides."""
    source, out = Path(source), Path(out)
    sites = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")) if source.is_dir() else []
    if not sites:
        raise DataError(f"{source} has no site folders")
    counts = {}
    with staged_folder(out) as staging:
        for site in sites:
            images = sorted(
                path
                for path in (source / site).rglob("*")
                if path.parent.name.lower() == "image" and path.suffix.lower() in _FUNDUS_IMAGE_SUFFIXES
            )
            if not images:
                raise DataError(f"site {site}: no images in folders named 'image' under {source / site}")
            for folder in ("images", "masks"):
                (staging / site / folder).mkdir(parents=True, exist_ok=True)
            for image_path in images:
                mask_folder = image_path.parent.with_name("mask")
                masks = sorted(mask_folder.glob(image_path.stem + ".*")) if mask_folder.is_dir() else []
                if not masks:
                    raise DataError(f"{image_path}: no mask named {image_path.stem}.* in {mask_folder}")
                parts = image_path.relative_to(source / site).parent.parent.parts
                name = "_".join((*parts, image_path.stem))
                with _naming(image_path), Image.open(image_path) as opened:
                    opened.convert("RGB").save(staging / site / "images" / f"{name}.png")
                with _naming(masks[0]):
                    label_map = _fundus_label_map(masks[0])
                Image.fromarray(label_map).save(staging / site / "masks" / f"{name}.png")
            counts[site] = len(images)
        Labels(("disc", "cup"), nested=True).write(staging)
    return counts
