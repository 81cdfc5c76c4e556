"""kohya's block-wise ranks and learning rates against sd-scripts' own ``networks/lora.py``.

sd-scripts' ``networks/lora.py`` and its SDXL U-Net are extracted from the bare mirror and imported, as
``scripts/sd_scripts_sdxl_names.py`` does (``library.utils`` stubbed); its ``create_network`` then builds the
reference on the same tiny SD (SD 1.x: the diffusers U-Net has sd-scripts' class and module names), or on its own
SDXL U-Net built on the meta device beside a meta diffusers SDXL for ours. Skipped where the mirror is absent.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from lycoris_interop import TextModel

import lycolab.networks.algorithms.lora  # noqa: F401  (the algorithm registry's package, imported first)
from lycolab.config import ConfigError, load_config
from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network
from lycolab.networks.args import NetworkArgsError, network_kwargs
from lycolab.networks.block_weights import SD_BLOCKS, SDXL_BLOCKS, block_index, lr_weights, parse_block_wise

MIRROR = Path("/work/.mirror/kohya-ss+sd-scripts/repo")
SOURCES = ("library/__init__.py", "library/sdxl_original_unet.py", "networks/lora.py")


@pytest.fixture(scope="session")
def sd_scripts(tmp_path_factory):
    """(networks.lora, library.sdxl_original_unet) of sd-scripts' HEAD, imported from a temporary folder."""
    if not MIRROR.is_dir():
        pytest.skip("no sd-scripts mirror here")
    folder = tmp_path_factory.mktemp("sd_scripts")
    for source in SOURCES:
        target = folder / source
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(subprocess.run(["git", f"--git-dir={MIRROR}", "show", f"HEAD:{source}"], check=True,
                                         capture_output=True, text=True).stdout, encoding="utf-8")
    (folder / "networks" / "__init__.py").touch()
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in ("library", "networks")}
    stub = types.ModuleType("library.utils")
    stub.setup_logging = lambda *args, **kwargs: None
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module("library")
        sys.modules["library.utils"] = stub
        unet_module = importlib.import_module("library.sdxl_original_unet")
        lora = importlib.import_module("networks.lora")
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.split(".")[0] in ("library", "networks")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return lora, unet_module


def reference_network(lora, text_encoders, unet, dim, alpha, **args):
    """sd-scripts' create_network with string network_args, applied (its modules drop their layer reference then);
    its class list is restored, as it extends it in place."""
    targets = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
    try:
        network = lora.create_network(1.0, dim, alpha, None, text_encoders, unet, **args)
    finally:
        lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = targets
    network.apply_to(text_encoders, unet, bool(text_encoders), True)
    return network


def reference_ranks(network) -> dict[str, tuple[int, float]]:
    return {module.lora_name: (module.lora_dim, float(module.alpha)) for module in
            network.text_encoder_loras + network.unet_loras}


def our_ranks(network) -> dict[str, tuple[int, float]]:
    return {adapter.lora_name: (adapter.dim, float(adapter.alpha)) for adapter in network.adapters}


def reference_groups(network, text_encoder_lr, unet_lr, default_lr) -> dict[str, tuple[float, set[str]]]:
    """sd-scripts' optimizer groups: description → (lr, the parameters as "lora_name.parameter")."""
    names = {id(param): f"{module.lora_name}.{name}" for module in network.text_encoder_loras + network.unet_loras
             for name, param in module.named_parameters()}
    groups, descriptions = network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    return {description: (group["lr"], {names[id(param)] for param in group["params"]})
            for group, description in zip(groups, descriptions, strict=True)}


def our_groups(network, text_encoder_lr, unet_lr, default_lr) -> dict[str, tuple[float, set[str]]]:
    names = {id(param): f"{module.lora_name}.{name}" for module in network.modules_applied
             for name, param in module.named_parameters()}
    groups = network.parameter_groups(unet_lr, text_encoder_lr, default_lr)
    assert len({group["name"] for group in groups}) == len(groups)
    return {group["name"]: (group["lr"], {names[id(param)] for param in group["params"]}) for group in groups}


def _ours(sd, args: dict[str, str], dim=4, alpha=2.0):
    kwargs = network_kwargs("networks.lora", dim, alpha, args)
    return create_network(sd.unet, [sd.text_encoder], **kwargs)


def _csv(values) -> str:
    return ",".join(str(value) for value in values)


