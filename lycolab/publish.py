"""Publish a trained adapter on the Hugging Face Hub with a generated model card, as the old Colab notebooks did.

The card's front matter is what the Hub reads (base model, tags, the trigger words as ``instance_prompt``, a
``widget`` gallery of the sample images); its body says how to use the file and lists what it was trained with,
read from the file's own ``ss_*`` metadata so the card cannot disagree with the weights. The adapter, its samples
and the card go up in one commit, so a repo never holds an adapter without its card.

The token comes from ``HF_TOKEN`` (Colab's Secrets panel 🔑, or the environment) and never leaves this module: it
is not logged, returned or put in the card, and every error message is scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TAGS = ("text-to-image", "stable-diffusion", "lora", "lycoris", "lycolab")
SAMPLES_FOLDER = "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
TOKEN_VARIABLE = "HF_TOKEN"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
DEFAULT_COMMIT_MESSAGE = "Upload adapter, samples and model card (lycolab)"
PROJECT_URL = "https://github.com/lycolab/lycolab"
TOP_TAGS = 20
# owner/name as the Hub spells repo ids; a bare name is not a base_model the Hub can link
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# any ASCII punctuation may be backslash-escaped in CommonMark; these are the ones that can change how text renders
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&!#])")
# Hub tokens look like hf_ + letters; scrubbed even when they are not the token given (an old one in a message)
_HUB_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")

# The settings table: (label, ss_* key), in the order a reader looks for them. ss_network_args expands into one row
# per argument right after the network rows.
NETWORK_SETTINGS = (
    ("Network module", "ss_network_module"),
    ("Network dim (rank)", "ss_network_dim"),
    ("Network alpha", "ss_network_alpha"),
)
TRAINING_SETTINGS = (
    ("Learning rate", "ss_learning_rate"),
    ("U-Net learning rate", "ss_unet_lr"),
    ("Text encoder learning rate", "ss_text_encoder_lr"),
    ("Optimizer", "ss_optimizer"),
    ("LR scheduler", "ss_lr_scheduler"),
    ("Epochs", "ss_num_epochs"),
    ("Saved at epoch", "ss_epoch"),
    ("Max train steps", "ss_max_train_steps"),
    ("Saved at step", "ss_steps"),
    ("Training images (with repeats)", "ss_num_train_images"),
    ("Resolution", "ss_resolution"),
    ("Base checkpoint", "ss_sd_model_name"),
    ("Base model version", "ss_base_model_version"),
    ("Clip skip", "ss_clip_skip"),
    ("Mixed precision", "ss_mixed_precision"),
)
NETWORK_ARG_LABELS = {"algo": "Algorithm", "conv_dim": "Conv dim", "conv_alpha": "Conv alpha"}
ALGORITHM_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3",
                   "diag-oft": "Diag-OFT", "boft": "BOFT", "full": "full fine-tune (diff)", "glora": "GLoRA"}
# ss_base_model_version, as lycolab and sd-scripts write it
SD_VERSIONS = {"sd_v1": " 1.x", "sd_v2": " 2.x", "sdxl_base_v1-0": " XL"}
# what diffusers' load_lora_weights reads for SD 1.x/2.x and SDXL: kohya LoRA/LoCon keys (tests/test_networks_interop*)
DIFFUSERS_LOADABLE = ("lora", "locon")


class PublishError(OSError, ValueError):
    """A card or upload that cannot be made: one line naming the file or repo and the fix, never the token.

    An OSError like huggingface_hub's HTTP errors, and a ValueError so the notebooks and the CLI show it as one line
    (``lycolab.errors.user_errors``).
    """


def read_metadata(adapter: str | Path) -> dict[str, str]:
    """The ``ss_*`` (and other) metadata of a ``.safetensors`` adapter; only the header is read, no tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(adapter)
    if path.suffix.lower() != ".safetensors":
        raise PublishError(f"{path}: only .safetensors adapters are published (pickled files can run code)")
    if not path.is_file():
        raise PublishError(f"{path}: file not found; check the path (trained adapters are in the output/ folder)")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        raise PublishError(f"{path}: not a readable safetensors file ({_one_line(str(error))}); re-save or "
                           "re-download it") from None


def sample_path_in_repo(sample: str | Path) -> str:
    """Where a sample image lives in the repo; the card's widget points there."""
    return f"{SAMPLES_FOLDER}/{Path(sample).name}"


