"""Getting base models and VAEs: presets, Hugging Face hub files and repos, plain URLs and Civitai models.

Downloads go to ``<name>.part`` beside the destination and are renamed only when complete (and, when known, of the
right size and sha256), so a file under its final name is always whole. An interrupted download resumes where it
stopped (HTTP Range), also after a dropped connection mid-transfer. Tokens (``HF_TOKEN``, ``CIVITAI_TOKEN``) are sent
as headers only: never put in a URL we print, a log line, an error message or a file.

A hub repo (``owner/name``) brings only what a diffusers pipeline loads: ``model_index.json`` and, in each component
folder it names, the configs and one set of weights — safetensors before pickled ``.bin``, the plain weights or the
asked-for variant (``fp16``) — never the root single-file checkpoints, non-EMA copies or other formats that repos keep
beside them (for SD 1.5 about 5 GB instead of 20). ``HF_ENDPOINT`` (a mirror) is read when a download starts.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Colab and this project run 3.11+
    import tomli as tomllib

logger = logging.getLogger(__name__)

CIVITAI_API = "https://civitai.com/api/v1"
CHUNK_BYTES = 1 << 20
RETRIES = 5
# civitai:ID, civitai:ID@VERSION_ID, or a model page URL (its ?modelVersionId= picks the version, as the site does)
_CIVITAI_MODEL = re.compile(r"^(?:civitai:(\d+)(?:@(\d+))?|https?://(?:www\.)?civitai\.com/models/(\d+)\S*)$")
_CIVITAI_VERSION = re.compile(r"[?&]modelVersionId=(\d+)")
# the weight file names diffusers (models) and transformers (text encoders) load, in that order of preference
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_FORMATS = ("safetensors", "bin")  # safetensors first; .bin is read with torch.load(weights_only=True)
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies and merges, sentencepiece models
_ANY_WEIGHTS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
_SHARD_INDEX = re.compile(r"\.index(\.\w+)?\.json$")
_VARIANT_NAME = re.compile(r"\w+")


class DownloadError(RuntimeError):
    """A download that could not finish; the message says what to do (and never contains a token)."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    repo: str | None = None
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None
    kind: str = "model"
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    zero_terminal_snr: bool = False  # v-prediction SDXL models trained with it (NoobAI-XL v-pred)


def load_presets() -> dict[str, Preset]:
    """The presets in ``lycolab/models/presets.toml``, by name."""
    text = resources.files("lycolab.models").joinpath("presets.toml").read_text(encoding="utf-8")
    return {name: Preset(name=name, **values) for name, values in tomllib.loads(text).items()}


def download(source: str, to: str | Path, token: str | None = None, sha256: str | None = None,
             progress: bool = True, variant: str | None = None) -> Path:
    """Fetch ``source`` into the folder ``to`` and return the local path.

    ``source`` is a preset name (``sd15``, ``anything-v5`` …), a hub repo ``owner/name`` (a diffusers folder), a hub
    file ``owner/name/path/file.safetensors``, an http(s) URL, or a Civitai model (``civitai:ID`` or its page URL).
    The token defaults to ``HF_TOKEN`` for the hub and ``CIVITAI_TOKEN`` for Civitai. ``variant`` (``fp16``) picks a
    diffusers repo's variant weights where the repo has them.
    """
    to = Path(to)
    presets = load_presets()
    civitai = _CIVITAI_MODEL.match(source)
    is_url = source.startswith(("http://", "https://"))
    parts = source.split("/")
    if variant and (source in presets or civitai or is_url or len(parts) != 2):
        raise DownloadError(f"variant {variant!r} applies to a hub repo (owner/name) only; drop it for {source!r}")
    if source in presets:
        preset = presets[source]
        if preset.url:
            return download_url(preset.url, to, token=token, sha256=sha256 or preset.sha256, progress=progress)
        return download_hub_file(preset.repo, preset.filename, to, token, sha256 or preset.sha256)
    if civitai:
        version = civitai.group(2) or (_CIVITAI_VERSION.search(source) or [None, None])[1]
        return download_civitai(int(civitai.group(1) or civitai.group(3)), to, token, progress=progress,
                                version_id=int(version) if version else None)
    if is_url:
        return download_url(source, to, token=token, sha256=sha256, progress=progress)
    if len(parts) == 2:
        return download_hub_repo(source, to, token, variant)
    if len(parts) > 2:
        return download_hub_file("/".join(parts[:2]), "/".join(parts[2:]), to, token, sha256)
    raise DownloadError(f"{source!r} is not a preset ({', '.join(presets)}), a hub repo or file, a URL or a "
                        "Civitai model")


