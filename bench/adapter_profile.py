"""Where an adapter's training-step overhead goes, per module type, measured inside the same steps.

The U-Net and workload are ``bench/networks.py``'s. One process builds the U-Net and our network, then profiles
base steps (network restored) and adapter steps (network applied) alternately with ``torch.profiler``. Inside each
adapted layer's op (``_LowRank*`` forward and backward, ``lycolab.networks.low_rank_function``) every child op is
either the layer's own (it takes the frozen weight) or the adapter's (the rank-r matmuls and convs, the in-place
accumulations); the op's own time is Python and autograd overhead. Add the optimizer, and the rest of the step is
what base and adapter steps share — its difference between the two is the machine's noise, which this split keeps
out of the adapter's figures. Run it on an idle machine; the profiler itself adds a few µs per op.

    python bench/adapter_profile.py --algo lora
    python bench/adapter_profile.py --algo locon-lycoris --steps 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import collections
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import networks  # noqa: E402  (bench/networks.py: the workload, the rows, the optimizer)

ADAPTER_OPS = {"_LowRankLinear": "Linear", "_LowRankPointwiseConv": "1x1 conv", "_LowRankConv": "kxk conv"}
OPTIMIZER_PREFIX = "Optimizer."


def _kind(name: str) -> str | None:
    """The module type of one of our ops' forward or backward event, None for any other event."""
    name = name.removeprefix("autograd::engine::evaluate_function: ").removesuffix("Backward")
    return ADAPTER_OPS.get(name)


def _owner(event) -> tuple[str, object] | None:
    """("adapter", our op's event) or ("optimizer", event) for the nearest such ancestor, else None."""
    parent = event.cpu_parent
    while parent is not None:
        if _kind(parent.name) is not None:
            return "adapter", parent
        if parent.name.startswith(OPTIMIZER_PREFIX):
            return "optimizer", parent
        parent = parent.cpu_parent
    return None


def _direct_child_of(event, ancestor):
    """The child of ``ancestor`` that ``event`` descends from (``event`` itself if it is one)."""
    while event.cpu_parent is not ancestor:
        event = event.cpu_parent
    return event


def _weight_shapes(events) -> set[tuple[int, ...]]:
    """The frozen layers' weight shapes, as our forward ops received them (their second input)."""
    shapes = set()
    for event in events:
        if _kind(event.name) is not None and not event.name.endswith("Backward") and event.input_shapes:
            shapes.add(tuple(event.input_shapes[1]))
    return shapes


def split_step(events) -> dict[str, float]:
    """µs of one profiled step by bucket: (type, "layer"/"adapter"/"overhead"), "optimizer", "shared"."""
    events = list(events)
    weights = _weight_shapes(events)
    weights |= {shape[::-1] for shape in weights if len(shape) == 2}  # Linear weights appear transposed too
    buckets: dict = collections.Counter()
    calls: dict = collections.Counter()
    for event in events:
        kind = _kind(event.name)
        if kind is not None:
            calls[kind] += event.name in ADAPTER_OPS  # one forward event per layer call
            buckets[(kind, "overhead")] += event.self_cpu_time_total
            continue
        owner = _owner(event)
        if owner is None:
            if event.name.startswith(OPTIMIZER_PREFIX):
                buckets["optimizer"] += event.self_cpu_time_total
            else:
                buckets["shared"] += event.self_cpu_time_total
        elif owner[0] == "optimizer":
            buckets["optimizer"] += event.self_cpu_time_total
        else:
            top = _direct_child_of(event, owner[1])
            own = any(tuple(shape) in weights for shape in top.input_shapes or [])
            kind = _kind(owner[1].name)
            buckets[(kind, "layer" if own else "adapter")] += event.self_cpu_time_total
            if not own:
                direction = "backward" if owner[1].name.endswith("Backward") else "forward"
                buckets[(kind, "op", f"{direction} {top.name}")] += event.self_cpu_time_total
    buckets["calls"] = calls
    return buckets


def profile_steps(algo: str, steps: int, args: argparse.Namespace) -> tuple[list[dict], list[float], int]:
    """(the adapter steps' buckets, the base steps' total µs, layers wrapped), alternating base and adapter."""
    unet = networks.build_unet("sd15", "cpu", torch.float32)
    network, parameters, wrapped = networks.attach_ours(unet, algo)
    optimizer = networks.make_optimizer("ours", parameters)
    inputs = networks.make_inputs("sd15", args, torch.float32)
    step = networks.TrainingStep(unet, optimizer, inputs, args, torch.float32)
    progress = networks.Progress(algo)
    adapted, base = [], []
    for index in range(steps + 1):
        for which in ("base", "ours") if index % 2 else ("ours", "base"):
            if which == "base":
                network.restore()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
                step.run(None if which == "base" else optimizer, progress)
            if which == "base":
                network.apply_to()
            if index == 0:
                continue  # warm-up
            events = profiler.events()
            if which == "base":
                base.append(sum(event.self_cpu_time_total for event in events))
            else:
                adapted.append(split_step(events))
    return adapted, base, wrapped


def format_report(algo: str, adapted: list[dict], base: list[float], wrapped: int) -> str:
    """The fastest adapter step's split, as a table of ms per module type and its share of the base step, then
    the adapter's ops by name."""
    best = min(adapted, key=lambda buckets: sum(v for k, v in buckets.items() if k != "calls"))
    base_ms = min(base) / 1e3
    lines = [f"{algo}: {wrapped} layers wrapped; base step {base_ms:.0f} ms (profiled, fastest)", "",
             "| module type | layers | layer's own ops ms | adapter's ops ms | Python + autograd ms | "
             "adapter + overhead / base step |", "|---|---|---|---|---|---|"]
    breakdown, total = [], 0.0
    for kind in ADAPTER_OPS.values():
        layer, ops, overhead = (best.get((kind, part), 0.0) / 1e3 for part in ("layer", "adapter", "overhead"))
        if not (layer or ops):
            continue
        total += ops + overhead
        lines.append(f"| {kind} | {best['calls'][kind]} | {layer:.0f} | {ops:.1f} | {overhead:.1f} | "
                     f"{(ops + overhead) / base_ms:.1%} |")
        by_op = sorted(((key[2], value / 1e3) for key, value in best.items() if key[:2] == (kind, "op")),
                       key=lambda item: -item[1])
        breakdown.append(f"- {kind}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in by_op if ms >= 0.5))
    optimizer = best.get("optimizer", 0.0) / 1e3
    total += optimizer
    lines.append(f"| optimizer (AdamW, fused) | – | – | {optimizer:.1f} | – | {optimizer / base_ms:.1%} |")
    lines.append(f"| **all** | {wrapped} | – | – | – | **{total / base_ms:.1%}** |")
    return "\n".join(lines + ["", "The adapter's ops by direction and name, ms:", "", *breakdown])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", default="lora", choices=["lora", "locon", "locon-lycoris"])
    parser.add_argument("--steps", type=int, default=2, help="profiled pairs after one warm-up pair")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    args = parser.parse_args(argv)
    args.device = "cpu"
    adapted, base, wrapped = profile_steps(args.algo, args.steps, args)
    today = datetime.now(timezone.utc).date().isoformat()
    report = format_report(args.algo, adapted, base, wrapped)
    section = (f"### Where {args.algo}'s overhead goes, {today}\n\n{report}\n\nReproduce: `"
               + " ".join(["python bench/adapter_profile.py", *sys.argv[1:]]) + "`")
    print(section)
    if args.write:
        args.arch, args.dtype = f"profile {args.algo}", "fp32"
        networks.write_section(args.write, section, args)


if __name__ == "__main__":
    main()