def model_card(adapter: str | Path, samples: Sequence[str | Path] = (), trigger_words: Sequence[str] = (),
               base_model: str = "", extra_notes: str = "", *, sample_prompts: Sequence[Any] = (),
               license: str = "", repo_id: str = "") -> str:
    """README.md for the adapter's hub repo: YAML front matter the Hub reads, then how to use it and its settings.

    ``base_model`` is a hub repo id, a lycolab preset name (``sd15``) or a local model path; only a hub id goes in
    the front matter (a path is shown by its name, never in full). Without it the checkpoint name in the metadata is
    matched against the presets. ``sample_prompts`` are the samples' prompts in order (strings, or objects with
    ``prompt``/``negative_prompt`` such as ``SamplePrompt``); a sample without one uses the prompt A1111 embeds in
    a PNG, else the trigger words (or the adapter's name). ``extra_notes`` is Markdown, kept as written.
    """
    adapter = Path(adapter)
    metadata = read_metadata(adapter)
    samples = _checked_samples(samples)
    triggers = _trigger_words(trigger_words)
    hub_id = hub_base_model(base_model, metadata)
    fallback_prompt = ", ".join(triggers) or adapter.stem
    front_matter: dict[str, Any] = {}
    if license.strip():
        front_matter["license"] = license.strip()
    if hub_id:
        front_matter["base_model"] = hub_id
    front_matter["tags"] = list(TAGS)
    if triggers:
        front_matter["instance_prompt"] = ", ".join(triggers)
    if samples:
        front_matter["widget"] = _widget(samples, list(sample_prompts), fallback_prompt)
    sections = [
        _title_section(adapter, metadata, bool(samples)),
        _trigger_section(triggers),
        _base_model_section(base_model, hub_id, metadata),
        _usage_section(adapter, metadata, hub_id, repo_id, fallback_prompt),
        _settings_section(metadata),
        _tags_section(metadata),
    ]
    if extra_notes.strip():
        sections.append(f"## Notes\n\n{extra_notes.strip()}")
    body = "\n\n".join(section for section in sections if section)
    return f"---\n{_yaml(front_matter)}---\n\n{body}\n"


def upload_to_hub(repo_id: str, adapter: str | Path, samples: Sequence[str | Path] = (), card: str | None = None,
                  token: str | None = None, private: bool = True, endpoint: str | None = None,
                  commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """Create the repo if needed and commit the adapter, ``samples/…`` and README.md in one commit; the repo's URL.

    ``card`` defaults to :func:`model_card` of the adapter and samples. ``token`` defaults to ``HF_TOKEN`` from the
    environment or Colab's Secrets panel; ``endpoint`` to ``HF_ENDPOINT`` as it is now. New repos are private unless
    ``private=False`` (an existing repo keeps its visibility).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from lycolab.colab import secret

    adapter = Path(adapter)
    read_metadata(adapter)  # refuse a damaged file before anything leaves the machine
    samples = _checked_samples(samples)
    token = (token or secret(TOKEN_VARIABLE) or "").strip()
    if not token:
        raise PublishError(f"{repo_id}: no Hugging Face token; add one with write access ({TOKENS_PAGE}) as "
                           f"{TOKEN_VARIABLE} in Colab's Secrets panel (🔑) or the environment")
    card = model_card(adapter, samples, repo_id=repo_id) if card is None else card
    if token in card or token in commit_message:
        raise PublishError(f"{repo_id}: the model card or commit message contains your token; remove it")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    operations = [CommitOperationAdd(path_in_repo=adapter.name, path_or_fileobj=str(adapter))]
    operations += [CommitOperationAdd(path_in_repo=sample_path_in_repo(sample), path_or_fileobj=str(sample))
                   for sample in samples]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    logger.info("uploading %s, %d sample(s) and README.md to %s", adapter.name, len(samples), repo_id)
    with _hub_errors(repo_id, token, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.create_commit(url.repo_id or repo_id, operations, commit_message=commit_message)
    logger.info("uploaded to %s", url)
    return str(url)


def hub_base_model(base_model: str, metadata: dict[str, str]) -> str | None:
    """The base model's hub repo id, when known: given as one, as a lycolab preset name, or found by matching the
    checkpoint name in the metadata (``ss_sd_model_name``) against the presets' files and repos."""
    from lycolab.models.download import load_presets

    models = {name: preset for name, preset in load_presets().items() if preset.kind == "model" and preset.repo}
    given = base_model.strip()
    if given in models:
        return models[given].repo
    if _HUB_REPO_ID.fullmatch(given) and not Path(given).expanduser().exists():
        return given
    checkpoint = Path(given).name if given else metadata.get("ss_sd_model_name", "")
    for preset in models.values():
        if checkpoint and checkpoint in (Path(preset.filename or "").name, preset.repo.split("/")[-1]):
            return preset.repo
    return None


# ---- the card's parts


def _yaml(front_matter: dict[str, Any]) -> str:
    """YAML by PyYAML (a huggingface_hub dependency), so quotes, colons and ``#`` in prompts are quoted for us."""
    import yaml

    return yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True, width=float("inf"))


