"""A site's data for training: its cases read through MONAI, cut into 2D slices on the model grid, and split
into training, validation and test sets by case."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .layout import Case, Labels, find_cases
from .preprocess import SliceOptions, model_input, normalise, planes, to_model_grid
from .reading import read_case
from .splits import SiteSplit, site_split

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    image: torch.Tensor  # (C, S, S) in [0, 1]
    mask: torch.Tensor  # (K, S, S) of 0/1
    case: str
    slice: int


def kept_slices(case: Case, mask_planes: list[np.ndarray], options: SliceOptions, seed: int) -> list[int]:
    """The slices of ``case`` a set uses: every slice with foreground and a seeded share of the empty ones."""
    empty = [index for index, mask in enumerate(mask_planes) if not mask.any()]
    dropped: set[int] = set()
    if empty and options.empty_slice_fraction < 1.0:
        generator = np.random.default_rng([seed, zlib.crc32(f"{case.site}/{case.name}".encode())])
        keep = round(options.empty_slice_fraction * len(empty))
        dropped = set(generator.permutation(empty)[keep:].tolist())
    return [index for index in range(len(mask_planes)) if index not in dropped]


class SiteDataset(torch.utils.data.Dataset):
    """Slices of some of a site's cases, read from their files when asked; items are ``(image, mask)``.

    Only the index (case, slice) stays in memory, and the planes of the last case read, so reading in order reads
    each file once and memory does not grow with the number of slices.
    """

    def __init__(self, cases: list[Case], labels: Labels, options: SliceOptions, seed: int) -> None:
        self.labels, self.options = labels, options
        self._cases = {case.name: case for case in cases}
        self._open: tuple[str, list[np.ndarray], list[np.ndarray]] | None = None
        self.index: list[tuple[str, int]] = []
        for case in cases:
            _, mask_planes = self._planes(case.name)
            self.index += [(case.name, index) for index in kept_slices(case, mask_planes, options, seed)]

    def _planes(self, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._open is None or self._open[0] != name:
            data = read_case(self._cases[name], self.labels)
            image = normalise(data.image, self.options.clip_percentiles)
            axis = self.options.axis
            self._open = (name, list(planes(image, axis)), list(planes(self.labels.channels(data.label_map), axis)))
        return self._open[1], self._open[2]

    def __len__(self) -> int:
        return len(self.index)

    def sample(self, index: int) -> Sample:
        name, plane = self.index[index]
        image_planes, mask_planes = self._planes(name)
        size = self.options.image_size
        image = model_input(image_planes[plane], size)
        return Sample(image, to_model_grid(mask_planes[plane], size, "nearest"), name, plane)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.sample(index)
        return sample.image, sample.mask

    @property
    def cases(self) -> list[str]:
        return sorted({name for name, _ in self.index})


@dataclass
class SiteData:
    """Training and validation slices, read when asked; the test cases stay files until the final evaluation
    reads them whole (``cases``)."""

    train: SiteDataset
    val: SiteDataset
    split: SiteSplit
    labels: Labels
    cases: dict[str, Case]

    def split_cases(self, split: str) -> list[Case]:
        return [self.cases[name] for name in self.split.cases(split)]


def load_site(
    root: str | Path,
    site: str,
    options: SliceOptions = SliceOptions(),
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | Path | None = None,
) -> SiteData:
    """Read a site's training and validation cases as slices, split by case.

    With ``split_file``, an existing split is reused (so a restarted site keeps its split) after checking that it
    was made with these settings from exactly the site's cases; otherwise the new split is written there.
    """
    root = Path(root)
    labels = Labels.of_root(root)
    cases = {case.name: case for case in find_cases(root, site)}
    split = site_split(
        site, list(cases), val_fraction, test_fraction, seed, None if split_file is None else Path(split_file)
    )
    every_slice = replace(options, empty_slice_fraction=1.0)  # validation scores every slice
    sets = {
        name: SiteDataset([cases[case] for case in split.cases(name)], labels, kept, seed)
        for name, kept in (("train", options), ("val", every_slice))
    }
    logger.info(
        "site %s: %d training cases (%d slices), %d validation cases (%d slices), %d test cases",
        site, len(split.train_cases), len(sets["train"]), len(split.val_cases), len(sets["val"]), len(split.test_cases),
    )
    return SiteData(train=sets["train"], val=sets["val"], split=split, labels=labels, cases=cases)
