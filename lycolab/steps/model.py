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
from lycolab.models.detect import SD2, SDXL, model_family


@dataclass(frozen=True)
class ModelChoice(ShownAsTable):
    model: Path
    vae: Path | None
    v2: bool
    v_parameterization: bool
    sdxl: bool = False
    zero_terminal_snr: bool = False

    def table(self) -> Table:
        rows = [{"part": "model", "path": str(self.model)}, {"part": "vae", "path": str(self.vae or "(built in)")}]
        family = "SDXL" if self.sdxl else f"Stable Diffusion {'2.x' if self.v2 else '1.x'}"
        note = family + (", v-prediction" if self.v_parameterization else "") + (
            ", zero terminal SNR" if self.zero_terminal_snr else "")
        notes = [note] + (["step 05 switches to SDXL's defaults: 1024 px, U-Net only, text-encoder outputs cached"]
                          if self.sdxl else [])
        return Table(rows, title="base model", notes=notes)


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
    family = model_family(model_path)
    sdxl = bool(preset and preset.sdxl) or family == SDXL
    v2 = not sdxl and (bool(preset and preset.v2) or family == SD2)
    v_parameterization = bool(preset and preset.v_parameterization)
    zero_terminal_snr = bool(preset and preset.zero_terminal_snr)
    workspace.remember(model=str(model_path), vae=str(vae_path) if vae_path else "", v2=v2,
                       v_parameterization=v_parameterization, sdxl=sdxl, zero_terminal_snr=zero_terminal_snr)
    return ModelChoice(model_path, vae_path, v2, v_parameterization, sdxl, zero_terminal_snr)


def presets() -> Table:
    """The presets the model form offers."""
    from lycolab.models.download import load_presets

    return Table([{"name": p.name, "kind": p.kind, "description": p.description} for p in load_presets().values()],
                 title="presets")