def _widget(samples: list[Path], prompts: list[Any], fallback_prompt: str) -> list[dict[str, Any]]:
    """The Hub's text-to-image widget entries (``text``, ``parameters.negative_prompt``, ``output.url``)."""
    entries = []
    for index, sample in enumerate(samples):
        given = prompts[index] if index < len(prompts) else None
        prompt, negative = _prompt_of(given) if given is not None else _embedded_prompt(sample)
        entry: dict[str, Any] = {"text": prompt or fallback_prompt}
        if negative:
            entry["parameters"] = {"negative_prompt": negative}
        entry["output"] = {"url": sample_path_in_repo(sample)}
        entries.append(entry)
    return entries


def _prompt_of(given: Any) -> tuple[str, str]:
    prompt = getattr(given, "prompt", given)
    return _one_line(str(prompt)), _one_line(str(getattr(given, "negative_prompt", "") or ""))


def _embedded_prompt(sample: Path) -> tuple[str, str]:
    """The prompt A1111 writes into a PNG's ``parameters`` text: prompt lines, ``Negative prompt:``, ``Steps: …``."""
    from PIL import Image

    try:
        with Image.open(sample) as image:
            text = str(image.info.get("parameters") or "")
    except OSError:
        return "", ""
    prompt, negative, target = [], [], None
    for line in text.splitlines():
        if line.startswith("Steps:"):
            break
        if line.startswith("Negative prompt:"):
            target = negative
            line = line.removeprefix("Negative prompt:")
        (target if target is not None else prompt).append(line)
    return _one_line(" ".join(prompt)), _one_line(" ".join(negative))


def _title_section(adapter: Path, metadata: dict[str, str], has_samples: bool) -> str:
    algorithm = ALGORITHM_NAMES.get(_algorithm(metadata), _algorithm(metadata))
    lycoris = " (LyCORIS)" if metadata.get("ss_network_module") == "lycoris.kohya" else ""
    version = SD_VERSIONS.get(metadata.get("ss_base_model_version", ""), "")
    lines = [f"# {_md(adapter.stem)}", "",
             f"A {_md(algorithm)} adapter{lycoris} for Stable Diffusion{version}, trained with "
             f"[lycolab]({PROJECT_URL})."]
    if has_samples:
        lines += ["", "<Gallery />"]
    return "\n".join(lines)


def _trigger_section(triggers: list[str]) -> str:
    if not triggers:
        return "## Trigger words\n\nNone: the adapter applies without a trigger word."
    return "## Trigger words\n\nPut these in the prompt: " + ", ".join(_code(word) for word in triggers)


def _base_model_section(base_model: str, hub_id: str | None, metadata: dict[str, str]) -> str:
    checkpoint = metadata.get("ss_sd_model_name", "")
    if hub_id:
        shown = f"[{_md(hub_id)}](https://huggingface.co/{hub_id})"
    elif base_model.strip() or checkpoint:
        shown = _code(Path(base_model.strip()).name or checkpoint)  # a name, never a full local path
    else:
        return ""
    if checkpoint and checkpoint not in (hub_id or "", Path(base_model.strip()).name):
        shown += f" (checkpoint {_code(checkpoint)})"
    return f"## Base model\n\n{shown}"


