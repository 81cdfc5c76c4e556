"""Sample images during and after training, from prompt files in kohya's syntax.

A line is ``prompt --n negative --w 512 --h 768 --s 28 --l 7.5 --d 42``; ``#`` starts a comment line. Samples use
the same text encoding (clip_skip, long prompts) as training.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lycolab.config import SAMPLERS, sampler_key
from lycolab.files import atomic_write
from lycolab.models.text import encode_conditioning

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser under its old name
    import tomli as tomllib

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int | None = None


def parse_prompt_line(line: str, defaults: SamplePrompt = SamplePrompt("")) -> SamplePrompt | None:
    """One kohya prompt line → SamplePrompt; None for blank and comment lines."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = line.split(" --")
    sample = replace(defaults, prompt=parts[0].strip())
    fields = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
              "l": ("guidance_scale", float), "d": ("seed", int)}
    for option in parts[1:]:
        flag, _, value = option.strip().partition(" ")
        if flag not in fields:
            logger.warning("sample prompt option --%s is not known, ignoring it", flag)
            continue
        name, cast = fields[flag]
        try:
            sample = replace(sample, **{name: cast(value.strip())})
        except ValueError:
            logger.warning("sample prompt option --%s %s is not a valid %s, ignoring it", flag, value, cast.__name__)
    return sample


# sd-scripts' key names in .toml / .json prompt files → SamplePrompt fields
STRUCTURED_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
                   "sample_steps": "steps", "scale": "guidance_scale", "seed": "seed"}


def read_prompt_file(path: str | Path, defaults: SamplePrompt = SamplePrompt("")) -> list[SamplePrompt]:
    """Prompts from a kohya text file (one per line), or sd-scripts' ``.toml`` (``[prompt]`` defaults plus
    ``[[prompt.subset]]`` entries) and ``.json`` (a list of objects) forms."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".toml", ".json"):
        return _structured_prompts(path, text, defaults)
    lines = text.splitlines()
    return [prompt for prompt in (parse_prompt_line(line, defaults) for line in lines) if prompt is not None]


def _structured_prompts(path: Path, text: str, defaults: SamplePrompt) -> list[SamplePrompt]:
    try:
        if path.suffix.lower() == ".toml":
            document = tomllib.loads(text).get("prompt", {})
            common, entries = {k: v for k, v in document.items() if k != "subset"}, document.get("subset", [])
        else:
            common, entries = {}, json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path}: not a readable prompt file ({error})") from None
    prompts = []
    for entry in entries:
        values = {STRUCTURED_KEYS[key]: value for key, value in {**common, **entry}.items() if key in STRUCTURED_KEYS}
        if values.get("prompt"):
            prompts.append(replace(defaults, **values))
    return prompts


def make_sampler(name: str, training_scheduler_config):
    """A diffusers scheduler for a kohya sampler name, sharing the training noise schedule."""
    import diffusers

    key = sampler_key(name)
    if key not in SAMPLERS:
        raise ValueError(f"sample_sampler {name!r} is not known; use one of {', '.join(SAMPLERS)}")
    scheduler_class = getattr(diffusers, SAMPLERS[key])
    extra = {"algorithm_type": key} if key in ("dpmsolver", "dpmsolver++") else {}
    if key == "dpmsolver":
        extra["final_sigmas_type"] = "sigma_min"  # diffusers refuses its default "zero" with first-order dpmsolver
    return scheduler_class.from_config(training_scheduler_config, **extra)


def make_grid(images: list, path: str | Path, columns: int | None = None) -> Path:
    """All images of one sampling round side by side (up to 4 per row, cells sized to the largest), on white;
    ``images`` are files or PIL images."""
    from PIL import Image

    from lycolab.files import atomic_write

    pictures = [image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
                for image in images]
    columns = columns or min(4, len(pictures))
    rows = -(-len(pictures) // columns)
    cell_width = max(picture.width for picture in pictures)
    cell_height = max(picture.height for picture in pictures)
    grid = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    for index, picture in enumerate(pictures):
        row, column = divmod(index, columns)
        grid.paste(picture, (column * cell_width + (cell_width - picture.width) // 2,
                             row * cell_height + (cell_height - picture.height) // 2))
    return atomic_write(path, lambda temporary: grid.save(temporary, format="PNG"))


@torch.no_grad()
def generate_samples(parts, prompts: list[SamplePrompt], out_dir: str | Path, file_stem: str, sampler: str = "euler_a",
                     clip_skip: int | None = None, max_token_length: int | None = None) -> list[Path]:
    """Render each prompt with the U-Net as it is now (adapter applied) and save PNGs ``{file_stem}_{i:02d}.png``.

    Runs inside ``torch.random.fork_rng`` so sampling never changes the training run's random numbers. A U-Net
    held in fp16/bf16 (mixed-precision training) denoises under autocast, since the adapter's weights stay fp32;
    the latents are decoded by the VAE in its own dtype (fp32), where SD's VAE does not overflow. SDXL models
    render through diffusers' SDXL pipeline (its size conditioning: the image's own size, no crop)."""
    device = next(parts.unet.parameters()).device
    pipeline = sampling_pipeline(parts, make_sampler(sampler, parts.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, sample in enumerate(prompts):
            paths.append(_render(pipeline, parts, sample, index, out_dir / f"{file_stem}_{index:02d}.png", clip_skip,
                                 max_token_length, device))
    return paths


def sampling_pipeline(parts, scheduler):
    """A diffusers pipeline over the loaded parts (nothing copied): SDXL's when there is a second text encoder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if getattr(parts, "text_encoder_2", None) is not None:
        return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                         text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                         tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _prompt_arguments(parts, sample: SamplePrompt, clip_skip: int | None, max_token_length: int | None,
                      device: torch.device) -> dict:
    """The prompt and negative prompt encoded exactly as training encodes captions, as pipeline arguments."""
    conditioning = encode_conditioning(parts, [sample.prompt, sample.negative_prompt], clip_skip, max_token_length,
                                       device).to(parts.unet.dtype)
    arguments = {"prompt_embeds": conditioning.states[:1], "negative_prompt_embeds": conditioning.states[1:]}
    if conditioning.pooled is not None:
        arguments.update(pooled_prompt_embeds=conditioning.pooled[:1],
                         negative_pooled_prompt_embeds=conditioning.pooled[1:])
    return arguments


def _render(pipeline, parts, sample: SamplePrompt, index: int, path: Path, clip_skip: int | None,
            max_token_length: int | None, device: torch.device) -> Path:
    """One prompt → one PNG; a prompt without --d uses its position as seed, so rounds are comparable."""
    arguments = _prompt_arguments(parts, sample, clip_skip, max_token_length, device)
    generator = torch.Generator(device="cpu").manual_seed(sample.seed if sample.seed is not None else index)
    low_precision = parts.unet.dtype != torch.float32
    with torch.autocast(device.type, dtype=parts.unet.dtype, enabled=low_precision):
        latents = pipeline(
            **arguments,
            height=sample.height - sample.height % 8, width=sample.width - sample.width % 8,
            num_inference_steps=sample.steps, guidance_scale=sample.guidance_scale, generator=generator,
            output_type="latent",
        ).images
    vae = parts.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    image = pipeline.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))
    return path
