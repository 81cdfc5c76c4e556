"""The kohya options the seed guide sets, sampling during training, logs, guards and the notebook display."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_shapes_dataset as make_dataset
from PIL import Image
from safetensors import safe_open

from lycolab.config import load_config
from lycolab.training import TrainingError, train
from lycolab.training.callbacks import LiveDisplay, TrainingCallback
from lycolab.training.loop import Trainer
from lycolab.training.loss import min_snr_weights

PROMPTS = """# every kohya option once
sks, red circle --n blurry, lowres --w 64 --h 96 --s 3 --l 5.5 --d 11
sks, yellow square --s 2 --d 3

sks, green triangle --w 96 --h 64 --s 2 --l 1
"""


def _read(path):
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_a_run_with_the_seed_guides_options_saves_samples_and_logs_everything(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    (tmp_path / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    out, logs = tmp_path / "out", tmp_path / "logs"
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "network_dim": 4, "network_alpha": 1, "network_args": ["conv_dim=2"],
        "unet_lr": 1e-3, "text_encoder_lr": 5e-4, "optimizer_type": "Lion", "optimizer_args": ["weight_decay=0.01"],
        "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2, "lr_warmup_steps": 1,
        "max_grad_norm": 0.5, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
        "mixed_precision": "bf16", "save_precision": "bf16", "mem_eff_attn": True, "xformers": True,
        "noise_offset": 0.1, "min_snr_gamma": 5.0, "seed": 3, "clip_skip": 2, "max_token_length": 150,
        "lowram": True, "training_comment": "options run", "max_train_epochs": 4, "train_batch_size": 2,
        "save_every_n_epochs": 1, "save_last_n_epochs": 2, "save_every_n_steps": 3, "save_last_n_steps": 2,
        "sample_every_n_epochs": 2, "sample_every_n_steps": 5, "sample_prompts": str(tmp_path / "prompts.txt"),
        "sample_sampler": "ddim", "sample_at_first": True, "output_dir": str(out), "output_name": "opt",
        "logging_dir": str(logs), "log_prefix": "opt_",
    })
    result = train(config, progress=False)
    assert result.total_steps == 8  # 8 images with repeats / batch 2 = 4 batches, 2 per step, 4 epochs

    # save_every_n_epochs with save_last_n_epochs=2 keeps epochs 2 and 3 (4 is the final file); step saves at 3 and 6
    # keep only those within 2 steps of the newest.
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "opt-000002.safetensors", "opt-000003.safetensors", "opt-step00000006.safetensors", "opt.safetensors"]
    tensors, metadata = _read(out / "opt.safetensors")
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)
    assert metadata["ss_training_comment"] == "options run" and metadata["ss_min_snr_gamma"] == "5.0"
    assert metadata["ss_optimizer"] == "lion_pytorch.lion_pytorch.Lion(weight_decay=0.01)"
    assert (metadata["ss_clip_skip"], metadata["ss_max_token_length"], metadata["ss_seed"]) == ("2", "150", "3")
    assert (metadata["ss_epoch"], metadata["ss_steps"], metadata["ss_lr_scheduler"]) == (
        "4", "8", "cosine_with_restarts")

    # Samples before training, at epochs 2 and 4 (sd-scripts ignores sample_every_n_steps when
    # sample_every_n_epochs is set): every prompt with its size, a grid per round.
    sample_dir = out / "sample"
    stems = ["opt_e000000", "opt_e000002", "opt_e000004"]  # in the order they were made
    assert sorted(p.name for p in sample_dir.glob("*_grid.png")) == sorted(f"{stem}_grid.png" for stem in stems)
    for stem in stems:
        sizes = [Image.open(sample_dir / f"{stem}_{index:02d}.png").size for index in range(3)]
        assert sizes == [(64, 96), (64, 64), (96, 64)]
        assert Image.open(sample_dir / f"{stem}_grid.png").size == (3 * 96, 96)
    assert [p.name for p in result.grid_files] == [f"{stem}_grid.png" for stem in stems]

    # Logs: CSV and JSONL per step with both learning rates; TensorBoard with sd-scripts' tags.
    rows = [json.loads(line) for line in (logs / "opt_loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert rows[0]["lr_unet"] == pytest.approx(1e-3) and rows[0]["lr_textencoder"] == pytest.approx(5e-4)
    assert (logs / "opt_loss.csv").read_text().splitlines()[0] == "step,epoch,loss,average_loss,lr_unet,lr_textencoder"
    assert (logs / "opt_loss.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.tensorboard_dir))
    events.Reload()
    assert result.tensorboard_dir.parent == logs and result.tensorboard_dir.name.startswith("opt_")
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss/current")] == list(range(1, 9))


def test_prompt_files_in_sd_scripts_toml_and_json_forms(tmp_path):
    from lycolab.training.sampling import SamplePrompt, read_prompt_file

    (tmp_path / "p.toml").write_text(
        '[prompt]\nwidth = 64\nscale = 5.5\nsample_steps = 3\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 7\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nnegative_prompt = "blurry"\nheight = 96\n', encoding="utf-8")
    (tmp_path / "p.json").write_text('[{"prompt": "a cat", "width": 64, "scale": 5.5, "sample_steps": 3, '
                                     '"seed": 7}]', encoding="utf-8")
    defaults = SamplePrompt("", width=512, height=512)
    cat = SamplePrompt("a cat", width=64, height=512, steps=3, guidance_scale=5.5, seed=7)
    assert read_prompt_file(tmp_path / "p.toml", defaults) == [
        cat, SamplePrompt("a dog", "blurry", width=64, height=96, steps=3, guidance_scale=5.5)]
    assert read_prompt_file(tmp_path / "p.json", defaults) == [cat]
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not a readable prompt file"):
        read_prompt_file(tmp_path / "bad.json")


@pytest.mark.parametrize(("only", "prefix"), [("network_train_unet_only", "lora_unet_"),
                                               ("network_train_text_encoder_only", "lora_te_")])
def test_training_only_the_unet_or_only_the_text_encoder(tiny_model_dir, tmp_path, only, prefix):
    data = make_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "network_dim": 4, "max_train_steps": 2, "learning_rate": 1e-3, "output_dir": str(tmp_path / "o"), only: True,
        "v_parameterization": True,
    })
    tensors, _ = _read(train(config, progress=False).saved_files[-1])
    assert tensors and all(key.startswith(prefix) for key in tensors)


def test_min_snr_weights_follow_the_formula(tiny_sd):
    scheduler = tiny_sd.scheduler
    timesteps = torch.tensor([10, 500, 990])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0), expected)
    assert min_snr_weights(scheduler, timesteps, 5.0)[0] < 0.1 and min_snr_weights(scheduler, timesteps, 5.0)[2] == 1
    scheduler.register_to_config(prediction_type="v_prediction")
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_out_of_memory_names_the_settings_to_lower(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "network_dim": 4, "max_train_steps": 2, "output_dir": str(tmp_path / "o"), "train_batch_size": 2,
    })
    trainer = Trainer(config, progress=False)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.loss_sum = exhausted
    with pytest.raises(TrainingError) as caught:
        trainer.train()
    assert str(caught.value) == ("out of memory: lower train_batch_size (now 2), resolution (now 64x64), "
                                 "or set gradient_checkpointing = true, sdpa = true")
    assert not list((tmp_path / "o").glob("*.safetensors"))


class _FakeHandle:
    def __init__(self):
        self.updates = 0

    def update(self, value):
        self.updates += 1


def test_the_live_display_updates_one_plot_and_shows_each_grid(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    (tmp_path / "prompts.txt").write_text("sks, red circle --s 2\n", encoding="utf-8")
    shown, handle = [], _FakeHandle()

    def display(value, display_id=False):
        shown.append(type(value).__name__)
        return handle if display_id else None

    class Saves(TrainingCallback):
        saved = []

        def on_save(self, path):
            self.saved.append(path.name)

    live = LiveDisplay(every_seconds=0, display=display)
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "network_dim": 4, "max_train_epochs": 2, "train_batch_size": 4, "output_dir": str(tmp_path / "o"),
        "sample_prompts": str(tmp_path / "prompts.txt"), "sample_every_n_epochs": 1, "save_every_n_epochs": 1,
    })
    train(config, progress=False, callbacks=[live, Saves()])
    # one plot shown once and updated after every other step and at the end; two sample rounds with a title each
    assert shown == ["Image", "Markdown", "Image", "Markdown", "Image"]
    assert handle.updates == 4 and live.plots_drawn == 5
    assert Saves.saved == ["last-000001.safetensors", "last.safetensors"]


def test_states_are_pruned_by_their_own_count_as_sd_scripts_does(tmp_path):
    """save_last_n_epochs_state keeps that many epoch states; save_last_n_epochs keeps files (and states unless the
    state count is given); the same for steps."""
    from lycolab.training.checkpoints import prune_epochs, prune_steps

    for epoch in range(1, 5):
        (tmp_path / f"run-{epoch:06d}.safetensors").write_bytes(b"x")
        (tmp_path / f"run-{epoch:06d}-state").mkdir()
        (tmp_path / f"run-step{epoch * 10:08d}.safetensors").write_bytes(b"x")
        (tmp_path / f"run-step{epoch * 10:08d}-state").mkdir()
    prune_epochs(tmp_path, "run", None, 1)
    prune_steps(tmp_path, "run", 40, 20, 5)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert [name for name in names if "step" not in name] == [
        "run-000001.safetensors", "run-000002.safetensors", "run-000003.safetensors", "run-000004-state",
        "run-000004.safetensors"]
    assert [name for name in names if "step" in name] == [
        "run-step00000020.safetensors", "run-step00000030.safetensors", "run-step00000040-state",
        "run-step00000040.safetensors"]
    prune_epochs(tmp_path, "run", 2)
    assert sorted(path.name for path in tmp_path.glob("run-0*")) == [
        "run-000003.safetensors", "run-000004-state", "run-000004.safetensors"]


def test_step_samples_save_ratio_and_the_end_state_follow_sd_scripts(tiny_model_dir, tmp_path):
    """sample_every_n_steps alone samples by steps and not at the end; save_n_epoch_ratio 2 over 4 epochs saves
    every 2; save_state_on_train_end writes the final state only."""
    data = make_dataset(tmp_path / "train")
    (tmp_path / "prompts.txt").write_text("a red circle --w 64 --h 64 --s 2\n", encoding="utf-8")
    out = tmp_path / "out"
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "network_dim": 2, "network_alpha": 1, "unet_lr": 1e-3, "optimizer_type": "AdamW",
        "max_train_epochs": 4, "train_batch_size": 4, "save_n_epoch_ratio": 2, "save_state_on_train_end": True,
        "sample_every_n_steps": 3, "sample_prompts": str(tmp_path / "prompts.txt"), "output_dir": str(out),
        "output_name": "r", "seed": 1,
    })
    result = train(config, progress=False)
    assert result.total_steps == 8
    assert sorted(p.name for p in out.glob("r*")) == ["r-000002.safetensors", "r-state", "r.safetensors"]
    assert sorted(p.name for p in (out / "sample").glob("*_grid.png")) == ["r_000003_grid.png", "r_000006_grid.png"]


def test_network_weights_load_into_the_configured_network_and_dim_from_weights_takes_the_files(
        tiny_model_dir, tmp_path):
    """sd-scripts: network_weights fill the network the arguments build (a different dim is an error);
    dim_from_weights builds it from the file; base_weights are baked into the model first."""
    data = make_dataset(tmp_path / "train")
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
            "caption_extension": ".txt", "network_dim": 4, "network_alpha": 2, "unet_lr": 1e-3,
            "optimizer_type": "AdamW", "max_train_epochs": 1, "train_batch_size": 4, "output_dir": str(tmp_path),
            "seed": 1}
    first = train(load_config(overrides={**base, "output_name": "first"}), progress=False).saved_files[-1]
    again = train(load_config(overrides={**base, "output_name": "again", "network_weights": str(first)}),
                  progress=False)
    assert again.history.losses[0] != pytest.approx(0) and again.saved_files
    with pytest.raises(TrainingError, match="first.safetensors: .* has shape .*dim_from_weights = true"):
        train(load_config(overrides={**base, "output_name": "wider", "network_weights": str(first),
                                     "network_dim": 8}), progress=False)
    wide = train(load_config(overrides={**base, "output_name": "fromfile", "network_weights": str(first),
                                        "network_dim": 8, "dim_from_weights": True}), progress=False)
    with safe_open(str(wide.saved_files[-1]), "pt") as handle:  # rank 4, from the file (ss_network_dim says 8:
        downs = [handle.get_tensor(key) for key in handle.keys() if key.endswith("lora_down.weight")]  # sd-scripts
    assert downs and {down.shape[0] for down in downs} == {4}  # writes the argument as given)
    merged = train(load_config(overrides={**base, "output_name": "merged", "base_weights": [str(first)],
                                          "base_weights_multiplier": [0.5]}), progress=False)
    assert merged.saved_files
