"""The estimate before training: lycolab's own step plan, VRAM that moves the right way with each setting, exact adapter
counts without weights, nothing downloaded, and text that says it is an estimate. No test depends on this machine's
speed: times come from the table in lycolab/estimate.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_shapes_dataset, write_images

from lycolab.config import load_config
from lycolab.estimate import (
    DEVICES,
    GRADIENT_CHECKPOINTING_SLOWDOWN,
    SDXL_STEP_TIME_AT_1024,
    TrainingEstimate,
    _counts,
    choose_device,
    estimate,
    match_gpu_name,
    model_configs,
    model_counts,
    optimizer_state_bytes,
    run_plan,
    training_precision,
    vram_phases,
    workload,
)

SD15 = "runwayml/stable-diffusion-v1-5"
# The guide's setup: SD 1.5 LoRA dim 32 / alpha 16, batch 6 on a 16 GB card, fp16, 512 px, AdamW8bit, cached latents.
GUIDE = {"pretrained_model_name_or_path": SD15, "v2": False, "resolution": "512", "caption_extension": ".txt",
         "network_dim": 32, "network_alpha": 16, "mixed_precision": "fp16", "train_batch_size": 6,
         "optimizer_type": "AdamW8bit", "cache_latents": True, "xformers": True, "max_train_epochs": 10}


SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# The documented SDXL plan for a free T4: LoRA dim 32 on the U-Net only, 1024 px, batch 1, fp16, AdamW8bit, latents
# and text-encoder outputs cached, gradient checkpointing.
SDXL_T4_PLAN = {"pretrained_model_name_or_path": SDXL, "resolution": "1024", "caption_extension": ".txt",
                "network_dim": 32, "network_alpha": 16, "network_train_unet_only": True, "mixed_precision": "fp16",
                "train_batch_size": 1, "optimizer_type": "AdamW8bit", "cache_latents": True,
                "cache_text_encoder_outputs": True, "gradient_checkpointing": True, "xformers": True,
                "max_train_epochs": 10}


def _config_maker(train: Path, settings: dict, folder: str, images: int):
    """Configs of ``settings`` (plus overrides) over ``images`` small captioned images in ``train/folder``."""
    write_images(train / folder, [(64, 64)] * images, ["sks, a shape"])

    def make(**overrides):
        return load_config(overrides={**settings, "train_data_dir": str(train), **overrides})

    return make


@pytest.fixture
def sd15_config(tmp_path):
    """A config for SD 1.5 by hub name (never downloaded) over 12 small images (4 per bucket) × 2 repeats."""
    return _config_maker(tmp_path / "train", GUIDE, "2_shapes", 12)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch from the hub fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the estimate tried to download {args} {kwargs}")

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
        monkeypatch.setattr(f"huggingface_hub.file_download.{name}" if name == "hf_hub_download"
                            else f"huggingface_hub._snapshot_download.{name}", refuse, raising=False)


def test_steps_are_lycolabs_own_plan(tiny_model_dir, tmp_path):
    from lycolab.data.dataset import BucketedDataset
    from lycolab.training.loop import plan_run

    make_shapes_dataset(tmp_path / "train")
    for overrides in ({"max_train_epochs": 3}, {"max_train_steps": 7, "gradient_accumulation_steps": 2},
                      {"max_train_epochs": 2, "train_batch_size": 3}):
        config = load_config(overrides={"pretrained_model_name_or_path": str(tiny_model_dir), "resolution": "64",
                                        "train_data_dir": str(tmp_path / "train"), "caption_extension": ".txt",
                                        **overrides})
        plan = plan_run(config, BucketedDataset(config.datasets, config.train_batch_size))
        result = estimate(config, "CPU")
        assert (result.steps, result.epochs, result.steps_per_epoch) == (plan.total_steps, plan.epochs,
                                                                          plan.steps_per_epoch)
        assert result.total_seconds == pytest.approx(result.steps * result.seconds_per_step)


def test_the_tiny_models_adapter_is_counted_exactly_without_weights(tiny_model_dir, tmp_path, tiny_sd):
    from lycolab.networks import create_network

    make_shapes_dataset(tmp_path / "train")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "network_module": "lycoris.kohya", "network_dim": 8, "network_alpha": 4,
        "network_args": ["algo=loha", "conv_dim=4", "conv_alpha=2"]})
    counts, note = model_counts(config)
    network = create_network(tiny_sd.unet, [tiny_sd.text_encoder], algo="loha", dim=8, alpha=4, conv_dim=4,
                             conv_alpha=2, network_module="lycoris.kohya")
    assert note is None  # the folder's own configs were read
    assert counts.adapter == sum(p.numel() for p in network.parameters())
    assert counts.unet == sum(p.numel() for p in tiny_sd.unet.parameters())
    assert counts.text_encoder == sum(p.numel() for p in tiny_sd.text_encoder.parameters())
    assert counts.vae == sum(p.numel() for p in tiny_sd.vae.parameters())


def test_network_weights_are_counted_from_the_file_with_dim_from_weights(tiny_model_dir, tmp_path, tiny_sd):
    from lycolab.networks import create_network

    make_shapes_dataset(tmp_path / "train")
    network = create_network(tiny_sd.unet, [], algo="lora", dim=4, alpha=1)
    saved = network.save_weights(tmp_path / "start.safetensors")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "network_weights": str(saved), "network_dim": 16, "dim_from_weights": True})
    counts, _ = model_counts(config)
    assert counts.adapter == sum(p.numel() for p in network.parameters())


def test_sd15_by_hub_name_is_never_downloaded_and_has_sd15s_sizes(sd15_config, no_downloads):
    result = estimate(sd15_config(), "T4")
    counts, note = model_counts(sd15_config())
    assert (counts.unet, counts.text_encoder, counts.vae) == (859_520_964, 123_060_480, 83_653_863)
    # kohya LoRA dim 32 on SD 1.5's U-Net and text encoder: 18.9 M parameters (a 37.8 MB fp16 file)
    assert counts.adapter == 18_874_368
    assert "SD 1.x architecture was assumed" in note and any(SD15 in line for line in result.notes)


def test_sd2_is_chosen_by_v2(sd15_config, no_downloads):
    v1, _ = model_counts(sd15_config())
    v2, note = model_counts(sd15_config(v2=True, v_parameterization=True, resolution="768"))
    assert v2.text_encoder > 2.5 * v1.text_encoder  # OpenCLIP ViT-H (23 layers of 1024) vs CLIP ViT-L
    assert abs(v2.unet - v1.unet) < 0.01 * v1.unet and "SD 2.x" in note


def test_the_guide_plan_on_a_t4(sd15_config, no_downloads):
    """The documented plan: batch 6 at 512 px fits a T4 as the guide says (~10 GiB); batch 1 fits easily; batch 64 at
    1024 px does not, and the notes say what to lower."""
    guide = estimate(sd15_config(), "T4")
    assert guide.vram_available_gib == DEVICES["T4"].memory_gib
    assert guide.fits_vram and 8 < guide.vram_needed_gib < 13
    single = estimate(sd15_config(train_batch_size=1), "T4")
    assert single.fits_vram and single.vram_needed_gib < 6
    huge = estimate(sd15_config(train_batch_size=64, resolution="1024"), "T4")
    assert not huge.fits_vram
    advice = " ".join(huge.notes)
    assert "train_batch_size" in advice and "gradient_checkpointing" in advice


def test_vram_grows_with_batch_and_resolution_and_drops_with_checkpointing(sd15_config, no_downloads):
    needed = {key: estimate(sd15_config(**overrides), "T4").vram_needed_gib for key, overrides in {
        "batch 1": {"train_batch_size": 1}, "batch 4": {"train_batch_size": 4},
        "512": {"train_batch_size": 2}, "768": {"train_batch_size": 2, "resolution": "768"},
        "no checkpointing": {}, "checkpointing": {"gradient_checkpointing": True},
    }.items()}
    assert needed["batch 1"] < needed["batch 4"]
    assert needed["512"] < needed["768"]
    assert needed["checkpointing"] < needed["no checkpointing"]


def test_checkpointing_and_fp32_cost_time_as_documented(sd15_config, no_downloads):
    plain = estimate(sd15_config(), "T4")
    checkpointed = estimate(sd15_config(gradient_checkpointing=True), "T4")
    fp32 = estimate(sd15_config(mixed_precision="no"), "T4")
    assert checkpointed.seconds_per_step == pytest.approx(plain.seconds_per_step * GRADIENT_CHECKPOINTING_SLOWDOWN)
    assert fp32.seconds_per_step == pytest.approx(plain.seconds_per_step * DEVICES["T4"].fp32_slowdown)
    assert fp32.vram_needed_gib > plain.vram_needed_gib  # fp32 weights and activations
    assert any('mixed_precision = "fp16"' in note for note in fp32.notes)


def test_time_per_step_follows_the_table_not_this_machine(sd15_config, no_downloads):
    """Batch 1 at 512 px with cached latents is the table's own workload: exactly its it/s on every device."""
    for device, spec in DEVICES.items():
        mixed_precision = "no" if device == "CPU" else "fp16"
        result = estimate(sd15_config(train_batch_size=1, mixed_precision=mixed_precision,
                                      optimizer_type="AdamW"), device)
        assert result.seconds_per_step == pytest.approx(1 / spec.iterations_per_second)
    a100 = estimate(sd15_config(), "A100")
    assert a100.device == "A100-40GB" and a100.seconds_per_step < estimate(sd15_config(), "T4").seconds_per_step


