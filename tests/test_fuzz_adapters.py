"""Adapter ``.safetensors`` files of any content: corrupt headers, truncation, wrong shapes, dtypes and values,
missing alpha, unknown keys, huge or non-string metadata.

The invariant (issue 13): ``load_network`` (which ``merge`` and ``generate`` use too) either loads the file or raises
an AdapterFileError of one line naming the file — never a traceback — and a refused file leaves the U-Net and text
encoder exactly as they were: same weights, no layer rerouted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from lycolab.networks import AdapterFileError, create_network, load_network, read_adapter_file
from lycolab.networks.merge import merge_files

ALGORITHMS = ("lora", "loha", "lokr")
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4",
          "F33", "", "f32", "Q4_K"]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool,
                torch.float8_e4m3fn, torch.complex64]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny SD's U-Net and text encoder, loaded once for the module; every test leaves them as it found them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"),
            CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder"))


# One module of each kind: 3x3 conv, 1x1 conv, linear, time-embedding linear, text-encoder linear. Rebuilding a module
# from a file costs milliseconds; a whole network's 143 modules per example would make the fuzzing slow for nothing.
KEPT_MODULES = ("lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1",
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                "lora_unet_mid_block_resnets_0_time_emb_proj", "lora_te_text_model_encoder_layers_0_self_attn_q_proj")


@pytest.fixture(scope="module")
def adapter_files(model, tmp_path_factory) -> dict[str, Path]:
    """A real file per algorithm (alpha 2 of dim 4: scale 0.5) holding the modules of :data:`KEPT_MODULES` that the
    algorithm makes; each network is detached again, so the model stays as built."""
    folder = tmp_path_factory.mktemp("adapters")
    files = {}
    unet, text_encoder = model
    for algo in ALGORITHMS:
        module = "networks.lora" if algo == "lora" else "lycoris.kohya"
        network = create_network(unet, [text_encoder], algo=algo, dim=4, alpha=2, conv_dim=2, conv_alpha=1,
                                 network_module=module)
        with torch.no_grad():  # LoRA's up (and LoKr's w2) start at zero; non-zero factors make ΔW checks meaningful
            for parameter in network.parameters():
                noise = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1), dtype=parameter.dtype)
                parameter.copy_(noise * 0.1)
        full = network.save_weights(folder / f"{algo}_full.safetensors")
        network.restore()
        files[algo] = _resave(full, folder / f"{algo}.safetensors", lambda tensors, metadata: (
            {key: value for key, value in tensors.items() if key.split(".")[0] in KEPT_MODULES}, metadata))
    return files


def _fingerprint(model) -> tuple[str, list[str]]:
    """A hash of every weight, and the layers whose forward has been rerouted (an applied adapter sets it)."""
    digest = hashlib.sha256()
    rerouted = []
    for part in model:
        for name, tensor in part.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        rerouted += [name for name, module in part.named_modules() if not _own_forward(module)]
    return digest.hexdigest(), rerouted


def _own_forward(module: torch.nn.Module) -> bool:
    """Whether calling the layer runs its class's forward, with nothing left on the instance by an adapter."""
    return "forward" not in vars(module)


@pytest.fixture(scope="module")
def pristine(model):
    return _fingerprint(model)


def _load_or_refuse(path: Path, model, pristine) -> object | None:
    """The invariant: a loaded network (then checked and detached again), or a one-line error naming the file with
    the model untouched."""
    unet, text_encoder = model
    try:
        network = load_network(path, unet, [text_encoder])
    except AdapterFileError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 1000 and path.name in message, message[:2000]
        assert _fingerprint(model) == pristine
        return None
    try:
        for adapter in network.adapters:
            delta = adapter.delta_weight()
            assert tuple(delta.shape) == adapter.weight_shape and bool(torch.isfinite(delta).all())
    finally:
        network.restore()
    assert _fingerprint(model) == pristine
    return network


def _split(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: object, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=6)


