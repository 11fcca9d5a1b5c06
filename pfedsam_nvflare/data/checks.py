"""``pfedsam check-data``: what a hospital's IT runs before joining a federation. Reads every case the
way training will and reports every problem it finds, not just the first."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .layout import DataError, Labels, find_cases, list_sites
from .reading import read_case


@dataclass
class SiteSummary:
    site: str
    cases: int = 0
    slices: int = 0
    foreground_slices: int = 0
    sizes: set[tuple[int, ...]] = field(default_factory=set)
    count: int = 0
    total: float = 0.0
    total_squares: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, image: np.ndarray, label_map: np.ndarray, axis: int) -> None:
        self.cases += 1
        self.sizes.add(tuple(label_map.shape))
        planes = np.moveaxis(label_map, axis, 0) if label_map.ndim == 3 else label_map[None]
        self.slices += len(planes)
        self.foreground_slices += int(np.count_nonzero(planes.reshape(len(planes), -1).any(axis=1)))
        values = image.astype(np.float64)
        self.count += values.size
        self.total += values.sum()
        self.total_squares += np.square(values).sum()
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    def row(self) -> str:
        if not self.cases:
            return f"{self.site:<12} {'(no readable case)':>8}"
        mean = self.total / self.count
        std = max(self.total_squares / self.count - mean**2, 0.0) ** 0.5
        sizes = ", ".join("x".join(map(str, size)) for size in sorted(self.sizes)[:3])
        if len(self.sizes) > 3:
            sizes += f" (+{len(self.sizes) - 3})"
        return (
            f"{self.site:<12} {self.cases:>5} {self.slices:>6} {self.foreground_slices / self.slices:>10.0%} "
            f"{mean:>10.1f} {std:>9.1f} {self.low:>9.1f} {self.high:>9.1f}  {sizes}"
        )


HEADER = f"{'site':<12} {'cases':>5} {'slices':>6} {'foreground':>10} {'mean':>10} {'std':>9} {'min':>9} {'max':>9}  sizes"


def check_root(root: str | Path, axis: int = 2) -> tuple[list[SiteSummary], list[str]]:
    """Per-site summaries and every problem found (each message names its file or site)."""
    root = Path(root)
    problems: list[str] = []
    try:
        labels = Labels.of_root(root)
        sites = list_sites(root)
    except DataError as error:
        return [], [str(error)]
    summaries = []
    for site in sites:
        summary = SiteSummary(site)
        summaries.append(summary)
        try:
            cases = find_cases(root, site)
        except DataError as error:
            problems.append(str(error))
            continue
        for case in cases:
            try:
                data = read_case(case, labels)
            except DataError as error:
                problems.append(str(error))
                continue
            summary.add(data.image, data.label_map, axis)
    return summaries, problems


def report(root: str | Path, axis: int = 2) -> tuple[str, bool]:
    """The printable summary and whether the root is fit for training."""
    summaries, problems = check_root(root, axis)
    lines = [f"data root {root}"]
    if summaries:
        lines += [HEADER, *(summary.row() for summary in summaries)]
        lines.append("foreground: share of 2D slices with any label; mean/std/min/max: raw image intensities")
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  - {problem}" for problem in problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines), not problems