def test_an_eight_bit_optimizer_needs_less_than_adamw(sd15_config, no_downloads):
    eight_bit = estimate(sd15_config(optimizer_type="AdamW8bit"), "T4")
    adamw = estimate(sd15_config(optimizer_type="AdamW"), "T4")
    lion = estimate(sd15_config(optimizer_type="Lion"), "T4")
    assert eight_bit.vram_needed_gib < lion.vram_needed_gib < adamw.vram_needed_gib
    difference = (adamw.vram_breakdown_gib["adapter"] - eight_bit.vram_breakdown_gib["adapter"]) * 2**30
    assert difference == pytest.approx(18_874_368 * 6)  # 8 bytes of state per parameter instead of 2
    on_cpu = estimate(sd15_config(optimizer_type="AdamW8bit"), "CPU")  # bitsandbytes needs CUDA: AdamW runs
    assert any("32-bit" in note for note in on_cpu.notes)


def test_a_long_run_does_not_fit_a_free_t4_session(sd15_config, no_downloads):
    short = estimate(sd15_config(), "T4")
    long = estimate(sd15_config(max_train_epochs=None, max_train_steps=100_000), "T4")
    assert short.fits_session and short.session_hours == DEVICES["T4"].session_hours
    assert not long.fits_session and long.total_seconds > 4 * 3600
    assert any("save_state" in note for note in long.notes)
    assert estimate(sd15_config(max_train_epochs=None, max_train_steps=100_000), "T4", session_hours=1000).fits_session


