"""Single-file (A1111-layout) checkpoints: our export loads back in diffusers' single-file loader with the same
outputs, malicious pickles are refused without running, and SD 2.x is recognised."""

import pickle

import pytest
import torch

from lycolab.models.export import export_single_file
from lycolab.models.load import ModelLoadError, is_v2_checkpoint, load_single_file, load_stable_diffusion


@torch.no_grad()
def _outputs(parts):
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    ids = torch.randint(0, 100, (1, 77), generator=generator)
    return (parts.unet(latents, 10, context).sample, parts.vae.encode(image).latent_dist.mean,
            parts.vae.decode(latents).sample, parts.text_encoder(ids)[0])


def test_exported_single_file_loads_back_with_the_same_outputs(tiny_model_dir, tmp_path):
    parts = load_stable_diffusion(tiny_model_dir)
    with torch.no_grad():  # different weights from the config folder, so the file's own weights must be used
        for model in (parts.unet, parts.vae, parts.text_encoder):
            for parameter in model.parameters():
                parameter.mul_(1.05)
    path = export_single_file(parts.unet, parts.vae, parts.text_encoder, tmp_path / "tiny.safetensors", dtype=None)
    assert not list(tmp_path.glob(".*tmp"))
    loaded = load_single_file(path, config=tiny_model_dir)
    for got, expected in zip(_outputs(loaded), _outputs(parts), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PAYLOAD_RAN",))


def test_a_ckpt_that_would_run_code_is_refused_and_never_runs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Payload()}}, protocol=2))
    with pytest.raises(ModelLoadError, match="pickled code and was refused.*convert it to .safetensors"):
        load_stable_diffusion(path)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_sd2_checkpoints_are_recognised_by_their_openclip_text_encoder():
    assert is_v2_checkpoint(["model.diffusion_model.out.0.weight",
                             "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"])
    assert not is_v2_checkpoint(["cond_stage_model.transformer.text_model.final_layer_norm.weight"])


def test_lowram_places_each_part_on_the_device_as_it_loads(tiny_model_dir, tmp_path):
    parts = load_stable_diffusion(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    assert next(parts.unet.parameters()).dtype == torch.bfloat16
    assert next(parts.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(parts.vae.parameters()).dtype == torch.float32  # the VAE overflows in half precision


def test_generate_and_training_read_a_single_file_with_a_config_folder(tiny_model_dir, tmp_path):
    from PIL import Image

    from lycolab.cli import main
    from lycolab.config import load_config
    from lycolab.training import train

    parts = load_stable_diffusion(tiny_model_dir)
    path = export_single_file(parts.unet, parts.vae, parts.text_encoder, tmp_path / "tiny.safetensors", dtype=None)
    assert main(["generate", "--model", str(path), "--model_config", str(tiny_model_dir), "--prompt",
                 "x --w 64 --h 64 --s 2", "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
    (tmp_path / "data" / "2_thing").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "data" / "2_thing" / "a.png")
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(path), "model_config": str(tiny_model_dir), "lowram": True,
        "train_data_dir": str(tmp_path / "data"), "resolution": "64", "output_dir": str(tmp_path / "out"),
        "max_train_steps": 2, "network_dim": 2,
    })
    assert train(config, progress=False).saved_files[-1].is_file()
