"""Whole networks on the tiny SDXL: sd-scripts' original-layout (SGM) U-Net names and lora_te1/lora_te2, the same
layers as the LyCORIS package, files that load both ways (ours in LyCORIS, LyCORIS' diffusers-layout ones in ours)
and in diffusers' StableDiffusionXLPipeline."""

import functools
import logging
import warnings

import pytest
import torch
from conftest import LibraryWarnings, assert_same_delta_weights, randomize_parameters
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from torch import nn

from lycolab.models.tiny import TINY_MAX_TOKENS
from lycolab.models.tiny_sdxl import build_tiny_sdxl
from lycolab.networks import create_network, load_network
from lycolab.networks.naming import sgm_paths

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# sd-scripts + LyCORIS on SDXL: the block classes of its original-layout U-Net, no name targets (LyCORIS' conv_in /
# conv_out / time_embedding names match nothing there).
SDXL_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}
ALGORITHMS = {"lora": {}, "locon": {}, "loha": {}, "lokr": {"factor": 4}}
DIFFUSERS_LAYOUT = ("down_blocks", "up_blocks", "mid_block")
TRANSFORMER_BLOCK_LINEARS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                             "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2")
CLIP_LAYER_LINEARS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                      "mlp_fc2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads, and on shared cores busy-waiting threads make each
    forward seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_lycoris_preset():
    """apply_preset sets class attributes: leave LyCORIS' defaults as they were for other test modules."""
    names = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
             "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")
    saved = {name: getattr(LycorisNetworkKohya, name) for name in names}
    yield
    for name, value in saved.items():
        setattr(LycorisNetworkKohya, name, value)


class TextModel(nn.Module):
    """transformers 5 dropped CLIPTextModel.text_model; the reference names modules from the attribute path
    (CLIPTextModelWithProjection still has it)."""

    def __init__(self, encoder):
        super().__init__()
        self.text_model = encoder


def _reference_text_encoders(parts):
    return [TextModel(parts.text_encoder), parts.text_encoder_2]


def _sgm_alias(unet):
    """A module tree whose ``named_modules()`` are sd-scripts' original-layout paths and whose leaves are the very
    Linear/Conv2d objects of the diffusers U-Net: LyCORIS wraps them in place, so the diffusers U-Net runs its
    adapters."""
    root = nn.Module()
    for path, sgm_path in sgm_paths(unet).items():
        module = unet.get_submodule(path)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        *parents, leaf = sgm_path.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.add_module(leaf, module)
    return root


def _ours(parts, algo, network_module="lycoris.kohya", conv_dim=2, **options):
    return create_network(parts.unet, [parts.text_encoder, parts.text_encoder_2], algo=algo, dim=4, alpha=2,
                          conv_dim=conv_dim, conv_alpha=1, network_module=network_module, **options)


def _reference_network(parts, algo, **options):
    """LyCORIS built on the diffusers U-Net, as a diffusers-based trainer would: diffusers-layout names."""
    LycorisNetworkKohya.apply_preset(SDXL_PRESET)
    network = LycorisNetworkKohya(_reference_text_encoders(parts), parts.unet, multiplier=1.0, lora_dim=4,
                                  conv_lora_dim=2, alpha=2, conv_alpha=1, network_module=algo,
                                  **options)
    network.apply_to(None, None, True, True)
    return network



@torch.no_grad()
def _outputs(parts):
    """Both encoders' hidden states, the pooled projection, and the U-Net's prediction conditioned on them."""
    generator = torch.Generator().manual_seed(0)
    config = parts.text_encoder.config
    ids = torch.randint(0, config.vocab_size - 2, (2, TINY_MAX_TOKENS), generator=generator)
    ids[:, -1] = config.eos_token_id
    hidden = parts.text_encoder(ids).last_hidden_state
    second = parts.text_encoder_2(ids)
    context = torch.cat([hidden, second.last_hidden_state], dim=-1)
    assert context.shape[-1] == parts.unet.config.cross_attention_dim
    assert second.text_embeds.shape[-1] == parts.text_encoder_2.config.projection_dim
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
    prediction = parts.unet(sample, torch.tensor([10, 700]), context,
                            added_cond_kwargs={"text_embeds": second.text_embeds, "time_ids": time_ids}).sample
    return hidden, second.last_hidden_state, second.text_embeds, prediction


@functools.cache
def _plain_outputs():
    return _outputs(build_tiny_sdxl())


