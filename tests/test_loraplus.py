"""LoRA+ (``loraplus_*lr_ratio``): the optimizer groups equal sd-scripts' ``networks.lora`` and LyCORIS 4.1.3's
``prepare_optimizer_params`` on the tiny SD — the same parameters in each group at the same lr (the ``lora_up``
weights apart at lr × ratio; LyCORIS' other algorithms have no such weights) — and the keys stay in the metadata."""

from __future__ import annotations

import json
import logging

import pytest
from lycoris_interop import AlgorithmCase, TextModel, reference_network
from test_block_wise import our_groups, sd_scripts  # noqa: F401  (fixture)
from test_block_wise import reference_network as sd_scripts_network

import lycolab.networks.algorithms.lora  # noqa: F401  (the algorithm registry's package, imported first)
from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network
from lycolab.networks.args import NetworkArgsError, network_kwargs

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
RATIOS = {
    "one-ratio": {"loraplus_lr_ratio": "16"},
    "per-part": {"loraplus_lr_ratio": "4", "loraplus_unet_lr_ratio": "8", "loraplus_text_encoder_lr_ratio": "2"},
    "unet-only": {"loraplus_unet_lr_ratio": "16"},
    "zero-means-unset": {"loraplus_lr_ratio": "3", "loraplus_text_encoder_lr_ratio": "0"},
}
LEARNING_RATES = [(None, 1e-3, 2e-3), (5e-4, None, 1e-3), (0.0, 1e-3, 1e-3)]


def _reference_groups(network, loras, text_encoder_lr, unet_lr, default_lr):
    """LyCORIS' or sd-scripts' groups as description → (lr, "lora_name.parameter" set)."""
    names = {id(param): f"{module.lora_name}.{name}" for module in loras for name, param in module.named_parameters()}
    groups, descriptions = network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    return {description: (group["lr"], {names[id(param)] for param in group["params"]})
            for group, description in zip(groups, descriptions, strict=True)}


def _ratios(args: dict[str, str]) -> list[float | None]:
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    return [float(args[key]) if key in args else None for key in keys]


@pytest.mark.parametrize("ratios", RATIOS, ids=list(RATIOS))
def test_groups_equal_sd_scripts_networks_lora(sd_scripts, ratios):  # noqa: F811
    lora, _ = sd_scripts
    args = {"conv_dim": "2", **RATIOS[ratios]}
    reference_sd, ours_sd = build_tiny_sd(pretrained=False), build_tiny_sd(pretrained=False)
    reference = sd_scripts_network(lora, TextModel(reference_sd.text_encoder), reference_sd.unet, 4, 2.0, **args)
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], **network_kwargs("networks.lora", 4, 2.0, args))
    for lrs in LEARNING_RATES:
        expected = _reference_groups(reference, reference.text_encoder_loras + reference.unet_loras, *lrs)
        assert our_groups(ours, *lrs) == expected
    assert "unet plus" in expected


def test_groups_with_block_weights_equal_sd_scripts(sd_scripts):  # noqa: F811
    lora, _ = sd_scripts
    args = {"down_lr_weight": "sine", "up_lr_weight": "1,0,2", "loraplus_lr_ratio": "8"}
    reference_sd, ours_sd = build_tiny_sd(pretrained=False), build_tiny_sd(pretrained=False)
    reference = sd_scripts_network(lora, TextModel(reference_sd.text_encoder), reference_sd.unet, 4, 2.0, **args)
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], **network_kwargs("networks.lora", 4, 2.0, args))
    expected = _reference_groups(reference, reference.text_encoder_loras + reference.unet_loras, None, 1e-3, 1e-3)
    assert our_groups(ours, None, 1e-3, 1e-3) == expected
    assert "unet_block13 plus" in expected


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("ratios", ["one-ratio", "per-part"])
def test_groups_equal_lycoris(algo, ratios):
    args = {"algo": algo, "conv_dim": "2", "conv_alpha": "1", "train_norm": "true", **RATIOS[ratios]}
    reference_sd, ours_sd = build_tiny_sd(pretrained=False), build_tiny_sd(pretrained=False)
    reference = reference_network(reference_sd, AlgorithmCase(id=algo, algo=algo, reference_options={
        "train_norm": True}))
    reference.set_loraplus_lr_ratio(*_ratios(args))
    ours = create_network(ours_sd.unet, [ours_sd.text_encoder], **network_kwargs("lycoris.kohya", 4, 2.0, args))
    for lrs in LEARNING_RATES:
        assert our_groups(ours, *lrs) == _reference_groups(reference, reference.loras, *lrs)
    has_plus = any(name.endswith("plus") for name in our_groups(ours, None, 1e-3, 1e-3))
    assert has_plus == (algo == "locon")  # only lora_up counts in LyCORIS 4.1.3


@pytest.mark.parametrize("network_module", ["networks.lora", "lycoris.kohya"])
def test_loraplus_keys_stay_in_the_metadata_and_rebuild(network_module):
    sd = build_tiny_sd(pretrained=False)
    args = RATIOS["per-part"]
    ours = create_network(sd.unet, [sd.text_encoder], **network_kwargs(network_module, 4, 2.0, args))
    metadata = ours.network_metadata()
    ours.restore()
    saved = json.loads(metadata["ss_network_args"])
    assert {key: float(saved[key]) for key in args} == {key: float(value) for key, value in args.items()}
    rebuilt = create_network(sd.unet, [sd.text_encoder], **network_kwargs(network_module, 4, 2.0, saved))
    assert our_groups(rebuilt, None, 1e-3, 1e-3) == our_groups(ours, None, 1e-3, 1e-3)


@pytest.mark.parametrize("value", ["fast", "-2", "inf"])
def test_bad_ratio_is_a_one_line_error_naming_the_key(value):
    with pytest.raises(NetworkArgsError) as error:
        network_kwargs("networks.lora", 4, 1.0, {"loraplus_unet_lr_ratio": value})
    assert "loraplus_unet_lr_ratio" in str(error.value) and "\n" not in str(error.value)
