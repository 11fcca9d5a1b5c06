"""Which of a site's cases train, which validate and which are kept for the final test: a split by case, never
by slice, deterministic by seed, and written next to the site's state so it can be audited."""

from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .layout import DataError

SPLITS = ("train", "val", "test")


def _count(fraction: float, cases: int) -> int:
    return 0 if fraction == 0 else max(1, round(fraction * cases))


@dataclass
class SiteSplit:
    """Training cases fit the model, validation cases select (best round, settings), test cases are evaluated
    once at the end and never choose anything. A fraction above 0 gives its set at least one case; 0 gives none."""

    site: str
    seed: int
    val_fraction: float
    test_fraction: float
    train_cases: list[str] = field(default_factory=list)
    val_cases: list[str] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, site: str, cases: list[str], val_fraction: float, test_fraction: float, seed: int) -> SiteSplit:
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{name} must be within [0, 1), got {fraction}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")
        names = sorted(cases)

        def training_cases(count: int) -> int:
            return count - _count(val_fraction, count) - _count(test_fraction, count)

        if training_cases(len(names)) < 1:
            needed = next(n for n in itertools.count(len(names) + 1) if training_cases(n) >= 1)  # ends: the sum is < 1
            raise DataError(
                f"site {site} has {len(names)} case(s); a split by case with val_fraction={val_fraction} and "
                f"test_fraction={test_fraction} needs at least {needed}, so that every set asked for "
                "(training, validation, test) has a case"
            )
        num_val, num_test = _count(val_fraction, len(names)), _count(test_fraction, len(names))
        order = [names[i] for i in np.random.default_rng([seed, zlib.crc32(site.encode())]).permutation(len(names))]
        test, val = sorted(order[:num_test]), sorted(order[num_test : num_test + num_val])
        train = [name for name in names if name not in set(test) | set(val)]
        return cls(site, seed, val_fraction, test_fraction, train, val, test)

    def cases(self, split: str) -> list[str]:
        if split == "all":
            return sorted(self.train_cases + self.val_cases + self.test_cases)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
        return list(getattr(self, f"{split}_cases"))

    def write(self, path: Path) -> None:
        atomic_write_text(json.dumps(asdict(self), indent=2) + "\n", path)

    @classmethod
    def read(cls, path: Path) -> SiteSplit:
        try:
            split = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise DataError(f"{path}: not a split file of this version ({error}); move it away to split again") from error
        for name in ("train_cases", "val_cases", "test_cases"):
            value = getattr(split, name)
            if not isinstance(value, list) or not all(isinstance(case, str) for case in value):
                raise DataError(f"{path}: {name} must be a list of case names, got {type(value).__name__} {value!r:.60}")
        named = split.train_cases + split.val_cases + split.test_cases
        if len(set(named)) != len(named):
            raise DataError(f"{path}: a case is named in more than one set")
        return split

    def differences(self, site: str, cases: list[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
        """What no longer matches: the site, the seed, the fractions or the cases."""
        changed = []
        for name, saved, now in (
            ("site", self.site, site),
            ("seed", self.seed, seed),
            ("val_fraction", self.val_fraction, val_fraction),
            ("test_fraction", self.test_fraction, test_fraction),
        ):
            if saved != now:
                changed.append(f"{name} was {saved!r}, is now {now!r}")
        saved_cases, now_cases = set(self.cases("all")), set(cases)
        if saved_cases != now_cases:
            added, removed = sorted(now_cases - saved_cases), sorted(saved_cases - now_cases)
            if added:
                changed.append(f"cases added: {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}")
            if removed:
                changed.append(f"cases removed: {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
        return changed


def site_split(
    site: str, cases: list[str], val_fraction: float, test_fraction: float, seed: int, split_file: Path | None
) -> SiteSplit:
    """The site's split: reused from ``split_file`` when it still matches the settings and the cases (so a
    restarted site keeps its split), refused with what changed when it does not, and written there when new."""
    if split_file is not None and split_file.exists():
        split = SiteSplit.read(split_file)
        changed = split.differences(site, cases, val_fraction, test_fraction, seed)
        if changed:
            raise DataError(
                f"{split_file}: the split no longer matches the site's data or settings ({'; '.join(changed)}). "
                "Move the file away to split again; results on the old and the new test cases cannot be compared"
            )
        return split
    split = SiteSplit.of(site, cases, val_fraction, test_fraction, seed)
    if split_file is not None:
        split.write(split_file)
    return split
