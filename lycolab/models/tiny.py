"""A tiny but architecturally faithful Stable Diffusion, built in code with a fixed seed.

Tests, the demo and the notebooks' CI run must never download a model, yet they should exercise the very classes a
real SD 1.x checkpoint uses: diffusers' ``UNet2DConditionModel`` (Transformer2DModel, ResnetBlock2D, Downsample2D,
Upsample2D), ``AutoencoderKL`` with SD's 8x downscale, transformers' ``CLIPTextModel`` and a working
``CLIPTokenizer``. Only the sizes are small, so adapters, key names and training code are the real thing.

By default the weights are pretrained (``tiny_pretrained.safetensors``, made by ``scripts/pretrain_tiny.py``): the
model draws the simple scenes of :mod:`lycolab.models.scenes` at 64 px, so training an adapter can be seen, and
measured, to learn. ``pretrained=False`` gives the random weights of the fixed seed (what the pretraining starts
from), for tests that need the architecture but no drawing.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_SEED = 20240401
PRETRAINED_WEIGHTS = Path(__file__).with_name("tiny_pretrained.safetensors")
TINY_HIDDEN_SIZE = 32
TINY_MAX_TOKENS = 77

# Words that get whole-word BPE merges so that captions tokenize into a handful of tokens, like the real CLIP vocab.
_TINY_WORDS = (
    "a an the of with and on in at photo picture drawing painting style sks person girl boy cat dog "
    "red green blue yellow purple orange black white pink brown gray "
    "circle square triangle stripe stripes dot dots background foreground shape shapes "
    "long short hair eyes ears smile solo looking viewer simple masterpiece best quality "
    "lowres bad anatomy text blurry tall wide small large bright dark"
).split()


@dataclass
class TinySD:
    """The five parts of a Stable Diffusion model, as training and sampling use them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    def __iter__(self):
        return iter((self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _learn_merges(alphabet: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned (by the tokenizers library) from the tiny word list, so common words become one token."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=5000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False, min_frequency=0)
    learner.train_from_iterator([" ".join(_TINY_WORDS)], trainer)
    return [tuple(merge) for merge in json.loads(learner.to_str())["model"]["merges"]]


def build_tiny_tokenizer():
    """A CLIPTokenizer with CLIP's byte-level alphabet plus merges for common caption words."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges = _learn_merges(alphabet)
    known = set(tokens)
    for left, right in merges:
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = TINY_MAX_TOKENS
    return tokenizer


def build_tiny_text_encoder(vocab_size: int, v2: bool = False):
    """A 4-layer CLIP text encoder, so clip_skip=2 selects a genuinely different layer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TOKENS,
        hidden_act="gelu" if v2 else "quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_tiny_unet(v2: bool = False):
    """Two cross-attention down/up blocks: every module kind LoRA/LoCon/LoHa target is present."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_HIDDEN_SIZE,
        attention_head_dim=(2, 4) if v2 else 8,
        use_linear_projection=v2,
    )


def build_tiny_vae():
    """Four encoder blocks give SD's 8x spatial downscale, so bucket and latent sizes behave like the real VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )


def build_tiny_scheduler(v_prediction: bool = False):
    """The DDPM noise schedule sd-scripts trains with (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )


def build_tiny_sd(seed: int = TINY_SEED, v2: bool = False, v_prediction: bool = False,
                  pretrained: bool | None = None) -> TinySD:
    """Build all parts deterministically: the same seed gives bit-identical weights on every machine.

    ``pretrained`` (default: when the seed and variant are the default ones and the weights file is there) loads
    the pretrained weights that draw; the v2 and v-prediction variants are always random. Each call returns new,
    independent parts: a copy of the ones built once per process (copying is several times faster than building,
    which the test suite does hundreds of times)."""
    if pretrained is None:
        pretrained = seed == TINY_SEED and not v2 and not v_prediction and PRETRAINED_WEIGHTS.is_file()
    if pretrained and (v2 or v_prediction):
        raise ValueError("the pretrained tiny model is SD 1.x with epsilon prediction; use pretrained=False")
    return copy.deepcopy(_built_tiny_sd(seed, v2, v_prediction, pretrained))


@functools.lru_cache(maxsize=4)
def _built_tiny_sd(seed: int, v2: bool, v_prediction: bool, pretrained: bool) -> TinySD:
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer()
        text_encoder = build_tiny_text_encoder(len(tokenizer), v2=v2)
        unet = build_tiny_unet(v2=v2)
        vae = build_tiny_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    parts = TinySD(unet, vae, text_encoder, tokenizer, build_tiny_scheduler(v_prediction))
    if pretrained:
        load_pretrained_weights(parts)
    for model in (unet, vae, text_encoder):
        model.eval()
    return parts


PARTS_WITH_WEIGHTS = ("unet", "vae", "text_encoder")


def save_pretrained_weights(parts: TinySD, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """The three models' weights in one float16 safetensors file (a few MB), with the VAE's latent scale."""
    from lycolab.files import save_safetensors

    tensors = {f"{name}.{key}": value.detach().to(torch.float16).contiguous()
               for name in PARTS_WITH_WEIGHTS for key, value in getattr(parts, name).state_dict().items()}
    info = {**(metadata or {}), "scaling_factor": repr(float(parts.vae.config.scaling_factor))}
    return save_safetensors(Path(path), tensors, info)


def load_pretrained_weights(parts: TinySD, path: str | Path = PRETRAINED_WEIGHTS) -> None:
    """Load the file ``save_pretrained_weights`` wrote into freshly built parts (float32, strict key match)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        info = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for name in PARTS_WITH_WEIGHTS:
        model = getattr(parts, name)
        prefix = name + "."
        stored = {key[len(prefix):]: value.float() for key, value in tensors.items() if key.startswith(prefix)}
        model.load_state_dict(_in_model_layout(stored, set(model.state_dict())), strict=True)
    parts.vae.register_to_config(scaling_factor=float(info["scaling_factor"]))


def _in_model_layout(tensors: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    """transformers 5.x releases differ on whether CLIPTextModel's keys start with ``text_model.``; the file holds
    one layout, the installed release wants its own."""
    if set(tensors) == own_keys:
        return tensors
    wrapped = "text_model."
    if all(wrapped + key in own_keys for key in tensors):
        return {wrapped + key: value for key, value in tensors.items()}
    return {key.removeprefix(wrapped): value for key, value in tensors.items()}


def save_tiny_sd(directory: str | Path, seed: int = TINY_SEED, v2: bool = False, v_prediction: bool = False,
                 pretrained: bool | None = None) -> Path:
    """Write the tiny model as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads offline."""
    return save_tiny_parts(build_tiny_sd(seed, v2=v2, v_prediction=v_prediction, pretrained=pretrained), directory)


def save_tiny_parts(parts: TinySD, directory: str | Path) -> Path:
    """Write built (or trained) tiny parts as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    from lycolab.models.export import save_diffusers_folder

    return save_diffusers_folder(pipeline, Path(directory))


def is_tiny_model(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers folder holding this tiny model or the tiny SDXL (CPU-sized: notebooks train
    them without a GPU)."""
    import json

    config = Path(str(path)) / "unet" / "config.json"
    try:
        unet = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    from lycolab.models.tiny_sdxl import TINY_TE1_WIDTH, TINY_TE2_WIDTH

    widths = (TINY_HIDDEN_SIZE, TINY_TE1_WIDTH + TINY_TE2_WIDTH)
    return unet.get("cross_attention_dim") in widths and max(unet.get("block_out_channels") or [0]) <= 64
