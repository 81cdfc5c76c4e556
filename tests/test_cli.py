import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from lycolab.cli import parse_overrides


def _run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lycolab", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    completed = _run("demo", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


def test_demo_writes_configs_epochs_samples_and_loss_plot(demo_dir):
    assert (demo_dir / "config" / "config_file.toml").is_file()
    assert (demo_dir / "config" / "dataset_config.toml").is_file()
    epoch_files = sorted((demo_dir / "output").glob("demo_loha-0000*.safetensors"))
    assert len(epoch_files) >= 2
    for path in epoch_files + [demo_dir / "output" / "demo_loha.safetensors"]:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
            assert any(key.endswith(".hada_w1_a") for key in handle.keys())
        assert metadata["ss_network_module"] == "lycoris.kohya"
        assert json.loads(metadata["ss_tag_frequency"])["5_shapes square"]["sks"] == 6
        assert str(demo_dir) not in json.dumps(metadata), "no absolute user paths in metadata"
    samples = list((demo_dir / "output" / "sample").glob("*.png"))
    assert len(samples) >= 2
    assert (demo_dir / "logs" / "loss.png").stat().st_size > 1000
    assert (demo_dir / "models" / "tiny-sd" / "model_index.json").is_file()


def test_demo_dataset_has_two_buckets(demo_dir):
    from lycolab.config import load_config
    from lycolab.data import BucketedDataset

    config = load_config(demo_dir / "config" / "config_file.toml")
    dataset = BucketedDataset(config.datasets, config.train_batch_size)
    assert len({resolution for _, resolution in dataset.bucket_counts()}) == 2


def test_train_command_reads_the_toml_files_and_applies_overrides(demo_dir, tmp_path):
    completed = _run("train", "--config_file", str(demo_dir / "config" / "config_file.toml"),
                     "--max_train_epochs", "1", "--output_dir", str(tmp_path), "--output_name", "again",
                     "--network_args", "algo=lora", "--network_module", "lycoris.kohya", "--sample_prompts=")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "number of images (including repeats): 60" in completed.stdout
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as handle:
        assert any(key.endswith(".lora_down.weight") for key in handle.keys())
        assert handle.metadata()["ss_num_epochs"] == "1"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config_file", "nowhere.toml"], "nowhere.toml: config file not found"),
        (["--network_dim", "0"], "network_dim must be at least 1"),
        (["--pretrained_model_name_or_path", "missing-model-dir"], "missing-model-dir"),
    ],
)
def test_train_errors_are_one_line_without_traceback(demo_dir, args, expected):
    if args[0] != "--config_file":
        args = ["--config_file", str(demo_dir / "config" / "config_file.toml"), *args]
    completed = _run("train", *args)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0]


def test_override_values_are_typed_like_toml():
    assert parse_overrides(["--learning_rate", "1e-4", "--v2", "--network_args", "algo=loha", "conv_dim=4",
                            "--output_name", "my lora", "--seed=42"]) == {
        "learning_rate": 1e-4, "v2": True, "network_args": ["algo=loha", "conv_dim=4"], "output_name": "my lora",
        "seed": 42}
