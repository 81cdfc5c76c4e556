"""Image loading with DataLoader workers (``max_data_loader_n_workers``): seconds per epoch, 0 vs 1 vs 2 workers.

Workload: the tiny SD (``lycolab.models.tiny``), 24 photo-sized JPEGs (2000x1500, noise, so they do not compress to
nothing) trained at 128 px with bucketing, batch 2, latents not cached — every step decodes, resizes and crops its
images, as on a Colab run without ``cache_latents``. The tiny model's step at 128 px is short, as a GPU's step is
next to its CPU's image decoding, so the table shows what workers save where loading is the bottleneck. Every
configuration runs in a fresh process, round-robin for ``--rounds`` rounds; the fastest epoch per configuration is
reported (interference only adds time), with the spread beside it.

    python bench/data_loader.py
    python bench/data_loader.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

WORKERS = (0, 1, 2)
IMAGES, IMAGE_SIZE, RESOLUTION = 24, (2000, 1500), 128


def make_data(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "train" / "1_photo"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        pixels = rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.jpg", quality=90)
        (folder / f"{index:03d}.txt").write_text("a photo", encoding="utf-8")
    return root / "train"


def run_one(root: Path, workers: int) -> float:
    """Seconds for one epoch (model loading excluded: the second of two epochs is timed)."""
    from lycolab.config import load_config
    from lycolab.training import train

    marks: list[float] = []
    config = load_config(overrides={
        "pretrained_model_name_or_path": str(root / "tiny-sd"), "train_data_dir": str(root / "train"),
        "resolution": str(RESOLUTION), "enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256,
        "network_dim": 4, "train_batch_size": 2,
        "max_train_epochs": 2, "max_data_loader_n_workers": workers, "output_dir": str(root / f"out{workers}"),
        "seed": 1})
    steps_per_epoch = IMAGES // 2
    train(config, progress=False, on_step=lambda step, loss: marks.append(time.perf_counter())
          if step in (steps_per_epoch, 2 * steps_per_epoch) else None)
    return marks[1] - marks[0]


def run_all(rounds: int) -> dict[int, list[float]]:
    from lycolab.models.tiny import save_tiny_sd

    times: dict[int, list[float]] = {workers: [] for workers in WORKERS}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_data(root)
        save_tiny_sd(root / "tiny-sd")
        for _ in range(rounds):
            for workers in WORKERS:
                command = [sys.executable, __file__, "--one", str(root), str(workers)]
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                completed = subprocess.run(command, capture_output=True, text=True, env=env)
                if completed.returncode:
                    raise SystemExit(completed.stderr[-3000:])
                output = completed.stdout
                times[workers].append(json.loads(output.strip().splitlines()[-1])["seconds"])
    return times


def format_table(times: dict[int, list[float]]) -> str:
    base = min(times[0])
    lines = ["| `max_data_loader_n_workers` | epoch (s), fastest | spread (slowest − fastest) | vs 0 workers |",
             "|---|---|---|---|"]
    for workers, values in times.items():
        lines.append(f"| {workers} | {min(values):.2f} | {max(values) - min(values):.2f} | "
                     f"{min(values) / base:.2f}× |")
    return "\n".join(lines)


def describe_machine(rounds: int) -> str:
    import torch

    return (f"{date.today().isoformat()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {IMAGES} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} at {RESOLUTION} px, "
            f"batch 2, latents not cached, {rounds} rounds round-robin in fresh processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, help="replace the data-loader section of this Markdown file")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"seconds": run_one(Path(args.one[0]), int(args.one[1]))}))
        return
    times = run_all(args.rounds)
    section = f"### DataLoader workers, {describe_machine(args.rounds)}\n\n{format_table(times)}\n"
    print(section)
    if args.write:
        text = args.write.read_text(encoding="utf-8")
        marker = "### DataLoader workers, "
        if marker in text:
            start = text.index(marker)
            end = text.find("\n## ", start)
            text = text[:start] + section + (text[end:] if end != -1 else "")
        else:
            text = text.rstrip("\n") + "\n\n## Image loading (`bench/data_loader.py`)\n\n" + section
        args.write.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
