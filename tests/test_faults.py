"""Faults survived: a disk that fills up mid-write, a kill while the latent cache is written, a damaged state folder.

A full disk is simulated (a real small file system needs mount rights; the one test that has them is skipped
elsewhere): safetensors' ``save_file`` — wherever lycolab, diffusers or transformers imported it — writes the file,
cuts it to its first bytes like a writer stopped midway, then fails with ENOSPC, either as an OSError or as the
``SafetensorError("… (os error 28)")`` that safetensors 0.8 really raises.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_shapes_dataset
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lycolab.cli import main
from lycolab.config import load_config, write_config_file
from lycolab.data.dataset import BucketedDataset
from lycolab.files import WriteError, save_safetensors
from lycolab.training import TrainingError, train
from lycolab.training.latent_cache import LatentCache, cache_path
from lycolab.training.state import (
    CHECKSUM_KEY,
    INFO_FILE,
    TENSORS_FILE,
    TrainingState,
    find_latest_state,
    save_state,
    state_folders,
)

REAL_SAVE_FILE = safetensors.torch.save_file
ENOSPC_FORMS = {
    "oserror": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


class FullDisk:
    """``save_file`` call number ``fail_on`` (and every later one) writes only its first ``kept`` bytes, then fails."""

    def __init__(self, make_error):
        self.make_error = make_error
        self.real = REAL_SAVE_FILE
        self.calls = 0
        self.fail_on: int | None = None
        self.kept = 100

    def fail_from(self, call: int) -> None:
        self.calls, self.fail_on = 0, call

    def __call__(self, tensors, filename, metadata=None):
        self.calls += 1
        self.real(tensors, filename, metadata)
        if self.fail_on is not None and self.calls >= self.fail_on:
            with open(filename, "r+b") as handle:
                handle.truncate(min(self.kept, os.path.getsize(filename)))
            raise self.make_error()


@pytest.fixture(params=sorted(ENOSPC_FORMS))
def full_disk(request, monkeypatch) -> FullDisk:
    return install_full_disk(monkeypatch, request.param)


def install_full_disk(monkeypatch, form: str) -> FullDisk:
    """Replace the real save_file in every module that holds it (lycolab's, diffusers', transformers')."""
    fake = FullDisk(ENOSPC_FORMS[form])
    for module in list(sys.modules.values()):
        if module is sys.modules[__name__]:
            continue
        try:
            names = [name for name, value in vars(module).items() if value is REAL_SAVE_FILE]
        except TypeError:
            continue
        for name in names:
            monkeypatch.setattr(module, name, fake)
    return fake


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_one_line_about(error: BaseException, path: Path, *phrases: str) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    for phrase in phrases:
        assert phrase in message, message


# ----------------------------------------------------------------------------------------------- a full disk
def test_a_full_disk_while_saving_an_adapter_keeps_the_previous_file(tiny_sd, tmp_path, full_disk):
    from lycolab.networks import create_network

    network = create_network(tiny_sd.unet, [tiny_sd.text_encoder], algo="loha", dim=4, alpha=2)
    target = tmp_path / "out" / "x.safetensors"
    network.save_weights(target, metadata={"ss_output_name": "x"})
    before = snapshot(tmp_path / "out")
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    full_disk.fail_from(1)
    with pytest.raises(WriteError) as caught:
        network.save_weights(target, metadata={"ss_output_name": "x"})
    assert snapshot(tmp_path / "out") == before  # bit-identical, and no temporary file beside it
    assert caught.value.errno == errno.ENOSPC
    assert_one_line_about(caught.value, target, "disk is full", "free space", "previous version is unchanged")


def test_a_full_disk_while_saving_a_state_keeps_the_previous_state_folder(tmp_path, full_disk):
    folder = tmp_path / "run-step00000001-state"
    tensors = {"network/w": torch.arange(1000.0), "rng/torch": torch.get_rng_state()}
    save_state(folder, TrainingState(1, 1, 1, 7, {"optimizer_name": "AdamW"}, tensors))
    before = snapshot(tmp_path)
    full_disk.fail_from(1)
    with pytest.raises(WriteError) as caught:
        save_state(folder, TrainingState(2, 1, 2, 7, {"optimizer_name": "AdamW"}, {**tensors, "network/w": -tensors[
            "network/w"]}))
    assert snapshot(tmp_path) == before and sorted(path.name for path in tmp_path.iterdir()) == [folder.name]
    assert_one_line_about(caught.value, folder, "disk is full")


def test_a_full_disk_while_exporting_a_merged_model_keeps_the_previous_export(tiny_sd, tmp_path, full_disk):
    from diffusers import StableDiffusionPipeline

    from lycolab.models.export import export_single_file, save_diffusers_folder

    single = tmp_path / "merged.safetensors"
    export_single_file(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, single)
    pipeline = StableDiffusionPipeline(vae=tiny_sd.vae, text_encoder=tiny_sd.text_encoder, tokenizer=tiny_sd.tokenizer,
                                       unet=tiny_sd.unet, scheduler=tiny_sd.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path / "merged_model"
    save_diffusers_folder(pipeline, folder)
    before = snapshot(tmp_path)
    for export, target in ((lambda: export_single_file(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, single, None),
                            single), (lambda: save_diffusers_folder(pipeline, folder), folder)):
        full_disk.fail_from(1)
        with pytest.raises(WriteError) as caught:
            export()
        assert_one_line_about(caught.value, target, "disk is full")
        assert snapshot(tmp_path) == before


def test_a_full_disk_while_caching_latents_warns_once_and_keeps_them_in_memory(tiny_sd, tmp_path, full_disk, caplog):
    dataset = shapes_dataset(tmp_path / "train")
    full_disk.fail_from(1)
    before = snapshot(tmp_path / "train")
    with caplog.at_level(logging.WARNING):
        cache = LatentCache(dataset, tiny_sd.vae, 1, to_disk=True, seed=3)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk is full" in warnings[0] and "in memory only" in warnings[0], warnings
    assert snapshot(tmp_path / "train") == before and full_disk.calls == 1  # one try, then no more writes
    assert_same_latents(cache, LatentCache(dataset, tiny_sd.vae, 1, seed=3))


@pytest.mark.parametrize(("failing", "form"), [("adapter", "safetensors"), ("state", "oserror")])
def test_training_on_a_full_disk_stops_with_one_line_naming_the_file_and_the_last_good_save(
        tiny_model_dir, tmp_path, monkeypatch, capsys, failing, form):
    full_disk = install_full_disk(monkeypatch, form)
    data = make_shapes_dataset(tmp_path / "train")
    out = tmp_path / "out"
    config_file = write_config_file(small_run(tiny_model_dir, data, out), tmp_path / "config_file.toml")
    full_disk.fail_from(3 if failing == "adapter" else 4)  # save_file calls: 1, 2 = step 1's file and state
    assert main(["train", "--config_file", str(config_file)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    error = errors[0]
    failed = out / ("run-step00000002.safetensors" if failing == "adapter" else "run-step00000002-state")
    last_file = out / f"run-step0000000{1 if failing == 'adapter' else 2}.safetensors"
    assert_one_line_about(error, failed, "disk is full", "training stopped at step 2",
                          f"the last good save is {last_file}", f'resume = "{out / "run-step00000001-state"}"')
    written = sorted(path.name for path in out.iterdir() if path.suffix != ".csv" and path.suffix != ".jsonl")
    assert written == sorted({"run-step00000001.safetensors", "run-step00000001-state", last_file.name})
    assert load_file(str(last_file)) and not any(path.name.startswith(".") for path in out.rglob("*"))

    full_disk.fail_on = None  # space freed: resume = "latest" continues from the last complete state
    result = train(small_run(tiny_model_dir, data, out, resume="latest"), progress=False)
    assert result.resumed_from == out / "run-step00000001-state" and result.total_steps == 4


def test_a_real_full_file_system_gives_the_same_one_line_error_and_keeps_the_previous_file(tmp_path):
    """The simulation's ground truth, where a private tmpfs can be mounted (a user namespace); skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = textwrap.dedent(f"""
        import json, torch
        from lycolab.files import WriteError, save_safetensors
        target = {str(mount / "adapter.safetensors")!r}
        save_safetensors(target, {{"w": torch.ones(1000)}})
        try:
            save_safetensors(target, {{"w": torch.zeros(1_000_000)}})
        except WriteError as error:
            print(json.dumps({{"message": str(error), "errno": error.errno}}))
    """)
    command = f"mount -t tmpfs -o size=256k tmpfs {mount} && exec {sys.executable} -c \"$0\""
    try:
        completed = subprocess.run(["unshare", "-rm", "sh", "-c", command, script], capture_output=True, text=True,
                                   timeout=120)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if "mount" in completed.stderr and completed.returncode != 0 or "unshare" in completed.stderr:
        pytest.skip(f"no private tmpfs here: {completed.stderr.strip()[:200]}")
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["errno"] == errno.ENOSPC and "disk is full" in report["message"]
    assert "\n" not in report["message"] and "adapter.safetensors" in report["message"]


# ------------------------------------------------------------------------------- a kill while caching latents
KILLING_CACHE = """
import os, signal, sys
from pathlib import Path
import safetensors.torch
from diffusers import AutoencoderKL
from lycolab.config import load_config
from lycolab.data.dataset import BucketedDataset
from lycolab.training.latent_cache import LatentCache

model, data, how = sys.argv[1], sys.argv[2], sys.argv[3]
real, calls = safetensors.torch.save_file, []

def dying_save_file(tensors, filename, metadata=None):
    calls.append(filename)
    real(tensors, filename, metadata)
    if len(calls) == 3:
        os.truncate(filename, os.path.getsize(filename) // 2)  # the third entry half on disk, then the kill
        os.kill(os.getpid(), signal.SIGKILL)

if how != "external":
    safetensors.torch.save_file = dying_save_file
config = load_config(overrides={"train_data_dir": data, "resolution": "64", "output_dir": data + "/out"})
vae = AutoencoderKL.from_pretrained(Path(model) / "vae")
print("encoding", flush=True)
LatentCache(BucketedDataset(config.datasets, 1, seed=3), vae, 1, to_disk=True, seed=3)
"""


def shapes_dataset(root: Path, copies: int = 1) -> BucketedDataset:
    data = make_shapes_dataset(root)
    folder = data / "2_shapes"
    for copy in range(1, copies):
        for image in sorted(folder.glob("[0-9].png")):
            shutil.copy(image, folder / f"{copy}{image.name}")
    config = load_config(overrides={"train_data_dir": str(data), "resolution": "64", "output_dir": str(root / "o")})
    return BucketedDataset(config.datasets, 1, seed=3)


def assert_same_latents(first: LatentCache, second: LatentCache) -> None:
    assert first.latents.keys() == second.latents.keys()
    different = [index for index in first.latents if not torch.equal(first.get(index), second.get(index))]
    assert not different, f"latents of items {different} differ"


@pytest.mark.parametrize("how", ["mid-write", "external"])
def test_a_run_killed_while_writing_the_latent_cache_is_rebuilt_to_a_clean_runs_latents(tiny_model_dir, tmp_path,
                                                                                        how):
    from diffusers import AutoencoderKL

    dataset = shapes_dataset(tmp_path / "train", copies=3)  # 12 images
    folder = dataset.items[0].record.path.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    victim = subprocess.Popen([sys.executable, "-c", KILLING_CACHE, str(tiny_model_dir), str(tmp_path / "train"),
                               how], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    if how == "external":  # a real kill at whatever moment the third entry appears
        deadline = time.time() + 300
        while len(list(folder.glob("*.latents.safetensors"))) < 3 and victim.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        victim.send_signal(signal.SIGKILL)
    output = victim.communicate(timeout=300)[0].decode()
    assert victim.returncode == -signal.SIGKILL, output[-2000:]
    entries = sorted(folder.glob("*.latents.safetensors"))
    assert entries, output[-2000:]
    if how == "mid-write":
        assert len(entries) == 2 and any(path.name.startswith(".") for path in folder.iterdir())  # the leftovers

    vae = AutoencoderKL.from_pretrained(tiny_model_dir / "vae")
    rebuilt = LatentCache(dataset, vae, 1, to_disk=True, seed=3)
    assert_same_latents(rebuilt, LatentCache(dataset, vae, 1, seed=3))  # a clean run, bit for bit
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]
    again = LatentCache(dataset, vae, 1, to_disk=True, seed=3)
    assert again.loaded_from_disk == len(dataset.items) and not again.damaged
    assert_same_latents(again, rebuilt)


DAMAGES = ["truncated", "garbage", "empty", "wrong shape", "nan", "inf", "half precision", "flipped missing"]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory):
    """One image with flip_aug, its clean cache entry (bytes) and clean latents."""
    from lycolab.models.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("cache")
    folder = root / "1_one"
    folder.mkdir()
    shutil.copy(make_shapes_dataset(tmp_path_factory.mktemp("shapes")) / "2_shapes" / "0.png", folder / "0.png")
    config = load_config(overrides={"train_data_dir": str(root), "resolution": "64", "output_dir": str(root / "o")})
    config.datasets[0].subsets[0].flip_aug = True
    dataset = BucketedDataset(config.datasets, 1, seed=3)
    vae = build_tiny_sd().vae
    clean = LatentCache(dataset, vae, 1, to_disk=True, seed=3)
    entry = cache_path(dataset.items[0].record.path)
    return dataset, vae, clean, entry, entry.read_bytes()


@settings(max_examples=20)
@given(damage=st.sampled_from(DAMAGES), cut=st.floats(0, 1, exclude_max=True), noise=st.binary(min_size=1,
                                                                                                max_size=64))
def test_a_damaged_latent_cache_entry_is_encoded_again_to_the_clean_bits(clean_cache, damage, cut, noise):
    """What a non-atomic writer, a copy cut short or a Drive sync can leave under the final name."""
    dataset, vae, clean, entry, good = clean_cache
    assume(noise != good[: len(noise)])
    if damage == "truncated":
        entry.write_bytes(good[: int(cut * len(good))])
    elif damage == "garbage":
        entry.write_bytes(noise + good[len(noise):])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        tensors = {"latents": clean.get(0).clone(), "latents_flipped": clean.get(0, flip=True).clone()}
        if damage == "wrong shape":
            tensors["latents"] = tensors["latents"][:, :4]
        elif damage in ("nan", "inf"):
            tensors["latents"].view(-1)[int(cut * tensors["latents"].numel())] = float(damage)
        elif damage == "half precision":
            tensors["latents"] = tensors["latents"].half()
        else:
            del tensors["latents_flipped"]
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(entry),
                  {"fingerprint": clean.fingerprint(0)})
    rebuilt = LatentCache(dataset, vae, 1, to_disk=True, seed=3)
    assert rebuilt.loaded_from_disk == 0 and rebuilt.damaged == [entry]
    assert torch.equal(rebuilt.get(0), clean.get(0)) and torch.equal(rebuilt.get(0, flip=True), clean.get(0, True))
    assert load_file(str(entry)).keys() == {"latents", "latents_flipped"}
    assert LatentCache(dataset, vae, 1, to_disk=True, seed=3).loaded_from_disk == 1  # the rewrite is sound


# ---------------------------------------------------------------------------------------- damaged state folders
def small_run(model: Path, data: Path, out: Path, **extra):
    """4 steps (8 images per epoch, batches of 2) with a file and a state after every step."""
    return load_config(overrides={
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "network_module": "networks.lora", "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "optimizer_type": "AdamW", "max_train_epochs": 1, "train_batch_size": 2, "seed": 7,
        "output_dir": str(out), "output_name": "run", "save_precision": "float", "save_state": True,
        "save_every_n_steps": 1, **extra,
    })


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 4-step run's output folder (states after steps 1-3 and the final run-state) to copy and damage."""
    root = tmp_path_factory.mktemp("states")
    data = make_shapes_dataset(root / "train")
    result = train(small_run(tiny_model_dir, data, root / "out"), progress=False)
    assert [folder.name for folder in result.state_dirs] == [
        "run-step00000001-state", "run-step00000002-state", "run-step00000003-state", "run-state"]
    return root


def _truncate_tensors(folder: Path) -> None:
    path = folder / TENSORS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_rng_tensor(folder: Path) -> None:
    tensors = load_file(str(folder / TENSORS_FILE))
    del tensors["rng/torch"]
    save_file(tensors, str(folder / TENSORS_FILE))


def _flip_a_data_byte(folder: Path) -> None:
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (folder / TENSORS_FILE).write_bytes(bytes(data))


def _edit_info(folder: Path, change) -> None:
    info = json.loads((folder / INFO_FILE).read_text())
    (folder / INFO_FILE).write_text(json.dumps(change(info)))


STATE_DAMAGES = {
    "truncated tensors": (_truncate_tensors, "truncated or damaged"),
    "missing tensors file": (lambda folder: (folder / TENSORS_FILE).unlink(), f"{TENSORS_FILE} is missing"),
    "a tensor missing": (_drop_rng_tensor, "tensors missing from state.safetensors: rng/torch"),
    "a flipped byte": (_flip_a_data_byte, "does not match the checksum"),
    "broken json": (lambda folder: (folder / INFO_FILE).write_text('{"format": "lycolab-tr'), "not JSON"),
    "missing json": (lambda folder: (folder / INFO_FILE).unlink(), f"{INFO_FILE} is missing"),
    "wrong format": (lambda folder: _edit_info(folder, lambda info: {**info, "format": "kohya"}), "format 'kohya'"),
    "a list, not a state": (lambda folder: (folder / INFO_FILE).write_text("[1, 2]"), "format 'list'"),
    "no step": (lambda folder: _edit_info(folder, lambda info: {**info, "step": "3"}), "whole-number step"),
}


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGES))
def test_a_damaged_state_folder_is_refused_naming_the_next_older_complete_state(finished_run, tiny_model_dir,
                                                                                tmp_path, damage):
    shutil.copytree(finished_run / "out", tmp_path / "out")
    out, data = tmp_path / "out", finished_run / "train"
    damage_folder, reason = STATE_DAMAGES[damage]
    damage_folder(out / "run-step00000003-state")
    damage_folder(out / "run-state")  # the newest, which resume = "latest" looks at
    older = out / "run-step00000002-state"
    for resume, damaged in (("latest", out / "run-state"), (str(out / "run-step00000003-state"),
                                                            out / "run-step00000003-state")):
        with pytest.raises(TrainingError) as caught:
            train(small_run(tiny_model_dir, data, out, resume=resume), progress=False)
        assert_one_line_about(caught.value, damaged, reason, f'the next older complete state is {older.name}: set '
                              f'resume = "{older}"')
    assert find_latest_state(out, "run") == older  # what the message offers is what a resume would take


def test_following_the_message_resumes_from_the_older_state(finished_run, tiny_model_dir, tmp_path):
    shutil.copytree(finished_run / "out", tmp_path / "out")
    out = tmp_path / "out"
    _truncate_tensors(out / "run-state")
    with pytest.raises(TrainingError, match='delete run-state and resume = "latest" takes it'):
        train(small_run(tiny_model_dir, finished_run / "train", out, resume="latest"), progress=False)
    shutil.rmtree(out / "run-state")
    result = train(small_run(tiny_model_dir, finished_run / "train", out, resume="latest"), progress=False)
    assert result.resumed_from == out / "run-step00000003-state" and result.total_steps == 4
    reference = load_file(str(finished_run / "out" / "run.safetensors"))
    resumed = load_file(str(out / "run.safetensors"))
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_a_damaged_state_with_no_older_one_says_to_start_without_resume(finished_run, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(finished_run / "out" / "run-step00000001-state", out / "run-step00000001-state")
    (out / "run-step00000001-state" / INFO_FILE).write_text("")
    with pytest.raises(TrainingError, match="no older complete state of run in .*: start without resume"):
        train(small_run(tiny_model_dir, finished_run / "train", out, resume="latest"), progress=False)


def test_states_are_ordered_by_step_and_an_unreadable_one_by_when_it_was_written(finished_run, tmp_path):
    shutil.copytree(finished_run / "out", tmp_path / "out")
    out = tmp_path / "out"
    (out / "run-other-state").mkdir()  # another output name ("run-other") is not this run's
    (out / ".run-state.partial").mkdir()  # hidden leftovers never count
    names = [folder.name for folder in state_folders(out, "run")]
    assert names == ["run-state", "run-step00000003-state", "run-step00000002-state", "run-step00000001-state"]
    (out / "run-state" / INFO_FILE).write_text("")  # its step unknown: placed by the folder's time
    for folder, seconds in zip(names, (40, 30, 20, 10), strict=True):
        os.utime(out / folder, ns=(seconds * 10**9, seconds * 10**9))
    assert [folder.name for folder in state_folders(out, "run")] == names
    os.utime(out / "run-state", ns=(15 * 10**9, 15 * 10**9))  # written between steps 1 and 2
    assert [folder.name for folder in state_folders(out, "run")][1:3] == ["run-step00000002-state", "run-state"]
    assert json.loads((out / "run-step00000003-state" / INFO_FILE).read_text())[CHECKSUM_KEY]


def test_a_kill_left_writing_folder_is_cleared_by_the_next_save(tmp_path):
    target = tmp_path / "a.safetensors"
    leftover = tmp_path / ".a.safetensors.writing"
    leftover.mkdir()
    (leftover / ".tmpAbC123").write_bytes(b"half")
    save_safetensors(target, {"w": torch.ones(3)})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.safetensors"]
