"""``benchmarks/seeds.py``: mean ± spread over the seeds of a comparison (a unit: comparison records written here)."""

import importlib.util
import statistics

import pytest

from deployment import REPO

spec = importlib.util.spec_from_file_location("seeds", REPO / "benchmarks" / "seeds.py")
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def _run(dice: dict[str, tuple[float, float]], global_dice: float, status: str = "completed") -> dict:
    """A run whose sites score ``dice[site] = (outer, inner)`` with the kept model."""
    sites = {
        site: {"test": {"personalized": {"dice": {"outer": outer, "inner": inner, "mean": (outer + inner) / 2}}}}
        for site, (outer, inner) in dice.items()
    }
    mean = statistics.mean(site["test"]["personalized"]["dice"]["mean"] for site in sites.values())
    return {"status": status, "sites": sites, "mean": {"personalized_dice": mean, "global_dice": global_dice}}


def test_mean_and_spread_over_seeds_per_method_label_and_site():
    result = {"methods": {
        "pfedsam[seed=0]": _run({"a": (0.9, 0.5), "b": (0.8, 0.6)}, 0.6),
        "pfedsam[seed=1]": _run({"a": (1.0, 0.7), "b": (0.6, 0.4)}, 0.8),
        "pfedsam[seed=2]": _run({"a": (0.0, 0.0), "b": (0.0, 0.0)}, 0.0, status="failed"),  # not counted
        "fedavg[seed=0]": _run({"a": (0.7, 0.7), "b": (0.5, 0.5)}, 0.6),
    }}
    runs, incomplete = seeds.by_method(result)
    assert incomplete == ["pfedsam[seed=2]: failed"]
    assert {method: sorted(by_seed) for method, by_seed in runs.items()} == {"pfedsam": [0, 1], "fedavg": [0]}
    lines = seeds.table(runs, ["outer", "inner"]).splitlines()
    assert lines[0].split(" | ")[2:5] == ["kept: mean over sites", "kept `outer`", "kept `inner`"]
    pfedsam = lines[2].strip("| ").split(" | ")
    kept = [0.7, 0.675]  # each seed's mean over sites
    assert pfedsam[:3] == ["pfedsam", "0, 1", f"{statistics.mean(kept):.3f} ± {statistics.stdev(kept):.3f} (0.675–0.700)"]
    assert pfedsam[3] == f"0.825 ± {statistics.stdev([0.85, 0.8]):.3f} (0.800–0.850)"  # outer
    assert pfedsam[4] == f"0.550 ± {statistics.stdev([0.55, 0.55]):.3f} (0.550–0.550)"  # inner
    assert pfedsam[5] == f"0.700 ± {statistics.stdev([0.6, 0.8]):.3f} (0.600–0.800)"  # global alone
    assert pfedsam[6:] == ["0.775", "0.600"]  # site a: seeds 0.7 and 0.85; site b: 0.7 and 0.5
    assert lines[3].strip("| ").split(" | ")[2] == "0.600 (one seed)"


def test_a_comparison_that_does_not_ablate_the_seed_is_refused():
    with pytest.raises(ValueError, match="'fedavg' is not '<method>\\[seed=N\\]'"):
        seeds.by_method({"methods": {"fedavg": _run({"a": (1.0, 1.0)}, 1.0)}})
