"""Every optimizer_type and lr_scheduler name from sd-scripts builds and steps, or says clearly why not."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import write_images

from lycolab.config import ConfigError, load_config
from lycolab.training.optim import OPTIMIZER_NAMES, build_optimizer
from lycolab.training.schedule import build_lr_scheduler

EXPECTED_CLASSES = {
    "AdamW": "AdamW", "SGDNesterov": "SGD", "Lion": "Lion", "DAdaptation": "DAdaptAdam", "DAdaptAdam": "DAdaptAdam",
    "DAdaptAdaGrad": "DAdaptAdaGrad", "DAdaptAdan": "DAdaptAdan", "DAdaptLion": "DAdaptLion",
    "DAdaptSGD": "DAdaptSGD", "Prodigy": "Prodigy", "AdaFactor": "Adafactor",
    # without CUDA the bitsandbytes optimizers fall back to the 32-bit one of their family, with a warning
    "AdamW8bit": "AdamW", "PagedAdamW8bit": "AdamW", "Lion8bit": "Lion", "PagedLion8bit": "Lion",
    "SGDNesterov8bit": "SGD",
}


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of the 8-bit optimizers")
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_name_builds_and_steps(name, caplog):
    model, groups = _groups()
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-2
    with caplog.at_level(logging.WARNING):
        choice = build_optimizer(name.lower() if name == "AdamW" else name, groups, lr, [])
    assert type(choice.optimizer).__name__ == EXPECTED_CLASSES[name]
    for _ in range(3):
        loss = _step(model, choice.optimizer)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "nothing moved"
    if "8bit" in name:
        assert f"{name} needs a CUDA GPU" in caplog.text and choice.name == EXPECTED_CLASSES[name].replace(
            "SGD", "SGDNesterov")
    else:
        assert "needs a CUDA GPU" not in caplog.text


def test_optimizer_args_are_parsed_and_passed():
    model, groups = _groups()
    choice = build_optimizer("AdamW", groups, 1e-3, ["weight_decay=0.05", "betas=0.8,0.95", "amsgrad=true"])
    group = choice.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.05, (0.8, 0.95), True)
    assert group["lr"] == 1e-2 and choice.optimizer.param_groups[1]["lr"] == 5e-3  # per-group lrs kept


def test_a_full_class_name_builds_any_optimizer():
    model, groups = _groups()
    choice = build_optimizer("torch.optim.RAdam", groups, 1e-3, [])
    assert isinstance(choice.optimizer, torch.optim.RAdam)
    _step(model, choice.optimizer)


@pytest.mark.parametrize(("name", "args", "message"), [
    ("Adam9000", [], "optimizer_type 'Adam9000' is not known; use one of AdamW, SGDNesterov, Lion"),
    ("AdamW", ["no_such_option=1"], "optimizer_args do not fit AdamW"),
    ("AdamW", ["weight_decay"], 'must look like "key=value"'),
    ("torch.optim.Nope", [], "no class Nope in module torch.optim"),
])
def test_bad_optimizer_settings_are_one_line_errors(name, args, message):
    _, groups = _groups()
    with pytest.raises(ConfigError, match=message):
        build_optimizer(name, groups, 1e-3, args)


def test_dadaptation_and_prodigy_warn_about_a_small_learning_rate(caplog):
    _, groups = _groups()
    with caplog.at_level(logging.WARNING):
        build_optimizer("Prodigy", groups, 1e-4, [])
    assert "expects learning_rate around 1.0" in caplog.text


def test_adafactor_finds_its_own_step_size_with_its_schedule():
    model, groups = _groups()
    choice = build_optimizer("AdaFactor", groups, 1e-3, [])
    assert choice.forced_scheduler == "adafactor" and choice.optimizer.defaults["relative_step"]
    scheduler = build_lr_scheduler("adafactor", choice.optimizer, 0, 10, initial_lr=1e-3)
    assert scheduler.get_last_lr() == [1e-3, 1e-3]
    _step(model, choice.optimizer)
    scheduler.step()
    assert all(0 < lr < 1 for lr in scheduler.get_last_lr())
    fixed = build_optimizer("AdaFactor", _groups()[1], 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert fixed.forced_scheduler is None and fixed.optimizer.param_groups[0]["lr"] == 1e-2


def _lrs(name: str, steps: int = 10, **kwargs) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_lr_scheduler(name, optimizer, total_steps=steps, **kwargs)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_every_lr_scheduler_name_gives_its_shape():
    assert _lrs("constant", warmup_steps=0) == [1.0] * 10
    assert _lrs("constant", warmup_steps=2)[:3] == [0.0, 0.5, 1.0]  # warmup turns constant into constant_with_warmup
    assert _lrs("constant_with_warmup", warmup_steps=4)[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert _lrs("linear", warmup_steps=0) == pytest.approx([1.0 - i / 10 for i in range(10)])
    cosine = _lrs("cosine", warmup_steps=0)
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[-1] < 0.03
    restarts = _lrs("cosine_with_restarts", warmup_steps=0, num_cycles=2)
    assert restarts[5] == pytest.approx(1.0) and restarts[4] < 0.1  # back to the top halfway
    assert _lrs("polynomial", warmup_steps=0, power=2.0)[5] == pytest.approx(0.25, abs=1e-6)


def test_the_adafactor_schedule_needs_the_adafactor_optimizer(tmp_path):
    write_images(tmp_path / "1_x", [(64, 64)])
    with pytest.raises(ConfigError, match='lr_scheduler "adafactor" only works with optimizer_type = "AdaFactor"'):
        load_config(overrides={"train_data_dir": str(tmp_path), "lr_scheduler": "adafactor"})
    with pytest.raises(ValueError, match='needs optimizer_type = "AdaFactor"'):
        build_lr_scheduler("adafactor", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), 0, 10)
