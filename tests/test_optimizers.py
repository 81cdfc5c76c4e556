"""Every optimizer_type and lr_scheduler name from sd-scripts builds and steps, or says clearly why not.

The schedules are checked step by step against the formulas of the functions sd-scripts' get_scheduler_fix calls
(transformers.optimization; diffusers' piecewise_constant), with the arguments it passes them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import types

import pytest
import tomli_w
import torch
from conftest import make_shapes_dataset, write_images
from safetensors.torch import load_file

from lycolab.config import ConfigError, TrainConfig, load_config, scheduler_args_dict
from lycolab.training import train
from lycolab.training.loop import Trainer
from lycolab.training.optim import BITSANDBYTES_OPTIMIZERS, OPTIMIZER_NAMES, build_optimizer
from lycolab.training.schedule import ScheduleFreeLR, build_lr_scheduler, lr_scheduler_for, resolve_steps

HAS_SCHEDULEFREE = importlib.util.find_spec("schedulefree") is not None
SCHEDULE_FREE = ("RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")
EXPECTED_CLASSES = {
    "AdamW": "AdamW", "SGDNesterov": "SGD", "Lion": "Lion", "DAdaptation": "DAdaptAdamPreprint",
    "DAdaptAdamPreprint": "DAdaptAdamPreprint", "DAdaptAdam": "DAdaptAdam", "DAdaptAdaGrad": "DAdaptAdaGrad",
    "DAdaptAdan": "DAdaptAdan", "DAdaptAdanIP": "DAdaptAdanIP", "DAdaptLion": "DAdaptLion",
    "DAdaptSGD": "DAdaptSGD", "Prodigy": "Prodigy", "AdaFactor": "Adafactor",
    **{name: name for name in SCHEDULE_FREE},
    # without CUDA the bitsandbytes optimizers fall back to the 32-bit one of their family, with a warning
    "AdamW8bit": "AdamW", "PagedAdamW": "AdamW", "PagedAdamW8bit": "AdamW", "PagedAdamW32bit": "AdamW",
    "Lion8bit": "Lion", "PagedLion8bit": "Lion", "SGDNesterov8bit": "SGD",
}
FALLBACK_NAMES = {"AdamW": "AdamW", "Lion": "Lion", "SGD": "SGDNesterov"}


def _groups() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    return model, [{"params": list(model[0].parameters()), "lr": 1e-2, "name": "unet"},
                   {"params": list(model[1].parameters()), "lr": 5e-3, "name": "textencoder"}]


def _step(model: torch.nn.Module, optimizer) -> float:
    inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    loss = model(inputs).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_the_name_list_is_sd_scripts_get_optimizer_list():
    assert set(EXPECTED_CLASSES) == set(OPTIMIZER_NAMES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the 8-bit optimizers")
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_name_builds_and_steps(name, caplog):
    model, groups = _groups()
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-2
    if name in SCHEDULE_FREE and not HAS_SCHEDULEFREE:
        with pytest.raises(ConfigError, match=f"^optimizer_type {name} needs the schedulefree package: pip install "
                                              "schedulefree$"):
            build_optimizer(name, groups, lr, [])
        return
    with caplog.at_level(logging.WARNING):
        choice = build_optimizer(name.lower() if name == "AdamW" else name, groups, lr, [])
    assert type(choice.optimizer).__name__ == EXPECTED_CLASSES[name]
    for _ in range(8 if name == "RAdamScheduleFree" else 3):  # RAdam's first steps (rho_t <= 4) do not move
        loss = _step(model, choice.optimizer)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "nothing moved"
    assert choice.schedule_free == (name in SCHEDULE_FREE)
    if name.lower() in BITSANDBYTES_OPTIMIZERS:
        assert f"optimizer_type {name} needs a CUDA GPU (bitsandbytes)" in caplog.text
        assert len([r for r in caplog.records if "needs a CUDA GPU" in r.message]) == 1
        assert choice.name == FALLBACK_NAMES[EXPECTED_CLASSES[name]]
    else:
        assert "needs a CUDA GPU" not in caplog.text and choice.name == name


def test_dadaptation_is_the_preprint_adam_as_in_sd_scripts():
    choice = build_optimizer("DAdaptation", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1.0, [])
    assert type(choice.optimizer).__module__ == "dadaptation.experimental.dadapt_adam_preprint"
    assert choice.name == "DAdaptation"
    assert type(build_optimizer("dadaptadanip", _groups()[1], 1.0, []).optimizer).__module__.startswith(
        "dadaptation.experimental")


def test_optimizer_args_are_parsed_and_passed():
    model, groups = _groups()
    choice = build_optimizer("AdamW", groups, 1e-3, ["weight_decay=0.05", "betas=0.8,0.95", "amsgrad=true"])
    group = choice.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.05, (0.8, 0.95), True)
    assert group["lr"] == 1e-2 and choice.optimizer.param_groups[1]["lr"] == 5e-3  # per-group lrs kept


@pytest.mark.parametrize(("name", "args", "recorded"), [
    ("AdamW", [], "torch.optim.adamw.AdamW"),  # sd-scripts writes no "()" without arguments
    ("AdamW", ["weight_decay=0.1"], "torch.optim.adamw.AdamW(weight_decay=0.1)"),
    ("SGDNesterov", [], "torch.optim.sgd.SGD(momentum=0.9)"),  # the momentum sd-scripts adds is recorded
    ("AdaFactor", [], "transformers.optimization.Adafactor(relative_step=True)"),
    ("AdaFactor", ["relative_step=False", "warmup_init=True"],
     "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"),  # warmup_init turns it back on
    ("RAdam", [], "torch.optim.radam.RAdam"),
])
def test_ss_optimizer_is_recorded_as_sd_scripts_records_it(name, args, recorded):
    assert build_optimizer(name, _groups()[1], 1e-3, args).ss_optimizer == recorded


def test_any_torch_optim_class_or_full_class_name_builds():
    model, groups = _groups()
    for name in ("torch.optim.RAdam", "RAdam"):  # without a dot: torch.optim, as sd-scripts
        choice = build_optimizer(name, groups, 1e-3, [])
        assert isinstance(choice.optimizer, torch.optim.RAdam) and choice.name == name
        _step(model, choice.optimizer)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the 8-bit optimizers")
def test_sgdnesterov8bit_takes_a_momentum_from_optimizer_args():
    choice = build_optimizer("SGDNesterov8bit", _groups()[1], 1e-3, ["momentum=0.5"])
    assert choice.optimizer.param_groups[0]["momentum"] == 0.5 and choice.name == "SGDNesterov"


@pytest.mark.parametrize(("name", "args", "message"), [
    ("Adam9000", [], "optimizer_type 'Adam9000' is not known; use one of AdamW, SGDNesterov, Lion"),
    ("adam", [], "optimizer_type 'adam' is not known"),  # torch.optim names are case-sensitive in sd-scripts
    ("AdEMAMix8bit", [], r"a bitsandbytes one: bitsandbytes\.optim\.AdEMAMix8bit"),
    ("AdamW", ["no_such_option=1"], "optimizer_args do not fit AdamW"),
    ("AdamW", ["weight_decay"], 'must look like "key=value"'),
    ("torch.optim.Nope", [], "no class Nope in module torch.optim"),
    ("nowhere_at_all.Optimizer", [], "module nowhere_at_all cannot be imported"),
])
def test_bad_optimizer_settings_are_one_line_errors(name, args, message):
    _, groups = _groups()
    with pytest.raises(ConfigError, match=message) as error:
        build_optimizer(name, groups, 1e-3, args)
    assert "\n" not in str(error.value)


def test_dadaptation_and_prodigy_warn_about_a_small_learning_rate(caplog):
    _, groups = _groups()
    with caplog.at_level(logging.WARNING):
        build_optimizer("Prodigy", groups, 1e-4, [])
    assert "expects learning_rate around 1.0" in caplog.text


def test_adafactor_finds_its_own_step_size_with_its_schedule(caplog):
    model, groups = _groups()
    with caplog.at_level(logging.WARNING):
        choice = build_optimizer("AdaFactor", groups, 1e-3, [])
    assert "unet_lr and text_encoder_lr are ignored" in caplog.text
    assert choice.forced_scheduler == "adafactor" and choice.optimizer.defaults["relative_step"]
    scheduler = build_lr_scheduler("adafactor", choice.optimizer, 0, 10, initial_lr=1e-3)
    assert scheduler.get_last_lr() == [1e-3, 1e-3]
    _step(model, choice.optimizer)
    scheduler.step()
    assert all(0 < lr < 1 for lr in scheduler.get_last_lr())
    fixed = build_optimizer("AdaFactor", _groups()[1], 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert fixed.forced_scheduler is None and fixed.optimizer.param_groups[0]["lr"] == 1e-2
    with pytest.raises(ConfigError, match="AdaFactor's own schedule .* takes no warmup"):
        build_lr_scheduler("adafactor", choice.optimizer, 2, 10, initial_lr=1e-3)


# ------------------------------------------------------------------------------------------------ schedule-free


class _FakeScheduleFree(torch.optim.SGD):
    """The schedulefree package's contract: eval mode when built, step() only in train mode."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
        self.modes = ["eval"]

    def train(self):
        self.modes.append("train")

    def eval(self):
        self.modes.append("eval")

    def step(self, closure=None):
        assert self.modes[-1] == "train", "Optimizer was not in train mode when step is called"
        return super().step(closure)


