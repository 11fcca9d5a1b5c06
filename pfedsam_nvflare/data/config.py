"""Where a site's data comes from: a data root, or, without one, the default synthetic sites, generated
once into ``$PFEDSAM_DATA_HOME`` (default ``~/.cache/pfedsam_nvflare``) and shared by every site and run on
the machine."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .preprocess import SliceOptions
from .synthetic import make_sites

logger = logging.getLogger(__name__)

DATA_HOME_VARIABLE = "PFEDSAM_DATA_HOME"


@dataclass(frozen=True)
class SyntheticConfig:
    sites: int = 3
    cases: int = 6
    size: int = 128
    depth: int = 8
    seed: int = 0
    fmt: str = "nifti"
    labels: int = 1

    @property
    def folder_name(self) -> str:
        return (
            f"synthetic-s{self.sites}-c{self.cases}-px{self.size}-d{self.depth}-l{self.labels}-{self.fmt}-seed{self.seed}"
        )


@dataclass(frozen=True)
class DataConfig:
    """``root``: the data root (``root/<site>/images``, ``root/<site>/masks``); ``None`` means the synthetic
    sites of ``synthetic``. ``val_fraction`` and ``test_fraction``: the shares of each site's cases that validate
    and that are kept for the final test (at least one case each). ``axis``, ``empty_slice_fraction`` and
    ``clip_percentiles`` as ``SliceOptions``."""

    root: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    axis: int = 2
    empty_slice_fraction: float = 1.0
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def slice_options(self, image_size: int) -> SliceOptions:
        return SliceOptions(image_size, self.axis, self.empty_slice_fraction, tuple(self.clip_percentiles))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["clip_percentiles"] = list(self.clip_percentiles)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown data settings: {', '.join(sorted(unknown))}")
        values = dict(values)
        if "synthetic" in values:
            values["synthetic"] = SyntheticConfig(**values["synthetic"])
        if "clip_percentiles" in values:
            values["clip_percentiles"] = tuple(values["clip_percentiles"])
        return cls(**values)


def data_home() -> Path:
    return Path(os.environ.get(DATA_HOME_VARIABLE) or Path.home() / ".cache" / "pfedsam_nvflare")


def resolve_root(config: DataConfig) -> Path:
    """The data root to read; generates the synthetic sites the first time they are asked for."""
    if config.root is not None:
        return Path(config.root)
    target = data_home() / config.synthetic.folder_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    synthetic = asdict(config.synthetic)
    make_sites(staging, **synthetic)
    try:
        staging.rename(target)  # atomic: a site running at the same time either wins or finds it there
        logger.info("generated the synthetic sites in %s", target)
    except OSError:
        shutil.rmtree(staging)
    return target
