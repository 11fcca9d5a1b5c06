"""The site folder layout, read through MONAI: ``DATA_ROOT/<site>/images/<case>.<ext>`` and
``DATA_ROOT/<site>/masks/<case>.<ext>``, cut into 2D slices, normalised and resized for the model, and
split into training and validation sets by case.

An optional ``DATA_ROOT/dataset.json`` names the labels: ``{"labels": ["disc", "cup"], "nested": true}``.
Mask files hold label maps with values 0 (background) to K. With ``nested`` label k covers every pixel
whose value is at least k (a cup inside a disc); otherwise label k is the pixels equal to k. Without the
file there is one label, ``foreground``, and masks hold 0 and 1.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage, Resize, SpatialPad

logger = logging.getLogger(__name__)

EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".png")
DATASET_FILE = "dataset.json"


class DataError(ValueError):
    """Bad data; the message names the file or site."""


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...] = ("foreground",)
    nested: bool = False

    @classmethod
    def of_root(cls, root: Path) -> Labels:
        path = root / DATASET_FILE
        if not path.exists():
            return cls()
        try:
            spec = json.loads(path.read_text())
            labels = cls(tuple(spec["labels"]), bool(spec.get("nested", False)))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}: expected {{\"labels\": [names...], \"nested\": bool}} ({error})") from error
        if not labels.names or not all(isinstance(name, str) for name in labels.names):
            raise DataError(f"{path}: 'labels' must be a non-empty list of names")
        return labels

    def write(self, root: Path) -> None:
        (root / DATASET_FILE).write_text(json.dumps({"labels": list(self.names), "nested": self.nested}, indent=2) + "\n")

    def channels(self, label_map: np.ndarray) -> np.ndarray:
        """(K, ...) of 0/1 from a label map."""
        compare = np.greater_equal if self.nested else np.equal
        return np.stack([compare(label_map, k) for k in range(1, len(self.names) + 1)]).astype(np.float32)


@dataclass(frozen=True)
class Case:
    site: str
    name: str
    image: Path
    mask: Path


def _case_name(path: Path) -> tuple[str, str] | None:
    for extension in EXTENSIONS:
        if path.name.endswith(extension):
            return path.name[: -len(extension)], extension
    return None


def list_sites(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    sites = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise DataError(f"data root {root} is empty: expected one folder per site, each with images/ and masks/")
    return sites


def _files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        named = _case_name(path)
        if named is None:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
        if named[0] in found:
            raise DataError(f"{path}: case {named[0]!r} has two files ({found[named[0]].name} and {path.name})")
        found[named[0]] = path
    return found


def find_cases(root: Path, site: str) -> list[Case]:
    """The site's cases; every image needs a mask of the same case name and every mask an image."""
    site_dir = root / site
    for folder in ("images", "masks"):
        if not (site_dir / folder).is_dir():
            raise DataError(f"site {site}: {site_dir / folder} is missing")
    images, masks = _files(site_dir / "images"), _files(site_dir / "masks")
    if not images:
        raise DataError(f"site {site} has no cases: {site_dir / 'images'} is empty")
    for name, path in images.items():
        if name not in masks:
            raise DataError(f"{path}: case {name!r} has no mask in {site_dir / 'masks'}")
    for name, path in masks.items():
        if name not in images:
            raise DataError(f"{path}: mask of case {name!r} has no image in {site_dir / 'images'}")
    return [Case(site, name, images[name], masks[name]) for name in sorted(images)]


def read_array(path: Path) -> np.ndarray:
    """A file as (channels, *spatial) float32, via MONAI's readers (PNG rows stay rows)."""
    if path.name.endswith(".png"):
        loader = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True, reverse_indexing=False)
    else:
        loader = LoadImage(image_only=True, ensure_channel_first=True)
    try:
        return np.asarray(loader(str(path)), dtype=np.float32)
    except Exception as error:  # MONAI re-raises each reader's own error types
        raise DataError(f"{path}: cannot be read as an image ({type(error).__name__}: {error})") from error


def read_case(case: Case, labels: Labels) -> tuple[np.ndarray, np.ndarray]:
    """Image (C, *spatial) and label map (*spatial) of integers 0..K, checked against each other."""
    image, mask = read_array(case.image), read_array(case.mask)
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
    allowed = set(range(len(labels.names) + 1))
    found = set(np.unique(mask).tolist())
    if not found <= allowed:
        raise DataError(
            f"{case.mask}: mask values [{', '.join(f'{v:g}' for v in sorted(found - allowed))}] are outside the label "
            f"set {sorted(allowed)} "
            f"({', '.join(labels.names)}); see {DATASET_FILE}"
        )
    return image, mask[0].astype(np.int64)


@dataclass(frozen=True)
class SliceOptions:
    """How cases become model samples. ``axis`` is the spatial axis 3D volumes are cut along;
    ``empty_slice_fraction`` keeps that share of the slices without foreground (all by default)."""

    image_size: int = 256
    axis: int = 2
    empty_slice_fraction: float = 1.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if not 0.0 <= self.empty_slice_fraction <= 1.0:
            raise ValueError(f"empty_slice_fraction must be within [0, 1], got {self.empty_slice_fraction}")