@st.composite
def corrupted(draw, original: bytes) -> bytes:
    """One kind of damage to a valid file: what disks, downloads and other tools do to ``.safetensors``."""
    header, body = _split(original)
    names = sorted(key for key in header if key != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["random", "truncated", "header_length", "header_json", "dtype", "shape", "offsets",
                                 "flipped", "metadata"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncated":
        return original[:draw(st.integers(0, len(original) - 1))]
    if kind == "header_length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + original[8:]
    if kind == "header_json":
        return _join(draw(json_values), body)
    if kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4) | json_values)
    elif kind == "offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-1, len(body) + 10**6), max_size=3) | json_values)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
    else:  # a few bytes anywhere overwritten
        position = draw(st.integers(0, len(original) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        return original[:position] + patch + original[position + len(patch):]
    return _join(header, body)


@given(data=st.data(), algo=st.sampled_from(ALGORITHMS))
def test_a_damaged_adapter_file_loads_or_is_refused_naming_it_and_leaves_the_model_untouched(
        model, adapter_files, pristine, tmp_path_factory, data, algo):
    path = tmp_path_factory.mktemp("damaged") / f"{algo}_damaged.safetensors"
    path.write_bytes(data.draw(corrupted(adapter_files[algo].read_bytes())))
    _load_or_refuse(path, model, pristine)


@st.composite
def replacement_tensors(draw) -> torch.Tensor:
    """Any shape (empty and 0-d included), any dtype a file can hold, sometimes a NaN/inf/huge value inside."""
    shape = draw(st.lists(st.integers(0, 6), max_size=4))
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    fill = draw(st.sampled_from([None, 0.0, 1.0, math.nan, math.inf, -math.inf, 1e30]))
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9))))
    if fill is not None and tensor.numel():
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = fill
    return tensor.to(dtype)


@given(data=st.data(), algo=st.sampled_from(ALGORITHMS))
def test_adapter_tensors_of_any_shape_dtype_or_value_are_applied_or_refused(model, adapter_files, pristine,
                                                                            tmp_path_factory, data, algo):
    tensors, metadata = read_adapter_file(adapter_files[algo])
    for _ in range(data.draw(st.integers(1, 3))):
        change = data.draw(st.sampled_from(["replace", "drop", "drop_alphas", "add_unknown"]))
        key = data.draw(st.sampled_from(sorted(tensors))) if tensors else None
        if change == "replace" and key:
            tensors[key] = data.draw(replacement_tensors())
        elif change == "drop" and key:
            del tensors[key]
        elif change == "drop_alphas":
            tensors = {name: tensor for name, tensor in tensors.items() if not name.endswith(".alpha")}
        else:
            name = data.draw(st.text(min_size=1, max_size=30).filter(lambda text: "\x00" not in text))
            tensors[name] = torch.zeros(data.draw(st.lists(st.integers(0, 3), max_size=2)))
    path = tmp_path_factory.mktemp("tensors") / f"{algo}_changed.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata)
    _load_or_refuse(path, model, pristine)


# ------------------------------------------------------------------------------------- the cases, one by one

