"""Step 08: a prompt × epoch grid from the saved epochs, to pick the epoch before over-fitting shows.

The base model loads once; each epoch's file is loaded into the same adapter modules in turn, and every cell uses
the same seed, so the only difference along a row is the training.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from lycolab.colab import Workspace
from lycolab.display import Picture, one_line_errors
from lycolab.files import atomic_write

LABEL_HEIGHT = 24


def epoch_files(workspace: Workspace, output_name: str) -> list[tuple[str, Path]]:
    """(label, file) for every ``{output_name}-NNNNNN.safetensors`` in order, then the final file."""
    pattern = re.compile(rf"{re.escape(output_name)}-(\d{{6}})\.safetensors")
    numbered = sorted((int(match.group(1)), path) for path in workspace.output.glob("*.safetensors")
                      if (match := pattern.fullmatch(path.name)))
    files = [(f"epoch {epoch}", path) for epoch, path in numbered]
    final = workspace.output / f"{output_name}.safetensors"
    return files + ([("final", final)] if final.is_file() else [])


def _selected(files: list[tuple[str, Path]], epochs: str) -> list[tuple[str, Path]]:
    wanted = {part.strip() for part in epochs.split(",") if part.strip()}
    if not wanted or wanted == {"all"}:
        return files
    return [(label, path) for label, path in files if label.split()[-1] in wanted]


@one_line_errors
def compare_epochs(workspace: Workspace, prompts: str, epochs: str = "all", seed: int = 42, steps: int = 20,
                   width: int = 0, height: int = 0, guidance_scale: float = 7.0, sampler: str = "euler_a",
                   include_base: bool = True) -> Picture:
    """Render every prompt (one per line, kohya options allowed) with every chosen epoch; returns the grid."""
    from lycolab.config import load_config
    from lycolab.models.load import load_stable_diffusion
    from lycolab.networks import load_network
    from lycolab.training.sampling import SamplePrompt, generate_samples, parse_prompt_line

    config = load_config(workspace.config_file)
    name = config.output_name or workspace.name
    files = _selected(epoch_files(workspace, name), epochs)
    if not files:
        raise ValueError(f"no saved epochs of {name} in {workspace.output}; run step 06 first")
    size = config.datasets[0].resolution if config.datasets else (512, 512)
    defaults = SamplePrompt("", width=width or size[0], height=height or size[1], steps=steps,
                            guidance_scale=guidance_scale, seed=seed)
    samples = [sample for line in prompts.replace("\\n", "\n").splitlines()
               if (sample := parse_prompt_line(line, defaults)) is not None]
    if not samples:
        raise ValueError("give at least one prompt (one per line)")
    parts = load_stable_diffusion(config.pretrained_model_name_or_path, config.vae, config.v_parameterization,
                                  config.model_config)
    network = load_network(files[0][1], parts.unet, parts.text_encoders)
    network.eval()
    scratch = workspace.output / "compare" / time.strftime("%Y%m%d-%H%M%S")
    columns: list[tuple[str, list[Path]]] = []
    if include_base:
        network.set_multiplier(0.0)
        columns.append(("base", generate_samples(parts, samples, scratch, "base", sampler, config.clip_skip,
                                                 config.max_token_length)))
        network.set_multiplier(1.0)
    for index, (label, path) in enumerate(files):
        _load_epoch(network, path, files[0][1])
        columns.append((label, generate_samples(parts, samples, scratch, f"col{index:03d}", sampler,
                                                config.clip_skip, config.max_token_length)))
    grid = labelled_grid(columns, [sample.prompt for sample in samples], scratch.with_suffix(".png"))
    return Picture(grid, title=f"{len(samples)} prompt(s) × {len(columns)} column(s)")


def labelled_grid(columns: list[tuple[str, list[Path]]], row_labels: list[str], path: Path) -> Path:
    """Columns of images with their label on top, one row per prompt (labelled on the left, shortened)."""
    from PIL import Image, ImageDraw

    images = [[Image.open(image).convert("RGB") for image in paths] for _, paths in columns]
    cell_width = max(image.width for column in images for image in column)
    cell_height = max(image.height for column in images for image in column)
    label_width = 160
    grid = Image.new("RGB", (label_width + cell_width * len(columns), LABEL_HEIGHT + cell_height * len(row_labels)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for column, (label, _) in enumerate(columns):
        draw.text((label_width + column * cell_width + 4, 4), label, fill="black")
    for row, label in enumerate(row_labels):
        draw.text((4, LABEL_HEIGHT + row * cell_height + 4), label[:24], fill="black")
        for column, column_images in enumerate(images):
            grid.paste(column_images[row], (label_width + column * cell_width, LABEL_HEIGHT + row * cell_height))
    return atomic_write(path, lambda temporary: grid.save(temporary, format="PNG"))


def _load_epoch(network, path: Path, first: Path) -> None:
    """Swap another epoch's weights into the network built from the first file; a file of another shape (a run
    with other ranks or another algorithm saved under the same name) is one line, not a size-mismatch traceback."""
    from lycolab.networks import AdapterFileError
    from lycolab.networks.io import read_adapter_file

    try:
        network.load_state_dict(read_adapter_file(path)[0])
    except RuntimeError as error:
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise AdapterFileError(f"{path}: does not fit the network of {first.name} ({reason}); compare the epochs "
                               "of one run, or move the other run's files out of the output folder") from None
