"""Adapter training-step speed and memory: lycolab vs the reference ``lycoris-lora`` package vs the frozen base.

Workload (DESIGN.md §7): an SD1.5-architecture diffusers ``UNet2DConditionModel`` (random init, 860 M parameters;
``--arch sdxl``: the SDXL base 1.0 U-Net, 2.6 B parameters, with its pooled-text and size conditioning), 256 px
(32×32 latent), batch 1, one forward + backward + AdamW step, linear dim 16 / alpha 8, conv dim 8 / alpha 4 (BOFT:
conv dim 16 like the linear layers: it cannot split SD's 320 channels into even blocks of at most 8). A row may carry
options (``ALGORITHMS``): ours gets them as ``create_network`` keywords, the reference module as its constructor's
(DoRA is ``dora_wd`` in ours and ``weight_decompose`` there).
The base row is the same forward + backward with no adapter (gradient taken for the input latent, so the whole
backward pass runs). Ours updates with AdamW as lycolab's trainer builds it (torch's fused kernel), the reference
with AdamW as sd-scripts builds it (torch's default). ``lora`` wraps sd-scripts' attention blocks only (no
``conv_dim``), ``locon`` adds its ResNet and sampler blocks (``conv_dim`` 8), ``locon-lycoris`` is LyCORIS' full set.
With ``--paired`` (the default) each of ours' processes also times the frozen base between its own steps, by
restoring the network for one step and applying it again for the next: the median of those per-pair ratios is the
figure the machine's slow drift moves least. Ours and the reference wrap exactly the same layers (the table gives
the count). Each configuration runs in its own process so that peak RSS is its own, round-robin for ``--rounds``
rounds, all in one invocation so the ratios compare like with like; the fastest timed step per configuration is
reported (interference from other work only adds time), with the spread beside it. ``--max-rss-gib`` stops a
configuration whose RSS passes that much (the table says so) instead of letting it push the machine into swap or
the OOM killer.

    python bench/networks.py                      # print the table
    python bench/networks.py --write docs/benchmarks.md
    python bench/networks.py --arch sdxl --warmup 1 --steps 2 --max-rss-gib 19 --write docs/benchmarks.md
    python bench/networks.py --device cuda --resolution 512 --batch 4 --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

LINEAR_RANK, LINEAR_ALPHA, CONV_RANK, CONV_ALPHA = 16, 8.0, 8, 4.0


@dataclass(frozen=True)
class Configuration:
    """One row: the algorithm as ours and the reference build it, on which layers, with which options."""

    algo: str  # our create_network algo, and LyCORIS' module for it (REFERENCE_MODULES)
    network_module: str  # "networks.lora" (sd-scripts' layer set) or "lycoris.kohya" (LyCORIS' "full" preset)
    include_conv: bool  # the ResNet / sampler kxk convs too
    options: dict = field(default_factory=dict)  # ours: create_network(**options)
    reference_options: dict = field(default_factory=dict)  # the reference module's constructor kwargs
    conv_rank: int = CONV_RANK  # BOFT cannot split SD's 320 channels into even blocks of ≤ 8 (it needs ≥ 10)

    @property
    def lycoris_preset(self) -> bool:
        return self.network_module == "lycoris.kohya"


ALGORITHMS = {
    "lora": Configuration("lora", "networks.lora", False),
    "locon": Configuration("locon", "networks.lora", True),
    "locon-lycoris": Configuration("locon", "lycoris.kohya", True),  # LyCORIS' "full" preset: every Linear and conv
    "loha": Configuration("loha", "lycoris.kohya", True),
    "lokr": Configuration("lokr", "lycoris.kohya", True),
    "diag-oft": Configuration("diag-oft", "lycoris.kohya", True),
    "boft": Configuration("boft", "lycoris.kohya", True, conv_rank=LINEAR_RANK),
    # DoRA: ours takes network_args' dora_wd, LyCORIS' modules call it weight_decompose
    "lora-dora": Configuration("locon", "lycoris.kohya", True, {"dora_wd": True}, {"weight_decompose": True}),
    "loha-dora": Configuration("loha", "lycoris.kohya", True, {"dora_wd": True}, {"weight_decompose": True}),
}
# U-Net configs (diffusers), random init: SD 1.5, and SDXL base 1.0's (its config.json, minus what is default).
UNET_CONFIGS = {
    "sd15": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
        "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 2048,
        "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
ARCH_NAMES = {"sd15": "SD1.5 U-Net", "sdxl": "SDXL base 1.0 U-Net"}
# Which algorithms run unless --algos says otherwise: LoRA/LoCon's three layer sets and LoHa/LoKr on SD1.5 (the
# DoRA/OFT rows take --algos and a --max-rss-gib: LyCORIS' BOFT does not fit in 21 GiB); LoRA and LoHa on SDXL.
DEFAULT_ALGOS = {"sd15": ["lora", "locon", "locon-lycoris", "loha", "lokr"], "sdxl": ["lora", "loha"]}
# LyCORIS' module class for each of our algos (module path, class name), imported when a row needs it
REFERENCE_MODULES = {
    "lora": ("lycoris.modules.locon", "LoConModule"), "locon": ("lycoris.modules.locon", "LoConModule"),
    "loha": ("lycoris.modules.loha", "LohaModule"), "lokr": ("lycoris.modules.lokr", "LokrModule"),
    "diag-oft": ("lycoris.modules.diag_oft", "DiagOFTModule"), "boft": ("lycoris.modules.boft", "ButterflyOFTModule"),
}


def build_unet(arch: str, device: str, dtype: torch.dtype):
    """The U-Net with diffusers' own random init under a fixed seed (the values do not change the timing)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    return unet.requires_grad_(False).to(device, dtype)


