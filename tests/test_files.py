import pytest

from lycolab.files import atomic_write


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_text("good")

    def broken(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_successful_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "config.toml"
    atomic_write(target, lambda temporary: temporary.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["config.toml"]