def _usage_section(adapter: Path, metadata: dict[str, str], hub_id: str | None, repo_id: str, prompt: str) -> str:
    weight_tag = f"<lora:{adapter.stem}:1>"
    algorithm = _algorithm(metadata)
    parts = [
        "## How to use",
        "### AUTOMATIC1111 / Forge",
        f"Put {_code(adapter.name)} in `models/Lora` and add {_code(weight_tag)} to the prompt (lower the 1 to "
        "weaken it)." + (" LyCORIS files need webui 1.5 or newer." if algorithm != "lora" else ""),
        "### ComfyUI",
        f"Put {_code(adapter.name)} in `models/loras` and load it with a **LoraLoader** node (strength 1.0).",
        "### diffusers",
    ]
    pipeline = "StableDiffusionXLPipeline" if metadata.get("ss_base_model_version", "").startswith("sdxl") else \
        "StableDiffusionPipeline"
    if algorithm in DIFFUSERS_LOADABLE:
        code = "\n".join([
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f"pipe = {pipeline}.from_pretrained({json.dumps(hub_id or 'BASE_MODEL')}, "
            "torch_dtype=torch.float16).to(\"cuda\")",
            f"pipe.load_lora_weights({json.dumps(repo_id or 'THIS_REPO')}, weight_name={json.dumps(adapter.name)})",
            f"image = pipe({json.dumps(prompt)}).images[0]",
        ])
        parts.append(_fenced(code, "python"))
    else:
        name = _md(ALGORITHM_NAMES.get(algorithm, algorithm))
        parts.append(f"diffusers' `load_lora_weights` reads LoRA/LoCon files, not {name} ones: use "
                     "A1111 or ComfyUI, or `lycolab generate --network`.")
    return "\n\n".join(parts)


def _settings_section(metadata: dict[str, str]) -> str:
    rows = [(label, key, metadata[key]) for label, key in NETWORK_SETTINGS if is_shown(metadata.get(key))]
    rows += network_arg_rows(metadata.get("ss_network_args"))
    rows += [(label, key, metadata[key]) for label, key in TRAINING_SETTINGS if is_shown(metadata.get(key))]
    if not is_shown(metadata.get("ss_resolution")):  # a dataset_config run: sd-scripts writes it per dataset
        rows += [("Resolution", "ss_datasets", resolution) for resolution in dataset_resolutions(metadata)]
    if not rows:
        return "## Training settings\n\nThe file carries no training metadata."
    lines = ["## Training settings", "", "| Setting | Value | Metadata key |", "|---|---|---|"]
    lines += [f"| {_md(label)} | {_md(value)} | {_code(key)} |" for label, key, value in rows]
    return "\n".join(lines)


def dataset_resolutions(metadata: dict[str, str]) -> list[str]:
    """The resolutions of ``ss_datasets`` (a dataset_config run writes them per dataset) as ``WxH`` texts."""
    try:
        datasets = json.loads(metadata.get("ss_datasets") or "[]")
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
        return []
    found = [dataset.get("resolution") for dataset in datasets if isinstance(dataset, dict)] if isinstance(
        datasets, list) else []
    return sorted({f"{value[0]}x{value[1]}" if isinstance(value, list) and len(value) == 2 else str(value)
                   for value in found if value})


def network_arg_rows(network_args: str | None) -> list[tuple[str, str, str]]:
    """(label, metadata key, value) per ``ss_network_args`` entry, ``algo`` first; unreadable JSON as one row."""
    if not is_shown(network_args):
        return []
    try:
        arguments = json.loads(network_args)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
        arguments = None
    if arguments is None or arguments == {}:
        return []
    if not isinstance(arguments, dict):
        return [("Network args", "ss_network_args", network_args)]
    ordered = sorted(arguments, key=lambda name: name != "algo")  # stable: algo first, the rest as written
    return [(NETWORK_ARG_LABELS.get(name, name), f"ss_network_args.{name}", str(arguments[name])) for name in ordered]


def _tags_section(metadata: dict[str, str]) -> str:
    top = top_tags(metadata)
    if not top:
        return ""
    shown = ", ".join(f"{_code(tag)} ({count})" for tag, count in top)
    return f"## Training data\n\nMost frequent tags in the training captions: {shown}"


