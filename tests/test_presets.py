"""LyCORIS presets, preset files and ``train_norm`` against lycoris-lora 4.1.3.

On the tiny SD the reference runs on the diffusers U-Net, so its preset is LyCORIS' own list respelled for that
model: sd-scripts' ``CrossAttention`` is diffusers' ``Attention``, and where 4.1.3 lists ``TimestepEmbedding`` it
also names the embedding's linears, which stops it with "duplicated lora name" (we adapt them once; the reference
is given the list without the names). On SDXL the reference runs on sd-scripts' own U-Net (meta device), exactly
as under sd-scripts, beside ours on a meta diffusers SDXL.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import randomize_parameters
from lycoris.config import PRESET
from lycoris.kohya import LycorisNetworkKohya
from lycoris_interop import (
    FULL_PRESET,
    AlgorithmCase,
    assert_outputs_changed,
    assert_same_outputs,
    our_network,
    reference_from_file,
    reference_network,
)
from test_block_wise import sd_scripts  # noqa: F401  (fixture)

import lycolab.networks.algorithms.lora  # noqa: F401  (the algorithm registry's package, imported first)
from lycolab.config import load_config
from lycolab.models.tiny import build_tiny_sd
from lycolab.networks import create_network, load_network
from lycolab.networks.args import NetworkArgsError, network_kwargs
from lycolab.networks.presets import BUILTIN_PRESETS

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
SD_PRESETS = [name for name in PRESET if name != "ia3"]


@pytest.fixture(autouse=True)
def lycoris_class_state():
    """LyCORIS keeps the applied preset in class attributes: put them back, so no other test inherits ours."""
    names = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
             "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {name: getattr(LycorisNetworkKohya, name) for name in names}
    yield
    for name, value in saved.items():
        setattr(LycorisNetworkKohya, name, value)


def _shapes(network) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def diffusers_spelling(preset: dict) -> dict:
    """LyCORIS' preset as it reaches sd-scripts' layers, for the reference on a diffusers model."""
    preset = dict(preset)
    modules = ["Attention" if name == "CrossAttention" else name for name in preset.get("unet_target_module", [])]
    names = list(preset.get("unet_target_name", []))
    if "TimestepEmbedding" in modules:
        names = [name for name in names if not name.startswith("time_embedding.")]
    return {**preset, "unet_target_module": modules, "unet_target_name": names}


def _case(preset: dict | None, algo: str = "lora", train_norm: bool = False, name: str = "full", **options):
    ours = {"preset": name, "train_norm": train_norm, **options}
    return AlgorithmCase(id=name, algo=algo, options=ours, reference_options={"train_norm": train_norm, **options},
                         preset=preset)


@pytest.mark.parametrize("train_norm", [False, True], ids=["plain", "train_norm"])
@pytest.mark.parametrize("name", SD_PRESETS)
def test_builtin_preset_builds_the_layers_lycoris_builds_on_the_tiny_sd(name, train_norm):
    case = _case(diffusers_spelling(PRESET[name]), train_norm=train_norm, name=name)
    ours = our_network(build_tiny_sd(pretrained=False), case)
    reference = reference_network(build_tiny_sd(pretrained=False), case)
    assert _shapes(ours) == _shapes(reference)
    assert bool(ours.norm_adapters) == (train_norm and name != "attn-only")  # no norm inside attention


def test_full_preset_builds_on_diffusers_where_lycoris_4_1_3_fails():
    with pytest.raises(AssertionError, match="duplicated lora name"):
        reference_network(build_tiny_sd(pretrained=False), _case(PRESET["full"]))
    ours = our_network(build_tiny_sd(pretrained=False), _case(None))
    reference = reference_network(build_tiny_sd(pretrained=False), _case(FULL_PRESET))
    assert _shapes(ours) == _shapes(reference)


@pytest.fixture(scope="module")
def sdxl_unets(sd_scripts):  # noqa: F811
    from diffusers import UNet2DConditionModel
    from test_sdxl_names import SDXL_UNET_CONFIG

    _, unet_module = sd_scripts
    with torch.device("meta"):
        return unet_module.SdxlUNet2DConditionModel(), UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.mark.parametrize("name", ["full", "full-lin", "attn-mlp", "attn-only", "unet-convblock-only"])
def test_builtin_preset_on_sdxl_equals_lycoris_on_sd_scripts_unet(sdxl_unets, name):
    sgm_unet, diffusers_unet = sdxl_unets
    LycorisNetworkKohya.apply_preset(PRESET[name])
    reference = LycorisNetworkKohya(None, sgm_unet, lora_dim=4, conv_lora_dim=2, alpha=2, conv_alpha=1,
                                    network_module="lora", train_norm=True)
    ours = create_network(diffusers_unet, [], algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                          network_module="lycoris.kohya", preset=name, train_norm=True)
    ours.restore()
    expected = {lora.lora_name for lora in reference.unet_loras if not getattr(lora, "not_supported", False)}
    assert {module.lora_name for module in ours.modules_applied} == expected


PRESET_FILE = """
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = ["conv_in", "down_blocks\\\\.0\\\\.downsamplers\\\\.0\\\\.conv"]
text_encoder_target_module = ["CLIPMLP"]
exclude_name = ["mid_block.resnets.0.conv2", "up_blocks.1.attentions.1.proj_out"]

