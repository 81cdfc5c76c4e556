import json

import pytest
import torch
from safetensors import safe_open

from lycolab.networks import AdapterFileError, create_network, load_network


def _unet_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 77, 32, generator=generator))


@torch.no_grad()
def _unet_output(unet):
    sample, timesteps, context = _unet_inputs()
    return unet(sample, timesteps, context).sample


def _randomize(network, seed=1, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def test_keys_use_kohya_names_for_unet_and_text_encoder(tiny_sd):
    network = create_network(tiny_sd.unet, [tiny_sd.text_encoder], algo="locon", dim=4, alpha=2, conv_dim=2)
    keys = set(network.state_dict())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # conv 3x3 (LoCon)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    conv = network.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert conv.lora_down.weight.shape[0] == 2 and conv.lora_down.kernel_size == (3, 3)


def test_lora_without_conv_dim_leaves_resnets_alone(tiny_sd):
    network = create_network(tiny_sd.unet, algo="lora", dim=4)
    assert not any("resnets" in name for name in network.state_dict())


def test_network_parameters_are_exactly_the_adapters(tiny_sd):
    unet_parameters = {id(p) for p in tiny_sd.unet.parameters()}
    network = create_network(tiny_sd.unet, [tiny_sd.text_encoder], algo="loha", dim=4)
    assert network.parameters() and not any(id(p) in unet_parameters for p in network.parameters())
    assert all(name.startswith(("lora_unet_", "lora_te_")) for name, _ in network.named_parameters())


@pytest.mark.parametrize("algo", ["lora", "locon", "loha"])
def test_fresh_adapter_leaves_output_unchanged(tiny_sd, algo):
    before = _unet_output(tiny_sd.unet)
    create_network(tiny_sd.unet, algo=algo, dim=4, alpha=2)
    assert torch.equal(_unet_output(tiny_sd.unet), before)


def test_loha_changes_output_and_saved_file_reloads_to_same_output(tiny_sd, tmp_path):
    from lycolab.models.tiny import build_tiny_sd

    base = _unet_output(tiny_sd.unet)
    network = create_network(tiny_sd.unet, [tiny_sd.text_encoder], algo="loha", dim=4, alpha=2, conv_dim=2,
                             conv_alpha=1)
    _randomize(network, std=0.3)
    adapted = _unet_output(tiny_sd.unet)
    assert (adapted - base).abs().max() > 1e-3
    path = network.save_weights(tmp_path / "loha.safetensors", dtype=torch.float32, metadata={"ss_note": "x"})
    fresh = build_tiny_sd(pretrained=False)  # the fixture's weights
    reloaded = load_network(path, fresh.unet, [fresh.text_encoder])
    assert reloaded.algo == "loha" and len(reloaded.adapters) == len(network.adapters)
    torch.testing.assert_close(_unet_output(fresh.unet), adapted, rtol=0, atol=1e-6)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        parameter_names = {key.split(".", 1)[1] for key in handle.keys()}
        assert {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} <= parameter_names
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert len(metadata["sshs_model_hash"]) == 64 and metadata["ss_note"] == "x"
    assert not list(tmp_path.glob(".*tmp")), "no temporary file may be left behind"


def test_lora_side_path_equals_merged_delta_weight(tiny_sd):
    network = create_network(tiny_sd.unet, algo="locon", dim=4, alpha=2, conv_dim=3, conv_alpha=3)
    _randomize(network)
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_down_blocks_0_resnets_0_conv1"):
        adapter = network.get_submodule(name)
        layer = adapter.org_module
        x = torch.randn(2, 32, 8, 8) if adapter.is_conv else torch.randn(2, 5, layer.in_features)
        expected = adapter.frozen_forward(x, layer.weight + adapter.delta_weight() * adapter.multiplier)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_loha_delta_weight_is_hadamard_of_two_low_rank_products(tiny_sd):
    network = create_network(tiny_sd.unet, algo="loha", dim=3, alpha=6)
    _randomize(network)
    adapter = network.get_submodule("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    expected = (adapter.hada_w1_a @ adapter.hada_w1_b) * (adapter.hada_w2_a @ adapter.hada_w2_b) * 2.0
    torch.testing.assert_close(adapter.delta_weight(), expected)


def test_multiplier_scales_the_effect_and_restore_undoes_it(tiny_sd):
    base = _unet_output(tiny_sd.unet)
    network = create_network(tiny_sd.unet, algo="lora", dim=4)
    _randomize(network)
    network.set_multiplier(0.0)
    torch.testing.assert_close(_unet_output(tiny_sd.unet), base)
    network.set_multiplier(1.0)
    assert not torch.allclose(_unet_output(tiny_sd.unet), base)
    network.restore()
    assert torch.equal(_unet_output(tiny_sd.unet), base)
    wrapped = [module for module in tiny_sd.unet.modules() if "forward" in vars(module)]
    assert not wrapped, "restore leaves no forward attribute on the layers: they run their class's own again"


def test_load_reports_unmatched_keys(tiny_sd, tmp_path, caplog):
    from safetensors.torch import save_file

    network = create_network(tiny_sd.unet, algo="lora", dim=2)
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 3)
    save_file(state, str(tmp_path / "extra.safetensors"))
    network.restore()
    load_network(tmp_path / "extra.safetensors", tiny_sd.unet)
    assert "1 module(s) match no layer" in caplog.text and "lora_unet_not_a_layer" in caplog.text


def test_pickled_and_broken_files_are_refused(tiny_sd, tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        load_network(tmp_path / "x.ckpt", tiny_sd.unet)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        load_network(tmp_path / "bad.safetensors", tiny_sd.unet)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_adapters_get_gradients_through_gradient_checkpointing(tiny_sd, algo):
    network = create_network(tiny_sd.unet, algo=algo, dim=4, conv_dim=2)
    tiny_sd.unet.requires_grad_(False)
    tiny_sd.unet.enable_gradient_checkpointing()
    tiny_sd.unet.train()
    _randomize(network)
    sample, timesteps, context = _unet_inputs()
    tiny_sd.unet(sample, timesteps, context).sample.square().mean().backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in tiny_sd.unet.parameters())


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_rank_and_module_dropout_act_only_in_training(tiny_sd, algo):
    network = create_network(tiny_sd.unet, algo=algo, dim=4, alpha=2, rank_dropout=0.5, module_dropout=0.0)
    _randomize(network, std=0.2)
    tiny_sd.unet.eval()
    network.eval()
    torch.manual_seed(0)
    evaluated = _unet_output(tiny_sd.unet)
    torch.testing.assert_close(_unet_output(tiny_sd.unet), evaluated)
    network.train()
    first, second = _unet_output(tiny_sd.unet), _unet_output(tiny_sd.unet)
    assert not torch.allclose(first, second) and not torch.allclose(first, evaluated)
    for adapter in network.adapters:
        adapter.rank_dropout, adapter.module_dropout = 0.0, 1.0  # every adapter skipped
    network.restore()
    base = _unet_output(tiny_sd.unet)
    network.apply_to()
    torch.testing.assert_close(_unet_output(tiny_sd.unet), base)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_bf16_autocast_training_step_matches_float32(tiny_sd, algo):
    network = create_network(tiny_sd.unet, algo=algo, dim=4, conv_dim=2)
    _randomize(network, std=0.1)
    sample, timesteps, context = _unet_inputs()

    def gradients(autocast: bool):
        network.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = tiny_sd.unet(sample, timesteps, context).sample
        output.float().square().mean().backward()
        return torch.cat([parameter.grad.flatten() for parameter in network.parameters()])

    reference, mixed = gradients(False), gradients(True)
    assert torch.isfinite(mixed).all()
    assert torch.nn.functional.cosine_similarity(reference, mixed, dim=0) > 0.98
