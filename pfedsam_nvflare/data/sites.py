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


def case_samples(case: Case, labels: Labels, options: SliceOptions, seed: int) -> list[Sample]:
    data = read_case(case, labels)
    image = normalise(data.image, options.clip_percentiles)
    masks = labels.channels(data.label_map)
    pairs = list(zip(planes(image, options.axis), planes(masks, options.axis)))
    empty = [index for index, (_, mask) in enumerate(pairs) if not mask.any()]
    dropped: set[int] = set()
    if empty and options.empty_slice_fraction < 1.0:
        generator = np.random.default_rng([seed, zlib.crc32(f"{case.site}/{case.name}".encode())])
        keep = round(options.empty_slice_fraction * len(empty))
        dropped = set(generator.permutation(empty)[keep:].tolist())
    samples = []
    for index, (image_plane, mask_plane) in enumerate(pairs):
        if index in dropped:
            continue
        image_tensor = model_input(image_plane, options.image_size)
        mask_tensor = to_model_grid(mask_plane, options.image_size, "nearest")
        samples.append(Sample(image_tensor, mask_tensor, case.name, index))
    return samples


class SiteDataset(torch.utils.data.Dataset):
    """Samples of a site in memory; items are ``(image, mask)``, ``samples`` says where each came from."""

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
class SiteData:
    """Training and validation slices in memory; the test cases stay files until the final evaluation reads
    them whole (``cases``)."""

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
        name: SiteDataset([s for case in split.cases(name) for s in case_samples(cases[case], labels, kept, seed)])
        for name, kept in (("train", options), ("val", every_slice))
    }
    logger.info(
        "site %s: %d training cases (%d slices), %d validation cases (%d slices), %d test cases",
        site, len(split.train_cases), len(sets["train"]), len(split.val_cases), len(sets["val"]), len(split.test_cases),
    )
    return SiteData(train=sets["train"], val=sets["val"], split=split, labels=labels, cases=cases)