@pytest.fixture
def fake_schedulefree(monkeypatch):
    module = types.ModuleType("schedulefree")
    for name in SCHEDULE_FREE:
        setattr(module, name, type(name, (_FakeScheduleFree,), {}))
    monkeypatch.setitem(sys.modules, "schedulefree", module)
    return module


@pytest.mark.parametrize("name", [*SCHEDULE_FREE, "schedulefree.AdamWScheduleFree"])
def test_schedule_free_optimizers_are_put_in_train_mode_and_get_a_schedule_that_does_nothing(fake_schedulefree,
                                                                                              name):
    model, groups = _groups()
    choice = build_optimizer(name, groups, 1e-2, ["momentum=0.5"])
    assert choice.schedule_free and choice.optimizer.modes == ["eval", "train"]
    config = TrainConfig(optimizer_type=name, lr_scheduler="cosine", lr_warmup_steps=3)  # both unused here
    scheduler = lr_scheduler_for(config, choice, total_steps=10)
    assert isinstance(scheduler, ScheduleFreeLR)
    for _ in range(3):
        _step(model, choice.optimizer)
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-2, 5e-3] and scheduler.state_dict() == {}
    scheduler.load_state_dict({})


@pytest.mark.skipif(not HAS_SCHEDULEFREE, reason="the schedulefree package is not installed")
def test_the_real_schedulefree_package_steps_after_build():
    model, groups = _groups()
    choice = build_optimizer("AdamWScheduleFree", groups, 1e-2, [])
    for _ in range(3):
        _step(model, choice.optimizer)
    choice.optimizer.eval()
    choice.optimizer.train()


