"""Extract the LoRA module names sd-scripts' ``networks/lora.py`` gives an SDXL model into
``tests/data/sd_scripts_sdxl_lora_names.toml``: the names lycolab's SDXL naming test compares its own with.

The names come from running sd-scripts' own code, not from a restatement of its rule: ``library/sdxl_original_unet.py``
and ``networks/lora.py`` are extracted from the given commit into a temporary folder and imported (only
``library.utils`` is replaced, by a stub whose ``setup_logging`` does nothing: the real one pulls in cv2 and
torchvision and only sets up logging). ``SdxlUNet2DConditionModel()`` is built on the meta device, the two text
encoders too, with the ``CLIPTextConfig`` arguments read (by ``ast``, as data) from
``load_models_from_sdxl_checkpoint`` of ``library/sdxl_model_util.py``; then ``LoRANetwork(..., is_sdxl=True)`` is
constructed twice, without and with ``conv_lora_dim``, and the ``lora_name`` of each ``LoRAModule`` it made is
recorded. Nothing of sd-scripts is copied into this repository: only the resulting names.

One adjustment: sd-scripts pins transformers 4.x, whose ``CLIPTextModel`` keeps the encoder under ``text_model``
(``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``); transformers 5 dropped that level from
``CLIPTextModel`` (not from ``CLIPTextModelWithProjection``). Under transformers 5 the first text encoder is therefore
handed to ``LoRANetwork`` inside a container module whose ``text_model`` attribute is it, which restores 4.x's paths.

A name is recorded as ``conv_kxk`` when its layer is a Conv2d with a kernel other than 1x1: the layers that get
``conv_dim`` rather than ``network_dim``.

To regenerate (``--commit`` picks another sd-scripts commit; needs torch, transformers, diffusers, einops, numpy):

    python scripts/sd_scripts_sdxl_names.py --git-dir /work/.mirror/kohya-ss+sd-scripts/repo \\
        > tests/data/sd_scripts_sdxl_lora_names.toml
"""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
import tempfile
import types
from pathlib import Path

SOURCES = ("library/__init__.py", "library/sdxl_original_unet.py", "networks/lora.py")
MODEL_UTIL = "library/sdxl_model_util.py"
TEXT_ENCODER_CONFIGS = ("text_model1_cfg", "text_model2_cfg")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def _extract(git_dir: str, commit: str, dest: Path) -> None:
    for path in SOURCES:
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git(git_dir, "show", f"{commit}:{path}"), encoding="utf-8")
    (dest / "networks" / "__init__.py").touch()  # a namespace package in sd-scripts; a regular one here


def text_encoder_configs(git_dir: str, commit: str) -> list[tuple[str, dict]]:
    """(model class name, CLIPTextConfig keyword arguments) of sd-scripts' two SDXL text encoders."""
    tree = ast.parse(_git(git_dir, "show", f"{commit}:{MODEL_UTIL}"))
    configs: dict[str, dict] = {}
    classes: dict[str, str] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if isinstance(call.func, ast.Name) and call.func.id == "CLIPTextConfig" and \
                node.targets[0].id in TEXT_ENCODER_CONFIGS:
            configs[node.targets[0].id] = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        # text_model1 = CLIPTextModel._from_config(text_model1_cfg) / CLIPTextModelWithProjection(text_model2_cfg)
        if call.args and isinstance(call.args[0], ast.Name) and call.args[0].id in TEXT_ENCODER_CONFIGS:
            function = call.func.value if isinstance(call.func, ast.Attribute) else call.func
            if isinstance(function, ast.Name):
                classes[call.args[0].id] = function.id
    return [(classes[name], configs[name]) for name in TEXT_ENCODER_CONFIGS]


def collect(git_dir: str, commit: str) -> dict[str, list[str]]:
    import torch
    import transformers
    from torch import nn

    with tempfile.TemporaryDirectory() as folder:
        _extract(git_dir, commit, Path(folder))
        utils = types.ModuleType("library.utils")
        utils.setup_logging = lambda *args, **kwargs: None
        saved = {name: sys.modules.pop(name) for name in list(sys.modules)
                 if name.split(".")[0] in ("library", "networks")}
        sys.path.insert(0, folder)
        try:
            importlib.import_module("library")
            sys.modules["library.utils"] = utils
            unet_module = importlib.import_module("library.sdxl_original_unet")
            lora = importlib.import_module("networks.lora")
        finally:
            sys.path.remove(folder)
        try:
            with torch.device("meta"):
                unet = unet_module.SdxlUNet2DConditionModel()
                encoders = []
                for class_name, kwargs in text_encoder_configs(git_dir, commit):
                    encoder = getattr(transformers, class_name)(transformers.CLIPTextConfig(**kwargs))
                    if not hasattr(encoder, "text_model"):  # transformers 5's CLIPTextModel: put 4.x's level back
                        container = nn.Module()
                        container.text_model = encoder
                        encoder = container
                    encoders.append(encoder)
                targets = list(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)
                try:
                    plain = lora.LoRANetwork(encoders, unet, lora_dim=4, alpha=1, is_sdxl=True)
                finally:  # LoRANetwork extends its class attribute in place when conv_lora_dim is set
                    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(targets)
                try:
                    conv = lora.LoRANetwork(encoders, unet, lora_dim=4, alpha=1, conv_lora_dim=4, conv_alpha=1,
                                            is_sdxl=True)
                finally:
                    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(targets)
        finally:
            for name in [name for name in sys.modules if name.split(".")[0] in ("library", "networks")]:
                del sys.modules[name]
            sys.modules.update(saved)

    def is_kxk(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)

    unet_names = sorted(module.lora_name for module in plain.unet_loras)
    conv_names = sorted({module.lora_name for module in conv.unet_loras} - set(unet_names))
    te_names = sorted(module.lora_name for module in plain.text_encoder_loras)
    kxk = sorted({module.lora_name for module in plain.unet_loras + conv.unet_loras + plain.text_encoder_loras
                  if is_kxk(module.org_module)})
    return {
        "unet": unet_names,
        "unet_conv_extra": conv_names,
        "te1": [name for name in te_names if name.startswith("lora_te1_")],
        "te2": [name for name in te_names if name.startswith("lora_te2_")],
        "conv_kxk": kxk,
    }


def _toml_list(name: str, items: list[str]) -> str:
    return "\n".join([f"{name} = ["] + [f'    "{item}",' for item in items] + ["]"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, help="a clone of kohya-ss/sd-scripts")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args(argv)
    commit = _git(args.git_dir, "rev-parse", args.commit).strip()
    names = collect(args.git_dir, commit)
    print("# Generated by scripts/sd_scripts_sdxl_names.py from kohya-ss/sd-scripts: the lora_name of every")
    print("# LoRAModule networks/lora.py's LoRANetwork(is_sdxl=True) makes for SdxlUNet2DConditionModel and the two")
    print("# text encoders.")
    print(f'commit = "{commit}"\n')
    comments = {
        "unet": "U-Net, no conv_dim (Transformer2DModel blocks)",
        "unet_conv_extra": "U-Net, the names conv_dim adds (ResnetBlock2D, Downsample2D, Upsample2D blocks)",
        "te1": "CLIP ViT-L text encoder",
        "te2": "OpenCLIP bigG text encoder (CLIPTextModelWithProjection)",
        "conv_kxk": "of all the above, the Conv2d layers with a kernel other than 1x1 (they get conv_dim)",
    }
    for section, items in names.items():
        print(f"[{section}]  # {comments[section]}: {len(items)}")
        print(_toml_list("names", items) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
