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
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Payload()}}))
    with pytest.raises(ModelLoadError, match="pickled code and was refused.*convert it to .safetensors"):
        load_stable_diffusion(path)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_sd2_checkpoints_are_recognised_by_their_openclip_text_encoder():
    assert is_v2_checkpoint(["model.diffusion_model.out.0.weight",
                             "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"])
    assert not is_v2_checkpoint(["cond_stage_model.transformer.text_model.final_layer_norm.weight"])
