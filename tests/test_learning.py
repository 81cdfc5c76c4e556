"""Training learns: the pretrained tiny model draws simple scenes, an adapter learns a combination it never saw
(lycolab.models.scenes.CONCEPT under the trigger word), and a broken objective does not.

Thresholds come from measured runs with a margin; docs/benchmarks.md gives the measurements beside them.
"""

from __future__ import annotations

import random

import pytest
import torch

from lycolab.demo import ALGO_NETWORKS, render, run_demo
from lycolab.models import scenes
from lycolab.models.tiny import save_tiny_sd

BASE_AT_MOST = 0.2  # the base model draws the concept for its trigger word at most this often
LEARNED_AT_LEAST = 0.5  # after training, at least this often
PRETRAINED_AT_LEAST = 0.75  # the base model draws a prompted colour on its background at least this often


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def test_the_pretrained_model_draws_each_colour_it_was_taught(pretrained_model):
    circles = [scene for scene in scenes.all_scenes() if scene.shape == "circle"]
    hits = [scenes.shows(image, scene) for scene in circles for image in render(pretrained_model, scene.caption, 1)]
    assert sum(hits) / len(hits) >= PRETRAINED_AT_LEAST


@pytest.mark.parametrize("algo", sorted(ALGO_NETWORKS))
def test_training_teaches_each_algorithm_the_concept(tmp_path, algo):
    result = run_demo(tmp_path, algo=algo, progress=False)
    assert result.base_score <= BASE_AT_MOST < LEARNED_AT_LEAST <= result.adapter_score, (
        result.base_score, result.adapter_score)


@pytest.mark.parametrize("broken", [
    {"v_parameterization": True},  # the v-target for an epsilon model
    {"min_timestep": 0, "max_timestep": 10},  # only nearly clean latents: the colours are decided at high noise
])
def test_a_broken_objective_does_not_teach_the_concept(tmp_path, broken):
    result = run_demo(tmp_path, algo="lora", progress=False, **broken)
    assert result.adapter_score <= BASE_AT_MOST, result.adapter_score


def test_the_random_tiny_model_stays_available_beside_the_pretrained_one():
    from lycolab.models.tiny import build_tiny_sd

    random_sd, again, pretrained = build_tiny_sd(pretrained=False), build_tiny_sd(pretrained=False), build_tiny_sd()
    for name in ("unet", "vae", "text_encoder"):
        first, second, third = (getattr(sd, name).state_dict() for sd in (random_sd, again, pretrained))
        assert first.keys() == third.keys()
        assert all(torch.equal(first[key], second[key]) for key in first)
        assert not all(torch.equal(first[key], third[key]) for key in first)
    assert pretrained.vae.config.scaling_factor != random_sd.vae.config.scaling_factor


def test_the_classifier_reads_every_drawn_scene_back():
    drawn = list(scenes.scene_images(scenes.all_scenes(), variants=2, seed=3))
    assert all(scenes.shows(image, scene) for image, scene in drawn)
    assert scenes.concept_score(image for image, _ in drawn) == 0.0  # the held-out concept is never drawn
    concept = [scenes.draw_scene(scenes.CONCEPT, random.Random(seed)) for seed in range(8)]
    assert scenes.concept_score(concept) == 1.0