def top_tags(metadata: dict[str, str], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent caption tags over all folders of ``ss_tag_frequency``; ties in name order."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
        return []
    counts: Counter[str] = Counter()
    for folder in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(folder, dict):
            counts.update({str(tag): count for tag, count in folder.items()
                           if isinstance(count, int) and not isinstance(count, bool)})
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


def _algorithm(metadata: dict[str, str]) -> str:
    """The algorithm's name: ``algo`` in the LyCORIS network args; sd-scripts' ``networks.lora`` is LoRA, or LoCon
    when it trains convs too."""
    try:
        arguments = json.loads(metadata.get("ss_network_args") or "{}")
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
        arguments = {}
    arguments = arguments if isinstance(arguments, dict) else {}
    if arguments.get("algo"):
        return str(arguments["algo"])
    return "locon" if arguments.get("conv_dim") else "lora"


# ---- escaping


def _md(text: str) -> str:
    """Text as Markdown that renders as written, on one line (so a table cell stays in its cell)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _one_line(str(text)))


def _code(text: str) -> str:
    """An inline code span that holds any text: the fence is longer than any run of backticks inside."""
    text = _one_line(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _fenced(code: str, language: str) -> str:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", code)), default=0) + 1)
    return f"{fence}{language}\n{code}\n{fence}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def is_shown(value: str | None) -> bool:
    """Whether a metadata value says something (sd-scripts writes unset values as \"None\")."""
    return value is not None and value.strip() not in ("", "None")


def _trigger_words(trigger_words: Sequence[str] | str) -> list[str]:
    """Trigger words as a list; one string is split at commas, as a caption's tags are."""
    words = trigger_words.split(",") if isinstance(trigger_words, str) else trigger_words
    return [word for word in (_one_line(word) for word in words) if word]


def _checked_samples(samples: Sequence[str | Path] | str | Path) -> list[Path]:
    paths = [Path(samples)] if isinstance(samples, (str, Path)) else [Path(sample) for sample in samples]
    by_name: dict[str, Path] = {}
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise PublishError(f"{path}: not an image the Hub shows; use {', '.join(IMAGE_SUFFIXES)}")
        if not path.is_file():
            raise PublishError(f"{path}: sample image not found; check the path")
        if path.name in by_name:
            raise PublishError(f"{path} and {by_name[path.name]}: two samples named {path.name} (both would be "
                               f"{sample_path_in_repo(path)}); rename one")
        by_name[path.name] = path
    return paths


# ---- hub errors


@contextmanager
def _hub_errors(repo_id: str, token: str, endpoint: str | None) -> Iterator[None]:
    """huggingface_hub's failures as one PublishError line that says what to do, with the token scrubbed."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PublishError(f"{repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and restart "
                           "the runtime") from None
    except HFValidationError:
        raise PublishError(_scrub(f"{repo_id!r}: not a hub repo id; use your-name/adapter-name (letters, digits, "
                                  "'-', '_', '.')", token)) from None
    except HfHubHTTPError as error:
        raise PublishError(_scrub(f"{repo_id}: {_http_advice(error)}", token)) from None
    except ValueError as error:  # create_commit's README metadata check, or a reply it cannot read
        raise PublishError(_scrub(f"{repo_id}: the hub refused the upload ({_one_line(str(error))}); fix the model "
                                  "card's front matter or try again", token)) from None
    except OSError as error:
        if error.filename:
            raise PublishError(_scrub(f"{error.filename}: cannot read it ({error.strerror})", token)) from None
        raise _unreachable(repo_id, endpoint, error) from None
    except _transport_errors() as error:
        raise _unreachable(repo_id, endpoint, error) from None


def _http_advice(error: Any) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    server = _one_line(getattr(error, "server_message", None) or "")[:300]
    said = f"; the hub said: {server}" if server else ""
    if status == 401:
        return (f"the hub refused the token (HTTP 401: wrong, expired or read-only){said}; make a token with write "
                f"access at {TOKENS_PAGE} and put it in {TOKEN_VARIABLE} (Colab: the Secrets panel 🔑)")
    if status == 403:
        return (f"the token may not write there (HTTP 403){said}; use a write token ({TOKENS_PAGE}) and a namespace "
                "you own or belong to")
    if status == 404:
        return f"not found (HTTP 404){said}; check the owner part of the repo id and that the token can see it"
    if status == 429:
        return f"too many requests (HTTP 429){said}; wait a few minutes and run again"
    if status is not None and status >= 500:
        return f"the hub had an error (HTTP {status}){said}; try again later"
    return f"the hub refused the upload (HTTP {status}){said}; check the repo id and try again"


def _unreachable(repo_id: str, endpoint: str | None, error: BaseException) -> PublishError:
    where = endpoint or "the hub"
    return PublishError(f"{repo_id}: cannot reach {where} ({type(error).__name__}); check the internet connection "
                        "or HF_ENDPOINT")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx or httpx2), which are not OSErrors."""
    clients = (sys.modules.get(name) for name in ("httpx", "httpx2"))
    return tuple(client.TransportError for client in clients if client and hasattr(client, "TransportError"))


def _scrub(text: str, token: str) -> str:
    """The message without the token (or anything shaped like a hub token), on one line."""
    if token:
        text = text.replace(token, "<token>")
    return _one_line(_HUB_TOKEN_PATTERN.sub("hf_<token>", text))
