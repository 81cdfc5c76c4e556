"""save_state / resume: a killed run continues to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_shapes_dataset as make_dataset
from safetensors.torch import load_file

from lycolab.config import TrainConfig, load_config, write_config_file
from lycolab.files import atomic_directory
from lycolab.training import TrainingError, train
from lycolab.training.state import find_latest_state, load_state


def resume_config(model: Path, data: Path, out: Path, **extra) -> TrainConfig:
    """12 steps over 3 epochs with everything random switched on: dropouts, caption shuffling, noise offset."""
    return load_config(overrides={
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "shuffle_caption": True, "network_module": "lycoris.kohya",
        "network_args": ["algo=locon", "conv_dim=4", "conv_alpha=2", "rank_dropout=0.1", "module_dropout=0.1"],
        "network_dim": 4, "network_alpha": 2, "network_dropout": 0.1, "learning_rate": 1e-3,
        "optimizer_type": "AdamW", "lr_scheduler": "cosine", "lr_warmup_steps": 2, "noise_offset": 0.05,
        "max_train_epochs": 3, "train_batch_size": 2, "seed": 7, "output_dir": str(out), "output_name": "run",
        "save_precision": "float", "save_state": True, "save_every_n_steps": 1, **extra,
    })


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_resuming_from_any_saved_state_ends_with_the_uninterrupted_weights(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    reference = train(resume_config(tiny_model_dir, data, tmp_path / "full"), progress=False)
    assert reference.total_steps == 12 and len(reference.state_dirs) == 12  # 11 step states + the final one
    for step in (3, 4, 9):  # mid-epoch, at an epoch boundary, late
        out = tmp_path / f"from{step}"
        out.mkdir()
        state = tmp_path / "full" / f"run-step{step:08d}-state"
        resumed = train(resume_config(tiny_model_dir, data, out, resume=str(state)), progress=False)
        assert resumed.resumed_from == state and resumed.total_steps == 12
        assert_same_weights(reference.saved_files[-1], resumed.saved_files[-1])
        assert resumed.history.steps == list(range(1, 13))
        assert resumed.history.losses == pytest.approx(reference.history.losses, rel=0, abs=0)


def test_resuming_with_cached_latents_and_accumulation_ends_with_the_same_weights(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    extra = {"cache_latents": True, "gradient_accumulation_steps": 2, "max_train_epochs": 4}
    reference = train(resume_config(tiny_model_dir, data, tmp_path / "full", **extra), progress=False)
    assert reference.total_steps == 8
    state = tmp_path / "full" / "run-step00000003-state"
    resumed = train(resume_config(tiny_model_dir, data, tmp_path / "resumed", resume=str(state), **extra),
                    progress=False)
    assert_same_weights(reference.saved_files[-1], resumed.saved_files[-1])


def _launch(config_file: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lycolab", "train", "--config_file", str(config_file), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _states(out: Path) -> list[Path]:
    return sorted(path for path in out.glob("run-*state") if path.is_dir())


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    full, killed = tmp_path / "full", tmp_path / "killed"
    full_file = write_config_file(resume_config(tiny_model_dir, data, full), tmp_path / "full.toml")
    killed_file = write_config_file(resume_config(tiny_model_dir, data, killed), tmp_path / "killed.toml")
    reference = _launch(full_file)
    victim = _launch(killed_file)
    deadline = time.time() + 300
    while len(_states(killed)) < 5 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # kill somewhere inside the next steps: mid-step, mid-save or mid-state
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read().decode()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-2000:]

    # Nothing half-written is visible: every adapter file reads, every state folder loads.
    assert not (killed / "run.safetensors").exists()
    for path in killed.glob("run*.safetensors"):
        assert weights(path)
    for folder in _states(killed):
        assert load_state(folder).step >= 1
    latest = find_latest_state(killed, "run")
    assert latest is not None

    resumed = _launch(killed_file, "--resume", "latest")
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output[-2000:]
    assert f"resuming from {latest}" in output
    assert_same_weights(full / "run.safetensors", killed / "run.safetensors")
    log = [json.loads(line) for line in (killed / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 13))


def test_resume_latest_without_a_state_starts_fresh_and_a_wrong_folder_is_one_line(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    config = resume_config(tiny_model_dir, data, tmp_path / "o", resume="latest", save_state=False,
                           save_every_n_steps=None, max_train_epochs=1)
    result = train(config, progress=False)
    assert result.resumed_from is None and result.total_steps == 4
    bad = tmp_path / "o" / "not-a-state"
    bad.mkdir()
    (bad / "optimizer.bin").write_bytes(b"pickle")
    with pytest.raises(TrainingError, match="pickles, which lycolab does not load"):
        train(resume_config(tiny_model_dir, data, tmp_path / "o", resume=str(bad)), progress=False)
    with pytest.raises(TrainingError, match="resume folder not found"):
        train(resume_config(tiny_model_dir, data, tmp_path / "o", resume=str(tmp_path / "missing")), progress=False)


def test_resuming_with_another_network_says_so(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    first = train(resume_config(tiny_model_dir, data, tmp_path / "a", max_train_epochs=1), progress=False)
    other = resume_config(tiny_model_dir, data, tmp_path / "b", network_dim=8, resume=str(first.state_dirs[-1]))
    with pytest.raises(TrainingError, match="does not fit this network"):
        train(other, progress=False)


def test_an_interrupted_state_write_leaves_the_previous_state(tmp_path):
    folder = tmp_path / "run-state"
    atomic_directory(folder, lambda temporary: (temporary / "state.json").write_text("old"))

    def crash(temporary: Path) -> None:
        (temporary / "state.json").write_text("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(folder, crash)
    assert (folder / "state.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run-state"]
