"""Atomic writes, one-line write errors and file modes (lycolab/files.py), and the modes of everything a run writes."""

from __future__ import annotations

import errno
import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import make_shapes_dataset
from safetensors import SafetensorError
from safetensors.torch import save_file

from lycolab import files
from lycolab.files import WriteError, as_write_error, atomic_directory, atomic_write, current_umask, save_safetensors


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


def test_a_write_that_fails_for_another_reason_keeps_its_own_error(tmp_path):
    with pytest.raises(ValueError, match="expected torch.Tensor"):
        save_safetensors(tmp_path / "a.safetensors", {"w": "not a tensor"})
    with pytest.raises(KeyError):
        atomic_directory(tmp_path / "d", lambda folder: {}["missing"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("error", "reason", "fix"), [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full", "free space on that disk"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "the disk is full", "free space on that disk"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied", "choose a folder you can write to"),
    (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only", "choose a folder you can write to"),
    (OSError(errno.ENOTCONN, "Transport endpoint is not connected"), "transport endpoint is not connected",
     "check the folder"),
])
def test_an_operating_system_failure_becomes_one_line_naming_the_file_and_the_fix(tmp_path, error, reason, fix):
    target = tmp_path / "out" / "x.safetensors"
    failure = as_write_error(error, target, previous_kept=True)
    assert isinstance(failure, OSError) and isinstance(failure, ValueError)  # the CLI prints ValueErrors as one line
    message = str(failure)
    assert message.startswith(f"{target}: could not be written, {reason}") and fix in message, message
    assert "\n" not in message and message.endswith("(the previous version is unchanged)")
    assert as_write_error(ValueError("a bug"), target) is None


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_umask_modes(root: Path, umask: int) -> list[Path]:
    """Every file and folder under ``root`` has the mode the umask gives; returns the files checked."""
    wrong = [(str(path.relative_to(root)), oct(mode(path))) for path in root.rglob("*")
             if mode(path) != (0o777 if path.is_dir() else 0o666) & ~umask]
    assert not wrong, f"umask {umask:o}: {wrong[:5]}"
    return [path for path in root.rglob("*") if path.is_file()]


def test_the_umask_is_read_without_changing_it(umask, tmp_path, monkeypatch):
    assert current_umask() == umask and os.umask(umask) == umask

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(files, "open", no_proc, raising=False)  # not Linux: the probe file answers
    assert current_umask(tmp_path) == umask and list(tmp_path.iterdir()) == []


def test_files_and_folders_get_the_umasks_mode_even_from_safetensors(umask, tmp_path):
    # safetensors 0.8 creates its files 0600 through its own temporary file; a plain rename would keep that
    atomic_write(tmp_path / "direct.safetensors", lambda temporary: save_file({"w": torch.ones(2)}, str(temporary)))
    save_safetensors(tmp_path / "nested" / "adapter.safetensors", {"w": torch.ones(2)})
    atomic_write(tmp_path / "config.toml", lambda temporary: temporary.write_text("a = 1"))

    def folder_with_files(folder: Path) -> None:
        (folder / "unet").mkdir()
        save_file({"w": torch.ones(2)}, str(folder / "unet" / "model.safetensors"))
        (folder / "model_index.json").write_text("{}")

    atomic_directory(tmp_path / "state", folder_with_files)
    checked = assert_umask_modes(tmp_path, umask)
    assert len(checked) == 5


def test_exported_models_get_the_umasks_mode(umask, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from lycolab.models.export import export_single_file, save_diffusers_folder

    out = tmp_path / "exports"
    export_single_file(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, out / "merged.safetensors")
    pipeline = StableDiffusionPipeline(vae=tiny_sd.vae, text_encoder=tiny_sd.text_encoder, tokenizer=tiny_sd.tokenizer,
                                       unet=tiny_sd.unet, scheduler=tiny_sd.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    save_diffusers_folder(pipeline, out / "merged_model")
    checked = assert_umask_modes(out, umask)
    assert sum(path.suffix == ".safetensors" for path in checked) >= 4  # the file, U-Net, VAE, text encoder


def test_a_folder_that_is_not_a_diffusers_model_is_not_replaced_by_an_export(tiny_sd, tmp_path):
    from lycolab.models.export import save_diffusers_folder

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15.safetensors").write_bytes(b"precious")
    with pytest.raises(WriteError, match="not a diffusers model folder; choose a new folder"):
        save_diffusers_folder(object(), tmp_path / "models")
    assert (tmp_path / "models" / "sd15.safetensors").read_bytes() == b"precious"


def test_everything_a_training_run_writes_gets_the_umasks_mode(umask, tiny_model_dir, tmp_path):
    from lycolab.config import load_config, write_config_file
    from lycolab.training import train

    work = tmp_path / "work"
    data = make_shapes_dataset(work / "train")
    (work / "prompts.txt").write_text("a red circle --w 64 --h 64 --s 2 --d 1\n")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "network_module": "networks.lora", "network_dim": 4, "network_alpha": 2,
        "max_train_steps": 2, "train_batch_size": 2, "seed": 1, "output_dir": str(work / "output"),
        "output_name": "run", "save_state": True, "save_every_n_steps": 1, "cache_latents_to_disk": True,
        "sample_prompts": str(work / "prompts.txt"), "sample_every_n_steps": 1, "logging_dir": str(work / "logs"),
    })
    write_config_file(config, work / "config" / "config_file.toml")
    result = train(config, progress=False)
    assert result.saved_files and result.state_dirs and result.sample_files and result.loss_plot
    written = assert_umask_modes(work, umask)
    names = {path.name for path in written}
    assert {"run.safetensors", "run-step00000001.safetensors", "state.safetensors", "state.json", "loss.csv",
            "loss.png", "0.png.latents.safetensors", "config_file.toml", result.sample_files[0].name,
            result.grid_files[0].name} <= names
    if importlib.util.find_spec("tensorboard"):
        assert any(name.startswith("events.out.tfevents") for name in names)
