"""Step 02: the base model and an optional VAE — a preset, hub repo or file, URL, Civitai model, or a local path.

Tokens come from ``HF_TOKEN`` / ``CIVITAI_TOKEN`` (environment, or Colab's secrets panel) and go to the download
only, as an HTTP header; they are never saved, printed or remembered, and the notebook has no field for them (form
values are saved inside the notebook file). What later steps need (paths, v2, v-prediction) is remembered in the
workspace. Downloads go to the model folder every project shares (``MyDrive/lycolab/_models`` in Colab), so a base
model a second project picks is found there instead of filling Drive with another copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lycolab.colab import Workspace
from lycolab.display import ShownAsTable, Table, one_line_errors


@dataclass(frozen=True)
class ModelChoice(ShownAsTable):
    model: Path
    vae: Path | None
    v2: bool
    v_parameterization: bool

    def table(self) -> Table:
        rows = [{"part": "model", "path": str(self.model)}, {"part": "vae", "path": str(self.vae or "(built in)")}]
        note = f"Stable Diffusion {'2.x' if self.v2 else '1.x'}" + (", v-prediction" if self.v_parameterization
                                                                      else "")
        return Table(rows, title="base model", notes=[note])


def _fetch(source: str, folder: Path, token: str | None) -> Path:
    from lycolab.models.download import download

    local = Path(source).expanduser()
    if local.exists():
        return local.resolve()  # a folder or file already on Drive / disk: used where it is
    return download(source, folder, token=token)


def _token(source: str, hf_token: str, civitai_token: str) -> str | None:
    from lycolab.colab import secret

    if source.startswith("civitai:") or "civitai.com" in source:
        return civitai_token or secret("CIVITAI_TOKEN")
    return hf_token or secret("HF_TOKEN")


@one_line_errors
def get_model(workspace: Workspace, model: str = "sd15", vae: str = "", hf_token: str = "",
              civitai_token: str = "") -> ModelChoice:
    """Download (or locate) the base model and VAE into the shared model folder and remember them for step 05."""
    from lycolab.models.download import load_presets

    if not model.strip():
        raise ValueError("choose a model: a preset, owner/repo, a URL, civitai:ID or a path")
    model, vae = model.strip(), vae.strip()
    model_path = _fetch(model, workspace.shared_models, _token(model, hf_token, civitai_token))
    vae_path = _fetch(vae, workspace.shared_models / "vae", _token(vae, hf_token, civitai_token)) if vae else None
    preset = load_presets().get(model)
    v2 = bool(preset and preset.v2) or _looks_v2(model_path)
    v_parameterization = bool(preset and preset.v_parameterization)
    workspace.remember(model=str(model_path), vae=str(vae_path) if vae_path else "", v2=v2,
                       v_parameterization=v_parameterization)
    return ModelChoice(model_path, vae_path, v2, v_parameterization)


def _looks_v2(path: Path) -> bool:
    """A diffusers folder whose text encoder is OpenCLIP-sized (1024 wide) is SD 2.x."""
    import json

    config = path / "text_encoder" / "config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("hidden_size") == 1024


def presets() -> Table:
    """The presets the model form offers."""
    from lycolab.models.download import load_presets

    return Table([{"name": p.name, "kind": p.kind, "description": p.description} for p in load_presets().values()],
                 title="presets")
