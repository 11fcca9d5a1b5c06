import pytest

from pfedsam_nvflare.atomic import atomic_copy


def test_a_copy_replaces_the_target_whole(tmp_path):
    (tmp_path / "source").write_bytes(b"new" * 1000)
    (tmp_path / "target").write_bytes(b"old")
    atomic_copy(tmp_path / "source", tmp_path / "target")
    assert (tmp_path / "target").read_bytes() == b"new" * 1000


def test_a_copy_that_fails_leaves_the_target_as_it_was_and_no_temporary_file(tmp_path):
    (tmp_path / "target").write_bytes(b"old")
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing", tmp_path / "target")
    assert (tmp_path / "target").read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["target"]