[module_algo_map.FeedForward]
algo = "loha"
dim = 2

[name_algo_map.conv_in]
algo = "lokr"
factor = 2
dim = 3

[name_algo_map."down_blocks.0.downsamplers.*"]  # no escapes in keys: LyCORIS' toml package misreads them
alpha = 0.5
use_tucker = true
"""


@pytest.fixture
def preset_file(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text(PRESET_FILE, encoding="utf-8")
    return path


def _file_case(path) -> AlgorithmCase:
    from lycoris.utils.preset import read_preset

    # LyCORIS keeps preset keys in class attributes; a fresh sd-scripts process starts from its defaults
    defaults = {**PRESET["full"], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}
    return AlgorithmCase(id="file", algo="lora", options={"preset": str(path)},
                         preset={**defaults, **read_preset(str(path))})


def test_preset_file_with_overrides_builds_the_layers_and_algorithms_lycoris_builds(preset_file):
    case = _file_case(preset_file)
    ours = our_network(build_tiny_sd(pretrained=False), case)
    reference = reference_network(build_tiny_sd(pretrained=False), case)
    assert _shapes(ours) == _shapes(reference)
    algos = {adapter.lora_name: adapter.algo for adapter in ours.adapters}
    assert algos["lora_unet_conv_in"] == "lokr"
    assert algos["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"] == "loha"
    assert ours.get_submodule("lora_unet_down_blocks_0_downsamplers_0_conv").tucker


@pytest.mark.parametrize("direction", ["ours-to-lycoris", "lycoris-to-ours"])
def test_preset_file_network_files_load_both_ways_with_the_same_outputs(preset_file, tmp_path, direction):
    case = _file_case(preset_file)
    source_sd, target_sd = build_tiny_sd(), build_tiny_sd()
    path = tmp_path / "mixed.safetensors"
    if direction == "ours-to-lycoris":
        ours = our_network(source_sd, case)
        randomize_parameters(ours.parameters())
        ours.save_weights(path, dtype=torch.float32)
        reference, _ = reference_from_file(path, target_sd, preset=case.preset)
        reference.apply_to(target_sd.text_encoder, target_sd.unet, True, True)
        assert len(reference.loras) == len(ours.adapters)
    else:
        reference = reference_network(source_sd, case)
        randomize_parameters(reference.parameters())
        reference.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        loaded = load_network(path, target_sd.unet, [target_sd.text_encoder])
        assert len(loaded.adapters) == len(reference.loras)
    assert_outputs_changed(source_sd, build_tiny_sd())
    assert_same_outputs(source_sd, target_sd)


@pytest.mark.parametrize("direction", ["ours-to-lycoris", "lycoris-to-ours"])
def test_train_norm_files_load_both_ways_with_the_same_outputs(tmp_path, direction):
    case = _case(diffusers_spelling(PRESET["attn-mlp"]), algo="loha", train_norm=True, name="attn-mlp")
    source_sd, target_sd = build_tiny_sd(), build_tiny_sd()
    path = tmp_path / "norm.safetensors"
    if direction == "ours-to-lycoris":
        ours = our_network(source_sd, case)
        randomize_parameters(ours.parameters())
        ours.save_weights(path, dtype=torch.float32)
        reference, _ = reference_from_file(path, target_sd, preset=case.preset)
        reference.apply_to(target_sd.text_encoder, target_sd.unet, True, True)
        norms = [lora for lora in reference.loras if type(lora).__name__ == "NormModule"]
        assert len(norms) == len(ours.norm_adapters) > 0
    else:
        reference = reference_network(source_sd, case)
        randomize_parameters(reference.parameters())
        reference.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        loaded = load_network(path, target_sd.unet, [target_sd.text_encoder])
        assert len(loaded.norm_adapters) == sum(type(lora).__name__ == "NormModule" for lora in reference.loras) > 0
        assert {key: tuple(v.shape) for key, v in loaded.state_dict().items()} == _shapes(reference)
    assert_outputs_changed(source_sd, build_tiny_sd())
    assert_same_outputs(source_sd, target_sd)


def test_norm_offsets_restore_and_multiply():
    sd = build_tiny_sd(pretrained=False)
    network = create_network(sd.unet, [], algo="loha", network_module="lycoris.kohya", preset="attn-mlp",
                             train_norm=True)
    norm = next(norm for norm in network.norm_adapters if isinstance(norm.org_module, torch.nn.LayerNorm))
    layer = norm.org_module
    x = torch.randn(2, 5, layer.weight.numel())
    with torch.no_grad():
        norm.w_norm.normal_()
        norm.b_norm.normal_()
        norm.multiplier = 0.5
        expected = torch.nn.functional.layer_norm(x, layer.normalized_shape, layer.weight + 0.5 * norm.w_norm,
                                                  layer.bias + 0.5 * norm.b_norm, layer.eps)
        torch.testing.assert_close(layer(x), expected)
        network.restore()
        torch.testing.assert_close(layer(x), torch.nn.functional.layer_norm(x, layer.normalized_shape,
                                                                            layer.weight, layer.bias, layer.eps))
    assert "forward" not in vars(layer)


@pytest.mark.parametrize("preset", [*SD_PRESETS, "preset_file"])
def test_saved_network_args_rebuild_the_same_network(preset, preset_file):
    preset = str(preset_file) if preset == "preset_file" else preset
    sd = build_tiny_sd(pretrained=False)
    kwargs = network_kwargs("lycoris.kohya", 4, 2.0, {"algo": "loha", "preset": preset, "train_norm": "true"})
    ours = create_network(sd.unet, [sd.text_encoder], **kwargs)
    metadata = ours.network_metadata()
    ours.restore()
    args = json.loads(metadata["ss_network_args"])
    assert args.get("preset", "full") == preset and args["train_norm"] == "True"
    rebuilt = create_network(sd.unet, [sd.text_encoder], **network_kwargs(
        metadata["ss_network_module"], int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"]), args))
    assert _shapes(rebuilt) == _shapes(ours)


def test_ia3_preset_adapts_nothing_as_in_lycoris_and_is_an_error():
    reference = reference_network(build_tiny_sd(pretrained=False), _case(PRESET["ia3"]))
    assert not reference.loras
    with pytest.raises(ValueError, match="preset ia3 adapts no layer of this model"):
        create_network(build_tiny_sd(pretrained=False).unet, [], algo="lora", network_module="lycoris.kohya",
                       preset="ia3")


def test_builtin_presets_are_lycorises():
    assert set(BUILTIN_PRESETS) == set(PRESET)


@pytest.mark.parametrize(("text", "message"), [
    ("unet_target_modules = []", "unknown key(s) unet_target_modules"),
    ("enable_conv = 'yes'", "enable_conv must be true or false"),
    ("unet_target_name = 'conv_in'", "unet_target_name must be a list of strings"),
    ("exclude_name = ['(']", "exclude_name '(' is not a regular expression"),
    ("[module_algo_map.Attention]\nalgo = 'lorax'", "module_algo_map.Attention.algo: unknown algo 'lorax'"),
    ("[name_algo_map.conv_in]\ndim = 2.5", "name_algo_map.conv_in.dim must be a whole number"),
    ("[name_algo_map.conv_in]\nuse_tucker = 'maybe'", "name_algo_map.conv_in: use_tucker must be true or false"),
    ("enable_conv = [", "not a readable TOML file"),
])
def test_bad_preset_files_are_one_line_errors_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(NetworkArgsError) as error:
        network_kwargs("lycoris.kohya", 4, 1.0, {"preset": str(path)})
    assert message in str(error.value) and "\n" not in str(error.value) and "bad.toml" in str(error.value)


def test_missing_preset_file_and_unknown_name_are_errors(tmp_path):
    with pytest.raises(NetworkArgsError, match="missing.toml: file not found"):
        network_kwargs("lycoris.kohya", 4, 1.0, {"preset": str(tmp_path / "missing.toml")})
    with pytest.raises(NetworkArgsError, match="'attn' is neither a LyCORIS preset"):
        network_kwargs("lycoris.kohya", 4, 1.0, {"preset": "attn"})


def test_preset_file_config_with_train_norm_and_loraplus_trains_a_step(tiny_model_dir, tmp_path, preset_file):
    from conftest import make_shapes_dataset

    from lycolab.networks.io import read_adapter_file
    from lycolab.training import train

    make_shapes_dataset(tmp_path / "train")
    args = ["algo=locon", f"preset={preset_file}", "train_norm=true", "loraplus_lr_ratio=8"]
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(tmp_path / "train"),
        "resolution": "64", "network_module": "lycoris.kohya", "network_args": args, "network_dim": 4,
        "network_alpha": 2, "learning_rate": 1e-3, "max_train_steps": 1, "train_batch_size": 1, "seed": 0,
        "output_dir": str(tmp_path / "out"), "output_name": "preset", "save_precision": "float"})
    result = train(config, progress=False)
    tensors, metadata = read_adapter_file(result.saved_files[-1])
    saved = json.loads(metadata["ss_network_args"])
    assert saved["preset"] == str(preset_file) and saved["train_norm"] == "true"  # as given, like sd-scripts
    assert saved["loraplus_lr_ratio"] == "8"
    assert any(key.endswith(".w_norm") and tensor.abs().sum() > 0 for key, tensor in tensors.items())


def test_merging_a_train_norm_network_equals_its_forward():
    from lycolab.networks.merge import merge_network

    applied, merged = build_tiny_sd(), build_tiny_sd()
    network = create_network(applied.unet, [applied.text_encoder], algo="locon", dim=2, alpha=1,
                             network_module="lycoris.kohya", train_norm=True)
    randomize_parameters(network.parameters())
    baked = create_network(merged.unet, [merged.text_encoder], algo="locon", dim=2, alpha=1,
                           network_module="lycoris.kohya", train_norm=True)
    baked.load_state_dict(network.state_dict())
    assert merge_network(baked, 1.0) == len(baked.adapters) + len(baked.norm_adapters) > len(baked.adapters)
    assert_same_outputs(merged, applied)
