import pytest

from deepshrink.core.io import atomic_path, atomic_write_bytes


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second!")
    assert target.read_bytes() == b"second!"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temp_name_keeps_the_target_suffix(tmp_path):
    with atomic_path(tmp_path / "model.pt2") as tmp:
        assert tmp.name.endswith("model.pt2")
        tmp.write_bytes(b"x")
