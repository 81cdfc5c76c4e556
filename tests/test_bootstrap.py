"""The notebooks' install cell (lycolab/bootstrap.py): what a lycolab_source means, when nothing is installed, and
that torch is pinned to the installed build. The real install into a fresh venv is tests/test_notebooks.py's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lycolab import bootstrap

ROOT = Path(__file__).resolve().parent.parent
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"


@pytest.mark.parametrize(("source", "kind", "pip_gets"), [
    ("", "release", "git+https://github.com/lycolab/lycolab@v0.1.0"),
    ("0.2.1", "release", "git+https://github.com/lycolab/lycolab@v0.2.1"),
    ("v1.0rc1", "release", "git+https://github.com/lycolab/lycolab@v1.0rc1"),
    ("main", "git", "git+https://github.com/lycolab/lycolab@main"),
    ("git+https://github.com/me/fork@fix", "git", "git+https://github.com/me/fork@fix"),
    ("https://example.org/lycolab-0.1.0-py3-none-any.whl", "wheel",
     "https://example.org/lycolab-0.1.0-py3-none-any.whl"),
])
def test_a_source_names_a_release_a_branch_or_a_wheel(source, kind, pip_gets):
    assert bootstrap.wanted(source)[:2] == (kind, pip_gets)


def test_a_folder_or_wheel_on_disk_is_installed_from_its_path(tmp_path):
    assert bootstrap.wanted(str(ROOT)) == ("folder", ROOT.as_uri(), ROOT.as_uri())
    wheel = tmp_path / "lycolab-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert bootstrap.wanted(str(wheel))[0] == "wheel"
    with pytest.raises(bootstrap.InstallError, match="not a lycolab source folder"):
        bootstrap.wanted(str(tmp_path))


def test_nothing_is_installed_when_the_wanted_lycolab_is_in_place():
    assert bootstrap.in_place("release", "0.1.0", ("0.1.0", None, None))
    assert not bootstrap.in_place("release", "0.2.0", ("0.1.0", None, None))
    assert not bootstrap.in_place("release", "0.1.0", None)
    main = "git+https://github.com/lycolab/lycolab@main"
    assert bootstrap.in_place("git", main, ("0.1.0", main, "main"))
    assert not bootstrap.in_place("git", main, ("0.1.0", "git+https://github.com/lycolab/lycolab@dev", "dev"))
    assert bootstrap.in_place("folder", ROOT.as_uri(), ("0.1.0", ROOT.as_uri(), None))
    assert not bootstrap.in_place("folder", ROOT.as_uri(), ("0.1.0", None, None))


def test_the_installed_version_in_this_environment_needs_no_install(capsys):
    bootstrap.ensure("0.1.0")  # the test environment has lycolab 0.1.0: no pip, no output
    assert capsys.readouterr().out == ""


def test_the_install_pins_the_installed_torch_and_takes_the_sources_constraints(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)  # no NVIDIA GPU
    command = bootstrap.install_command("folder", ROOT.as_uri(), tmp_path)
    pins = Path(command[command.index("-c") + 1]).read_text().split()
    assert f"torch=={torch.__version__}" in pins and all(not pin.startswith("lycolab") for pin in pins)
    assert str(ROOT / "requirements-colab.txt") in command
    assert command[-1] == f"lycolab[notebook,tensorboard] @ {ROOT.as_uri()}"
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    git = bootstrap.install_command("release", "git+https://github.com/lycolab/lycolab@v0.1.0", tmp_path)
    assert "https://raw.githubusercontent.com/lycolab/lycolab/v0.1.0/requirements-colab.txt" in git
    assert git[-1].startswith("lycolab[notebook,tensorboard,gpu] @ git+")


def test_a_source_on_drive_mounts_drive_first_in_a_new_colab_runtime(tmp_path, monkeypatch):
    drive = tmp_path / "content" / "drive"
    store = tmp_path / "unmounted"
    (store / "lycolab-src").mkdir(parents=True)
    (store / "lycolab-src" / "pyproject.toml").write_text("[project]\nname = 'lycolab'\n")
    monkeypatch.setattr(bootstrap, "DRIVE_MOUNT", drive)
    monkeypatch.setenv("FAKE_COLAB_DRIVE_STORE", str(store))
    monkeypatch.syspath_prepend(str(FAKE_COLAB))
    before = {name: module for name, module in sys.modules.items() if name == "google" or name.startswith("google.")}
    for name in before:
        del sys.modules[name]
    try:
        source = drive / "MyDrive" / "lycolab-src"
        assert bootstrap.wanted(str(source))[0] == "folder"
        assert (source / "pyproject.toml").is_file()
    finally:  # the fake google.colab must not outlive this test: lycolab.colab.in_colab() would see it
        for name in [name for name in sys.modules if name == "google" or name.startswith("google.")]:
            del sys.modules[name]
        sys.modules.update(before)


def test_a_failed_pip_gives_one_line_and_shows_pips_last_lines(capsys):
    with pytest.raises(bootstrap.InstallError) as caught:
        bootstrap._run([sys.executable, "-c", "print('Collecting x'); print('ERROR: No matching distribution found "
                        "for lycolab==9.9'); raise SystemExit(1)"])
    assert str(caught.value) == "pip could not install lycolab: ERROR: No matching distribution found for " \
                                "lycolab==9.9 (the lines above say more)"
    assert caught.value._render_traceback_() == [f"\033[31merror:\033[0m {caught.value}"]
    assert "Collecting x" in capsys.readouterr().out


def test_installed_reads_pips_record_of_where_lycolab_came_from(monkeypatch):
    class Distribution:
        version = "0.1.0"

        def read_text(self, name):
            return json.dumps({"url": "https://github.com/lycolab/lycolab",
                               "vcs_info": {"vcs": "git", "requested_revision": "main", "commit_id": "a" * 40}})

    monkeypatch.setattr(bootstrap.importlib.metadata, "distribution", lambda name: Distribution())
    assert bootstrap.installed() == ("0.1.0", "git+https://github.com/lycolab/lycolab@main", "main")


def test_a_package_updated_while_loaded_asks_for_a_restart(monkeypatch, tmp_path, capsys):
    versions = iter([{"numpy": "1.26.4", "pillow": "10.0.0"}])
    monkeypatch.setattr(bootstrap, "loaded_versions", lambda: next(versions))
    monkeypatch.setattr(bootstrap, "_version_now", {"numpy": "2.1.0", "pillow": "10.0.0"}.get)
    monkeypatch.setattr(bootstrap, "installed", iter([None, ("0.1.0", None, None)]).__next__)
    monkeypatch.setattr(bootstrap, "_run", lambda command, hint="": None)
    monkeypatch.delitem(sys.modules, "lycolab", raising=False)
    with pytest.raises(bootstrap.InstallError, match="pip updated numpy, already loaded in this runtime: restart"):
        bootstrap.ensure("0.1.0")
    assert "lycolab 0.1.0 installed" in capsys.readouterr().out


def test_loaded_versions_name_the_distributions_of_imported_modules():
    import numpy  # noqa: F401

    assert "numpy" in bootstrap.loaded_versions()