def make_inputs(arch: str, args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latent, text context, added conditioning): SDXL also takes the pooled text embedding and 6 size numbers."""
    latent = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, latent, latent, generator=generator).to(args.device, dtype)
    context_dim = UNET_CONFIGS[arch]["cross_attention_dim"]
    context = torch.randn(args.batch, 77, context_dim, generator=generator).to(args.device, dtype)
    extra = {}
    if arch == "sdxl":
        size = float(args.resolution)
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(args.batch, 1280, generator=generator).to(args.device, dtype),
            # original size, crop top-left, target size
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * args.batch).to(args.device, dtype),
        }
    return sample, context, extra


def attach_ours(unet, name: str):
    """(the network, its trainable parameters, how many layers got an adapter)."""
    from lycolab.networks import create_network

    row = ALGORITHMS[name]
    conv_rank = row.conv_rank if row.include_conv else None  # None: sd-scripts' attention blocks only (0 would
    # bring in the ResNet blocks' Linear and 1x1 layers, as sd-scripts does for an explicit conv_dim)
    network = create_network(unet, algo=row.algo, dim=LINEAR_RANK, alpha=LINEAR_ALPHA, conv_dim=conv_rank,
                             conv_alpha=CONV_ALPHA, network_module=row.network_module, **row.options)
    network = network.to(next(unet.parameters()).device)
    return network, list(network.parameters()), len(network.adapters)


def attach_reference(unet, name: str) -> tuple[list[torch.nn.Parameter], int]:
    """The reference modules (default forward, i.e. not bypass mode) on the very layers ours would wrap."""
    import importlib

    from lycolab.networks.naming import unet_targets

    row = ALGORITHMS[name]
    module_path, class_name = REFERENCE_MODULES[row.algo]
    module_class = getattr(importlib.import_module(module_path), class_name)
    device = next(unet.parameters()).device
    parameters = []
    targets = unet_targets(unet, row.include_conv, row.lycoris_preset)
    for target in targets:
        rank, alpha = (row.conv_rank, CONV_ALPHA) if target.is_conv_kxk else (LINEAR_RANK, LINEAR_ALPHA)
        module = module_class(target.lora_name, target.module, 1.0, rank, alpha, **row.reference_options).to(device)
        module.apply_to()
        parameters += list(module.parameters())
    return parameters, len(targets)


class Progress:
    """Where the worker is, for the RSS guard's report: step number, phase, and when the step began."""

    def __init__(self, config: str) -> None:
        self.config, self.step, self.phase, self.step_start = config, 0, "building the model", time.perf_counter()
        self.times: list[float] = []
        self.wrapped = 0


