"""Step 09: the adapter tools on the project's ``output/`` folder — inspect, resize, merge, extract, convert.

Files are named as the form shows them: a name in ``output/`` (``my_lora.safetensors``, the ``.safetensors`` may be
left out) or a full path; an empty name is the project's final adapter (``<output_name>.safetensors``), else the
newest file there. New files go to ``output/`` too, so they are on Drive in Colab and step 07 keeps them. A tool
whose main field is empty is skipped with a note, so running the whole notebook only does what was filled in.
"""

from __future__ import annotations

from pathlib import Path

from lycolab.colab import Workspace
from lycolab.display import ShownAsTable, Table, one_line_errors


def adapter_path(workspace: Workspace, name: str = "") -> Path:
    """The adapter ``name`` means (see the module docstring); a missing one lists what ``output/`` holds."""
    name = name.strip()
    if name:
        given = Path(name).expanduser()
        candidates = [given, workspace.output / name, workspace.output / f"{name}.safetensors"]
        found = next((path for path in candidates if path.is_file()), None)
    else:
        final = workspace.output / f"{_output_name(workspace)}.safetensors"
        newest = sorted(workspace.output.glob("*.safetensors"), key=lambda path: path.stat().st_mtime)
        found = final if final.is_file() else (newest[-1] if newest else None)
    if found is None:
        present = ", ".join(sorted(path.name for path in workspace.output.glob("*.safetensors"))) or "none"
        raise FileNotFoundError(f"no adapter {name or '(the final one)'} in {workspace.output} (there: {present}); "
                                "train in step 06 first, or give a file name or full path")
    return found


def _output_name(workspace: Workspace) -> str:
    from lycolab.config import load_config

    if workspace.config_file.is_file():
        try:
            return load_config(workspace.config_file).output_name or workspace.name
        except ValueError:
            return workspace.name
    return workspace.name


def _out(workspace: Workspace, output_name: str, default: str) -> Path:
    name = output_name.strip() or default
    return workspace.output / (name if name.endswith(".safetensors") else f"{name}.safetensors")


def _skipped(tool: str, what: str) -> Table:
    return Table([], title=f"{tool}: skipped", notes=[f"fill in {what} to {tool}"])


@one_line_errors
def inspect(workspace: Workspace, adapter: str = "", top_tags: int = 20) -> ShownAsTable:
    """The table of what ``adapter`` is and how it was trained."""
    from lycolab.tools.inspect import inspect_adapter

    return inspect_adapter(adapter_path(workspace, adapter), top=top_tags)


@one_line_errors
def resize(workspace: Workspace, adapter: str = "", new_rank: int = 0, new_conv_rank: int = 0,
           dynamic_method: str = "none", dynamic_param: float = 0.9, save_precision: str = "fp16",
           output_name: str = "", device: str = "") -> ShownAsTable:
    """``adapter`` at rank ``new_rank`` (0 with a dynamic method: as the method picks), as ``output_name``
    (default ``<name>-r<rank>``); new_rank 0 and no method skips."""
    from lycolab.tools.resize import resize_adapter

    method = None if dynamic_method.strip() in ("", "none") else dynamic_method.strip()
    if new_rank <= 0 and method is None:
        return _skipped("resize", "new_rank (or a dynamic_method)")
    source = adapter_path(workspace, adapter)
    suffix = f"r{new_rank}" if method is None else f"{method}-{dynamic_param:g}"
    return resize_adapter(source, _out(workspace, output_name, f"{source.stem}-{suffix}"), new_rank or None,
                          new_conv_rank or None, method, dynamic_param if method else None, save_precision,
                          _device(device))


@one_line_errors
def merge(workspace: Workspace, adapters: str = "", new_rank: int = 0, new_conv_rank: int = 0,
          save_precision: str = "fp16", output_name: str = "", device: str = "") -> ShownAsTable:
    """Several adapters as one: ``adapters`` is ``a.safetensors:0.7, b.safetensors:0.3`` (ratio 1 when left out);
    new_rank 0 concatenates LoRA ranks exactly, a rank re-factorises by SVD. Empty skips."""
    from lycolab.models.generate import parse_network_spec
    from lycolab.tools.merge_adapters import merge_adapters

    specs = [parse_network_spec(part.strip()) for part in adapters.replace("\n", ",").split(",") if part.strip()]
    if not specs:
        return _skipped("merge", "adapters (a.safetensors:0.7, b.safetensors:0.3)")
    sources = [(adapter_path(workspace, str(path)), ratio) for path, ratio in specs]
    default = "-".join(path.stem for path, _ in sources)[:80] + "-merged"
    return merge_adapters(sources, _out(workspace, output_name, default), new_rank or None, new_conv_rank or None,
                          save_precision, _device(device))


@one_line_errors
def extract(workspace: Workspace, tuned_model: str = "", base_model: str = "", mode: str = "fixed",
            linear_dim: int = 64, conv_dim: int = 32, threshold: float = 0.0, ratio: float = 0.0,
            quantile: float = 1.0, text_encoder: bool = True, save_precision: str = "fp16", output_name: str = "",
            device: str = "") -> ShownAsTable:
    """The LoRA/LoCon from ``base_model`` (default: step 02's model) to ``tuned_model``; the mode's parameter
    applies to linear and conv layers alike. Empty ``tuned_model`` skips."""
    from lycolab.tools.extract import extract_adapter

    if not tuned_model.strip():
        return _skipped("extract", "tuned_model (a fine-tuned checkpoint or diffusers folder)")
    base = base_model.strip() or workspace.recall("model", "")
    if not base:
        raise ValueError("extract: no base model; pick one in step 02 or fill in base_model")
    tuned = Path(tuned_model.strip()).expanduser()
    out = _out(workspace, output_name, f"{tuned.stem}-extracted")
    return extract_adapter(base, tuned, out, mode, linear_dim, conv_dim, threshold, threshold, ratio, ratio,
                           quantile, quantile, text_encoder, save_precision, _device(device))


@one_line_errors
def convert(workspace: Workspace, adapter: str = "", to: str = "none", output_name: str = "") -> ShownAsTable:
    """``adapter`` in the PEFT/diffusers layout (``to="diffusers"``) or back in kohya's (``to="kohya"``), as
    ``output_name`` (default ``<name>-<to>``); ``to="none"`` skips."""
    from lycolab.tools.convert import convert_adapter

    if to.strip() in ("", "none"):
        return _skipped("convert", "convert_to (diffusers or kohya)")
    source = adapter_path(workspace, adapter)
    return convert_adapter(source, _out(workspace, output_name, f"{source.stem}-{to.strip()}"), to.strip())


def _device(device: str) -> str:
    """The form's device, or the GPU when there is one (SVD of a big adapter is minutes on a CPU, seconds there)."""
    if device.strip():
        return device.strip()
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
