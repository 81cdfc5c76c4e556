"""`lycolab generate` and `lycolab merge` on the tiny model with a real adapter file."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lycolab.models.generate import generate, parse_network_spec
from lycolab.models.load import load_stable_diffusion
from lycolab.networks import create_network, load_network


@pytest.fixture(scope="module")
def adapter_file(tiny_model_dir, tmp_path_factory):
    parts = load_stable_diffusion(tiny_model_dir)
    network = create_network(parts.unet, [parts.text_encoder], algo="loha", dim=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network.save_weights(tmp_path_factory.mktemp("adapter") / "style.safetensors", dtype=torch.float32)


def test_network_specs_take_an_optional_ratio():
    assert parse_network_spec("style.safetensors:0.6") == (Path("style.safetensors"), 0.6)
    assert parse_network_spec("style.safetensors") == (Path("style.safetensors"), 1.0)
    assert parse_network_spec("C:\\models\\style.safetensors") == (Path("C:\\models\\style.safetensors"), 1.0)
    assert parse_network_spec("dir/a:b.safetensors:-0.5") == (Path("dir/a:b.safetensors"), -0.5)


def test_generate_applies_prompt_options_seed_and_ratio(tiny_model_dir, adapter_file, tmp_path):
    prompt = "a red circle --n blurry --w 64 --h 96 --s 3 --l 5 --d 11"
    base = generate(tiny_model_dir, [prompt], tmp_path / "base.png")[0]
    again = generate(tiny_model_dir, [prompt], tmp_path / "again.png", networks=[(adapter_file, 0.0)])[0]
    styled = generate(tiny_model_dir, [prompt], tmp_path / "styled.png", networks=[(adapter_file, 1.0)])[0]
    assert Image.open(base).size == (64, 96)
    pixels = [np.asarray(Image.open(path), dtype=np.int16) for path in (base, again, styled)]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # ratio 0 and the same seed: the base image
    assert np.abs(pixels[0] - pixels[2]).mean() > 1  # the adapter changes it
    several = generate(tiny_model_dir, ["one --w 64 --h 64 --s 2", "two --w 64 --h 64 --s 2"], tmp_path / "many")
    assert [path.name for path in several] == ["image_00.png", "image_01.png"]


def test_merge_bakes_the_adapter_into_a_loadable_folder(tiny_model_dir, adapter_file, tmp_path):
    from lycolab.cli import main

    assert main(["merge", "--model", str(tiny_model_dir), "--network", f"{adapter_file}:0.5",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_stable_diffusion(tmp_path / "merged")
    applied = load_stable_diffusion(tiny_model_dir)
    load_network(adapter_file, applied.unet, [applied.text_encoder], multiplier=0.5)
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(sample, 10, context).sample, applied.unet(sample, 10, context).sample,
                                   rtol=1e-4, atol=1e-5)
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "x --w 64 --h 64 --s 2",
                 "--out", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()
    # the same merge as one A1111-layout file, read back through the single-file loader
    from lycolab.models.generate import merge_into_model
    from lycolab.models.load import load_single_file

    single = merge_into_model(tiny_model_dir, [(adapter_file, 0.5)], tmp_path / "merged.safetensors", dtype=None)
    reloaded = load_single_file(single, config=tiny_model_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.unet(sample, 10, context).sample, merged.unet(sample, 10, context).sample,
                                   rtol=1e-4, atol=1e-5)
