"""sd-scripts' noise and loss options (train_util.get_noise_noisy_latents_and_timesteps, conditional_loss,
custom_train_functions): each formula against values worked out here by hand, then real runs and a resume."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import make_shapes_dataset as make_dataset
from safetensors.torch import load_file

from lycolab.config import ConfigError, TrainConfig, load_config, validate_config
from lycolab.models.tiny import build_tiny_scheduler
from lycolab.training import train
from lycolab.training.batch_loader import PlannedBatch
from lycolab.training.loop import Trainer
from lycolab.training.loss import (
    BATCH_SLOT,
    IP_NOISE_STREAM,
    IP_STRENGTH_STREAM,
    MULTIRES_NOISE_STREAM,
    MULTIRES_SCALE_STREAM,
    OFFSET_STRENGTH_STREAM,
    draw_batch_noise,
    huber_threshold,
    noisy_latents,
    per_sample_loss,
    prepare_noise_scheduler,
    training_target,
    weighted_loss,
)
from lycolab.training.seeds import python_rng, torch_generator

SEED, EPOCH, BATCH = 11, 2, 3
SHAPE = (3, 4, 16, 12)  # batch, channels, height, width


def _draws(**options):
    return draw_batch_noise(TrainConfig(**options), SHAPE, 1000, SEED, EPOCH, BATCH)


def _first_stream():
    """The batch's first stream as sd-scripts' order needs it here: timesteps, noise, then the offset direction."""
    generator = torch_generator(SEED, EPOCH, BATCH)
    timesteps = torch.randint(0, 1000, (SHAPE[0],), generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    direction = torch.randn((SHAPE[0], SHAPE[1], 1, 1), generator=generator)
    return timesteps, noise, direction


def _stream(stream):
    return torch_generator(SEED, EPOCH, BATCH, BATCH_SLOT, stream)


# ------------------------------------------------------------------------------------------------------ noise
def test_plain_noise_is_the_first_streams_normal_draw_and_timesteps_span_the_schedule():
    timesteps, noise, _ = _first_stream()
    draws = _draws()
    assert torch.equal(draws.timesteps, timesteps) and torch.equal(draws.noise(), noise)
    assert draws.perturbation is None and not draws.needs_latent_means


def test_noise_offset_adds_noise_offset_times_one_normal_per_sample_and_channel():
    _, noise, direction = _first_stream()
    assert torch.equal(_draws(noise_offset=0.1).noise(), noise + 0.1 * direction)


def test_noise_offset_random_strength_scales_the_offset_by_a_uniform_draw():
    _, noise, direction = _first_stream()
    strength = torch.rand(1, generator=_stream(OFFSET_STRENGTH_STREAM)) * 0.1
    assert 0 <= strength.item() < 0.1
    assert torch.equal(_draws(noise_offset=0.1, noise_offset_random_strength=True).noise(),
                       noise + strength * direction)


def test_adaptive_noise_scale_adds_the_latents_absolute_channel_means_to_the_offset_clamped_at_zero():
    _, noise, direction = _first_stream()
    means = torch.linspace(-2.0, 2.0, SHAPE[0] * SHAPE[1]).reshape(SHAPE[0], SHAPE[1], 1, 1)
    draws = _draws(noise_offset=0.1, adaptive_noise_scale=0.05)
    assert draws.needs_latent_means
    assert torch.equal(draws.noise(means), noise + (0.1 + 0.05 * means.abs()) * direction)
    negative = _draws(noise_offset=0.1, adaptive_noise_scale=-0.1).noise(means)
    strength = torch.clamp(0.1 - 0.1 * means.abs(), min=0.0)
    assert torch.equal(negative, noise + strength * direction)
    assert (strength == 0).any() and (strength > 0).any()


def _pyramid_by_hand(iterations, discount, start):
    """sd-scripts' pyramid_noise_like written out: level i adds noise drawn at 1/rⁱ of the size with r in [2, 4),
    resized bilinearly, times discountⁱ; it stops after a level 1 pixel high or wide; then unit std."""
    scales = python_rng(SEED, EPOCH, BATCH, BATCH_SLOT, MULTIRES_SCALE_STREAM)
    generator = _stream(MULTIRES_NOISE_STREAM)
    batch, channels, height, width = SHAPE
    resize = torch.nn.Upsample(size=(height, width), mode="bilinear")
    noise, levels = start, 0
    for level in range(iterations):
        ratio = scales.random() * 2 + 2
        small_height, small_width = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        noise = noise + resize(torch.randn((batch, channels, small_height, small_width), generator=generator)) \
            * discount**level
        levels += 1
        if small_height == 1 or small_width == 1:
            break
    return noise / noise.std(), levels


def test_multires_noise_adds_the_pyramid_levels_and_normalises_the_whole_batch():
    _, noise, direction = _first_stream()
    draws = _draws(multires_noise_iterations=3, multires_noise_discount=0.4)
    expected, levels = _pyramid_by_hand(3, 0.4, noise)
    assert levels == 3 and len(draws.pyramid) == 3
    assert torch.equal(draws.noise(), expected)
    torch.testing.assert_close(draws.noise().std(), torch.tensor(1.0))
    # 12 px wide: the pyramid reaches one pixel after a few levels whatever the iterations asked for
    deep = _draws(multires_noise_iterations=50)
    expected, levels = _pyramid_by_hand(50, 0.3, noise)
    assert levels < 10 and len(deep.pyramid) == levels and torch.equal(deep.noise(), expected)


def test_multires_noise_comes_after_the_noise_offset_as_in_sd_scripts():
    _, noise, direction = _first_stream()
    expected, _ = _pyramid_by_hand(4, 0.3, noise + 0.1 * direction)
    assert torch.equal(_draws(noise_offset=0.1, multires_noise_iterations=4).noise(), expected)


def test_ip_noise_gamma_perturbs_the_noisy_latents_but_not_the_target():
    scheduler = build_tiny_scheduler()
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    timesteps, noise, _ = _first_stream()
    draws = _draws(ip_noise_gamma=0.1)
    perturbation = 0.1 * torch.randn(SHAPE, generator=_stream(IP_NOISE_STREAM))
    assert torch.equal(draws.perturbation, perturbation) and torch.equal(draws.noise(), noise)
    noisy = noisy_latents(scheduler, latents, draws.noise(), draws.timesteps, draws.perturbation)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise + perturbation, timesteps))
    assert not torch.equal(noisy, scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(training_target(scheduler, latents, draws.noise(), draws.timesteps), noise)

    strength = torch.rand(1, generator=_stream(IP_STRENGTH_STREAM)) * 0.1
    random = _draws(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    assert torch.equal(random.perturbation, strength * torch.randn(SHAPE, generator=_stream(IP_NOISE_STREAM)))


def test_each_option_draws_from_its_own_stream_so_the_others_stay_the_same():
    plain = _draws()
    everything = _draws(noise_offset=0.1, noise_offset_random_strength=True, multires_noise_iterations=3,
                        ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    assert torch.equal(everything.timesteps, plain.timesteps) and torch.equal(everything.base, plain.base)
    assert torch.equal(everything.pyramid[1], _draws(multires_noise_iterations=3).pyramid[1])
    again = _draws(noise_offset=0.1, noise_offset_random_strength=True, multires_noise_iterations=3,
                   ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    assert torch.equal(again.noise(), everything.noise()) and torch.equal(again.perturbation, everything.perturbation)


def test_timesteps_stay_in_min_timestep_to_max_timestep():
    def timesteps(**options):
        return draw_batch_noise(TrainConfig(**options), (4000, 4, 1, 1), 1000, SEED, EPOCH, BATCH).timesteps

    drawn = timesteps(min_timestep=100, max_timestep=110)
    assert drawn.min() == 100 and drawn.max() == 109  # [min, max): every value drawn, 110 never
    assert timesteps(min_timestep=990).min() == 990 and timesteps(min_timestep=990).max() == 999
    assert timesteps(max_timestep=5).max() == 4 and timesteps(max_timestep=5).min() == 0
    assert torch.equal(timesteps(min_timestep=500, max_timestep=500), torch.full((4000,), 500))  # sd-scripts: fixed
    generator = torch_generator(SEED, EPOCH, BATCH)
    assert torch.equal(drawn, torch.randint(100, 110, (4000,), generator=generator))


# ------------------------------------------------------------------------------------------- noise schedule
def test_zero_terminal_snr_makes_the_last_alphas_cumprod_zero_and_keeps_the_first():
    original, scheduler = build_tiny_scheduler(), build_tiny_scheduler()
    prepare_noise_scheduler(scheduler, zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.betas[-1] == 1
    torch.testing.assert_close(scheduler.alphas_cumprod[0], original.alphas_cumprod[0])
    assert (scheduler.alphas_cumprod[1:] < scheduler.alphas_cumprod[:-1]).all()
    # Lin et al. 2023, Algorithm 1, in float64: √ᾱ shifted by its last value and scaled back to its first
    root = original.alphas_cumprod.double().sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
    # the loss weights keep the SNR of the schedule before the fix, as in sd-scripts (its all_snr is taken first)
    ac = original.alphas_cumprod.double()
    torch.testing.assert_close(scheduler.all_snr.double(), ac / (1 - ac), rtol=1e-5, atol=0)


def test_without_zero_terminal_snr_the_schedule_is_unchanged():
    original, scheduler = build_tiny_scheduler(), build_tiny_scheduler()
    prepare_noise_scheduler(scheduler)
    assert torch.equal(scheduler.alphas_cumprod, original.alphas_cumprod)
    assert scheduler.alphas_cumprod[-1] > 0


# ---------------------------------------------------------------------------------------------- loss weights
TIMESTEPS = torch.tensor([0, 1, 10, 500, 999])


def _snr_by_hand(scheduler):
    ac = scheduler.alphas_cumprod.double()[TIMESTEPS]
    return ac / (1 - ac)


def _weights(scheduler, **options):
    prepare_noise_scheduler(scheduler)
    return weighted_loss(torch.ones(len(TIMESTEPS)), TIMESTEPS, scheduler, TrainConfig(**options)).double()


def test_the_snr_at_timestep_zero_is_over_the_cap_of_1000():
    assert _snr_by_hand(build_tiny_scheduler())[0] > 1000 > _snr_by_hand(build_tiny_scheduler())[1]


@pytest.mark.parametrize("v_prediction", [False, True], ids=["epsilon", "v"])
def test_debiased_estimation_weighs_by_one_over_root_snr_or_one_over_snr_plus_one(v_prediction):
    scheduler = build_tiny_scheduler(v_prediction)
    snr = _snr_by_hand(scheduler).clamp(max=1000)
    expected = 1 / (snr + 1) if v_prediction else 1 / snr.sqrt()
    torch.testing.assert_close(_weights(scheduler, debiased_estimation_loss=True), expected, rtol=1e-5, atol=0)


def test_scale_v_pred_loss_like_noise_pred_weighs_by_snr_over_snr_plus_one():
    scheduler = build_tiny_scheduler(v_prediction=True)
    snr = _snr_by_hand(scheduler).clamp(max=1000)
    torch.testing.assert_close(_weights(scheduler, scale_v_pred_loss_like_noise_pred=True), snr / (snr + 1),
                               rtol=1e-5, atol=0)


def test_v_pred_like_loss_adds_k_times_the_loss_over_snr_over_snr_plus_one():
    scheduler = build_tiny_scheduler()
    snr = _snr_by_hand(scheduler).clamp(max=1000)
    torch.testing.assert_close(_weights(scheduler, v_pred_like_loss=0.3), 1 + 0.3 * (snr + 1) / snr,
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("v_prediction", [False, True], ids=["epsilon", "v"])
def test_the_weights_combine_in_sd_scripts_order_after_min_snr_gamma(v_prediction):
    scheduler = build_tiny_scheduler(v_prediction)
    snr = _snr_by_hand(scheduler)
    capped = snr.clamp(max=1000)
    loss = snr.clamp(max=5.0) / (snr + 1 if v_prediction else snr)  # min_snr_gamma = 5
    if v_prediction:
        loss = loss * capped / (capped + 1) / (capped + 1)  # scale_v_pred_loss_like_noise_pred, then debiased
        options = {"scale_v_pred_loss_like_noise_pred": True}
    else:
        loss = (loss + loss / (capped / (capped + 1)) * 0.3) / capped.sqrt()  # v_pred_like_loss, then debiased
        options = {"v_pred_like_loss": 0.3}
    weights = _weights(scheduler, min_snr_gamma=5.0, debiased_estimation_loss=True, **options)
    torch.testing.assert_close(weights, loss, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------- loss types
def test_huber_c_schedules_per_timestep():
    scheduler = build_tiny_scheduler()
    exponential = TrainConfig(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5)
    expected = torch.tensor([1.5 * math.exp(math.log(0.2) * t / 1000) for t in TIMESTEPS.tolist()])
    torch.testing.assert_close(huber_threshold(exponential, scheduler, TIMESTEPS), expected)
    ac = scheduler.alphas_cumprod.double()[TIMESTEPS]
    sigma = ((1 - ac) / ac).sqrt()
    snr = dataclasses.replace(exponential, huber_schedule="snr")  # huber_scale is not used, as in sd-scripts
    torch.testing.assert_close(huber_threshold(snr, scheduler, TIMESTEPS).double(), 0.8 / (1 + sigma) ** 2 + 0.2,
                               rtol=1e-5, atol=0)
    constant = dataclasses.replace(exponential, loss_type="smooth_l1", huber_schedule="constant")
    assert torch.equal(huber_threshold(constant, scheduler, TIMESTEPS), torch.full((5,), 0.2 * 1.5))
    assert huber_threshold(dataclasses.replace(constant, loss_type="l2"), scheduler, TIMESTEPS) is None


def test_loss_types_follow_their_formulas_per_sample():
    prediction = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 0.25, -0.5, 1.0]]).reshape(2, 1, 2, 2)
    target = torch.tensor([[0.0, 1.0, 2.5, -0.1], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    c = torch.tensor([0.1, 0.7])
    difference = (prediction - target).double().reshape(2, 4)
    huber_c = c.double().reshape(2, 1)
    excess = (difference**2 + huber_c**2).sqrt() - huber_c
    expected = {
        "l2": (difference**2).mean(dim=1),
        "l1": difference.abs().mean(dim=1),
        "huber": (2 * huber_c * excess).mean(dim=1),
        "smooth_l1": (2 * excess).mean(dim=1),
    }
    for loss_type, values in expected.items():
        torch.testing.assert_close(per_sample_loss(prediction, target, loss_type, c).double(), values,
                                   rtol=1e-6, atol=1e-7, msg=loss_type)
    # huber: quadratic for errors well below c, 2c|d| - 2c² for ones well above
    small, large = torch.full((1, 1, 1, 1), 0.05), torch.full((1, 1, 1, 1), 100.0)
    zero, one = torch.zeros((1, 1, 1, 1)), torch.tensor([1.0])
    torch.testing.assert_close(per_sample_loss(small, zero, "huber", one), torch.tensor([0.0025]), rtol=1e-3, atol=0)
    torch.testing.assert_close(per_sample_loss(large, zero, "huber", one), torch.tensor([198.01]), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("options", "message"), [
    ({"adaptive_noise_scale": 0.05}, "adaptive_noise_scale requires noise_offset"),
    ({"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred_loss_like_noise_pred can be enabled only with "
                                                  "v_parameterization"),
    ({"v_pred_like_loss": 0.2, "v_parameterization": True}, "v_pred_like_loss cannot be enabled with "
                                                             "v_parameterization"),
    ({"loss_type": "l3"}, "loss_type must be one of l1, l2, huber, smooth_l1"),
    ({"huber_schedule": "linear"}, "huber_schedule must be one of constant, exponential, snr"),
    ({"loss_type": "huber", "huber_c": 0.0}, "huber_c must be > 0"),
    ({"loss_type": "smooth_l1", "huber_scale": -1.0}, "huber_scale must be > 0"),
    ({"min_timestep": -1}, "min_timestep must be between 0 and 999"),
    ({"min_timestep": 1000}, "min_timestep must be between 0 and 999"),
    ({"max_timestep": 1001}, "max_timestep must be between 1 and 1000"),
    ({"max_timestep": 0}, "max_timestep must be between 1 and 1000"),
    ({"min_timestep": 600, "max_timestep": 400}, "min_timestep (600) must be <= max_timestep (400)"),
    ({"ip_noise_gamma": -0.1}, "ip_noise_gamma must be >= 0"),
    ({"v_pred_like_loss": -1.0}, "v_pred_like_loss must be >= 0"),
    ({"multires_noise_iterations": -2}, "multires_noise_iterations must be >= 0"),
])
def test_values_and_combinations_sd_scripts_refuses_are_one_line_errors_naming_the_key(options, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_zero_terminal_snr_without_v_parameterization_only_warns_as_in_sd_scripts(caplog):
    validate_config(TrainConfig(zero_terminal_snr=True), "config")
    assert "zero_terminal_snr is enabled but v_parameterization is not" in caplog.text
    caplog.clear()
    validate_config(TrainConfig(zero_terminal_snr=True, v_parameterization=True), "config")
    assert "zero_terminal_snr" not in caplog.text


def test_a_written_config_keeps_the_options(tmp_path):
    from lycolab.config import read_config_file, write_config_file

    options = {"noise_offset": 0.1, "adaptive_noise_scale": 0.01, "multires_noise_iterations": 6,
               "ip_noise_gamma": 0.05, "min_timestep": 10, "max_timestep": 900, "loss_type": "huber",
               "huber_schedule": "exponential", "zero_terminal_snr": True, "debiased_estimation_loss": True}
    written = read_config_file(write_config_file(TrainConfig(**options), tmp_path / "config_file.toml"))
    assert {key: getattr(written, key) for key in options} == options


# ------------------------------------------------------------------------------------------------ training
def _config(model, data, out, **options):
    return load_config(overrides={
        "pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "resolution": "64",
        "caption_extension": ".txt", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3,
        "train_batch_size": 2, "seed": 4, "output_dir": str(out), "save_precision": "float", **options,
    })


EPSILON_OPTIONS = {
    "noise_offset": 0.1, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.05,
    "multires_noise_iterations": 6, "multires_noise_discount": 0.3, "ip_noise_gamma": 0.1,
    "ip_noise_gamma_random_strength": True, "min_timestep": 50, "max_timestep": 950, "zero_terminal_snr": True,
    "debiased_estimation_loss": True, "v_pred_like_loss": 0.2, "min_snr_gamma": 5.0, "loss_type": "huber",
    "huber_schedule": "snr", "huber_c": 0.1,
}
V_OPTIONS = {**{key: value for key, value in EPSILON_OPTIONS.items() if key != "v_pred_like_loss"},
             "v_parameterization": True, "scale_v_pred_loss_like_noise_pred": True, "loss_type": "smooth_l1",
             "huber_schedule": "exponential", "huber_scale": 2.0}


@pytest.mark.parametrize("options", [EPSILON_OPTIONS, V_OPTIONS], ids=["epsilon", "v"])
def test_a_run_with_every_option_on_trains_with_finite_loss(tiny_model_dir, tmp_path, options):
    data = make_dataset(tmp_path / "train")
    result = train(_config(tiny_model_dir, data, tmp_path / "o", max_train_steps=2, cache_latents=True, **options),
                   progress=False)
    assert result.total_steps == 2 and all(math.isfinite(loss) for loss in result.history.losses)
    weights = load_file(str(result.saved_files[-1]))
    assert all(torch.isfinite(value).all() for value in weights.values())


# (base options, the option switched on): each must change the first step's loss, which is the run's loss history
EFFECTS = [
    ({}, {"noise_offset": 0.1}),
    ({"noise_offset": 0.1}, {"noise_offset_random_strength": True}),
    ({"noise_offset": 0.1}, {"adaptive_noise_scale": 0.5}),
    ({}, {"multires_noise_iterations": 6}),
    ({"multires_noise_iterations": 6}, {"multires_noise_discount": 0.8}),
    ({}, {"ip_noise_gamma": 0.1}),
    ({"ip_noise_gamma": 0.1}, {"ip_noise_gamma_random_strength": True}),
    ({}, {"min_timestep": 990}),  # the seed's first timesteps are 715 and 512
    ({}, {"max_timestep": 10}),
    ({}, {"zero_terminal_snr": True, "min_timestep": 900}),
    ({}, {"debiased_estimation_loss": True}),
    ({}, {"v_pred_like_loss": 0.5}),
    ({"v_parameterization": True}, {"scale_v_pred_loss_like_noise_pred": True}),
    ({}, {"loss_type": "l1"}),
    ({}, {"loss_type": "huber"}),
    ({}, {"loss_type": "smooth_l1"}),
    ({"loss_type": "huber"}, {"huber_schedule": "exponential"}),
    ({"loss_type": "huber"}, {"huber_schedule": "constant"}),
    ({"loss_type": "huber"}, {"huber_c": 0.3}),
    ({"loss_type": "huber", "huber_schedule": "constant"}, {"huber_scale": 2.0}),
]


@pytest.fixture(scope="module")
def trainers(tiny_model_dir, tmp_path_factory):
    """One set-up trainer per prediction type; each variant below only swaps the config (and the schedule)."""
    root = tmp_path_factory.mktemp("effects")
    data = make_dataset(root / "train")
    made = {}
    for v_prediction in (False, True):
        trainer = Trainer(_config(tiny_model_dir, data, root / f"o{v_prediction}", max_train_steps=1,
                                  cache_latents=True, v_parameterization=v_prediction), progress=False)
        trainer.setup()
        made[v_prediction] = trainer
    yield made
    _LOSSES.clear()
    for trainer in made.values():
        trainer._close_log()


def _first_step_loss(trainer: Trainer, **options) -> float:
    """The first step's loss as the run computes it (micro_step's loss_sum over its batch), without the update;
    remembered, since the bases repeat."""
    key = (id(trainer), tuple(sorted(options.items())))
    if key not in _LOSSES:
        _LOSSES[key] = _compute_first_step_loss(trainer, **options)
    return _LOSSES[key]


_LOSSES: dict[tuple, float] = {}


def _compute_first_step_loss(trainer: Trainer, **options) -> float:
    base_config, base_scheduler = trainer.config, trainer.parts.noise_scheduler
    trainer.config = dataclasses.replace(base_config, **options)
    validate_config(trainer.config, "test")
    if trainer.config.zero_terminal_snr:
        trainer.parts.noise_scheduler = copy.deepcopy(base_scheduler)
        prepare_noise_scheduler(trainer.parts.noise_scheduler, zero_terminal_snr=True)
    try:
        batch = trainer.dataset.make_batches(1)[0]
        shape = (len(batch), 4, 8, 8)
        draws = draw_batch_noise(trainer.config, shape, 1000, trainer.seed, 1, 0)
        with torch.no_grad():
            inputs = trainer.batch_reader([PlannedBatch(1, 0, tuple(batch), 0)])[0]
            return (trainer.loss_sum(inputs, draws) / len(batch)).item()
    finally:
        trainer.config, trainer.parts.noise_scheduler = base_config, base_scheduler


@pytest.mark.parametrize(("base", "option"), EFFECTS, ids=[",".join(option) for _, option in EFFECTS])
def test_each_option_changes_the_loss(trainers, base, option):
    trainer = trainers[bool(base.get("v_parameterization"))]
    base = {key: value for key, value in base.items() if key != "v_parameterization"}
    without, with_option = _first_step_loss(trainer, **base), _first_step_loss(trainer, **base, **option)
    assert math.isfinite(with_option) and with_option != without


def test_huber_scale_does_not_change_the_snr_schedule_as_in_sd_scripts(trainers):
    trainer = trainers[False]
    assert _first_step_loss(trainer, loss_type="huber", huber_scale=3.0) == _first_step_loss(trainer, loss_type="huber")


def test_the_first_step_loss_here_is_the_runs_loss_history(tiny_model_dir, tmp_path, trainers):
    data = make_dataset(tmp_path / "train")
    options = {"noise_offset": 0.1, "ip_noise_gamma": 0.1, "multires_noise_iterations": 4, "loss_type": "huber"}
    result = train(_config(tiny_model_dir, data, tmp_path / "o", max_train_steps=1, cache_latents=True, **options),
                   progress=False)
    assert result.history.losses == [pytest.approx(_first_step_loss(trainers[False], **options), rel=1e-6)]


def test_a_resumed_run_with_the_random_options_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "train")
    options = {"noise_offset": 0.1, "noise_offset_random_strength": True, "adaptive_noise_scale": 0.05,
               "multires_noise_iterations": 4, "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True,
               "min_timestep": 20, "max_timestep": 980, "loss_type": "smooth_l1", "max_train_steps": 4,
               "save_state": True, "save_every_n_steps": 2, "output_name": "run", "cache_latents": True}
    full = train(_config(tiny_model_dir, data, tmp_path / "full", **options), progress=False)
    state = tmp_path / "full" / "run-step00000002-state"
    resumed = train(_config(tiny_model_dir, data, tmp_path / "resumed", resume=str(state), **options),
                    progress=False)
    assert resumed.resumed_from == state and resumed.total_steps == 4
    first, second = load_file(str(full.saved_files[-1])), load_file(str(resumed.saved_files[-1]))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    assert resumed.history.losses == full.history.losses
