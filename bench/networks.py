"""Adapter training-step speed and memory: lycolab vs the reference ``lycoris-lora`` package vs the frozen base.

Workload (DESIGN.md §7): an SD1.5-architecture diffusers ``UNet2DConditionModel`` (random init, 860 M parameters),
256 px (32×32 latent), batch 1, one forward + backward + AdamW step, linear dim 16 / alpha 8, conv dim 8 / alpha 4.
The base row is the same forward + backward with no adapter (gradient taken for the input latent, so the whole
backward pass runs). Ours and the reference wrap exactly the same layers. Each configuration runs in its own process
so that peak RSS is its own; all run in one invocation so the ratios compare like with like.

    python bench/networks.py                      # print the table
    python bench/networks.py --write docs/benchmarks.md
    python bench/networks.py --device cuda --resolution 512 --batch 4 --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

# name → (network_module, include the conv blocks, use the LyCORIS "full" preset)
ALGORITHMS = {
    "lora": ("networks.lora", False, False),
    "locon": ("networks.lora", True, False),
    "loha": ("lycoris.kohya", True, True),
    "lokr": ("lycoris.kohya", True, True),
}
LINEAR_RANK, LINEAR_ALPHA, CONV_RANK, CONV_ALPHA = 16, 8.0, 8, 4.0


def build_unet(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return unet.requires_grad_(False).to(device, dtype)


def attach_ours(unet, algo: str) -> list[torch.nn.Parameter]:
    from lycolab.networks import create_network

    network_module = ALGORITHMS[algo][0]
    network = create_network(unet, algo=algo, dim=LINEAR_RANK, alpha=LINEAR_ALPHA, conv_dim=CONV_RANK if algo != "lora"
                             else 0, conv_alpha=CONV_ALPHA, network_module=network_module)
    return list(network.to(next(unet.parameters()).device).parameters())


def attach_reference(unet, algo: str) -> list[torch.nn.Parameter]:
    """The reference modules (default forward, i.e. not bypass mode) on the very layers ours would wrap."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from lycolab.networks.naming import unet_targets

    module_class = {"lora": LoConModule, "locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]
    _, include_conv, lycoris_preset = ALGORITHMS[algo]
    device = next(unet.parameters()).device
    parameters = []
    for target in unet_targets(unet, include_conv, lycoris_preset):
        rank, alpha = (CONV_RANK, CONV_ALPHA) if target.is_conv_kxk else (LINEAR_RANK, LINEAR_ALPHA)
        module = module_class(target.lora_name, target.module, 1.0, rank, alpha).to(device)
        module.apply_to()
        parameters += list(module.parameters())
    return parameters


def run_worker(config: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of one configuration (after warm-up) in this process."""
    import logging

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    unet = build_unet(args.device, dtype)
    implementation, _, algo = config.partition(":")
    parameters = []
    if implementation == "ours":
        parameters = attach_ours(unet, algo)
    elif implementation == "reference":
        parameters = attach_reference(unet, algo)
    for parameter in parameters:
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None
    latent = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, latent, latent, generator=generator).to(args.device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=generator).to(args.device, dtype)
    timesteps = torch.full((args.batch,), 500, device=args.device)
    autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    _reset_peak_rss()
    for _ in range(args.warmup + args.steps):
        _synchronize(args.device)
        start = time.perf_counter()
        inputs = sample.detach().requires_grad_(optimizer is None)
        with autocast:
            prediction = unet(inputs, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _synchronize(args.device)
        times.append(time.perf_counter() - start)
    peak = _peak_rss()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return {"config": config, "seconds": statistics.median(times[args.warmup:]), "peak_bytes": peak,
            "trainable": sum(p.numel() for p in parameters)}


def _reset_peak_rss() -> None:
    """Forget the peak so far (building the model), so the figure is the training steps' own; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_all(args: argparse.Namespace) -> list[dict]:
    configs = ["base"]
    for algo in args.algos:
        configs += [f"ours:{algo}"] + ([] if args.skip_reference else [f"reference:{algo}"])
    results = []
    for config in configs:
        command = [sys.executable, __file__, "--worker", config, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--resolution", str(args.resolution), "--batch", str(args.batch),
                   "--device", args.device, "--dtype", args.dtype]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(f"{config:>16}: {result['seconds']:.2f} s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)
        results.append(result)
    return results


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    by_config = {result["config"]: result for result in results}
    base = by_config["base"]
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    lines = [
        f"| algo | ours s/step | reference s/step | base s/step | ours / base | ours / reference | ours {memory} "
        f"(× base) | reference {memory} (× base) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo in args.algos:
        ours, reference = by_config[f"ours:{algo}"], by_config.get(f"reference:{algo}")
        ref_seconds = f"{reference['seconds']:.2f}" if reference else "–"
        ref_ratio = f"{ours['seconds'] / reference['seconds']:.2f}" if reference else "–"
        ref_memory = _memory(reference, base) if reference else "–"
        lines.append(f"| {algo} | {ours['seconds']:.2f} | {ref_seconds} | {base['seconds']:.2f} | "
                     f"{ours['seconds'] / base['seconds']:.2f} | {ref_ratio} | {_memory(ours, base)} | {ref_memory} |")
    lines.append(f"| base | – | – | {base['seconds']:.2f} | 1.00 | – | {base['peak_bytes'] / 2**30:.2f} GiB | – |")
    return "\n".join(lines)


def _memory(result: dict, base: dict) -> str:
    return f"{result['peak_bytes'] / 2**30:.2f} GiB ({result['peak_bytes'] / base['peak_bytes']:.2f})"


def describe_machine(args: argparse.Namespace) -> str:
    import os

    if args.device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        device = f"{os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, no GPU"
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"{args.resolution} px, batch {args.batch}, {args.dtype}, median of {args.steps} steps after "
            f"{args.warmup} warm-up")


def write_section(path: Path, section: str, args: argparse.Namespace) -> None:
    """Replace this workload's section of the results file (kept between markers), or append it."""
    workload = f"{args.device} {args.resolution}px batch {args.batch} {args.dtype}"
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
    parser.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--skip-reference", action="store_true", help="only ours and the base")
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return
    results = run_all(args)
    table = format_table(results, args)
    section = (f"### Adapter training step, {date.today().isoformat()}\n\n{describe_machine(args)}.\n\n{table}\n\n"
               "Reproduce: `" + " ".join(["python bench/networks.py", *sys.argv[1:]]) + "`")
    print(section)
    if args.write:
        write_section(args.write, section, args)


if __name__ == "__main__":
    main()
