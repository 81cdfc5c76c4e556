"""Pretrain the tiny SD (``lycolab.models.tiny``) to draw simple scenes, on CPU, deterministically.

The scenes are flat-colour shapes on plain backgrounds captioned "a red circle on a white background"
(``lycolab.models.scenes``), 64 px, every shape x colour x background except the held-out concept (a yellow shape on
a purple background). First the VAE learns to reconstruct them (its latent scale is then set so latents have unit
variance, as SD's 0.18215 does), then the U-Net learns to denoise their latents with SD's epsilon objective and
noise schedule, conditioned on the frozen text encoder's last hidden states, with 10 % empty captions so that
classifier-free guidance works. The text encoder stays as built (random but fixed), and is shipped with the rest.

    python scripts/pretrain_tiny.py                      # writes lycolab/models/tiny_pretrained.safetensors
    python scripts/pretrain_tiny.py --check              # only the check: how often each scene is drawn right

Seeds and the thread count are fixed, so the run repeats on one machine with the same library versions (another CPU
may round differently); docs/benchmarks.md gives the time, the sha256 of the shipped file and the check's rates.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lycolab.models import scenes  # noqa: E402
from lycolab.models.tiny import PRETRAINED_WEIGHTS, build_tiny_sd, save_pretrained_weights  # noqa: E402

SEED = 1234
THREADS = 2
VARIANTS = 8  # drawings per scene: 165 scenes x 8
VAE_STEPS, VAE_BATCH, VAE_LR, VAE_KL = 2500, 16, 5e-3, 1e-6
UNET_STEPS, UNET_BATCH, UNET_LR = 4000, 32, 2e-3
CAPTION_DROPOUT = 0.1


def scene_pixels(seed: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    for image, scene in scenes.scene_images(scenes.all_scenes(), VARIANTS, seed):
        images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
        captions.append(scene.caption)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, pixels: torch.Tensor, generator: torch.Generator, log, steps: int = VAE_STEPS) -> float:
    """Reconstruction (MSE) plus a small KL term; returns the latent scale that gives unit variance."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, VAE_LR)
        batch = pixels[torch.randint(len(pixels), (VAE_BATCH,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + VAE_KL * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    return float(1 / means.std())


def train_unet(unet, scheduler, latent_mean: torch.Tensor, latent_std: torch.Tensor, embeddings: torch.Tensor,
               empty: torch.Tensor, generator: torch.Generator, log, steps: int = UNET_STEPS) -> None:
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, UNET_LR)
        index = torch.randint(len(latent_mean), (UNET_BATCH,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (UNET_BATCH,), generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        dropped = torch.rand(UNET_BATCH, generator=generator) < CAPTION_DROPOUT
        conditioning = torch.where(dropped.view(-1, 1, 1), empty, embeddings[index])
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, conditioning).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.5f}")
    unet.eval().requires_grad_(False)


def pretrain(out: Path, vae_steps: int = 0, unet_steps: int = 0) -> None:
    from lycolab.models.text import encode_prompts

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    random.seed(SEED)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:7.1f} s] {message}", flush=True)

    parts = build_tiny_sd(pretrained=False)
    generator = torch.Generator().manual_seed(SEED)
    pixels, captions = scene_pixels(SEED)
    log(f"{len(pixels)} images of {len(set(captions))} scenes")
    vae_steps, unet_steps = vae_steps or VAE_STEPS, unet_steps or UNET_STEPS
    scale = train_vae(parts.vae, pixels, generator, log, vae_steps)
    parts.vae.register_to_config(scaling_factor=scale)
    log(f"latent scale {scale:.5f}")
    with torch.no_grad():
        posteriors = [parts.vae.encode(pixels[i:i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        latent_mean = torch.cat([p.mean for p in posteriors]) * scale
        latent_std = torch.cat([p.std for p in posteriors]) * scale
        unique = sorted(set(captions))
        encoded = encode_prompts(parts.text_encoder, parts.tokenizer, unique + [""])
        by_caption = {caption: encoded[i] for i, caption in enumerate(unique)}
        embeddings = torch.stack([by_caption[caption] for caption in captions])
        empty = encoded[-1:]
    train_unet(parts.unet, parts.scheduler, latent_mean, latent_std, embeddings, empty, generator, log,
               unet_steps)
    save_pretrained_weights(parts, out, {"seed": str(SEED), "vae_steps": str(vae_steps),
                                         "unet_steps": str(unet_steps), "seconds": f"{time.time() - started:.0f}"})
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), sha256 {digest}")


def check(weights: Path, samples_per_scene: int = 2) -> dict[str, float]:
    """Per shape colour, how often "a C circle on a B background" (every B it learned) comes out as C on B."""
    import tempfile

    from lycolab.demo import render
    from lycolab.models.tiny import load_pretrained_weights, save_tiny_parts

    parts = build_tiny_sd(pretrained=False)
    load_pretrained_weights(parts, weights)
    wanted = [scene for scene in scenes.all_scenes() if scene.shape == "circle"]
    hits: dict[str, list[bool]] = {color: [] for color in scenes.COLORS}
    with tempfile.TemporaryDirectory() as folder:
        model = save_tiny_parts(parts, Path(folder) / "tiny-sd")
        for scene in wanted:
            for image in render(model, scene.caption, count=samples_per_scene):
                hits[scene.color].append(scenes.shows(image, scene))
    rates = {color: sum(values) / len(values) for color, values in hits.items() if values}
    rates["all"] = sum(sum(values) for values in hits.values()) / sum(len(values) for values in hits.values())
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PRETRAINED_WEIGHTS)
    parser.add_argument("--check", action="store_true", help="only measure the weights in --out")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    args = parser.parse_args()
    if not args.check:
        pretrain(args.out, args.vae_steps, args.unet_steps)
    for name, rate in check(args.out).items():
        print(f"{name}: {rate:.2f}", flush=True)


if __name__ == "__main__":
    main()