def test_text_and_html_say_it_is_an_estimate(sd15_config, no_downloads):
    result = estimate(sd15_config(), "T4")
    assert isinstance(result, TrainingEstimate)
    text = str(result)
    assert "estimate" in text and "T4" in text and f"{result.steps:,}" in text and "VRAM" in text
    html = result._repr_html_()
    assert "estimate" in html and "<table>" in html


def test_this_runtime_is_detected(sd15_config, no_downloads, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = estimate(sd15_config())
    assert result.device == "CPU" and result.vram_available_gib is None and result.fits_vram
    assert "RAM" in str(result)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (14 * 2**30, int(14.75 * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=0: 0)
    result = estimate(sd15_config())
    assert result.device == "T4" and result.vram_available_gib == pytest.approx(14.5)

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce RTX 9090")
    result = estimate(sd15_config())
    assert result.device == "NVIDIA GeForce RTX 9090" and any("speed table" in note for note in result.notes)


@pytest.mark.parametrize(("name", "total", "key"), [
    ("Tesla T4", 14.75, "T4"), ("NVIDIA L4", 22.0, "L4"), ("NVIDIA A100-SXM4-40GB", 39.4, "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "A100-80GB"), ("NVIDIA A100 PCIe", 79.2, "A100-80GB"),
    ("Tesla V100-SXM2-16GB", 15.8, "V100"), ("Tesla P100-PCIE-16GB", 15.9, "P100"),
    ("NVIDIA H100 80GB HBM3", 79.1, "H100"), ("NVIDIA GeForce RTX 4090", 24.0, None),
])
def test_gpu_names_map_to_the_table(name, total, key):
    assert match_gpu_name(name, total) == key


def test_an_unknown_device_name_is_refused(sd15_config):
    with pytest.raises(ValueError, match="unknown device 'TPU'.*T4"):
        estimate(sd15_config(), "TPU")


def test_repeated_estimates_reuse_the_counts(sd15_config, no_downloads):
    estimate(sd15_config(), "T4")
    hits = _counts.cache_info().hits
    again = estimate(sd15_config(train_batch_size=2), "L4")
    assert _counts.cache_info().hits > hits and math.isfinite(again.total_seconds)


# ------------------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture
def sdxl_config(tmp_path):
    """A config for SDXL by hub name (never downloaded) over 4 small images × 5 repeats."""
    return _config_maker(tmp_path / "train", SDXL_T4_PLAN, "5_shapes", 4)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from lycolab.models.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def test_sdxl_by_hub_name_has_sdxls_sizes_without_a_download(sdxl_config, no_downloads):
    """With family="sdxl" the real SDXL base configs are counted on the meta device: the 2.57 B U-Net, CLIP ViT-L
    and OpenCLIP bigG with its projection, SD's VAE."""
    counts, note = model_counts(sdxl_config(), family="sdxl")
    assert (counts.family, counts.unet, counts.text_encoder, counts.text_encoder_2, counts.vae) == (
        "sdxl", 2_567_463_684, 123_060_480, 694_659_840, 83_653_863)
    # kohya LoRA dim 32 on SDXL's U-Net only: 85.1 M parameters (a 170 MB fp16 file; dim 64 is the ~325 MB users
    # report in kohya-ss/sd-scripts#695)
    assert counts.adapter == 85_114_880
    assert "SDXL architecture was assumed" in note and 'family = "sdxl"' in note


def test_an_sdxl_hub_id_not_on_disk_keeps_the_v2_fallback(sdxl_config, no_downloads):
    counts, note = model_counts(sdxl_config())
    assert counts.family == "sd1" and counts.text_encoder_2 == 0
    assert "SD 1.x architecture was assumed" in note and 'family="sdxl"' in note
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        model_counts(sdxl_config(), family="sd3")


def test_the_tiny_sdxl_folder_is_counted_exactly(tiny_sdxl_dir, tmp_path):
    """Its own configs are read (family from the folder, text_encoder_2 included), so every count is exact."""
    from lycolab.models.tiny_sdxl import build_tiny_sdxl
    from lycolab.networks import create_network

    make_shapes_dataset(tmp_path / "train")
    config = load_config(overrides={"pretrained_model_name_or_path": str(tiny_sdxl_dir), "resolution": "64",
                                    "train_data_dir": str(tmp_path / "train"), "caption_extension": ".txt",
                                    "network_dim": 8, "network_alpha": 4})
    counts, note = model_counts(config)
    tiny = build_tiny_sdxl()
    assert note is None and counts.family == "sdxl"
    assert counts.unet == sum(p.numel() for p in tiny.unet.parameters())
    assert counts.text_encoder == sum(p.numel() for p in tiny.text_encoder.parameters())
    assert counts.text_encoder_2 == sum(p.numel() for p in tiny.text_encoder_2.parameters())
    assert counts.vae == sum(p.numel() for p in tiny.vae.parameters())
    network = create_network(tiny.unet, [tiny.text_encoder, tiny.text_encoder_2], algo="lora", dim=8, alpha=4)
    assert counts.adapter == sum(p.numel() for p in network.parameters())


def test_the_tiny_sdxl_estimate_works_end_to_end(tiny_sdxl_dir, tmp_path):
    from lycolab.data.dataset import BucketedDataset
    from lycolab.training.loop import plan_run

    make_shapes_dataset(tmp_path / "train")
    overrides = {"pretrained_model_name_or_path": str(tiny_sdxl_dir), "resolution": "64", "caption_extension": ".txt",
                 "train_data_dir": str(tmp_path / "train"), "max_train_epochs": 2, "mixed_precision": "fp16"}
    config = load_config(overrides=overrides)
    plan = plan_run(config, BucketedDataset(config.datasets, config.train_batch_size))
    for device in ("CPU", "T4"):
        result = estimate(config, device)
        assert result.steps == plan.total_steps and result.fits_vram and math.isfinite(result.total_seconds)
        assert "text encoders" in result.vram_breakdown_gib and "estimate" in str(result)
        assert not any("architecture was assumed" in note for note in result.notes)
    cached = estimate(load_config(overrides={**overrides, "cache_text_encoder_outputs": True,
                                             "network_train_unet_only": True}), "T4")
    assert cached.vram_needed_gib < estimate(config, "T4").vram_needed_gib


def test_the_sdxl_t4_plan_fits_a_t4(sdxl_config, no_downloads):
    """The documented plan: SDXL LoRA dim 32, 1024 px, batch 1, cached latents and text-encoder outputs, gradient
    checkpointing, fp16 — ~9.4 GiB at its peak (caching latents, the text encoders still on the GPU), ~7.4 GiB while
    training, under the T4's 14.75 GiB (kohya's README: SDXL LoRA "can be done with 8GB GPU memory (10GB
    recommended)" with these options)."""
    plan = estimate(sdxl_config(), "T4", family="sdxl")
    assert plan.vram_available_gib == DEVICES["T4"].memory_gib
    assert plan.fits_vram and 8 < plan.vram_needed_gib < 12
    assert any("caching the latents" in note and "training itself needs ~7" in note for note in plan.notes)
    # batch 1 at 1024 px with cached latents: the T4's SD 1.5 time x the documented SDXL factor x checkpointing
    assert plan.seconds_per_step == pytest.approx(
        SDXL_STEP_TIME_AT_1024 * GRADIENT_CHECKPOINTING_SLOWDOWN / DEVICES["T4"].iterations_per_second)


def test_sdxl_without_checkpointing_and_caching_does_not_fit_a_t4(sdxl_config, no_downloads):
    """~8.9 GiB of activations at 1024 px and both text encoders on the GPU: ~17 GiB; the advice names gradient
    checkpointing, which fits."""
    result = estimate(sdxl_config(gradient_checkpointing=False, cache_latents=False,
                                  cache_text_encoder_outputs=False), "T4", family="sdxl")
    assert not result.fits_vram and result.vram_needed_gib > 15
    assert result.vram_breakdown_gib["activations"] > 8 and "text encoders" in result.vram_breakdown_gib
    assert any("gradient_checkpointing" in note and ": fits)" in note for note in result.notes)


def test_cached_text_encoder_outputs_take_the_text_encoders_off_the_gpu_for_training(sdxl_config, no_downloads):
    device = choose_device("T4")
    phases = {}
    for cached in (False, True):
        config = sdxl_config(cache_text_encoder_outputs=cached)
        counts, _ = model_counts(config, family="sdxl")
        phases[cached] = vram_phases(config, device, workload(run_plan(config)[1]), counts,
                                     training_precision(config, device), optimizer_state_bytes(config, device)[0])
    assert "text encoders" in phases[False]["training"] and "text encoders" not in phases[True]["training"]
    assert phases[True]["caching latents"]["text encoders"] == pytest.approx((123_060_480 + 694_659_840) * 2)


def test_network_train_unet_only_and_text_encoder_only_split_the_adapter(sd15_config, no_downloads):
    both, _ = model_counts(sd15_config())
    unet_only, _ = model_counts(sd15_config(network_train_unet_only=True))
    text_only, _ = model_counts(sd15_config(network_train_text_encoder_only=True))
    assert text_only.adapter == 5_308_416  # CLIP ViT-L: 12 layers x (4 attention + 2 MLP projections) at dim 32
    assert unet_only.adapter + text_only.adapter == both.adapter == 18_874_368


def test_files_win_over_a_wrong_family(tiny_model_dir, tmp_path):
    make_shapes_dataset(tmp_path / "train")
    config = load_config(overrides={"pretrained_model_name_or_path": str(tiny_model_dir), "resolution": "64",
                                    "train_data_dir": str(tmp_path / "train"), "caption_extension": ".txt"})
    configs = model_configs(config, family="sdxl")
    assert configs.family == "sd1" and len(configs.text_encoders) == 1 and "files say SD 1.x" in configs.note


def test_an_sdxl_hub_id_in_the_local_cache_is_read_from_it(tiny_sdxl_dir, tmp_path, monkeypatch, no_downloads):
    """A hub id step 04 has downloaded: its cached configs say SDXL (text_encoder_2 included), no family needed."""
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-sdxl" / "snapshots" / "abc123"
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        (snapshot / part).mkdir(parents=True)
        shutil.copy(tiny_sdxl_dir / part / "config.json", snapshot / part / "config.json")
    shutil.copy(tiny_sdxl_dir / "model_index.json", snapshot / "model_index.json")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    make_shapes_dataset(tmp_path / "train")
    config = load_config(overrides={"pretrained_model_name_or_path": "someone/tiny-sdxl", "resolution": "64",
                                    "train_data_dir": str(tmp_path / "train"), "caption_extension": ".txt"})
    configs = model_configs(config)
    assert configs.family == "sdxl" and len(configs.text_encoders) == 2 and configs.note is None
    assert configs.unet == json.loads((tiny_sdxl_dir / "unet" / "config.json").read_text())
