"""Reading a case through MONAI's readers: the image, its label map and its voxel spacing, checked against
each other; and reading one image with its geometry, for prediction."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.transforms import LoadImage

from .layout import DATASET_FILE, Case, DataError, Labels


DICOM_SUFFIX = ".dcm"
# MONAI announces on every read that an optional GPU DICOM decoder is not installed; the CPU decoder reads the same
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def is_dicom_series(path: Path) -> bool:
    """A folder of ``.dcm`` files: one DICOM series, read as one volume."""
    return path.is_dir() and any(child.suffix.lower() == DICOM_SUFFIX for child in path.iterdir())


@dataclass
class Volume:
    """An image (C, *spatial) as read, the size of its voxels along each spatial axis (mm for NIfTI, NRRD and
    DICOM; PNG has no spacing, so 1 per pixel) and, where the format has one, its voxel-to-world affine (4x4,
    as MONAI's reader gives it; ``None`` for PNG)."""

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None


def _loader(path: Path) -> LoadImage:
    if path.name.endswith(".png"):
        return LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True, reverse_indexing=False)
    if path.is_dir():
        return LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    return LoadImage(image_only=True, ensure_channel_first=True)


def read_volume(path: Path) -> Volume:
    """A file (or a DICOM series folder) as (channels, *spatial) float32 with its spacing and affine, via MONAI's
    readers (PNG rows stay rows)."""
    try:
        with warnings.catch_warnings():  # MONAI's DICOM reader warns that an optional GPU decoder is missing
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            image = _loader(path)(str(path))
    except Exception as error:  # MONAI re-raises each reader's own error types
        raise DataError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from error
    array = np.asarray(image, dtype=np.float32)
    spacing = tuple(float(v) for v in np.asarray(getattr(image, "pixdim", [1.0] * (array.ndim - 1))))
    if len(spacing) != array.ndim - 1 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"{path}: voxel spacing {spacing} is not one positive size per spatial axis")
    if array.shape[0] > 1 and not path.name.endswith(".png"):
        raise DataError(
            f"{path}: a 4D image of {array.shape[0]} frames or channels (shape {tuple(array.shape[1:])} each); "
            "expected a 2D image or a 3D volume of one channel: save the frame to segment on its own"
        )
    affine = None if path.name.endswith(".png") else np.asarray(image.affine, dtype=np.float64)
    return Volume(array, spacing, affine)


@dataclass
class CaseData:
    image: np.ndarray  # (C, *spatial) as stored
    label_map: np.ndarray  # (*spatial) of integers 0..K
    spacing: tuple[float, ...]


def read_case(case: Case, labels: Labels) -> CaseData:
    """Image, label map and spacing of a case, checked against each other."""
    volume = read_volume(case.image)
    image, mask = volume.array, read_volume(case.mask).array
    if mask.shape[0] > 1:
        if not (mask == mask[:1]).all():
            raise DataError(f"{case.mask}: a mask must have one channel, found {mask.shape[0]} that differ")
        mask = mask[:1]
    if image.shape[1:] != mask.shape[1:]:
        raise DataError(
            f"{case.mask}: mask size {mask.shape[1:]} differs from image size {image.shape[1:]} of {case.image}"
        )
    if image.ndim not in (3, 4):
        raise DataError(f"{case.image}: expected a 2D or 3D image, found {image.ndim - 1} spatial dimensions")
    if not np.isfinite(image).all():
        raise DataError(f"{case.image}: has non-finite values")
    if image.min() == image.max():
        raise DataError(f"{case.image}: every voxel has the value {image.min():g}; an empty or broken scan")
    allowed = set(range(len(labels.names) + 1))
    found = set(np.unique(mask).tolist())
    if not found <= allowed:
        raise DataError(
            f"{case.mask}: mask values [{', '.join(f'{v:g}' for v in sorted(found - allowed))}] are outside the label "
            f"set {sorted(allowed)} "
            f"({', '.join(labels.names)}); see {DATASET_FILE}"
        )
    return CaseData(image, mask[0].astype(np.int64), volume.spacing)