def _guard_rss(progress: Progress, limit_bytes: int) -> None:
    """Stop this process (exit status 3, a JSON line saying why) as soon as its RSS passes ``limit_bytes``.

    Polled every 50 ms: the largest single allocation here is one layer's weight (≤ 60 MB), so the overshoot is
    small next to the limit.
    """
    while True:
        rss = _rss()
        if rss > limit_bytes:
            print(json.dumps({"config": progress.config, "error": "rss", "rss_bytes": rss, "limit_bytes": limit_bytes,
                              "step": progress.step, "phase": progress.phase, "times": progress.times,
                              "wrapped": progress.wrapped, "step_elapsed": time.perf_counter() - progress.step_start}),
                  flush=True)
            os._exit(3)
        time.sleep(0.05)


def run_worker(config: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of one configuration (after warm-up) in this process.

    With ``args.paired`` an "ours" configuration also times the frozen base in the same process, step for step
    (the network restored for a base step, applied again for the next): the machine's slow drift then cancels in
    each pair's ratio, which the fastest-step figures across processes cannot promise.
    """
    import logging

    progress = Progress(config)
    if args.max_rss_gib:
        threading.Thread(target=_guard_rss, args=(progress, int(args.max_rss_gib * 2**30)), daemon=True).start()
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    unet = build_unet(args.arch, args.device, dtype)
    implementation, _, algo = config.partition(":")
    network, parameters, wrapped = None, [], 0
    if implementation == "ours":
        network, parameters, wrapped = attach_ours(unet, algo)
    elif implementation == "reference":
        parameters, wrapped = attach_reference(unet, algo)
    progress.wrapped, progress.phase = wrapped, "setting up"
    for parameter in parameters:
        parameter.data = parameter.data.float()
    optimizer = make_optimizer(implementation, parameters)
    step = TrainingStep(unet, optimizer, make_inputs(args.arch, args, dtype), args, dtype)
    paired = args.paired and network is not None
    base_times: list[float] = []
    _reset_peak_rss()
    for index in range(args.warmup + args.steps):
        timed = index >= args.warmup
        # pairs alternate which runs first, so neither always follows the other's cache state
        order = ("base", "ours") if index % 2 else ("ours", "base")
        for which in order if paired else ("ours",):
            if which == "base":
                network.restore()
                seconds = step.run(None, progress)
                network.apply_to()
                if timed:
                    base_times.append(seconds)
            else:
                progress.times.append(step.run(optimizer, progress))
    peak = _peak_rss()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return {"config": config, "times": progress.times[args.warmup:], "first_step": progress.times[0],
            "paired_base_times": base_times, "peak_bytes": peak,
            "trainable": sum(p.numel() for p in parameters), "wrapped": wrapped, "finite": step.finite}


def make_optimizer(implementation: str, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """Ours: AdamW as lycolab's trainer builds it (its fused kernel); the reference: as sd-scripts builds it."""
    if not parameters:
        return None
    if implementation == "ours":
        from lycolab.training.optim import build_optimizer

        return build_optimizer("AdamW", [{"params": parameters}], 1e-4, []).optimizer
    return torch.optim.AdamW(parameters, lr=1e-4)


class TrainingStep:
    """One timed training step: forward, backward and (with an optimizer) the update; without one, the input
    takes the gradient so that the whole backward pass runs."""

    def __init__(self, unet, optimizer, inputs, args: argparse.Namespace, dtype: torch.dtype) -> None:
        self.unet, self.device = unet, args.device
        self.sample, self.context, self.extra = inputs
        self.timesteps = torch.full((args.batch,), 500, device=args.device)
        self.autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)
        self.finite = True

    def run(self, optimizer, progress: Progress) -> float:
        _synchronize(self.device)
        progress.step, progress.phase, progress.step_start = progress.step + 1, "forward", time.perf_counter()
        inputs = self.sample.detach().requires_grad_(optimizer is None)
        with self.autocast:
            prediction = self.unet(inputs, self.timesteps, self.context, **self.extra).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32))
        progress.phase = "backward"
        loss.backward()
        if optimizer is not None:
            progress.phase = "optimizer step"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        self.finite = self.finite and bool(torch.isfinite(loss))
        return time.perf_counter() - progress.step_start


