"""Whole networks on the tiny SD beside other tools: LyCORIS' merge of our files, diffusers' loader, sd-scripts'
file habits, merging, and files that do not fit."""

import logging

import pytest
import torch
from conftest import LibraryWarnings, randomize_parameters
from lycoris_interop import model_outputs, reference_from_file
from safetensors.torch import save_file

from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import AdapterFileError, create_network, load_network
from lycolab.networks.merge import merge_files, merge_network

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

ALGORITHMS = {"lora": {}, "loha": {}, "lokr": {"factor": 4}}
# The same modules, shapes and outputs as LyCORIS, both ways, for every algorithm: tests/test_algorithms_interop.py.


def _assert_same_outputs(first, second):
    for got, expected in zip(model_outputs(first), model_outputs(second), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_lycoris_merge_of_our_files_equals_our_merge(algo, tmp_path):
    # LyCORIS 4.1.3 multiplies LoHa/LoKr ΔW by alpha/dim twice when merging (not in its forward), so alpha = dim
    # here; LoRA has no such problem and keeps alpha = dim / 2.
    alphas = (2, 1) if algo == "lora" else (4, 2)
    ours_sd = build_tiny_sd()
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], algo=algo, dim=4, alpha=alphas[0], conv_dim=2,
                          conv_alpha=alphas[1], network_module="lycoris.kohya", **ALGORITHMS[algo])
    randomize_parameters(ours.parameters())
    path = ours.save_weights(tmp_path / f"{algo}.safetensors", dtype=torch.float32)
    merge_network(ours, 1.0)  # the reference's kohya merge_to always merges at 1
    reference_sd = build_tiny_sd()
    reference, weights = reference_from_file(path, reference_sd)
    reference.merge_to(reference_sd.text_encoder, reference_sd.unet, weights, torch.float32, "cpu")
    for model in ("unet", "text_encoder"):
        expected = getattr(reference_sd, model).state_dict()
        for name, parameter in getattr(ours_sd, model).state_dict().items():
            torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(("algo", "network_module", "conv_dim"),
                         [("lora", "networks.lora", 0), ("lora", "networks.lora", 2), ("locon", "lycoris.kohya", 2)])
def test_lora_and_locon_files_load_in_diffusers_without_leftover_keys(algo, network_module, conv_dim, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    ours_sd = build_tiny_sd()
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], algo=algo, dim=4, alpha=2, conv_dim=conv_dim,
                          conv_alpha=1, network_module=network_module)
    randomize_parameters(ours.parameters(), std=0.2)
    path = ours.save_weights(tmp_path / "lora.safetensors", dtype=torch.float32)
    pipe_sd = build_tiny_sd()
    pipe = StableDiffusionPipeline(vae=pipe_sd.vae, text_encoder=pipe_sd.text_encoder, tokenizer=pipe_sd.tokenizer,
                                   unet=pipe_sd.unet, scheduler=pipe_sd.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    # diffusers' loggers do not propagate to the root logger, so caplog would not see them: listen on them directly
    records = LibraryWarnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for library_logger in loggers:
        library_logger.addHandler(records)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        for library_logger in loggers:
            library_logger.removeHandler(records)
    text = " ".join(records.messages).lower()
    assert "unexpected" not in text and "not loaded" not in text and "missing" not in text, text
    _assert_same_outputs(ours_sd, pipe_sd)



def test_merging_files_at_ratios_adds_ratio_times_delta_weight(tmp_path):
    sd = build_tiny_sd()
    before = {name: value.clone() for name, value in sd.unet.state_dict().items()}
    files = []
    for index, algo in enumerate(("loha", "lora")):
        network = create_network(sd.unet, [sd.text_encoder], algo=algo, dim=3, alpha=1.5)
        randomize_parameters(network.parameters(), seed=index)
        files.append(network.save_weights(tmp_path / f"{algo}.safetensors", dtype=torch.float32))
        network.restore()
    expected_sd = build_tiny_sd()
    applied = [load_network(path, expected_sd.unet, [expected_sd.text_encoder], multiplier=ratio)
               for path, ratio in zip(files, (0.7, -0.3), strict=True)]
    assert merge_files(sd.unet, [sd.text_encoder], zip(files, (0.7, -0.3), strict=True)) == files
    _assert_same_outputs(sd, expected_sd)
    layer_name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    deltas = [network.get_submodule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
              .delta_weight() * network.adapters[0].multiplier for network in applied]
    torch.testing.assert_close(sd.unet.state_dict()[layer_name], before[layer_name] + deltas[0] + deltas[1],
                               rtol=1e-5, atol=1e-6)


def test_sd_scripts_files_with_linear_shaped_conv_loras_and_fp16_load(tmp_path):
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="lora", dim=2, alpha=1)
    randomize_parameters(network.parameters())
    expected = model_outputs(sd)[1]
    network.restore()
    # sd-scripts for SD 2 writes proj_in/proj_out (1x1 convs in SD 1) as 2-D Linear weights, in fp16.
    state = {key: (value.flatten(1) if value.dim() == 4 else value).half().contiguous()
             for key, value in network.state_dict().items()}
    save_file(state, str(tmp_path / "kohya.safetensors"), {"ss_network_module": "networks.lora"})
    loaded = load_network(tmp_path / "kohya.safetensors", sd.unet)
    assert loaded.network_module == "networks.lora" and loaded.algo == "lora"
    torch.testing.assert_close(model_outputs(sd)[1], expected, rtol=1e-2, atol=1e-3)


def test_modules_of_unknown_formats_are_reported_and_skipped(tmp_path, caplog):
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="lora", dim=2)
    state = dict(network.state_dict())
    network.restore()
    state["lora_unet_conv_in.lora_A.weight"] = torch.zeros(2, 4, 3, 3)  # a PEFT-layout module under a kohya name
    state["lora_unet_conv_out.mystery"] = torch.zeros(4)
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level(logging.WARNING):
        loaded = load_network(tmp_path / "mixed.safetensors", sd.unet)
    loaded.restore()
    assert len(loaded.adapters) == len(network.adapters)
    assert "1 module(s) use peft/diffusers-format lora" in caplog.text
    assert "1 module(s) hold no tensors of a known algorithm (mystery)" in caplog.text


def test_dora_files_load_with_their_weight_decomposition(tmp_path):
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="lora", dim=2)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    network.restore()
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state[f"{name}.dora_scale"] = torch.full((32, 1, 1, 1), 0.5)
    save_file(state, str(tmp_path / "dora.safetensors"))
    loaded = {adapter.lora_name: adapter for adapter in load_network(tmp_path / "dora.safetensors", sd.unet).adapters}
    assert loaded[name].dora and loaded[name].dora_on_output
    assert torch.equal(loaded[name].dora_scale, state[f"{name}.dora_scale"])
    assert not any(adapter.dora for key, adapter in loaded.items() if key != name)


def test_adapter_for_another_model_gives_a_one_line_shape_error(tmp_path):
    sd = build_tiny_sd()
    network = create_network(sd.unet, algo="loha", dim=2)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    network.restore()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.hada_w1_b"
    state[key] = torch.zeros(2, 48)  # cross-attention width of another model
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(AdapterFileError, match="another base model") as error:
        load_network(tmp_path / "other.safetensors", sd.unet)
    assert "\n" not in str(error.value)
