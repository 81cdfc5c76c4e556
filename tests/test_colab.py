"""The notebooks' workspace: created locally outside Colab, same layout every time, safe project names."""

import pytest

from lycolab.colab import SUBFOLDERS, in_colab, open_workspace, project_name


def test_workspace_is_local_outside_colab_and_has_every_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not in_colab()
    workspace = open_workspace("My LoRA #1")
    assert workspace.root == tmp_path / "workspace" / "My_LoRA_1"
    assert all((workspace.root / folder).is_dir() for folder in SUBFOLDERS)
    assert workspace.config_file == workspace.root / "config" / "config_file.toml"
    assert workspace.samples == workspace.root / "output" / "sample"
    (workspace.train_data / "keep.txt").write_text("x", encoding="utf-8")
    again = open_workspace("My LoRA #1")  # re-opening after a restart keeps what is there
    assert (again.train_data / "keep.txt").read_text(encoding="utf-8") == "x"


def test_project_names_cannot_escape_the_workspace(tmp_path):
    assert project_name("../../etc") == "etc"
    assert open_workspace("../up", root=tmp_path).root == tmp_path / "up"
    with pytest.raises(ValueError, match="no usable characters"):
        project_name("///")
