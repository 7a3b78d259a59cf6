from pathlib import Path

import pytest

from deepshrink.core.io import atomic_path, atomic_write_bytes


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second!")
    assert target.read_bytes() == b"second!"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_a_reader_never_sees_a_mixed_file(tmp_path):
    """The new bytes arrive as a new file swapped in: a reader that opened the old one keeps
    reading it whole (writing in place would truncate it under the reader)."""
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"first version")
    with open(target, "rb") as reader:
        before = target.stat().st_ino
        atomic_write_bytes(target, b"second")
        assert reader.read() == b"first version"
    assert target.stat().st_ino != before and target.read_bytes() == b"second"


def test_a_crash_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old contents")

    def half_then_crash(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new contents, longer")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


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