@pytest.mark.skipif(not HAS_SCHEDULEFREE, reason="the schedulefree package is not installed")
def test_schedule_free_files_hold_the_averaged_weights_and_resume_to_the_same_bits(tiny_model_dir, tmp_path):
    data = make_shapes_dataset(tmp_path / "train")

    def config(out, **extra):
        return load_config(overrides={
            "pretrained_model_name_or_path": str(tiny_model_dir), "train_data_dir": str(data), "resolution": "64",
            "network_dim": 4, "network_alpha": 2, "optimizer_type": "AdamWScheduleFree", "learning_rate": 1e-2,
            "optimizer_args": ["warmup_steps=2"], "max_train_epochs": 2, "train_batch_size": 2, "seed": 3,
            "output_dir": str(out), "output_name": "sf", "save_precision": "float", "save_state": True,
            "save_every_n_steps": 3, **extra})

    trainer = Trainer(config(tmp_path / "full"), progress=False)
    result = trainer.train()
    saved = load_file(str(result.saved_files[-1]))
    training = {key: value.clone() for key, value in trainer.network.state_dict().items()}
    trainer.schedule_free.eval()  # the averaged weights sd-scripts saves, again: two more lerps' rounding away
    averaged = trainer.network.state_dict()
    for key in saved:
        rounding = 8 * torch.finfo(torch.float32).eps * max(saved[key].abs().max().item(), 1e-30)
        assert (saved[key] - averaged[key]).abs().max().item() <= rounding, key
    assert max((saved[key] - training[key]).abs().max().item() for key in saved) > 1e-4  # not the training point
    resumed = train(config(tmp_path / "resumed", resume=str(tmp_path / "full" / "sf-step00000003-state")),
                    progress=False)
    again = load_file(str(resumed.saved_files[-1]))
    assert [key for key in saved if not torch.equal(saved[key], again[key])] == []