def download_hub_file(repo: str, filename: str, to: Path, token: str | None = None, sha256: str | None = None
                      ) -> Path:
    """One file of a hub repo via huggingface_hub (its own resume and cache), checked against ``sha256``."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(f"{repo}/{filename}", to):
        path = Path(hf_hub_download(repo, filename, local_dir=to, token=_hub_token(token), endpoint=_hub_endpoint()))
    if sha256:
        _check_sha256(path, sha256, path)
    return path


def download_hub_repo(repo: str, to: Path, token: str | None = None, variant: str | None = None) -> Path:
    """The files a diffusers pipeline loads from a hub repo (see :func:`pipeline_files`) into ``to/<name>``.

    A new folder is filled as ``to/.<name>.part`` and renamed when every file is there, so ``to/<name>`` is never a
    half model; running again resumes (and updates an existing folder file by file). A repo without
    ``model_index.json`` is one model at its top level (a VAE: ``config.json`` and weights) or holds single-file
    checkpoints, of which exactly one is taken (:func:`single_checkpoint`).
    """
    from huggingface_hub import HfApi

    if variant is not None and not _VARIANT_NAME.fullmatch(variant):
        raise DownloadError(f"variant {variant!r}: give the name repos use in weight files, e.g. fp16")
    to = Path(to)
    target = to / repo.split("/")[-1]
    if target.exists() and not target.is_dir():
        raise DownloadError(f"{target}: a file is in the way of the model folder; move it or choose another --to")
    with _hub_errors(repo, to):
        info = HfApi(endpoint=_hub_endpoint(), token=_hub_token(token)).model_info(repo)
        names = [sibling.rfilename for sibling in info.siblings or []]
        if "model_index.json" not in names and not _is_root_model(names):
            if variant:
                logger.info("%s: not a diffusers pipeline, so variant %s does not apply", repo, variant)
            return download_hub_file(repo, single_checkpoint(names, repo), to, token)
        work = target if target.is_dir() else to / f".{target.name}.part"
        try:
            wanted = pipeline_files(names, _model_index(repo, info.sha, work, token) if "model_index.json" in names
                                    else None, variant, repo)
        except DownloadError:
            if work != target:
                shutil.rmtree(work, ignore_errors=True)  # only model_index.json was there
            raise
        logger.info("%s: %d of the repo's %d files (the pipeline's components, one set of weights each)", repo,
                    len(wanted), len(names))
        logger.debug("%s: taking %s; leaving %s", repo, ", ".join(wanted),
                     ", ".join(sorted(set(names) - set(wanted))) or "nothing")
        for name in wanted:
            _hub_file(repo, name, info.sha, work, token)
    if work != target:
        os.replace(work, target)
    return target


def pipeline_files(names: Iterable[str], model_index: dict | None, variant: str | None = None, repo: str = "repo"
                   ) -> list[str]:
    """Which of a diffusers repo's files ``names`` a pipeline loads: what sd-scripts / diffusers read, and no more.

    The components are the ``model_index`` keys whose value is a ``[library, class]`` pair (``[null, null]`` marks
    one the pipeline goes without, e.g. a removed safety checker); ``model_index=None`` means one model at the repo's
    top level. From each component folder come its configs and tokenizer files and ONE set of weights (a file, or a
    shard index and its shards): safetensors before ``.bin``; the ``variant`` when asked and present, else the plain
    weights (diffusers' fallback). Root checkpoints, ``non_ema``/other variants, flax/onnx copies never come.
    """
    names = set(names)
    if model_index is None:
        return _folder_files(names, "", variant, repo)
    chosen = ["model_index.json"]
    for folder in components(model_index):
        inside = _folder_files(names, folder, variant, repo)
        if not inside:
            logger.warning("%s: model_index.json names %s but the repo has no %s/ folder", repo, folder, folder)
        chosen += inside
    return chosen


def components(model_index: dict) -> list[str]:
    """The component folders ``model_index.json`` names: keys (not ``_class_name`` …) with a non-null pair."""
    return [key for key, value in model_index.items() if key and not key.startswith("_") and isinstance(value, list)
            and len(value) == 2 and all(isinstance(part, str) for part in value)]


def single_checkpoint(names: Iterable[str], repo: str) -> str:
    """A repo of single-file checkpoints gives its one top-level ``.safetensors`` (else its one ``.ckpt``, which the
    loader reads without running code); several are never guessed between: the message lists them to choose from."""
    top = sorted(name for name in names if "/" not in name)
    for suffix in (".safetensors", ".ckpt"):
        found = [name for name in top if name.endswith(suffix)]
        if len(found) == 1:
            return found[0]
        if found:
            shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
            raise DownloadError(f"{repo}: no model_index.json, and {len(found)} checkpoints ({shown}); choose one: "
                                f"{repo}/FILE")
    raise DownloadError(f"{repo}: neither a diffusers model (model_index.json) nor a single-file checkpoint at its top "
                        f"level; give the file as {repo}/path/FILE")


def _is_root_model(names: Iterable[str]) -> bool:
    """One diffusers/transformers model at the repo's top level (a VAE repo): its config and standard weights."""
    top = [name for name in names if "/" not in name]
    weights = [name for name in top if name.endswith(WEIGHT_FORMATS)]  # shards too: stem-00001-of-00002.safetensors
    return "config.json" in top and any(name.split(".")[0].split("-")[0] in WEIGHT_STEMS for name in weights)


def _folder_files(names: set[str], folder: str, variant: str | None, repo: str) -> list[str]:
    prefix = f"{folder}/" if folder else ""
    inside = sorted(name[len(prefix):] for name in names if name.startswith(prefix) and "/" not in name[len(prefix):])
    configs = [name for name in inside if name.endswith(CONFIG_SUFFIXES) and not _SHARD_INDEX.search(name)]
    if folder == "":
        configs = [name for name in configs if name != "model_index.json"]
    return [prefix + name for name in configs + _weights(inside, variant, f"{repo}: {prefix or 'the top level'}")]


def _weights(names: list[str], variant: str | None, where: str) -> list[str]:
    """One set of weights among a folder's files, in the order of preference of :func:`pipeline_files`."""
    present = set(names)
    for weight_format in WEIGHT_FORMATS:
        for wanted in dict.fromkeys((variant, None)):
            tag = f".{wanted}" if wanted else ""
            for stem in WEIGHT_STEMS:
                if f"{stem}{tag}.{weight_format}" in present:
                    return [f"{stem}{tag}.{weight_format}"]
                index = f"{stem}.{weight_format}.index{tag}.json"
                if index in present:
                    shard = re.compile(rf"{re.escape(stem + tag)}-\d+-of-\d+\.{weight_format}")
                    return [index] + [name for name in names if shard.fullmatch(name)]
    if not any(name.endswith(_ANY_WEIGHTS) for name in names):
        return []  # a tokenizer, scheduler or feature extractor: configs only
    variants = sorted({_variant_of(name) for name in names} - {None}, key=lambda name: (name != "fp16", name))
    if variants:
        raise DownloadError(f"{where} has only {', '.join(variants)} weights{f', not {variant}' if variant else ''}; "
                            f"download with the variant {variants[0]} (--variant {variants[0]})")
    raise DownloadError(f"{where} has no PyTorch weights a pipeline loads ({', '.join(WEIGHT_STEMS)}.safetensors or "
                        ".bin); this repo cannot be used as a diffusers model")


def _variant_of(name: str) -> str | None:
    """``fp16`` for ``diffusion_pytorch_model.fp16.safetensors`` (and its shards), None for plain weights."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in WEIGHT_STEMS or parts[2] not in WEIGHT_FORMATS:
        return None
    return re.sub(r"-\d+-of-\d+$", "", parts[1])


def _model_index(repo: str, revision: str | None, work: Path, token: str | None) -> dict:
    path = _hub_file(repo, "model_index.json", revision, work, token)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        index = None
    if not isinstance(index, dict):
        raise DownloadError(f"{repo}: its model_index.json is not a JSON object; the repo is broken, pick another")
    return index


def _hub_file(repo: str, filename: str, revision: str | None, work: Path, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, revision=revision, local_dir=work, token=_hub_token(token),
                                endpoint=_hub_endpoint()))


def _hub_token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN")


def _hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import; a notebook may set it later)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


@contextmanager
def _hub_errors(what: str, to: Path) -> Iterator[None]:
    """huggingface_hub's failures as one line that says what to do."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import HFValidationError, OfflineModeIsEnabled

    try:
        yield
    except HFValidationError:
        raise DownloadError(f"{what}: not a hub name; give owner/name or owner/name/path/file") from None
    except GatedRepoError as error:
        raise DownloadError(f"{what}: {_http_advice(_status(error) or 401, 'HF_TOKEN')}") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{what}: no such repo, or a private one (then set HF_TOKEN with access to it); check the "
                            "name") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise DownloadError(f"{what}: not available offline (HF_HUB_OFFLINE is set or there is no internet); "
                            "download it elsewhere and give its path instead") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"{what}: {_http_advice(_status(error), 'HF_TOKEN')}") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DownloadError(f"{to}: disk full while downloading {what}; free space (or use another folder) and "
                                "run again to resume") from None
        if error.errno is not None:
            raise DownloadError(f"{to}: cannot write the download ({error.strerror}); choose a folder you can write "
                                "to") from None
        raise DownloadError(f"{what}: cannot reach the hub ({type(error).__name__}); check the internet or "
                            "HF_ENDPOINT") from None
    except _transport_errors() as error:
        raise DownloadError(f"{what}: cannot reach the hub ({type(error).__name__}); check the internet or "
                            "HF_ENDPOINT") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses: requests' are OSErrors, httpx's are not."""
    clients = (sys.modules.get(name) for name in ("httpx", "httpx2"))
    return tuple(client.TransportError for client in clients if client and hasattr(client, "TransportError"))


def download_civitai(model_id: int, to: Path, token: str | None = None, api: str | None = None,
                     progress: bool = True, version_id: int | None = None) -> Path:
    """The primary file of a Civitai model's version ``version_id`` (a page URL's ``modelVersionId``; default the
    newest), checked against the sha256 Civitai publishes."""
    api = api or os.environ.get("CIVITAI_API", CIVITAI_API)
    token = token or os.environ.get("CIVITAI_TOKEN") or os.environ.get("CIVITAI_API_KEY")
    info = json.loads(_fetch_bytes(f"{api}/models/{model_id}", token, "CIVITAI_TOKEN"))
    versions = info.get("modelVersions") or []
    if not versions:
        raise DownloadError(f"civitai model {model_id}: it has no downloadable version")
    version = versions[0]
    if version_id is not None:
        version = next((item for item in versions if item.get("id") == version_id), None)
        if version is None:
            known = ", ".join(str(item.get("id")) for item in versions)
            raise DownloadError(f"civitai model {model_id} has no version {version_id} (it has {known}); copy the "
                                "page URL again with the version selected")
    files = version.get("files") or []
    chosen = next((item for item in files if item.get("primary")), files[0] if files else None)
    if chosen is None:
        raise DownloadError(f"civitai model {model_id}: version {version.get('id', '')} has no file")
    sha256 = (chosen.get("hashes") or {}).get("SHA256")
    return download_url(chosen.get("downloadUrl") or version["downloadUrl"], to, filename=chosen.get("name"),
                        token=token, sha256=sha256, progress=progress, token_variable="CIVITAI_TOKEN")


def download_url(url: str, to: Path, filename: str | None = None, token: str | None = None,
                 sha256: str | None = None, progress: bool = True, token_variable: str = "a token") -> Path:
    """A plain HTTP(S) download: resumable, size- and checksum-checked, renamed into place only when whole.

    The final name is ``filename``, else the server's Content-Disposition, else the URL's last part. A file of that
    name already complete in ``to`` (and matching ``sha256`` when one is given) is used without downloading again:
    the model cache is shared by every project. Google Drive share links and Hugging Face ``/blob/`` page URLs are
    turned into their download URLs first (:func:`direct_url`).
    """
    to.mkdir(parents=True, exist_ok=True)
    url = direct_url(url)
    shown = _without_query(url)
    name = _safe_name(filename or Path(urllib.parse.urlparse(url).path).name or "download")
    partial = to / f".{name}.part"
    existing = to / name
    if existing.is_file() and not partial.exists() and "." in name and not _drive_id(url):
        if sha256 is None or _sha256_matches(existing, sha256):
            logger.info("%s is already downloaded; using it", existing)
            return existing
    for attempt in range(1, RETRIES + 1):
        try:
            return _transfer(url, partial, filename, token, sha256, progress, token_variable)
        except _Interrupted as interruption:
            logger.warning("%s: connection dropped (%s); resuming (%d/%d)", shown, interruption, attempt, RETRIES)
    raise DownloadError(f"{shown}: the connection kept dropping; run the same command again to resume")


_DRIVE_FILE = re.compile(r"^https://drive\.google\.com/(?:file/d/([\w-]+)|(?:open|uc)\?(?:.*&)?id=([\w-]+))")


def _drive_id(url: str) -> str | None:
    match = _DRIVE_FILE.match(url)
    return (match.group(1) or match.group(2)) if match else None


def direct_url(url: str) -> str:
    """The URL that returns the file itself for links people copy from a browser: a Google Drive share link
    (``drive.google.com/file/d/ID/view``, ``open?id=ID``) and a Hugging Face file page (``…/blob/main/x``)."""
    drive_id = _drive_id(url)
    if drive_id:  # confirm=t skips the "too large to scan for viruses" page of big files
        return f"https://drive.usercontent.google.com/download?id={drive_id}&export=download&confirm=t"
    return re.sub(r"^(https://huggingface\.co/(?:datasets/|spaces/)?[^/]+/[^/]+)/blob/", r"\1/resolve/", url)


class _Interrupted(Exception):
    """The server stopped sending before the end; the .part file keeps what arrived."""


def _transfer(url: str, partial: Path, filename: str | None, token: str | None, sha256: str | None,
              progress: bool, token_variable: str) -> Path:
    offset = partial.stat().st_size if partial.exists() else 0
    request = _request(url, token, {"Range": f"bytes={offset}-"} if offset else None)
    with _open(request, _without_query(url), token_variable) as response:
        final = partial.parent / _safe_name(filename or _disposition_name(response) or partial.name[1:-5])
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: start again
        total = _total_size(response, offset)
        _receive(response, partial, offset, total, progress, final.name)
    if total is not None and partial.stat().st_size != total:
        raise _Interrupted(f"{partial.stat().st_size} of {total} bytes")
    if sha256:
        _check_sha256(partial, sha256, final)
    os.replace(partial, final)
    logger.info("downloaded %s (%.1f MB)", final, final.stat().st_size / 1e6)
    return final


def _receive(response, partial: Path, offset: int, total: int | None, progress: bool, name: str) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress)
    try:
        with open(partial, "ab" if offset else "wb") as handle:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, urllib.error.URLError, http.client.HTTPException) as error:
                    raise _Interrupted(type(error).__name__) from None
                if not chunk:
                    break
                handle.write(chunk)
                bar.update(len(chunk))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DownloadError(f"{partial.parent}: disk full while downloading {name}"
                                + (f" ({_human_size(total)} needed)" if total else "")
                                + "; free space (or use another folder) and run again to resume") from None
        raise
    finally:
        bar.close()


def _human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _request(url: str, token: str | None, headers: dict[str, str] | None = None) -> urllib.request.Request:
    request = urllib.request.Request(url, headers={"User-Agent": "lycolab", **(headers or {})})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def _open(request: urllib.request.Request, shown: str, token_variable: str):
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{shown}: {_http_advice(error.code, token_variable)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"{shown}: cannot connect ({reason}); check the address and the internet") from None


def _fetch_bytes(url: str, token: str | None, token_variable: str) -> bytes:
    with _open(_request(url, token), _without_query(url), token_variable) as response:
        return response.read()


def _http_advice(status: int | None, token_variable: str) -> str:
    if status in (401, 403):
        return (f"HTTP {status}: this file needs a login — set {token_variable} (or give a token) with access to "
                "it, and accept the model's licence on its page if it has one")
    if status == 404:
        return "HTTP 404: not found; check the name or URL"
    return f"HTTP {status}: the server refused the download; try again later"


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _total_size(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _disposition_name(response) -> str | None:
    match = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', response.headers.get("Content-Disposition", ""))
    return urllib.parse.unquote(match.group(1)) if match else None


def _safe_name(name: str) -> str:
    """A file name that cannot leave the target folder."""
    name = Path(name.replace("\\", "/")).name.strip()
    return name if name not in ("", ".", "..") else "download"


def _without_query(url: str) -> str:
    """The URL as we show it: no query string (Civitai tokens may be passed there by users)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest().lower()


def _sha256_matches(path: Path, expected: str) -> bool:
    return _sha256_of(path) == expected.lower()


def _check_sha256(path: Path, expected: str, final: Path) -> None:
    digest = _sha256_of(path)
    if digest != expected.lower():
        path.unlink(missing_ok=True)
        raise DownloadError(f"{final.name}: sha256 does not match the published one (got {digest[:12]}…, "
                            f"expected {expected[:12]}…); the partial file was deleted, download it again")
