"""Max-norm regularisation (sd-scripts' ``--scale_weight_norms``): after each step, shrink every adapter whose
‖ΔW‖ exceeds a limit back onto it, so one key cannot blow up while the loss still looks fine.

Two references, picked by the network's ``network_module`` because users of each get a different formula:

* ``networks.lora`` — sd-scripts ``LoRANetwork.apply_max_norm_regularization`` (networks/lora.py): ΔW = up·down
  (a 1x1 conv as a matrix product, a 3x3 LoCon through ``conv2d(down.permute(1, 0, 2, 3), up)``), times
  ``alpha / dim`` with alpha the stored float32 buffer; ``ratio = clamp(norm, max=limit) / clamp(norm, min=limit/2)``,
  and when ``ratio != 1`` both up and down are multiplied by √ratio. The same float32 ops in the same order are
  used here, so the weights and numbers come out bit-identical to sd-scripts'.
* ``lycoris.kohya`` — LyCORIS 4.1.3 ``apply_max_norm`` of each module and the network's
  ``apply_max_norm_regularization``: the same clamp and ratio on ‖ΔW‖ (scale included), a key counts as scaled when
  the clamped norm differs from the desired one, and the ratio lands as LoRA/LoCon ``scalar *= ratio`` (which
  LyCORIS folds into ``lora_up`` when saving), LoHa ``scalar *= ratio`` (folded into ``hada_w1_a``), LoKr
  ``ratio^(1/n)`` on each of its n factors. Our modules have no ``scalar``, so the ratio goes straight into the
  tensor LyCORIS folds it into: ΔW and the saved file are the same. One difference remains: LyCORIS' scalar also
  multiplies that factor's later gradients (with Adam, its effective steps shrink) until a resume folds the scalar
  back and resets it to 1; here later steps are unscaled. LyCORIS reports (0, 0, 0) when no key was scaled, and so
  does this, since that is what its users see logged.

ΔW is measured without rank dropout (LyCORIS' modules would draw a random rank-dropout mask while measuring in
training mode, which only makes their norm noisy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lycolab.networks.algorithms.lora import LoRAModule
from lycolab.networks.base import AdapterModule
from lycolab.networks.network import AdapterNetwork


@dataclass(frozen=True)
class MaxNormResult:
    """What sd-scripts' training loop logs after max-norm regularisation (norms are of ΔW after scaling)."""

    keys_scaled: int
    average_key_norm: float
    max_key_norm: float

    def logs(self) -> dict[str, float]:
        """The tracker keys sd-scripts' ``generate_step_logs`` writes for these numbers."""
        return {"max_norm/keys_scaled": self.keys_scaled, "max_norm/max_key_norm": self.max_key_norm,
                "norm/avg_key_norm": self.average_key_norm}

    def postfix(self) -> dict[str, float]:
        """The progress-bar postfix sd-scripts shows (before ``avr_loss``)."""
        return {"Keys Scaled": self.keys_scaled, "Average key norm": self.average_key_norm}


@torch.no_grad()
def apply_max_norm(network: AdapterNetwork, max_norm: float) -> MaxNormResult:
    """Scale, in place, every adapter of ``network`` whose ‖ΔW‖ exceeds ``max_norm``; see the module docstring.

    Every norm is computed before any is read back, so a GPU waits once per call instead of once per key.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"scale_weight_norms must be a positive number, got {max_norm}")
    if network.network_module == "networks.lora":
        norm_of, scale_by = _sd_scripts_norm, _sd_scripts_scale
    elif network.network_module == "lycoris.kohya":
        norm_of, scale_by = _lycoris_norm, _lycoris_scale
    else:
        raise ValueError(f"max-norm regularisation is not defined for network_module {network.network_module!r}")
    # LyCORIS' apply_max_norm does nothing for IA³, full and GLoRA: they are neither measured nor counted
    adapters = [adapter for adapter in network.adapters if adapter.has_max_norm_rule]
    if not adapters:
        return MaxNormResult(0, 0.0, 0.0)
    norms = [norm_of(adapter) for adapter in adapters]
    # One device→host copy; the float32 round trip is exact for float16/bfloat16 norms, so each is then handled
    # in its own dtype on the CPU, as both references do (they call .cpu() on every norm).
    host = torch.stack([norm.float() for norm in norms]).cpu()
    keys_scaled, scaled_norms = 0, []
    for adapter, norm, host_norm in zip(adapters, norms, host, strict=True):
        norm = host_norm.to(norm.dtype)
        clamped = norm.clamp(min=max_norm / 2)
        desired = torch.clamp(clamped, max=max_norm)
        ratio = desired / clamped
        # sd-scripts tests ratio != 1, LyCORIS clamped != desired: the same, as desired <= clamped and the IEEE
        # quotient of two different floats never rounds to 1.
        if ratio != 1:
            scale_by(adapter, ratio)
            keys_scaled += 1
        scaled_norms.append((norm * ratio).item())
    if network.network_module == "lycoris.kohya" and keys_scaled == 0:
        return MaxNormResult(0, 0.0, 0.0)
    return MaxNormResult(keys_scaled, sum(scaled_norms) / len(scaled_norms), max(scaled_norms))


def _sd_scripts_norm(adapter: AdapterModule) -> torch.Tensor:
    """‖up·down · alpha/dim‖ with sd-scripts' own ops (its scale is the float32 alpha buffer over dim)."""
    if not isinstance(adapter, LoRAModule):
        raise TypeError(f"{adapter.lora_name}: networks.lora holds LoRA modules only, got {adapter.algo}")
    if adapter.tucker:  # not something sd-scripts makes; its key loop would skip lora_mid, here ΔW includes it
        return adapter.delta_weight().norm()
    up, down = adapter.lora_up.weight, adapter.lora_down.weight
    scale = adapter.alpha / down.shape[0]
    if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
    elif up.dim() == 4:  # sd-scripts names only 3x3, the kernel SD's convs have; the same op serves any kxk
        updown = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        updown = up @ down
    updown *= scale
    return updown.norm()


def _sd_scripts_scale(adapter: LoRAModule, ratio: torch.Tensor) -> None:
    """√ratio on both up and down (ΔW shrinks by ratio, and neither factor is singled out)."""
    sqrt_ratio = ratio**0.5
    adapter.lora_up.weight.mul_(sqrt_ratio)
    adapter.lora_down.weight.mul_(sqrt_ratio)


def _lycoris_norm(adapter: AdapterModule) -> torch.Tensor:
    """What each LyCORIS module measures: ‖ΔW‖ with the scale (LoCon: ‖up·down‖·scale; DoRA: before the
    decomposition), ‖oft_blocks‖ for OFT — each algorithm's ``norm_for_max_norm``."""
    return adapter.norm_for_max_norm()


def _lycoris_scale(adapter: AdapterModule, ratio: torch.Tensor) -> None:
    """The ratio where LyCORIS puts it: each algorithm's own rule (its scalar, or LoKr's factors)."""
    adapter.scale_delta(ratio)
