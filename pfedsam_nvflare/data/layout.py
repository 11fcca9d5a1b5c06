"""The site folder layout: ``DATA_ROOT/<site>/images/<case>.<ext>`` and ``DATA_ROOT/<site>/masks/<case>.<ext>``,
and the labels a data root declares.

An optional ``DATA_ROOT/dataset.json`` names the labels: ``{"labels": ["disc", "cup"], "nested": true}``.
Mask files hold label maps with values 0 (background) to K. With ``nested`` label k covers every pixel
whose value is at least k (a cup inside a disc); otherwise label k is the pixels equal to k. Without the
file there is one label, ``foreground``, and masks hold 0 and 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

    def label_map(self, logits: np.ndarray) -> np.ndarray:
        """A label map (...) of 0..K from per-label logits (K, ...), each label where its logit is positive: nested,
        the innermost label found; otherwise the most confident one."""
        found = logits > 0
        if self.nested:
            values = np.arange(1, len(self.names) + 1).reshape(-1, *([1] * (logits.ndim - 1)))
            return (found * values).max(axis=0).astype(np.uint8)
        best = np.where(found, logits, -np.inf).argmax(axis=0) + 1
        return np.where(found.any(axis=0), best, 0).astype(np.uint8)


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
