"""The committed job folders are exactly what the recipe exports."""

from pathlib import Path

from pfedsam_nvflare.flare.jobs import DP_JOB, DPSGD_JOB, JOB_METHODS, export_jobs

COMMITTED = Path(__file__).parent.parent / "jobs"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_job_folders_equal_the_recipe_export(tmp_path):
    export_jobs(tmp_path)
    assert sorted(p.name for p in COMMITTED.iterdir()) == sorted([*JOB_METHODS, DP_JOB, DPSGD_JOB])
    exported, committed = _files(tmp_path), _files(COMMITTED)
    assert sorted(exported) == sorted(committed)
    for name in exported:
        assert exported[name] == committed[name], f"jobs/{name} differs from the recipe; run: pfedsam export-jobs"
    assert not any("custom" in name for name in committed)  # the jobs carry no code: sites import the package
