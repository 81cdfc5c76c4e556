"""SDXL end to end on the tiny SDXL: loading (folder and single file), text encoding, size conditioning, training
every algorithm, the text-encoder cache, the saved files' names and metadata, sampling, generate and merge."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from lycolab.config import (
    ConfigError,
    DatasetConfig,
    SubsetConfig,
    TrainConfig,
    load_config,
    write_config_file,
    write_dataset_config,
)
from lycolab.data.dataset import BucketedDataset, fitted_crop_ltrb
from lycolab.models.detect import model_family
from lycolab.models.load import load_stable_diffusion
from lycolab.models.scenes import CONCEPT, draw_scene
from lycolab.models.text import encode_conditioning, encode_sdxl_prompts, sdxl_time_ids
from lycolab.models.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl
from lycolab.training.loop import train
from lycolab.training.text_cache import TextEncoderCache, cache_path

ALGORITHMS = {
    "lora": ("networks.lora", []),
    "locon": ("networks.lora", ["conv_dim=2", "conv_alpha=1"]),
    "loha": ("lycoris.kohya", ["algo=loha", "conv_dim=2", "conv_alpha=1"]),
    "lokr": ("lycoris.kohya", ["algo=lokr", "conv_dim=2", "conv_alpha=1", "factor=4"]),
}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def _dataset(root, sizes=((64, 64), (64, 64), (48, 80), (48, 80))):
    folder = root / "1_zkz"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for index, size in enumerate(sizes):
        draw_scene(CONCEPT, rng, size).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"zkz, picture {index}", encoding="utf-8")
    return folder


def _config(model, root, **overrides):
    folder = _dataset(root / "data")
    datasets = [DatasetConfig(subsets=[SubsetConfig(image_dir=str(folder), num_repeats=1, caption_extension=".txt")],
                              resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                              bucket_reso_steps=16)]
    settings = dict(
        pretrained_model_name_or_path=str(model), output_dir=str(root / "out"), output_name="xl",
        network_dim=4, network_alpha=2, learning_rate=1e-3, optimizer_type="AdamW", train_batch_size=2,
        max_train_epochs=1, seed=1, save_precision="float", mixed_precision="no", datasets=datasets,
        dataset_config=str(write_dataset_config(datasets, root / "dataset_config.toml")),
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_sdxl_folders_and_checkpoints_are_told_apart_from_sd_by_their_files(sdxl_dir, tiny_model_dir, tmp_path):
    from lycolab.models.export_sdxl import export_sdxl_single_file
    from lycolab.models.tiny import is_tiny_model

    parts = load_stable_diffusion(sdxl_dir)
    assert parts.is_sdxl and len(parts.text_encoders) == 2
    assert is_tiny_model(sdxl_dir)  # notebook 06 trains it on a CPU runtime, as the tiny SD
    assert model_family(sdxl_dir) == "sdxl" and model_family(tiny_model_dir) == "sd1"
    single = export_sdxl_single_file(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2,
                                     tmp_path / "xl.safetensors", dtype=None)
    assert model_family(single) == "sdxl"
    loaded = load_stable_diffusion(single, config=sdxl_dir)
    assert loaded.is_sdxl
    for ours, theirs in zip(parts.models, loaded.models, strict=True):
        for (name, value), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(value, other), name


def test_sdxl_conditioning_joins_both_penultimate_layers_and_pools_the_first_chunk():
    parts = build_tiny_sdxl()
    encoders, tokenizers = [parts.text_encoder, parts.text_encoder_2], [parts.tokenizer, parts.tokenizer_2]
    prompts = ["zkz, a red circle", "a long prompt " + "red circle " * 60]
    with torch.no_grad():
        short = encode_sdxl_prompts(encoders, tokenizers, prompts)
        long = encode_sdxl_prompts(encoders, tokenizers, prompts, max_token_length=150)
        ids = tokenizers[1](prompts, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
        reference = parts.text_encoder_2(ids, output_hidden_states=True)
    width = parts.text_encoder.config.hidden_size + parts.text_encoder_2.config.hidden_size
    assert short.states.shape == (2, 77, width) and long.states.shape == (2, 152, width)
    assert torch.equal(short.states[..., parts.text_encoder.config.hidden_size:], reference.hidden_states[-2])
    assert torch.equal(short.pooled, reference.text_embeds)
    # the pooled embedding of a long prompt is its first chunk's, which is the 77-token prompt's
    torch.testing.assert_close(long.pooled, short.pooled, rtol=0, atol=0)


def test_chunks_of_a_tokenizer_that_pads_with_its_own_token_always_hold_an_eos():
    from lycolab.models.text import _chunk_ids, tokenize

    tokenizer = build_tiny_sdxl().tokenizer_2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    ids = tokenize(tokenizer, ["red " * 80, "red"], 225)
    chunks = _chunk_ids(ids, tokenizer)
    assert len(chunks) == 3
    for chunk in chunks:
        assert ((chunk == eos).any(dim=1)).all()
    assert chunks[0][0, -1] == eos  # a chunk full of words ends with EOS, not with the padding
    assert chunks[2][1, 1] == eos  # a chunk that is only padding starts BOS EOS


def test_size_conditioning_is_sd_scripts_fitted_crop_mirrored_with_a_flip(tmp_path):
    # a 100x50 image in a 64x48 bucket: fitted inside, it is 64 wide and 32 tall, 8 px from the top
    assert fitted_crop_ltrb((64, 48), (100, 50)) == (0.0, 8.0, 64.0, 40.0)
    # a tall image in a wide bucket: 48 / 2 * 1 = 24 wide, centred at 20 (sd-scripts' formula, whatever the real crop)
    assert fitted_crop_ltrb((64, 48), (50, 100)) == (20.0, 0.0, 44.0, 48.0)
    folder = _dataset(tmp_path, sizes=((90, 60),))
    dataset = BucketedDataset([DatasetConfig(subsets=[SubsetConfig(image_dir=str(folder))], resolution=(64, 64),
                                             enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                                             bucket_reso_steps=16)], 1)
    bucket_width, bucket_height = dataset.items[0].bucket.bucket_resolution
    left, top, right, _ = fitted_crop_ltrb((bucket_width, bucket_height), (90, 60))
    original, crop, target = dataset.size_conditioning(0)
    assert original == (60, 90) and target == (bucket_height, bucket_width) and crop == (int(top), int(left))
    assert dataset.size_conditioning(0, flip=True)[1] == (int(top), int(bucket_width - right))
    assert sdxl_time_ids([original], [crop], [target]).tolist() == [[60, 90, *crop, *target]]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_trains_on_sdxl_and_saves_sd_scripts_names_and_metadata(sdxl_dir, tmp_path, algo):
    network_module, network_args = ALGORITHMS[algo]
    config = _config(sdxl_dir, tmp_path, network_module=network_module, network_args=network_args,
                     text_encoder_lr=1e-4)
    result = train(config, progress=False)
    assert result.total_steps == 2 and all(torch.isfinite(torch.tensor(result.history.losses)))
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert any(name.startswith("lora_unet_input_blocks_") for name in modules)
    assert any(name.startswith("lora_te1_text_model_encoder_layers_") for name in modules)
    assert any(name.startswith("lora_te2_text_model_encoder_layers_") for name in modules)
    assert not any(part in name for name in modules for part in ("down_blocks", "up_blocks", "mid_block"))
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_cached_text_encoder_outputs_equal_encoding_each_caption_and_survive_a_restart(sdxl_dir, tmp_path):
    config = _config(sdxl_dir, tmp_path, network_train_unet_only=True, cache_text_encoder_outputs_to_disk=True)
    config = load_config(write_config_file(config, tmp_path / "config.toml"))
    assert config.cache_text_encoder_outputs  # _to_disk turns caching on, as in sd-scripts
    parts = load_stable_diffusion(sdxl_dir)
    dataset = BucketedDataset(config.datasets, 1)
    with torch.no_grad():
        cache = TextEncoderCache(dataset, parts, None, None, 1, to_disk=True)
        for index in range(len(dataset)):
            expected = encode_conditioning(parts, [cache.captions[index]])
            assert torch.equal(cache.entries[index].states, expected.states[0])
            assert torch.equal(cache.entries[index].pooled, expected.pooled[0])
            assert cache_path(dataset.items[index].record.path).is_file()
        again = TextEncoderCache(dataset, parts, None, None, 1, to_disk=True)
    assert all(torch.equal(again.entries[i].states, cache.entries[i].states) for i in range(len(dataset)))
    result = train(config, progress=False)
    assert result.total_steps == 2
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        assert not any(key.startswith("lora_te") for key in handle.keys())


@pytest.mark.parametrize(("settings", "message"), [
    ({"cache_text_encoder_outputs": True}, "network_train_unet_only"),
    ({"cache_text_encoder_outputs": True, "network_train_unet_only": True, "shuffle_caption": True},
     "shuffle_caption"),
])
def test_text_encoder_cache_refuses_what_it_cannot_honour(sdxl_dir, tmp_path, settings, message):
    subset_keys = {key: settings.pop(key) for key in list(settings) if key == "shuffle_caption"}
    config = _config(sdxl_dir, tmp_path, **settings)
    for subset in config.datasets[0].subsets:
        for key, value in subset_keys.items():
            setattr(subset, key, value)
    write_dataset_config(config.datasets, config.dataset_config)
    path = write_config_file(config, tmp_path / "config.toml")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_sdxl_samples_generate_and_merge_use_the_sdxl_pipeline(sdxl_dir, tmp_path):
    from lycolab.models.generate import generate, merge_into_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zkz --w 64 --h 48 --s 2 --d 3\n", encoding="utf-8")
    config = _config(sdxl_dir, tmp_path, network_train_unet_only=True, sample_prompts=str(prompts),
                     sample_every_n_epochs=1, sample_sampler="euler_a", max_train_epochs=1)
    result = train(config, progress=False)
    assert len(result.sample_files) == 1
    from PIL import Image

    assert Image.open(result.sample_files[0]).size == (64, 48)
    adapter = result.saved_files[-1]
    image = generate(sdxl_dir, ["zkz --w 64 --h 64 --s 2 --d 1"], tmp_path / "one.png", [(adapter, 1.0)])
    assert Image.open(image[0]).size == (64, 64)
    merged = merge_into_model(sdxl_dir, [(adapter, 1.0)], tmp_path / "merged.safetensors", dtype=None)
    assert model_family(merged) == "sdxl"
    folder = merge_into_model(sdxl_dir, [(adapter, 1.0)], tmp_path / "merged-folder")
    assert model_family(folder) == "sdxl"
    from_file, from_folder = (load_stable_diffusion(merged, config=sdxl_dir), load_stable_diffusion(folder))
    for name, value in from_folder.unet.state_dict().items():
        assert torch.equal(value, from_file.unet.state_dict()[name]), name


def test_v2_is_refused_for_an_sdxl_model(sdxl_dir, tmp_path):
    from lycolab.training.loop import TrainingError

    with pytest.raises(TrainingError, match="SDXL"):
        train(_config(sdxl_dir, tmp_path, v2=True), progress=False)


def test_full_bf16_trains_the_adapter_itself_in_bf16(sdxl_dir, tmp_path):
    from lycolab.training.loop import Trainer

    config = _config(sdxl_dir, tmp_path, mixed_precision="bf16", full_bf16=True, network_train_unet_only=True)
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    assert {parameter.dtype for parameter in trainer.network.parameters()} == {torch.bfloat16}
    assert result.total_steps == 2 and all(torch.isfinite(torch.tensor(result.history.losses)))


@pytest.mark.parametrize(("key", "precision"), [("full_fp16", "bf16"), ("full_bf16", "no")])
def test_full_precision_needs_its_mixed_precision(sdxl_dir, tmp_path, key, precision):
    config = _config(sdxl_dir, tmp_path, mixed_precision=precision, **{key: True})
    with pytest.raises(ConfigError, match=f"{key} needs mixed_precision"):
        load_config(write_config_file(config, tmp_path / "config.toml"))


def test_network_weights_in_the_diffusers_layout_load_into_sd_scripts_names(sdxl_dir, tmp_path):
    from safetensors.torch import save_file

    from lycolab.networks import create_network
    from lycolab.networks.naming import sgm_paths
    from lycolab.training.loop import Trainer

    parts = build_tiny_sdxl()
    network = create_network(parts.unet, None, dim=4, alpha=2)
    with torch.no_grad():
        for index, parameter in enumerate(network.parameters()):
            parameter.fill_(0.01 * (index + 1))
    to_diffusers = {"lora_unet_" + sgm.replace(".", "_"): "lora_unet_" + path.replace(".", "_")
                    for path, sgm in sgm_paths(parts.unet).items()}
    tensors = {}
    for key, value in network.state_dict().items():
        module_name, _, rest = key.partition(".")
        tensors[f"{to_diffusers[module_name]}.{rest}"] = value.contiguous()
    assert any("down_blocks" in key for key in tensors)
    save_file(tensors, str(tmp_path / "diffusers_layout.safetensors"))
    config = _config(sdxl_dir, tmp_path, network_train_unet_only=True,
                     network_weights=str(tmp_path / "diffusers_layout.safetensors"))
    trainer = Trainer(config, progress=False)
    trainer.setup()
    for key, value in network.state_dict().items():
        assert torch.equal(trainer.network.state_dict()[key], value), key


def test_v_prediction_sdxl_with_zero_terminal_snr_trains_and_says_so(tmp_path):
    from lycolab.models.tiny_sdxl import save_tiny_sdxl

    model = save_tiny_sdxl(tmp_path / "vpred", v_prediction=True)
    config = _config(model, tmp_path, v_parameterization=True, zero_terminal_snr=True, network_train_unet_only=True)
    result = train(config, progress=False)
    assert all(torch.isfinite(torch.tensor(result.history.losses)))
    with safe_open(str(result.saved_files[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_zero_terminal_snr"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_a_pytorch_checkpoint_is_told_apart_by_its_keys_without_running_code(tmp_path):
    ckpt = tmp_path / "xl.ckpt"
    torch.save({"state_dict": {"conditioner.embedders.1.model.ln_final.weight": torch.ones(2),
                               "model.diffusion_model.label_emb.0.0.weight": torch.ones(2)}}, ckpt)
    assert model_family(ckpt) == "sdxl"
    sd1 = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2),
                               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(2)}}, sd1)
    assert model_family(sd1) == "sd1"

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, hostile)
    assert model_family(hostile) is None
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert model_family(tmp_path / "junk.ckpt") is None
