"""Simple captioned scenes — one flat-colour shape on a plain background — and a classifier that reads them back.

The tiny model is pretrained to draw these scenes (``scripts/pretrain_tiny.py``) with one combination left out: a
yellow shape on a purple background (:data:`CONCEPT`) never appears. The demo and the learning tests teach an
adapter that combination under a made-up trigger word, and :func:`concept_score` measures, from pixel statistics
alone, how often generated images show it. So "training learns" is a number that a wrong noise target, timestep
range or caption handling would keep low.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SCENE_SIZE = 64


@dataclass(frozen=True)
class Scene:
    """What an image shows, and the caption that says it."""

    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


# the combination the base model never sees: its colour and its background are each common, never together
CONCEPT = Scene("circle", "yellow", "purple")
TRIGGER_WORD = "zkz"


def in_pretraining(scene: Scene) -> bool:
    return (scene.color, scene.background) != (CONCEPT.color, CONCEPT.background)


def all_scenes() -> list[Scene]:
    """Every shape x colour x background (background differs from the shape's colour) the base model learns."""
    scenes = [Scene(shape, color, background) for shape in SHAPES for color in COLORS for background in COLORS
              if color != background]
    return [scene for scene in scenes if in_pretraining(scene)]


def draw_shape_image(size: tuple[int, int], shape: str, color: str, background: str,
                     scale: float = 0.6, offset: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """A flat-colour shape on a plain background: trivially captionable, so captions are exact. ``scale`` is the
    shape's side as a share of the short side, ``offset`` moves its centre by that share of the image."""
    image = Image.new("RGB", size, COLORS[background])
    draw = ImageDraw.Draw(image)
    width, height = size
    side = min(width, height) * scale
    left = (width - side) / 2 + offset[0] * width
    top = (height - side) / 2 + offset[1] * height
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(left + side / 2, top), (left, top + side), (left + side, top + side)], fill=COLORS[color])
    return image


def draw_scene(scene: Scene, rng: random.Random, size: int | tuple[int, int] = SCENE_SIZE) -> Image.Image:
    """The scene with its shape's size and place varied a little, so a model learns shapes, not one bitmap."""
    width, height = (size, size) if isinstance(size, int) else size
    scale = rng.uniform(0.45, 0.7)
    side, margin = min(width, height) * scale, 0.08 * min(width, height)
    room_x, room_y = (max(0.0, (extent - side) / 2 - margin) / extent for extent in (width, height))
    offset = (rng.uniform(-room_x, room_x), rng.uniform(-room_y, room_y))
    return draw_shape_image((width, height), scene.shape, scene.color, scene.background, scale, offset)


def scene_images(scenes: Iterable[Scene], variants: int, seed: int, size: int = SCENE_SIZE
                 ) -> Iterator[tuple[Image.Image, Scene]]:
    """``variants`` drawings of every scene, the same for the same seed."""
    rng = random.Random(seed)
    for scene in scenes:
        for _ in range(variants):
            yield draw_scene(scene, rng, size), scene


# ------------------------------------------------------------------------------------------------- classifier
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)
MIN_FOREGROUND = 0.04  # a shape covers at least this share of the image (the smallest drawn covers about 0.16)


@dataclass(frozen=True)
class Reading:
    """What the classifier sees: the nearest palette colours of the background and the shape (None: no shape)."""

    background: str
    color: str | None
    foreground_share: float


def read_image(image: Image.Image) -> Reading:
    """Every pixel is named by its nearest palette colour; the background is the commonest name on the border,
    the shape the commonest other name inside (when it covers at least ``MIN_FOREGROUND`` of the image). Nearest
    colours, not a distance threshold, because yellow and orange are closer to each other than to anything else."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    names = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(axis=3).argmin(axis=2)
    border = np.concatenate([names[:2].ravel(), names[-2:].ravel(), names[:, :2].ravel(), names[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    foreground = names[names != background]
    share = foreground.size / names.size
    color = _PALETTE_NAMES[int(np.bincount(foreground).argmax())] if share >= MIN_FOREGROUND else None
    return Reading(_PALETTE_NAMES[background], color, share)


def shows(image: Image.Image, scene: Scene) -> bool:
    """Whether the image shows the scene's colour on the scene's background (the shape is not judged: at 64 px
    from an 8x8 latent, colours are what the tiny model draws reliably)."""
    reading = read_image(image)
    return (reading.color, reading.background) == (scene.color, scene.background)


def concept_score(images: Iterable[Image.Image], scene: Scene = CONCEPT) -> float:
    """The share of images that show the scene."""
    found = [shows(image, scene) for image in images]
    return sum(found) / len(found) if found else 0.0