def _assert_same_outputs(first, second):
    """Same outputs of both models, and not those of the model without adapters (so the adapters took effect)."""
    got_outputs = _outputs(first)
    for got, expected in zip(got_outputs, _outputs(second), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # both encoders' hidden states and the U-Net's prediction (the pooled projection follows the second encoder)
    for index in (0, 1, 3):
        assert not torch.allclose(got_outputs[index], _plain_outputs()[index], rtol=1e-3, atol=1e-4), index


def _sgm_names_of_diffusers_names(unet):
    return {f"lora_unet_{path}".replace(".", "_"): f"lora_unet_{sgm}".replace(".", "_")
            for path, sgm in sgm_paths(unet).items()}


def _expected_unet_names(config, conv_dim, network_module):
    """The U-Net module names sd-scripts gives this architecture, from the config alone: its original-layout block
    numbering, 10 linears per transformer block plus proj_in/proj_out per Transformer2DModel; with a conv rank
    (or LyCORIS' preset, whose ResnetBlock2D linears and 1x1 convs need none) ResNet layers and the samplers."""
    channels, per_block = config.block_out_channels, config.layers_per_block
    depths = config.transformer_layers_per_block
    count = len(channels)
    with_kxk = conv_dim > 0
    with_resnets = with_kxk or network_module == "lycoris.kohya"
    names = set()

    def attention(prefix, depth):
        names.update({f"{prefix}_proj_in", f"{prefix}_proj_out"})
        names.update(f"{prefix}_transformer_blocks_{index}_{linear}" for index in range(depth)
                     for linear in TRANSFORMER_BLOCK_LINEARS)

    def resnet(prefix, in_channels, out_channels):
        if with_resnets:
            names.add(f"{prefix}_emb_layers_1")
            if in_channels != out_channels:
                names.add(f"{prefix}_skip_connection")
        if with_kxk:
            names.update({f"{prefix}_in_layers_2", f"{prefix}_out_layers_3"})

    width, skips = channels[0], [channels[0]]
    for block, block_type in enumerate(config.down_block_types):
        for layer in range(per_block):
            index = 1 + block * (per_block + 1) + layer
            resnet(f"lora_unet_input_blocks_{index}_0", width, channels[block])
            width = channels[block]
            skips.append(width)
            if "CrossAttn" in block_type:
                attention(f"lora_unet_input_blocks_{index}_1", depths[block])
        if block < count - 1:
            if with_kxk:
                names.add(f"lora_unet_input_blocks_{(block + 1) * (per_block + 1)}_0_op")
            skips.append(width)
    resnet("lora_unet_middle_block_0", width, width)
    attention("lora_unet_middle_block_1", depths[-1])
    resnet("lora_unet_middle_block_2", width, width)
    for block, block_type in enumerate(config.up_block_types):
        out_channels = channels[count - 1 - block]
        for layer in range(per_block + 1):
            index = block * (per_block + 1) + layer
            in_channels = width + skips.pop()
            resnet(f"lora_unet_output_blocks_{index}_0", in_channels, out_channels)
            width = out_channels
            if "CrossAttn" in block_type:
                attention(f"lora_unet_output_blocks_{index}_1", depths[count - 1 - block])
        if block < count - 1 and with_kxk:
            position = 2 if "CrossAttn" in block_type else 1
            names.add(f"lora_unet_output_blocks_{block * (per_block + 1) + per_block}_{position}_conv")
    assert not skips
    return names


def _expected_text_names(prefix, encoder):
    return {f"{prefix}_text_model_encoder_layers_{layer}_{linear}" for layer in range(encoder.config.num_hidden_layers)
            for linear in CLIP_LAYER_LINEARS}


# networks.lora without conv_dim leaves the ResNet blocks out; an explicit conv_dim (even 0) brings their Linear and
# 1x1 layers in, as sd-scripts does (tests/test_block_wise.py compares with its code)
@pytest.mark.parametrize(("network_module", "conv_dim"),
                         [("networks.lora", None), ("networks.lora", 2), ("lycoris.kohya", 0), ("lycoris.kohya", 2)])
def test_sdxl_network_names_layers_as_sd_scripts_does(network_module, conv_dim):
    parts = build_tiny_sdxl()
    network = _ours(parts, "lora", network_module=network_module, conv_dim=conv_dim)
    names = {adapter.lora_name for adapter in network.adapters}
    assert len(names) == len(network.adapters)
    unet_names = {name for name in names if name.startswith("lora_unet_")}
    assert not [name for name in unet_names if any(part in name for part in DIFFUSERS_LAYOUT)]
    assert all(name.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for name in names)
    assert unet_names == _expected_unet_names(parts.unet.config, conv_dim or 0, network_module)
    assert {name for name in names if name.startswith("lora_te1_")} == _expected_text_names("lora_te1",
                                                                                            parts.text_encoder)
    assert {name for name in names if name.startswith("lora_te2_")} == _expected_text_names("lora_te2",
                                                                                            parts.text_encoder_2)
    # the file's keys are those names, with the rank of each layer kind
    state = network.state_dict()
    assert {key.partition(".")[0] for key in state} == names
    assert state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    if conv_dim:
        assert state["lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight"].shape[:2] == (2, 64 + 64)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_sdxl_network_wraps_the_layers_lycoris_wraps_on_the_diffusers_unet(algo):
    ours = _ours(build_tiny_sdxl(), algo, **ALGORITHMS[algo])
    reference_parts = build_tiny_sdxl()
    reference = _reference_network(reference_parts, algo, **ALGORITHMS[algo])
    renamed = _sgm_names_of_diffusers_names(reference_parts.unet)
    reference_shapes = {}
    for key, value in reference.state_dict().items():
        module_name, _, parameter = key.partition(".")
        reference_shapes[f"{renamed.get(module_name, module_name)}.{parameter}"] = tuple(value.shape)
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == reference_shapes


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sdxl_file_we_save_loads_in_lycoris_with_the_same_effect(algo, tmp_path):
    ours_parts = build_tiny_sdxl()
    ours = _ours(ours_parts, algo, **ALGORITHMS[algo])
    randomize_parameters(ours.parameters())
    path = ours.save_weights(tmp_path / f"{algo}.safetensors", dtype=torch.float32)
    reference_parts = build_tiny_sdxl()
    LycorisNetworkKohya.apply_preset(SDXL_PRESET)
    reference, _ = create_network_from_weights(1.0, str(path), None, _reference_text_encoders(reference_parts),
                                               _sgm_alias(reference_parts.unet))
    reference.apply_to(None, None, True, True)
    assert sorted(module.lora_name for module in reference.loras) == sorted(a.lora_name for a in ours.adapters)
    assert {key.partition("_")[2].partition("_")[0] for key in reference.state_dict()} == {"unet", "te1", "te2"}
    _assert_same_outputs(ours_parts, reference_parts)
    # The merged weight W + ΔW of every layer is the same (ΔW as the reference's forward applies it).
    assert_same_delta_weights(ours.adapters, reference.loras, lora_like=algo in ("lora", "locon"))


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_sdxl_file_lycoris_saves_for_a_diffusers_unet_loads_in_ours_with_the_same_effect(algo, tmp_path):
    reference_parts = build_tiny_sdxl()
    reference = _reference_network(reference_parts, algo, **ALGORITHMS[algo])
    randomize_parameters(reference.parameters())
    path = tmp_path / f"reference_{algo}.safetensors"
    reference.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    module_names = {module.lora_name for module in reference.loras}
    assert any(name.startswith("lora_unet_down_blocks_") for name in module_names)
    assert any(name.startswith("lora_unet_mid_block_") for name in module_names)
    assert any(name.startswith("lora_unet_up_blocks_") for name in module_names)
    ours_parts = build_tiny_sdxl()
    ours = load_network(path, ours_parts.unet, [ours_parts.text_encoder, ours_parts.text_encoder_2])
    assert len(ours.adapters) == len(reference.loras)
    assert {adapter.lora_name for adapter in ours.adapters} == module_names
    assert {adapter.algo for adapter in ours.adapters} == {algo}
    _assert_same_outputs(ours_parts, reference_parts)


@pytest.mark.parametrize(("algo", "network_module", "conv_dim"),
                         [("lora", "networks.lora", 0), ("lora", "networks.lora", 2), ("locon", "lycoris.kohya", 2)])
def test_sdxl_lora_and_locon_files_load_in_diffusers_without_leftover_keys(algo, network_module, conv_dim, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    ours_parts = build_tiny_sdxl()
    ours = _ours(ours_parts, algo, network_module=network_module, conv_dim=conv_dim)
    randomize_parameters(ours.parameters(), std=0.2)
    path = ours.save_weights(tmp_path / "lora.safetensors", dtype=torch.float32)
    pipe_parts = build_tiny_sdxl()
    pipe = StableDiffusionXLPipeline(vae=pipe_parts.vae, text_encoder=pipe_parts.text_encoder,
                                     text_encoder_2=pipe_parts.text_encoder_2, tokenizer=pipe_parts.tokenizer,
                                     tokenizer_2=pipe_parts.tokenizer_2, unet=pipe_parts.unet,
                                     scheduler=pipe_parts.scheduler)
    records = LibraryWarnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    messages = "\n".join(records.messages + [str(warning.message) for warning in caught]).lower()
    for word in ("unexpected", "missing", "not loaded", "not been correctly renamed"):
        assert word not in messages, messages
    for model, prefix in ((pipe_parts.unet, "lora_unet_"), (pipe_parts.text_encoder, "lora_te1_"),
                          (pipe_parts.text_encoder_2, "lora_te2_")):
        adapted = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
        assert len(adapted) == len([a for a in ours.adapters if a.lora_name.startswith(prefix)]), prefix
    _assert_same_outputs(ours_parts, pipe_parts)
