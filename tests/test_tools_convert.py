"""kohya/LyCORIS LoRA files ⇄ the PEFT/diffusers layout: round trips, diffusers' own loader, diffusers' own files,
SDXL's two name layouts, and the algorithms that have no PEFT form."""

import json
import logging

import pytest
import torch
from conftest import LibraryWarnings, randomize_parameters
from safetensors import safe_open
from safetensors.torch import load_file

from lycolab.models.tiny import build_tiny_sd
from lycolab.models.tiny_sdxl import build_tiny_sdxl
from lycolab.networks import AdapterFileError, create_network, load_network
from lycolab.networks.io import adaptable_layers
from lycolab.networks.naming import canonical_named_modules
from lycolab.tools.convert import KOHYA_ALPHAS_KEY, convert_adapter, dotted_path, split_kohya_name

pytest.importorskip("peft")
FLOAT32_ULP = torch.finfo(torch.float32).eps  # one unit in the last place, relative


@torch.no_grad()
def _outputs(sd):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sd.tokenizer.vocab_size, (2, 77), generator=generator)
    context = sd.text_encoder(ids)[0]
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    return context, sd.unet(sample, torch.tensor([10, 700]), context).sample


@torch.no_grad()
def _sdxl_outputs(parts):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, parts.text_encoder.config.vocab_size - 2, (2, 8), generator=generator)
    ids[:, -1] = parts.text_encoder.config.eos_token_id
    second = parts.text_encoder_2(ids)
    context = torch.cat([parts.text_encoder(ids).last_hidden_state, second.last_hidden_state], dim=-1)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    prediction = parts.unet(sample, torch.tensor([10, 700]), context,
                            added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids}).sample
    return context, second.text_embeds, prediction


def _assert_same(first, second):
    # the fold changes where alpha/rank is multiplied in: float32 rounding, amplified a little by the network
    for got, expected in zip(first, second, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _kohya_file(tmp_path, algo="lora", network_module="networks.lora", conv_dim=2, parts=None):
    parts = parts or build_tiny_sd()
    encoders = [parts.text_encoder] + ([parts.text_encoder_2] if hasattr(parts, "text_encoder_2") else [])
    # alpha/rank = 0.75 and 0.75: not a power of two, so folding it in rounds
    network = create_network(parts.unet, encoders, algo=algo, dim=4, alpha=3, conv_dim=conv_dim, conv_alpha=1.5,
                             network_module=network_module)
    randomize_parameters(network.parameters(), std=0.2)
    path = network.save_weights(tmp_path / "kohya.safetensors", dtype=torch.float32,
                                metadata={"ss_num_epochs": "3", "ss_tag_frequency": json.dumps({"1_x": {"a": 2}})})
    return parts, network, path


def _diffusers_warnings(load):
    records = LibraryWarnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for library_logger in loggers:
        library_logger.addHandler(records)
    try:
        load()
    finally:
        for library_logger in loggers:
            library_logger.removeHandler(records)
    return " ".join(records.messages).lower()


def test_a_kohya_file_round_trips_through_peft_to_the_same_tensors_and_metadata(tmp_path):
    _, _, path = _kohya_file(tmp_path)
    peft = convert_adapter(path, tmp_path / "peft.safetensors", "peft")
    back = convert_adapter(peft.out, tmp_path / "back.safetensors", "kohya")
    original, returned = load_file(path), load_file(back.out)
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        if key.endswith(("alpha", "lora_down.weight")):
            assert torch.equal(returned[key], tensor), key  # copied, never computed
        else:  # lora_up × (alpha/rank) ÷ (alpha/rank): at most one rounding each way
            torch.testing.assert_close(returned[key], tensor, rtol=2 * FLOAT32_ULP, atol=0, msg=key)
    with safe_open(str(path), "pt") as first, safe_open(str(back.out), "pt") as second:
        before, after = first.metadata(), second.metadata()
    # the training metadata comes back; the hashes are recomputed (the rounded lora_up bytes changed)
    assert {key: value for key, value in before.items() if not key.startswith("sshs_")} == \
        {key: value for key, value in after.items() if not key.startswith("sshs_")}
    assert after["ss_num_epochs"] == "3" and "sshs_model_hash" in after
    assert peft.modules == back.modules and sum(peft.modules.values()) == len(original) // 3


@pytest.mark.parametrize(("algo", "network_module"), [("lora", "networks.lora"), ("locon", "lycoris.kohya")])
def test_the_peft_file_loads_in_diffusers_with_the_outputs_of_the_kohya_file_in_lycolab(algo, network_module,
                                                                                         tmp_path):
    from diffusers import StableDiffusionPipeline

    ours, _, path = _kohya_file(tmp_path, algo, network_module)
    converted = convert_adapter(path, tmp_path / "peft.safetensors", "diffusers")
    with safe_open(str(converted.out), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert all(key.startswith(("unet.", "text_encoder.")) and key.endswith(("lora_A.weight", "lora_B.weight"))
               for key in keys)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert json.loads(metadata[KOHYA_ALPHAS_KEY])["unet.down_blocks.0.resnets.0.conv1"] == 1.5
    parts = build_tiny_sd()
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    said = _diffusers_warnings(lambda: pipe.load_lora_weights(str(converted.out)))
    assert "unexpected" not in said and "missing" not in said and "not loaded" not in said, said
    _assert_same(_outputs(ours), _outputs(parts))


def test_a_lora_diffusers_saved_converts_to_kohya_or_loads_directly_with_the_same_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    trained = build_tiny_sd()
    # as diffusers' training scripts save: per-module ranks and alphas in the LoraConfig, rsLoRA on the encoder
    unet_config = LoraConfig(r=4, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                             rank_pattern={"conv1": 2}, alpha_pattern={"conv1": 5}, init_lora_weights=False)
    text_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             init_lora_weights=False)
    torch.manual_seed(0)
    trained.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, trained.text_encoder)  # transformers' add_adapter wants peft >= 0.22
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", safe_serialization=True,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    saved = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"
    report = convert_adapter(saved, tmp_path / "kohya.safetensors", "kohya")
    ours = build_tiny_sd()
    network = load_network(report.out, ours.unet, [ours.text_encoder])
    assert len(network.adapters) == sum(report.modules.values()) > 0
    conv = network.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.dim == 2 and float(conv.alpha) == 5.0
    _assert_same(_outputs(trained), _outputs(ours))
    # the diffusers file itself applies too, read in kohya's names in memory
    direct = build_tiny_sd()
    load_network(saved, direct.unet, [direct.text_encoder])
    _assert_same(_outputs(trained), _outputs(direct))