SD_CASES = {
    "dims-alphas": {"block_dims": _csv([0, 2, 3, 0, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 3]),
                    "block_alphas": _csv([1.0 + i / 4 for i in range(SD_BLOCKS)])},
    "conv-blocks": {"block_dims": _csv([4] * SD_BLOCKS), "conv_block_dims": _csv([i % 4 for i in range(SD_BLOCKS)]),
                    "conv_block_alphas": _csv([0.5] * SD_BLOCKS)},
    "conv-dim": {"block_dims": _csv([3] * SD_BLOCKS), "conv_dim": "2"},
    "lr-weights": {"down_lr_weight": "sine+0.25", "mid_lr_weight": "0", "up_lr_weight": "0,0.5,,1,2",
                   "conv_dim": "2", "conv_alpha": "1"},
    "lr-threshold": {"down_lr_weight": "cosine", "up_lr_weight": "reverse_linear", "block_lr_zero_threshold": "0.4"},
    "zeros-plus": {"down_lr_weight": "zeros+0.5", "up_lr_weight": "linear"},
    "long-lists": {"down_lr_weight": _csv([0.5] * 14), "up_lr_weight": _csv([2] * 13), "mid_lr_weight": "3,4"},
}


@pytest.mark.parametrize("case", SD_CASES, ids=list(SD_CASES))
def test_ranks_and_groups_equal_sd_scripts_on_the_tiny_sd(sd_scripts, case):
    lora, _ = sd_scripts
    args = SD_CASES[case]
    reference_sd, ours_sd = build_tiny_sd(pretrained=False), build_tiny_sd(pretrained=False)
    reference = reference_network(lora, TextModel(reference_sd.text_encoder), reference_sd.unet, 4, 2.0, **args)
    ours = _ours(ours_sd, args)
    assert our_ranks(ours) == reference_ranks(reference)
    for lrs in ((None, 1e-3, 2e-3), (5e-4, None, 1e-3), (0.0, 1e-3, 1e-3)):
        assert our_groups(ours, *lrs) == reference_groups(reference, *lrs)


@pytest.fixture(scope="module")
def sdxl_unets(sd_scripts):
    """(sd-scripts' SDXL U-Net, a diffusers SDXL U-Net), both the real size on the meta device."""
    from diffusers import UNet2DConditionModel
    from test_sdxl_names import SDXL_UNET_CONFIG

    _, unet_module = sd_scripts
    with torch.device("meta"):
        return unet_module.SdxlUNet2DConditionModel(), UNet2DConditionModel(**SDXL_UNET_CONFIG)


SDXL_CASES = {
    "dims": {"block_dims": _csv([(i * 7) % 5 for i in range(SDXL_BLOCKS)]),
             "block_alphas": _csv([i / 2 for i in range(SDXL_BLOCKS)]), "conv_dim": "3"},
    "lr-weights": {"down_lr_weight": "0,1,2,,1,1,0.5,1", "mid_lr_weight": "1,0,1", "up_lr_weight": "sine",
                   "conv_block_dims": _csv([2] * SDXL_BLOCKS)},
}


@pytest.mark.parametrize("case", SDXL_CASES, ids=list(SDXL_CASES))
def test_ranks_and_groups_equal_sd_scripts_on_sdxl(sd_scripts, sdxl_unets, case):
    lora, _ = sd_scripts
    reference_unet, diffusers_unet = sdxl_unets
    args = SDXL_CASES[case]
    reference = reference_network(lora, [], reference_unet, 4, 2.0, **args)
    ours = create_network(diffusers_unet, [], **network_kwargs("networks.lora", 4, 2.0, args))
    ours.restore()
    assert our_ranks(ours) == reference_ranks(reference)
    assert our_groups(ours, None, 1e-3, 2e-3) == reference_groups(reference, None, 1e-3, 2e-3)


def test_block_index_equals_sd_scripts(sd_scripts, sdxl_unets):
    lora, _ = sd_scripts
    sd = build_tiny_sd(pretrained=False)
    network = create_network(sd.unet, [], dim=2, conv_dim=2)
    names = [adapter.lora_name for adapter in network.adapters]
    assert [block_index(name, False) for name in names] == [lora.get_block_index(name, False) for name in names]
    sdxl = create_network(sdxl_unets[1], [], dim=2, conv_dim=2)
    sdxl.restore()
    names = [adapter.lora_name for adapter in sdxl.adapters]
    assert {block_index(name, True) for name in names} == set(range(2, 22))  # 1 is conv_in, not adapted
    assert [block_index(name, True) for name in names] == [lora.get_block_index(name, True) for name in names]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("weights", [
    {"down_lr_weight": "sine+0.5"}, {"up_lr_weight": "cosine", "mid_lr_weight": "2"},
    {"down_lr_weight": "linear", "up_lr_weight": "reverse_linear+1", "block_lr_zero_threshold": "0.3"},
    {"down_lr_weight": "zeros", "mid_lr_weight": "0.5,0.25", "up_lr_weight": "1,2,3"},
], ids=["sine-base", "cosine-mid", "linear-threshold", "zeros-short"])
def test_lr_weights_equal_sd_scripts(sd_scripts, sdxl, weights):
    lora, _ = sd_scripts
    expected = lora.parse_block_lr_kwargs(sdxl, dict(weights))
    assert lr_weights(parse_block_wise(weights), sdxl) == pytest.approx(expected, rel=0, abs=1e-15)