def _resave(source: Path, target: Path, change) -> Path:
    tensors, metadata = read_adapter_file(source)
    tensors, metadata = change(dict(tensors), dict(metadata))
    save_file(tensors, str(target), metadata)
    return target


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_missing_alpha_means_alpha_equals_dim_as_in_sd_scripts_and_lycoris(model, adapter_files, pristine, tmp_path,
                                                                            algo):
    """sd-scripts (``modules_alpha[key] = modules_dim[key]``) and LyCORIS (``alpha = lora_dim if alpha is None``)
    read a file without alpha as scale 1. The file was saved with alpha 2 of dim 4 (scale 0.5) on the linear layers
    and conv_alpha 1 of conv_dim 2 (scale 0.5 too), so without alpha ΔW is exactly twice as large: scaling by a
    power of two is exact in float32, hence torch.equal. (LoKr layers small enough for two full factors have scale 1
    whatever the file says, as in LyCORIS.)"""
    without = _resave(adapter_files[algo], tmp_path / "no_alpha.safetensors",
                      lambda tensors, metadata: ({k: v for k, v in tensors.items() if not k.endswith(".alpha")},
                                                 metadata))
    with_alpha = _load_or_refuse(adapter_files[algo], model, pristine)
    no_alpha = _load_or_refuse(without, model, pristine)
    assert no_alpha is not None and len(no_alpha.adapters) == len(with_alpha.adapters) > 0
    ratios = []
    for plain, scaled in zip(no_alpha.adapters, with_alpha.adapters, strict=True):
        assert plain.lora_name == scaled.lora_name and plain.scale == 1.0 and scaled.scale in (0.5, 1.0)
        ratios.append(plain.scale / scaled.scale)
        assert torch.equal(plain.delta_weight(), scaled.delta_weight() * ratios[-1])
    assert 2.0 in ratios


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_values_are_refused_naming_the_file_and_the_tensor(model, adapter_files, pristine, tmp_path, value):
    def poison(tensors, metadata):
        key = sorted(name for name in tensors if name.endswith("hada_w2_b"))[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors, metadata

    path = _resave(adapter_files["loha"], tmp_path / "diverged.safetensors", poison)
    with pytest.raises(AdapterFileError, match=r"diverged\.safetensors: 1 tensor\(s\) hold NaN or infinite values "
                                               r"\(lora_.*hada_w2_b\); the training that wrote it diverged"):
        load_network(path, model[0], [model[1]])
    assert _fingerprint(model) == pristine


def test_unknown_keys_are_reported_with_the_file_and_the_first_few_names(model, adapter_files, pristine, tmp_path,
                                                                         caplog):
    """Like LyCORIS and sd-scripts (which load the modules they find and skip the rest), modules for layers this
    model does not have are skipped, but said: a count, the file and five names."""
    def add_unknown(tensors, metadata):
        for index in range(7):
            tensors[f"lora_unet_no_such_layer_{index}.lora_down.weight"] = torch.zeros(2, 2)
        return tensors, metadata

    path = _resave(adapter_files["lora"], tmp_path / "extra.safetensors", add_unknown)
    with caplog.at_level(logging.WARNING, logger="lycolab.networks.io"):
        network = _load_or_refuse(path, model, pristine)
    assert network is not None and len(network.adapters) > 0
    [warning] = [record.getMessage() for record in caplog.records]
    assert warning.startswith("extra.safetensors: 7 module(s) match no layer of this model and were skipped: ")
    assert warning.endswith("lora_unet_no_such_layer_4 …") and "no_such_layer_5" not in warning


def test_a_file_whose_modules_all_miss_the_model_is_refused(model, pristine, tmp_path):
    path = tmp_path / "other_model.safetensors"
    save_file({"lora_unet_not_here.lora_down.weight": torch.zeros(2, 2), "lonely": torch.zeros(1)}, str(path))
    assert _load_or_refuse(path, model, pristine) is None


def test_huge_metadata_loads_and_non_string_metadata_is_refused(model, adapter_files, pristine, tmp_path):
    huge = _resave(adapter_files["lokr"], tmp_path / "huge_metadata.safetensors",
                   lambda tensors, metadata: (tensors, {**metadata, "ss_tag_frequency": "x" * 50_000_000,
                                                        "ss_network_args": "[" * 100_000}))
    network = _load_or_refuse(huge, model, pristine)
    assert network is not None and network.algo == "lokr"  # the algorithm comes from the keys when metadata is junk
    header, body = _split(adapter_files["lokr"].read_bytes())
    header["__metadata__"] = {"ss_network_dim": 4}  # safetensors allows only strings there
    (tmp_path / "numeric_metadata.safetensors").write_bytes(_join(header, body))
    assert _load_or_refuse(tmp_path / "numeric_metadata.safetensors", model, pristine) is None


@pytest.mark.parametrize(("change", "expected"), [
    (lambda data: b"", "not a readable safetensors file"),
    (lambda data: data[: len(data) // 2], "not a readable safetensors file"),
    (lambda data: (2**40).to_bytes(8, "little") + data[8:], "not a readable safetensors file"),
])
def test_merge_refuses_a_broken_file_before_changing_the_model(model, adapter_files, pristine, tmp_path, change,
                                                               expected):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(change(adapter_files["loha"].read_bytes()))
    with pytest.raises(AdapterFileError, match=f"broken.safetensors: {expected}"):
        merge_files(model[0], [model[1]], [(path, 1.0)])
    assert _fingerprint(model) == pristine
