import json
import logging
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from safetensors import safe_open

import lycolab
from lycolab import cli
from lycolab.cli import build_parser, main, parse_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lycolab", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    completed = _run("demo", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    (out / "demo_stdout.txt").write_text(completed.stdout, encoding="utf-8")
    return out


def test_demo_prints_the_concept_score_with_and_without_the_adapter(demo_dir):
    printed = (demo_dir / "demo_stdout.txt").read_text(encoding="utf-8")
    assert re.search(r"concept 'zkz' \(yellow circle on a purple background\), share of samples that show it: "
                     r"base model \d+%, with the adapter \d+%", printed), printed


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
        assert json.loads(metadata["ss_tag_frequency"])["5_zkz"]["zkz"] == 12
        assert str(demo_dir) not in json.dumps(metadata), "no absolute user paths in metadata"
    samples = list((demo_dir / "output" / "sample").glob("*.png"))
    assert len(samples) >= 2
    assert (demo_dir / "logs" / "loss.png").stat().st_size > 1000
    assert (demo_dir / "models" / "tiny-sd" / "model_index.json").is_file()
    assert (demo_dir / "output" / "compare.png").stat().st_size > 1000


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
    assert "number of images (including repeats): 80" in completed.stderr  # the log goes to stderr
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
    assert completed.returncode == 1  # a failed run; 2 is kept for a wrong command line
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0]


def test_override_values_are_typed_like_toml():
    assert parse_overrides(["--learning_rate", "1e-4", "--v2", "--network_args", "algo=loha", "conv_dim=4",
                            "--output_name", "my lora", "--seed=42"]) == {
        "learning_rate": 1e-4, "v2": True, "network_args": ["algo=loha", "conv_dim=4"], "output_name": "my lora",
        "seed": 42}


def test_override_values_that_toml_reads_as_dates_stay_text():
    assert parse_overrides(["--output_name", "2024-01-01", "--sample_prompts", "07:30:00"]) == {
        "output_name": "2024-01-01", "sample_prompts": "07:30:00"}


@pytest.mark.parametrize("argv", [
    [], ["nonsense"], ["download", "--bogus"], ["train"], ["train", "--config_file", "c.toml", "stray"],
    ["train", "--config_file", "c.toml", "--=3"], ["check-dataset"], ["merge", "--model", "m", "--out", "o"],
    ["generate", "--model", "m", "--out", "o"], ["tag", "folder", "--append", "--overwrite"], ["-v", "-q", "demo"],
])
def test_a_wrong_command_line_exits_2_with_one_error_line(argv, capsys):
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in errors[0]


def test_a_failed_run_exits_1_with_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    runs = [["train", "--config_file", str(tmp_path / "nowhere.toml")],  # ConfigError
            ["generate", "--model", "m", "--prompt_file", str(tmp_path / "none.txt"), "--out", "o.png"],
            ["download", "nonsense"],  # DownloadError
            ["check-dataset", str(tmp_path / "empty")]]  # nothing usable
    for argv in runs:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, argv
    main(["train", "--config_file", str(tmp_path / "nowhere.toml")])
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere.toml'}: config file not found; check the path " \
        "(run the configure step first)\n"


def test_a_bug_keeps_its_traceback_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_run_download", lambda args: {}["no such key"])
    assert main(["download", "--list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'no such key'" in err and "a bug" in err.splitlines()[-1]


def test_version_comes_from_the_installed_package_and_matches_pyproject(capsys):
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert version("lycolab") == lycolab.__version__ == pyproject["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lycolab {lycolab.__version__}\n"
    completed = _run("--version")
    assert completed.returncode == 0 and completed.stdout == f"lycolab {lycolab.__version__}\n"


@pytest.mark.parametrize(("argv", "level"), [
    (["download", "x"], logging.INFO), (["-v", "download", "x"], logging.DEBUG),
    (["--quiet", "download", "x"], logging.WARNING), (["download", "x", "-q"], logging.WARNING),
    (["download", "--verbose", "x"], logging.DEBUG), (["-v", "download", "x", "-q"], logging.WARNING),
])
def test_verbose_and_quiet_set_lycolabs_log_level_before_or_after_the_command(argv, level, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_run_download", lambda args: seen.append(
        logging.getLogger("lycolab.models.download").getEffectiveLevel()) or 0)
    before = logging.getLogger("lycolab").level
    assert main(argv) == 0
    assert seen == [level] and logging.getLogger("lycolab").level == before  # restored for whoever called main


def test_verbose_shows_the_traceback_behind_a_one_line_error(tmp_path, capsys):
    assert main(["-v", "train", "--config_file", str(tmp_path / "nowhere.toml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and err.splitlines()[-1].startswith("error: ")


def test_options_after_the_training_command_are_overrides_except_verbosity():
    args, extra = build_parser().parse_known_args(["train", "--config_file", "c.toml", "-q", "--v2", "--seed", "1"])
    assert args.verbosity == -1 and parse_overrides(extra) == {"v2": True, "seed": 1}
    args, extra = build_parser().parse_known_args(["train", "--config_file", "c.toml", "--dataset", "d"])
    assert args.dataset_config is None and extra == ["--dataset", "d"]  # a typo is not taken for --dataset_config