# ------------------------------------------------------------------------------------------------ lr schedules


def _lrs(name: str, steps: int = 10, **kwargs) -> list[float]:
    """The lr each of the first ``steps`` optimizer steps uses (base lr 1, so the schedule's factor itself)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    kwargs.setdefault("warmup_steps", 0)
    scheduler = build_lr_scheduler(name, optimizer, total_steps=steps, **kwargs)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def _warm(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _progress(step: int, warmup: int, total: int) -> float:
    return (step - warmup) / max(1, total - warmup)


def _cosine(step, warmup, total, cycles=0.5, floor=0.0):
    if step < warmup:
        return _warm(step, warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * _progress(step, warmup, total)))
    return max(0.0, factor * (1 - floor) + floor)


def _restarts(step, warmup, total, cycles):
    if step < warmup:
        return _warm(step, warmup)
    progress = _progress(step, warmup, total)
    return 0.0 if progress >= 1 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def _polynomial(step, warmup, total, power, lr_end=1e-7):
    if step < warmup:
        return _warm(step, warmup)
    return (1.0 - lr_end) * (1 - (step - warmup) / (total - warmup)) ** power + lr_end


def _inverse_sqrt(step, warmup, timescale):
    if step < warmup:
        return _warm(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _wsd(step, warmup, decay, total, cycles, floor):
    stable = total - warmup - decay
    if step < warmup:
        return max(0.0, _warm(step, warmup) * (1 - floor) + floor)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        factor = 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * (step - warmup - stable) / max(1, decay)))
        return max(0.0, factor * (1 - floor) + floor)
    return floor


STEPS = range(20)
SCHEDULE_CASES = [
    ("constant", {}, [1.0] * 20),
    ("constant_with_warmup", {"warmup_steps": 4}, [min(1.0, s / 4) for s in STEPS]),
    ("linear", {"warmup_steps": 3}, [_warm(s, 3) if s < 3 else max(0.0, (20 - s) / 17) for s in STEPS]),
    ("cosine", {"warmup_steps": 2}, [_cosine(s, 2, 20) for s in STEPS]),
    ("cosine_with_restarts", {"warmup_steps": 2, "num_cycles": 3}, [_restarts(s, 2, 20, 3) for s in STEPS]),
    ("polynomial", {"warmup_steps": 1, "power": 2.0}, [_polynomial(s, 1, 20, 2.0) for s in STEPS]),
    ("inverse_sqrt", {"warmup_steps": 4}, [_inverse_sqrt(s, 4, 4) for s in STEPS]),  # timescale = warmup
    ("inverse_sqrt", {"warmup_steps": 4, "timescale": 7}, [_inverse_sqrt(s, 4, 7) for s in STEPS]),
    ("inverse_sqrt", {}, [_inverse_sqrt(s, 0, 10_000) for s in STEPS]),  # no warmup: timescale 10000
    # sd-scripts halves num_cycles for these two: the default 1 is one half cosine wave
    ("cosine_with_min_lr", {"warmup_steps": 2, "min_lr_ratio": 0.1}, [_cosine(s, 2, 20, 0.5, 0.1) for s in STEPS]),
    ("cosine_with_min_lr", {"num_cycles": 3, "min_lr_ratio": 0.2}, [_cosine(s, 0, 20, 1.5, 0.2) for s in STEPS]),
    ("warmup_stable_decay", {"warmup_steps": 3, "decay_steps": 5},  # min_lr_ratio unset: 0, as sd-scripts passes
     [_wsd(s, 3, 5, 20, 0.5, 0.0) for s in STEPS]),
    ("warmup_stable_decay", {"warmup_steps": 0.1, "decay_steps": 0.25, "min_lr_ratio": 0.1, "num_cycles": 2},
     [_wsd(s, 2, 5, 20, 1.0, 0.1) for s in STEPS]),  # ratios: int(0.1 * 20) = 2 and int(0.25 * 20) = 5
    ("piecewise_constant", {"scheduler_args": {"step_rules": "1:3,0.5:8,0.1"}},
     [1.0 if s < 3 else 0.5 if s < 8 else 0.1 for s in STEPS]),  # factor before step 3, before 8, then after
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), SCHEDULE_CASES,
                         ids=[f"{case[0]}-{index}" for index, case in enumerate(SCHEDULE_CASES)])
def test_every_lr_scheduler_follows_its_formula_step_by_step(name, kwargs, expected):
    assert _lrs(name, 20, **kwargs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_and_decay_ratios_are_rounded_down_as_sd_scripts_does():
    assert resolve_steps(0.1, 25) == 2  # int(2.5)
    assert resolve_steps(0.29, 100) == 28  # 0.29 * 100 is 28.999999999999996 in floats; int() truncates it
    assert resolve_steps(0.5, 7) == 3 and resolve_steps(0.0, 100) == 0
    assert resolve_steps(7, 100) == 7  # an integer is steps
    assert _lrs("constant_with_warmup", 10, warmup_steps=0.25)[:4] == [0.0, 0.5, 1.0, 1.0]  # int(2.5) = 2 steps
    assert _lrs("linear", 10, warmup_steps=0.5)[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_num_cycles_0_keeps_the_cosine_schedules_at_the_top_after_warmup():
    """The old notebook writes lr_scheduler_num_cycles = 0: cos(0 * progress) is 1, so the lr stays at its peak."""
    assert _lrs("cosine_with_restarts", 10, warmup_steps=2, num_cycles=0) == [0.0, 0.5] + [1.0] * 8
    assert _lrs("cosine_with_min_lr", 10, num_cycles=0, min_lr_ratio=0.1) == [1.0] * 10
    assert _lrs("warmup_stable_decay", 10, decay_steps=3, num_cycles=0, min_lr_ratio=0.1) == [1.0] * 10


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("constant", {"warmup_steps": 2}, r'lr_warmup_steps 2 \(2 steps\): lr_scheduler "constant" .* takes no warmup'),
    ("constant", {"warmup_steps": 0.5}, r"lr_warmup_steps 0.5 \(5 steps\)"),
    ("warmup_stable_decay", {"warmup_steps": 6, "decay_steps": 0.5}, "add up to more than the 10 training steps"),
    ("cosine", {"scheduler_args": {"num_warmup_steps": 3}}, "lr_scheduler_args num_warmup_steps: lr_scheduler cosine"),
    ("cosine_with_min_lr", {}, "lr_scheduler cosine_with_min_lr cannot be built.*min_lr"),
    ("linear", {"scheduler_args": {"bogus": 1}}, "lr_scheduler_args do not fit lr_scheduler linear"),
    ("piecewise_constant", {}, "lr_scheduler_args do not fit lr_scheduler piecewise_constant"),
    ("reduce_lr_on_plateau", {}, "lr_scheduler reduce_lr_on_plateau is not supported"),
    ("nonsense", {}, "lr_scheduler 'nonsense' is not a schedule"),
])
def test_schedules_that_sd_scripts_stops_on_are_one_line_errors(name, kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        _lrs(name, 10, **kwargs)
    assert "\n" not in str(error.value)


def test_a_ratio_warmup_that_rounds_to_no_steps_passes_constant_as_in_sd_scripts():
    assert _lrs("constant", 10, warmup_steps=0.05) == [1.0] * 10  # int(0.5) = 0


@pytest.mark.parametrize("scheduler_type", ["StepLR", "torch.optim.lr_scheduler.StepLR"])
def test_a_custom_lr_scheduler_type_gets_lr_scheduler_args(scheduler_type):
    config = TrainConfig(lr_scheduler_type=scheduler_type, lr_scheduler_args=["step_size=2", "gamma=0.5"],
                         lr_scheduler="cosine")  # lr_scheduler_type wins, as in sd-scripts
    model, groups = _groups()
    choice = build_optimizer("AdamW", groups, 1e-2, [])
    scheduler = lr_scheduler_for(config, choice, total_steps=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        _step(model, choice.optimizer)
        scheduler.step()
    assert seen == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3], rel=1e-12)


@pytest.mark.parametrize(("scheduler_type", "args", "warmup", "message"), [
    ("StepLR", ["step_size=2"], 3, r"lr_warmup_steps 3 \(3 steps\): lr_scheduler_type StepLR takes no warmup"),
    ("StepLR", [], 0, "lr_scheduler_args do not fit lr_scheduler_type StepLR"),
    ("NoSuchLR", [], 0, "lr_scheduler_type NoSuchLR: no class NoSuchLR in torch.optim.lr_scheduler"),
    ("nowhere_at_all.LR", [], 0, "module nowhere_at_all cannot be imported"),
    ("ReduceLROnPlateau", [], 0, "steps on a validation loss"),
])
def test_bad_custom_schedulers_are_one_line_errors(scheduler_type, args, warmup, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=message):
        build_lr_scheduler("constant", optimizer, warmup, 10, scheduler_type=scheduler_type,
                           scheduler_args=scheduler_args_dict(args))


def test_adafactor_forces_its_schedule_through_lr_scheduler_for():
    choice = build_optimizer("AdaFactor", _groups()[1], 1e-3, [])
    scheduler = lr_scheduler_for(TrainConfig(optimizer_type="AdaFactor", learning_rate=1e-3), choice, 10)
    assert type(scheduler).__name__ == "AdafactorSchedule" and scheduler.get_last_lr() == [1e-3, 1e-3]


# ------------------------------------------------------------------------------------------ config validation


def _config(tmp_path, **overrides):
    write_images(tmp_path / "1_x", [(64, 64)])
    return load_config(overrides={"train_data_dir": str(tmp_path), **overrides})


def test_the_adafactor_schedule_needs_the_adafactor_optimizer(tmp_path):
    with pytest.raises(ConfigError, match='lr_scheduler "adafactor" only works with optimizer_type = "AdaFactor"'):
        _config(tmp_path, lr_scheduler="adafactor")
    with pytest.raises(ConfigError, match="and its relative_step"):  # sd-scripts fails on "adafactor" without it
        _config(tmp_path, lr_scheduler="adafactor", optimizer_type="AdaFactor", optimizer_args=["relative_step=False"])
    assert _config(tmp_path, lr_scheduler="adafactor", optimizer_type="AdaFactor").lr_scheduler == "adafactor"
    with pytest.raises(ConfigError, match='needs optimizer_type = "AdaFactor"'):
        build_lr_scheduler("adafactor", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), 0, 10)


@pytest.mark.parametrize(("flag", "meaning"), [("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")])
def test_the_old_optimizer_flags_become_optimizer_type(tmp_path, flag, meaning):
    config = _config(tmp_path, **{flag: True})
    assert config.optimizer_type == meaning and getattr(config, flag) is False
    with pytest.raises(ConfigError, match=f'{flag} and optimizer_type .AdamW. are both set; remove {flag} '
                                          f'\\(it means optimizer_type = "{meaning}"\\)'):
        _config(tmp_path, **{flag: True, "optimizer_type": "AdamW"})


def test_both_old_optimizer_flags_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="use_8bit_adam and use_lion_optimizer are both set"):
        _config(tmp_path, use_8bit_adam=True, use_lion_optimizer=True)


def test_ratios_and_new_schedule_keys_read_from_config_file_toml(tmp_path):
    write_images(tmp_path / "data" / "1_x", [(64, 64)])
    path = tmp_path / "config_file.toml"
    path.write_text(tomli_w.dumps({
        "optimizer_arguments": {"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 0.1, "lr_decay_steps": 0.2,
                                "lr_scheduler_num_cycles": 0, "lr_scheduler_min_lr_ratio": 0.05,
                                "lr_scheduler_args": ["warmup_type='cosine'"]},
        "dataset_arguments": {"train_data_dir": str(tmp_path / "data")}}), encoding="utf-8")
    config = load_config(path)
    assert (config.lr_warmup_steps, config.lr_decay_steps, config.lr_scheduler_num_cycles) == (0.1, 0.2, 0)
    assert scheduler_args_dict(config.lr_scheduler_args) == {"warmup_type": "cosine"}
    from lycolab.config import write_config_file

    assert load_config(write_config_file(config, tmp_path / "out.toml")).lr_warmup_steps == 0.1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lr_warmup_steps": 1.5}, "lr_warmup_steps must be whole steps .* or a ratio below 1"),
    ({"lr_warmup_steps": 100.0}, "lr_warmup_steps must be whole steps"),  # sd-scripts would take 100 x the steps
    ({"lr_warmup_steps": -0.1}, "lr_warmup_steps must be >= 0"),
    ({"lr_decay_steps": 2.0}, "lr_decay_steps must be whole steps"),
    ({"lr_decay_steps": -3}, "lr_decay_steps must be >= 0"),
    ({"lr_scheduler_num_cycles": -1}, "lr_scheduler_num_cycles must be >= 0"),
    ({"lr_scheduler_timescale": 0}, "lr_scheduler_timescale must be at least 1"),
    ({"lr_scheduler_min_lr_ratio": 1.5}, "lr_scheduler_min_lr_ratio must be between 0 and 1"),
    ({"lr_scheduler": "cosine_warmup_with_min_lr"}, "lr_scheduler cosine_warmup_with_min_lr is not supported: "
                                                   "sd-scripts passes it num_decay_steps"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler reduce_lr_on_plateau is not supported"),
    ({"lr_scheduler": "greedy"}, "lr_scheduler greedy is not supported"),
    ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler must be one of constant"),
    ({"lr_warmup_steps": 10}, 'lr_scheduler "constant" takes no lr_warmup_steps .*constant_with_warmup'),
    ({"optimizer_type": "AdaFactor", "lr_warmup_steps": 10, "lr_scheduler": "cosine"},
     "AdaFactor's relative_step brings its own schedule, which takes no warmup"),
    ({"lr_scheduler_type": "StepLR", "lr_warmup_steps": 10, "lr_scheduler": "cosine"},
     "lr_scheduler_type 'StepLR' takes no lr_warmup_steps"),
    ({"lr_scheduler_type": "torch.optim.lr_scheduler.ReduceLROnPlateau"}, "lr_scheduler_type ReduceLROnPlateau"),
    ({"lr_scheduler_type": "not a class"}, "lr_scheduler_type must be a class name"),
    ({"lr_scheduler_args": ["step_rules=1:10,0.1"]}, "lr_scheduler_args step_rules value .* is not a Python literal"),
    ({"lr_scheduler_args": ["a=b=c"]}, 'lr_scheduler_args item .* must look like "key=value"'),
    ({"lr_scheduler_args": ["T_max = 10"]}, 'lr_scheduler_args item .* must look like "key=value"'),
    ({"lr_scheduler": "piecewise_constant"}, 'lr_scheduler "piecewise_constant" needs lr_scheduler_args'),
    ({"lr_scheduler": "piecewise_constant", "lr_scheduler_args": ["step_rules='1:x,0.1'"]}, "needs lr_scheduler_args"),
    ({"lr_scheduler": "cosine_with_min_lr"}, 'lr_scheduler "cosine_with_min_lr" needs one of'),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_args": ["min_lr=1e-6"]},
     "not both"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": ["num_training_steps=5"]},
     "lr_scheduler_args num_training_steps: lr_scheduler cosine gets it from its own key"),
])
def test_schedule_settings_that_cannot_work_are_one_line_errors_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        _config(tmp_path, **overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [
    {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 0, "lr_warmup_steps": 0.1},
    {"lr_scheduler": "constant", "lr_warmup_steps": 0.05},  # a ratio: checked once the steps are known
    {"lr_scheduler": "inverse_sqrt", "lr_scheduler_timescale": 100},
    {"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_args": ["min_lr=1e-7"]},
    {"lr_scheduler": "piecewise_constant", "lr_scheduler_args": ["step_rules='1:10,0.1:20,0.01'"]},
    {"lr_scheduler_type": "CosineAnnealingLR", "lr_scheduler_args": ["T_max=100"]},
    {"optimizer_type": "AdaFactor", "optimizer_args": ["relative_step=False"], "lr_scheduler": "constant_with_warmup",
     "lr_warmup_steps": 10},
])
def test_schedule_settings_sd_scripts_takes_are_accepted(tmp_path, overrides):
    config = _config(tmp_path, **overrides)
    assert all(getattr(config, key) == value for key, value in overrides.items())


def test_schedule_keys_the_chosen_schedule_does_not_use_are_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _config(tmp_path, lr_scheduler="cosine", lr_decay_steps=5, lr_scheduler_timescale=3)
    assert "not used by lr_scheduler cosine (as in sd-scripts): lr_decay_steps, lr_scheduler_timescale" in caplog.text


def test_scheduler_args_are_python_literals_as_sd_scripts_reads_them():
    assert scheduler_args_dict(["T_max=100", "eta_min=1e-6", "step_rules='1:10,0.1'", "milestones=[2, 4]"]) == {
        "T_max": 100, "eta_min": 1e-6, "step_rules": "1:10,0.1", "milestones": [2, 4]}
    with pytest.raises(ConfigError, match="quote text: step_rules='...'"):
        scheduler_args_dict(["step_rules=1:10,0.1"])


@pytest.mark.parametrize(("args", "fused"), [([], True), (["foreach=True"], None), (["fused=False"], False)])
def test_adamw_runs_the_fused_kernel_unless_optimizer_args_choose_and_the_metadata_does_not_say_so(args, fused):
    choice = build_optimizer("AdamW", _groups()[1], 1e-3, args)
    assert choice.optimizer.defaults["fused"] is fused
    assert "fused=True" not in choice.ss_optimizer


def test_fused_adamw_takes_the_same_steps_as_torchs_default_loop_to_float32_rounding():
    results = []
    for args in ([], ["foreach=False"]):
        model, groups = _groups()
        optimizer = build_optimizer("AdamW", groups, 1e-2, args).optimizer
        for _ in range(5):
            _step(model, optimizer)
        results.append(torch.cat([parameter.detach().flatten() for parameter in model.parameters()]))
    fused, looped = results
    # five updates of size ≤ lr each, every one rounded in float32: a few ulp of the largest weight apart
    assert (fused - looped).abs().max() <= 16 * torch.finfo(torch.float32).eps * looped.abs().max()