@pytest.mark.parametrize(("args", "message"), [
    ({"block_dims": "4,4"}, "block_dims must have 25 (SD 1.x/2.x) or 23 (SDXL) numbers"),
    ({"block_dims": ",".join(["4.5"] * 25)}, "block_dims must be comma-separated whole numbers"),
    ({"block_alphas": ",".join(["x"] * 25)}, "block_alphas must be comma-separated numbers"),
    ({"conv_block_dims": ",".join(["-1"] * 25)}, "conv_block_dims must hold finite numbers >= 0"),
    ({"down_lr_weight": "2"}, "down_lr_weight must be comma-separated numbers (one per block) or one of cosine"),
    ({"up_lr_weight": "sine+x"}, "up_lr_weight must be comma-separated numbers"),
    ({"mid_lr_weight": "nan"}, "mid_lr_weight must hold finite numbers"),
    ({"block_lr_zero_threshold": "0.1,0.2"}, "block_lr_zero_threshold must be one number"),
])
def test_bad_block_values_are_one_line_errors_naming_the_key(args, message):
    with pytest.raises(NetworkArgsError) as error:
        network_kwargs("networks.lora", 4, 1.0, args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_block_count_is_checked_for_the_family():
    sd = build_tiny_sd(pretrained=False)
    with pytest.raises(ValueError, match="block_dims must have 25 \\(SD 1.x/2.x\\) numbers, one per U-Net block"):
        _ours(sd, {"block_dims": _csv([2] * SDXL_BLOCKS)})


def test_block_wise_network_args_rebuild_the_same_network():
    sd = build_tiny_sd(pretrained=False)
    args = {**SD_CASES["dims-alphas"], "up_lr_weight": "sine+0.5", "block_lr_zero_threshold": "0.6"}
    ours = _ours(sd, args)
    metadata = ours.network_metadata()
    ours.restore()
    saved = json.loads(metadata["ss_network_args"])
    assert {key: saved[key] for key in args} == {**args, "block_alphas": _csv(
        [repr(1.0 + i / 4) for i in range(SD_BLOCKS)]), "block_lr_zero_threshold": "0.6"}
    rebuilt = _ours(sd, saved)
    assert our_ranks(rebuilt) == our_ranks(ours)
    assert our_groups(rebuilt, None, 1e-3, 1e-3) == our_groups(ours, None, 1e-3, 1e-3)


def test_block_wise_config_validates_and_trains_a_step(tiny_model_dir, tmp_path):
    from conftest import make_shapes_dataset

    from lycolab.training import train

    make_shapes_dataset(tmp_path / "train")
    args = ["block_dims=" + _csv([0] + [2] * 11 + [4] + [3] * 12), "conv_dim=2", "down_lr_weight=sine",
            "up_lr_weight=0,0,0,1", "loraplus_unet_lr_ratio=4"]
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "network_module": "networks.lora", "network_args": args, "network_dim": 4,
        "network_alpha": 2, "learning_rate": 1e-3, "max_train_steps": 1, "train_batch_size": 1, "seed": 0,
        "output_dir": str(tmp_path / "out"), "output_name": "blocks", "save_precision": "float",
        "network_train_unet_only": True})
    result = train(config, progress=False)
    tensors, metadata = _read(result.saved_files[-1])
    assert json.loads(metadata["ss_network_args"])["down_lr_weight"] == "sine"
    up_block_13 = [key for key in tensors if "up_blocks_0_resnets_0" in key]
    assert not up_block_13  # up weight 0 for block 13: not trained, not saved
    assert all(math.isfinite(float(value.abs().sum())) for value in tensors.values())


def test_bad_block_config_names_the_key(tmp_path):
    from test_config import _dataset_file, _write_toml

    path = _write_toml(tmp_path / "c.toml", {"training_arguments": {"output_dir": "o",
                                                                     "network_args": ["mid_lr_weight=a"]}})
    with pytest.raises(ConfigError, match="mid_lr_weight must be comma-separated numbers"):
        load_config(path, _dataset_file(tmp_path))


def _read(path):
    from lycolab.networks.io import read_adapter_file

    return read_adapter_file(path)