def normalise(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip a whole case to its intensity percentiles and scale it to [0, 1] (LiteMedSAM's min-max input)."""
    low, high = np.percentile(image, percentiles)
    if high <= low:
        return np.zeros_like(image)
    return (np.clip(image, low, high) - low) / (high - low)


def _planes(array: np.ndarray, axis: int) -> Iterator[np.ndarray]:
    """2D planes (channels, H, W) of a (channels, *spatial) array."""
    if array.ndim == 3:
        yield array
        return
    moved = np.moveaxis(array, axis + 1, 1)
    for index in range(moved.shape[1]):
        yield moved[:, index]


def _to_model_grid(plane: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """Pad to a square (keeping the aspect ratio), then resize to size x size."""
    side = max(plane.shape[1:])
    square = SpatialPad((side, side))(torch.from_numpy(np.ascontiguousarray(plane)))
    resized = Resize((size, size), mode=mode, **({"anti_aliasing": True} if mode == "bilinear" else {}))(square)
    return torch.as_tensor(resized).float()


@dataclass
class Sample:
    image: torch.Tensor  # (C, S, S) in [0, 1]
    mask: torch.Tensor  # (K, S, S) of 0/1
    case: str
    slice: int


def case_samples(case: Case, labels: Labels, options: SliceOptions, seed: int) -> list[Sample]:
    image, label_map = read_case(case, labels)
    image = normalise(image, options.clip_percentiles)
    masks = labels.channels(label_map)
    planes = list(zip(_planes(image, options.axis), _planes(masks, options.axis)))
    empty = [index for index, (_, mask) in enumerate(planes) if not mask.any()]
    dropped: set[int] = set()
    if empty and options.empty_slice_fraction < 1.0:
        generator = np.random.default_rng([seed, zlib.crc32(f"{case.site}/{case.name}".encode())])
        keep = round(options.empty_slice_fraction * len(empty))
        dropped = set(generator.permutation(empty)[keep:].tolist())
    samples = []
    for index, (image_plane, mask_plane) in enumerate(planes):
        if index in dropped:
            continue
        image_tensor = _to_model_grid(image_plane, options.image_size, "bilinear").clamp(0, 1)
        mask_tensor = _to_model_grid(mask_plane, options.image_size, "nearest")
        samples.append(Sample(image_tensor, mask_tensor, case.name, index))
    return samples


class SiteDataset(torch.utils.data.Dataset):
    """Samples of a site in memory; items are ``(image, mask)``, ``sources`` says where each came from."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        return sample.image, sample.mask

    @property
    def cases(self) -> list[str]:
        return sorted({sample.case for sample in self.samples})


@dataclass
class SiteSplit:
    """Which cases train and which validate; written next to the site's state so it can be audited."""

    site: str
    seed: int
    val_fraction: float
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, site: str, cases: list[str], val_fraction: float, seed: int) -> SiteSplit:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be within [0, 1), got {val_fraction}")
        names = sorted(cases)
        count = 0 if val_fraction == 0 else max(1, round(val_fraction * len(names)))
        if count and len(names) < 2:
            raise DataError(f"site {site} has {len(names)} case; a split by case needs at least 2")
        order = np.random.default_rng([seed, zlib.crc32(site.encode())]).permutation(len(names))
        val = sorted(names[i] for i in order[:count])
        return cls(site, seed, val_fraction, [n for n in names if n not in val], val)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> SiteSplit:
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise DataError(f"{path}: not a split file ({error})") from error


@dataclass
class SiteData:
    train: SiteDataset
    val: SiteDataset
    split: SiteSplit
    labels: Labels


def load_site(
    root: str | Path,
    site: str,
    options: SliceOptions = SliceOptions(),
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | Path | None = None,
) -> SiteData:
    """Read a site's cases into training and validation sets split by case.

    With ``split_file``, an existing split is reused (so a restarted site keeps its split) after checking that
    it names exactly the site's cases; otherwise the new split is written there.
    """
    root = Path(root)
    labels = Labels.of_root(root)
    cases = find_cases(root, site)
    names = [case.name for case in cases]
    split_path = None if split_file is None else Path(split_file)
    if split_path is not None and split_path.exists():
        split = SiteSplit.read(split_path)
        if sorted(split.train_cases + split.val_cases) != sorted(names) or split.site != site:
            raise DataError(
                f"{split_path}: the split does not name the cases of site {site} in {root}; the data changed since it "
                "was written. Move the file away to split again"
            )
    else:
        split = SiteSplit.of(site, names, val_fraction, seed)
        if split_path is not None:
            split.write(split_path)
    samples = {case.name: case_samples(case, labels, options, seed) for case in cases}
    logger.info(
        "site %s: %d training cases (%d slices), %d validation cases (%d slices)",
        site,
        len(split.train_cases),
        sum(len(samples[n]) for n in split.train_cases),
        len(split.val_cases),
        sum(len(samples[n]) for n in split.val_cases),
    )
    return SiteData(
        train=SiteDataset([s for name in split.train_cases for s in samples[name]]),
        val=SiteDataset([s for name in split.val_cases for s in samples[name]]),
        split=split,
        labels=labels,
    )