def _reset_peak_rss() -> None:
    """Forget the peak so far (building the model), so the figure is the training steps' own; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def _peak_rss() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_all(args: argparse.Namespace) -> dict[str, dict]:
    """Every configuration in a fresh process, round-robin for ``args.rounds`` rounds → config → merged result
    (all timed steps, the largest peak). A configuration stopped by the RSS guard is not started again."""
    configs = ["base"]
    for algo in args.algos:
        configs += [f"ours:{algo}"] + ([] if args.skip_reference else [f"reference:{algo}"])
    results: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for config in configs:
            if results.get(config, {}).get("error"):  # did not fit: it will not fit next round either
                continue
            result = _run_process(config, args)
            if result.get("error"):
                print(f"{config:>16} (round {round_index + 1}): stopped, RSS {result['rss_bytes'] / 2**30:.2f} GiB "
                      f"> {args.max_rss_gib} GiB in step {result['step']} ({result['phase']}, "
                      f"{result['step_elapsed']:.1f} s into it; steps before: {_seconds(result['times'])})",
                      file=sys.stderr, flush=True)
                if config not in results:  # a configuration that fitted in an earlier round keeps those steps
                    results[config] = result
                continue
            print(f"{config:>16} (round {round_index + 1}): steps {_seconds(result['times'])} s (first "
                  f"{result['first_step']:.2f} s), peak {result['peak_bytes'] / 2**30:.2f} GiB, "
                  f"{result['wrapped']} layers wrapped{'' if result['finite'] else ', NON-FINITE LOSS'}",
                  file=sys.stderr, flush=True)
            merged = results.setdefault(config, {**result, "times": [], "paired_base_times": [], "pair_ratios": []})
            merged["times"] += result["times"]
            merged["paired_base_times"] += result["paired_base_times"]
            merged["pair_ratios"] += [ours / base for ours, base in zip(result["times"], result["paired_base_times"])]
            merged["peak_bytes"] = max(merged["peak_bytes"], result["peak_bytes"])
            merged["finite"] = merged["finite"] and result["finite"]
    for result in results.values():
        if not result.get("error"):
            result["seconds"] = min(result["times"])
            result["spread"] = max(result["times"]) - result["seconds"]
    for algo in args.algos:
        ours, reference = results.get(f"ours:{algo}", {}), results.get(f"reference:{algo}", {})
        if "wrapped" in ours and "wrapped" in reference and ours["wrapped"] != reference["wrapped"]:
            print(f"WARNING {algo}: ours wraps {ours['wrapped']} layers, the reference {reference['wrapped']}",
                  file=sys.stderr, flush=True)
    return results


def _run_process(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", config, "--arch", args.arch, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--resolution", str(args.resolution), "--batch", str(args.batch),
               "--device", args.device, "--dtype", args.dtype, "--paired" if args.paired else "--no-paired"]
    if args.max_rss_gib:
        command += ["--max-rss-gib", str(args.max_rss_gib)]
    process = subprocess.run(command, capture_output=True, text=True)
    lines = process.stdout.strip().splitlines()
    if process.returncode not in (0, 3) or not lines:
        raise RuntimeError(f"{config} failed (exit status {process.returncode}):\n{process.stderr[-4000:]}")
    return json.loads(lines[-1])


def _seconds(times: list[float]) -> str:
    return ", ".join(f"{seconds:.2f}" for seconds in times) or "none"


def format_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    base = results["base"]
    if base.get("error"):
        raise SystemExit(f"the base configuration did not fit in {args.max_rss_gib} GiB: nothing to compare with")
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    lines = [
        f"| algo | layers wrapped (ours / reference) | ours s/step | reference s/step | base s/step | ours / base "
        f"| ours / base, paired | ours / reference | ours {memory} (× base) | reference {memory} (× base) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in args.algos:
        ours, reference = results[f"ours:{algo}"], results.get(f"reference:{algo}", {})
        ours_ratio = f"{ours['seconds'] / base['seconds']:.2f}" if "seconds" in ours else "–"
        ref_ratio = f"{ours['seconds'] / reference['seconds']:.2f}" if "seconds" in ours and "seconds" in reference \
            else "–"
        lines.append(f"| {algo} | {ours.get('wrapped', '–')} / {reference.get('wrapped', '–')} | {_step(ours)} | "
                     f"{_step(reference)} | {_step(base)} | {ours_ratio} | {_paired(ours)} | {ref_ratio} | "
                     f"{_memory(ours, base)} | {_memory(reference, base)} |")
    lines.append(f"| base | – | – | – | {_step(base)} | 1.00 | – | – | {base['peak_bytes'] / 2**30:.2f} GiB | – |")
    return "\n".join(lines)


def _step(result: dict) -> str:
    """The fastest step, the spread (slowest − fastest) in brackets; flagged if the loss was not finite; where the RSS
    guard stopped the configuration, where that was."""
    if not result:
        return "–"
    if result.get("error"):
        return (f"did not fit: stopped at {result['rss_bytes'] / 2**30:.1f} GiB RSS, {result['step_elapsed']:.0f} s "
                f"into step {result['step']} ({result['phase']})")
    text = f"{result['seconds']:.2f} (+{result['spread']:.2f})"
    return text if result["finite"] else text + " NON-FINITE LOSS"


def _paired(result: dict) -> str:
    """The median of the in-process (ours step / base step) ratios, the quartiles in brackets, and how many."""
    ratios = sorted(result.get("pair_ratios", []))
    if not ratios:
        return "–"
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{statistics.median(ratios):.3f} [{quartiles[0]:.3f}–{quartiles[2]:.3f}] ×{len(ratios)}"


def _memory(result: dict, base: dict) -> str:
    if not result:
        return "–"
    if result.get("error"):
        return f"> {result['limit_bytes'] / 2**30:g} GiB"
    return f"{result['peak_bytes'] / 2**30:.2f} GiB ({result['peak_bytes'] / base['peak_bytes']:.2f})"


def _cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_machine(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        device = f"{os.cpu_count()} CPU cores ({_cpu_name()}), {memory:.0f} GiB RAM, no GPU"
    import diffusers

    rounds = f", {args.rounds} rounds round-robin" if args.rounds > 1 else ""
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}; {ARCH_NAMES[args.arch]}, {args.resolution} px, batch {args.batch}, "
            f"{args.dtype}; {args.warmup} warm-up + {args.steps} timed steps per process{rounds}, each configuration "
            f"in a fresh process; s/step is the fastest timed step, in brackets the spread (slowest − fastest)"
            + ("; paired: in each of ours' processes the base ran between ours' steps (alternating which went "
               "first), and the column gives the median of those per-pair ratios with their quartiles"
               if args.paired else ""))


def write_section(path: Path, section: str, args: argparse.Namespace) -> None:
    """Replace this workload's section of the results file (kept between markers), or append it."""
    workload = f"{args.device} {args.resolution}px batch {args.batch} {args.dtype}"
    if args.arch != "sd15":
        workload += f" {args.arch}"
    start, end = f"<!-- bench/networks.py {workload} -->", f"<!-- end bench/networks.py {workload} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        text = head + block + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=list(UNET_CONFIGS),
                        help="the U-Net: SD 1.5's (860 M parameters) or SDXL base 1.0's (2.6 B, ~10 GB in fp32)")
    parser.add_argument("--algos", nargs="+", choices=list(ALGORITHMS),
                        help="default: all of them for sd15, lora and loha for sdxl")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per configuration, round-robin")
    parser.add_argument("--max-rss-gib", type=float, help="stop a configuration whose RSS passes this (CPU only)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--skip-reference", action="store_true", help="only ours and the base")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="ours' processes also time the base between their own steps (the paired column)")
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.algos = args.algos or DEFAULT_ALGOS[args.arch]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return
    results = run_all(args)
    table = format_table(results, args)
    today = datetime.now(timezone.utc).date().isoformat()
    title = "Adapter training step" + ("" if args.arch == "sd15" else f", {ARCH_NAMES[args.arch]}")
    section = (f"### {title}, {today}\n\n{describe_machine(args)}.\n\n{table}\n\n"
               "Reproduce: `" + " ".join(["python bench/networks.py", *sys.argv[1:]]) + "`")
    print(section)
    if args.write:
        write_section(args.write, section, args)


if __name__ == "__main__":
    main()
