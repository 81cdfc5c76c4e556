"""Shared fixtures: everything is built locally (tiny model, generated images); the hub is never contacted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

from lycolab.demo import draw_shape_image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property-based tests: the "ci" profile is fixed-seed and small (the whole fuzz share of `make test` stays within
# about 3 minutes); `make fuzz` selects "fuzz" for long runs that look much further.
_QUIET_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET_CHECKS)
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET_CHECKS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny SD (random weights: these tests need its architecture, not its drawing) saved once per session as a
    diffusers folder."""
    from lycolab.models.tiny import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd", pretrained=False)


@pytest.fixture
def tiny_sd():
    """A fresh tiny SD per test: networks wrap modules in place, so tests must not share one."""
    from lycolab.models.tiny import build_tiny_sd

    return build_tiny_sd(pretrained=False)


def write_images(directory: Path, sizes: list[tuple[int, int]], captions: list[str] | None = None,
                 extension: str = ".txt") -> list[Path]:
    """Solid-colour PNGs of the given sizes with optional caption files beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes):
        path = directory / f"img_{index:03d}.png"
        Image.new("RGB", size, ((index * 60) % 256, 120, 200)).save(path)
        if captions is not None:
            path.with_suffix(extension).write_text(captions[index % len(captions)], encoding="utf-8")
        paths.append(path)
    return paths


SHAPE_IMAGES = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "green", "white"),
                ("circle", "purple", "orange")]


def make_shapes_dataset(root: Path) -> Path:
    """Four 64 px shape images with captions in ``root/2_shapes`` (8 per epoch with repeats); returns ``root``."""
    folder = root / "2_shapes"
    folder.mkdir(parents=True)
    for index, (shape, color, background) in enumerate(SHAPE_IMAGES):
        draw_shape_image((64, 64), shape, color, background).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"sks, {color} {shape}, {background} background", encoding="utf-8")
    return root


def randomize_parameters(parameters, seed: int = 5, std: float = 0.1) -> None:
    """Give an adapter non-zero weights (a fresh one changes nothing), the same on every machine."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def assert_same_delta_weights(adapters, reference_modules, lora_like: bool) -> None:
    """Every layer's ΔW equals the reference LyCORIS module's, as its forward applies it (LoRA/LoCon modules scale
    ``make_weight``, the others ``get_weight``)."""
    import torch

    by_name = {module.lora_name: module for module in reference_modules}
    with torch.no_grad():
        for adapter in adapters:
            module = by_name[adapter.lora_name]
            if lora_like:
                expected = module.make_weight() * module.scale
            else:
                expected = module.get_weight(module.shape) * module.scalar
            torch.testing.assert_close(adapter.delta_weight(), expected.reshape(adapter.weight_shape), rtol=1e-5,
                                       atol=1e-6, msg=adapter.lora_name)


class LibraryWarnings(logging.Handler):
    """Warnings of libraries whose loggers do not propagate to the root logger (diffusers'), which caplog misses:
    add it to their loggers directly."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())