def test_an_sdxl_file_converts_to_diffusers_layout_loads_in_diffusers_and_comes_back_with_sgm_names(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours, _, path = _kohya_file(tmp_path, parts=build_tiny_sdxl())
    converted = convert_adapter(path, tmp_path / "peft.safetensors", "peft")
    assert converted.family == "sdxl" and set(converted.modules) == {"U-Net", "text encoder", "text encoder 2"}
    with safe_open(str(converted.out), "pt") as handle:
        keys = list(handle.keys())
    assert "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight" in keys  # lora_unet_input_blocks_4_1_proj_in
    parts = build_tiny_sdxl()
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                     text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                     tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler)
    said = _diffusers_warnings(lambda: pipe.load_lora_weights(str(converted.out)))
    assert "unexpected" not in said and "missing" not in said and "not loaded" not in said, said
    _assert_same(_sdxl_outputs(ours), _sdxl_outputs(parts))
    back = convert_adapter(converted.out, tmp_path / "back.safetensors", "kohya")
    assert back.family == "sdxl" and load_file(back.out).keys() == load_file(path).keys()


def test_every_layer_name_of_sd_and_sdxl_maps_to_its_diffusers_module_path(tmp_path):
    for parts, encoders in ((build_tiny_sd(), "text_encoder"), (build_tiny_sdxl(), "text_encoder text_encoder_2")):
        models = [getattr(parts, name) for name in encoders.split()]
        paths = {f"unet.{path}" for path, _ in parts.unet.named_modules()}
        for index, model in enumerate(models):
            component = "text_encoder" if index == 0 else "text_encoder_2"
            paths |= {f"{component}.{path}" for path, _ in canonical_named_modules(model)}  # with text_model
        for name in adaptable_layers(parts.unet, models):
            _, component, path = split_kohya_name(tmp_path, name)
            assert f"{component}.{path}" in paths, name
    assert dotted_path("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj") == \
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"


@pytest.mark.parametrize(("algo", "options", "refused"), [("loha", {}, "LoHa"), ("lokr", {"factor": 4}, "LoKr"),
                                                          ("lora", {"use_tucker": True}, "Tucker")])
def test_only_plain_lora_and_locon_convert_to_peft_and_others_are_refused_by_name(algo, options, refused, tmp_path):
    sd = build_tiny_sd()
    network = create_network(sd.unet, [sd.text_encoder], algo=algo, dim=4, alpha=2, conv_dim=2,
                             network_module="lycoris.kohya", **options)
    path = network.save_weights(tmp_path / f"{algo}.safetensors")
    with pytest.raises(AdapterFileError) as caught:
        convert_adapter(path, tmp_path / "peft.safetensors", "peft")
    assert refused in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "peft.safetensors").exists()


def test_a_file_already_in_the_asked_layout_or_an_unknown_layout_is_one_line(tmp_path):
    _, _, path = _kohya_file(tmp_path, conv_dim=0)
    with pytest.raises(ValueError, match="already in the kohya layout"):
        convert_adapter(path, tmp_path / "same.safetensors", "kohya")
    with pytest.raises(ValueError, match="choose one of kohya, peft, diffusers"):
        convert_adapter(path, tmp_path / "x.safetensors", "onnx")
