"""Getting base models and VAEs: presets, Hugging Face hub files and repos, plain URLs and Civitai models.

Downloads go to ``<name>.part`` beside the destination and are renamed only when complete (and, when known, of the
right size and sha256), so a file under its final name is always whole. An interrupted download resumes where it
stopped (HTTP Range), also after a dropped connection mid-transfer. Tokens (``HF_TOKEN``, ``CIVITAI_TOKEN``) are sent
as headers only: never put in a URL we print, a log line, an error message or a file.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
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
_CIVITAI_MODEL = re.compile(r"^(?:civitai:(\d+)|https?://(?:www\.)?civitai\.com/models/(\d+)\S*)$")


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


def load_presets() -> dict[str, Preset]:
    """The presets in ``lycolab/models/presets.toml``, by name."""
    text = resources.files("lycolab.models").joinpath("presets.toml").read_text(encoding="utf-8")
    return {name: Preset(name=name, **values) for name, values in tomllib.loads(text).items()}


def download(source: str, to: str | Path, token: str | None = None, sha256: str | None = None,
             progress: bool = True) -> Path:
    """Fetch ``source`` into the folder ``to`` and return the local path.

    ``source`` is a preset name (``sd15``, ``anything-v5`` …), a hub repo ``owner/name`` (a diffusers folder), a hub
    file ``owner/name/path/file.safetensors``, an http(s) URL, or a Civitai model (``civitai:ID`` or its page URL).
    The token defaults to ``HF_TOKEN`` for the hub and ``CIVITAI_TOKEN`` for Civitai.
    """
    to = Path(to)
    presets = load_presets()
    if source in presets:
        preset = presets[source]
        if preset.url:
            return download_url(preset.url, to, token=token, sha256=sha256 or preset.sha256, progress=progress)
        return download_hub_file(preset.repo, preset.filename, to, token, sha256 or preset.sha256)
    civitai = _CIVITAI_MODEL.match(source)
    if civitai:
        return download_civitai(int(civitai.group(1) or civitai.group(2)), to, token, progress=progress)
    if source.startswith(("http://", "https://")):
        return download_url(source, to, token=token, sha256=sha256, progress=progress)
    parts = source.split("/")
    if len(parts) == 2:
        return download_hub_repo(source, to, token)
    if len(parts) > 2:
        return download_hub_file("/".join(parts[:2]), "/".join(parts[2:]), to, token, sha256)
    raise DownloadError(f"{source!r} is not a preset ({', '.join(presets)}), a hub repo or file, a URL or a "
                        "Civitai model")


def download_hub_file(repo: str, filename: str, to: Path, token: str | None = None, sha256: str | None = None
                      ) -> Path:
    """One file of a hub repo via huggingface_hub (its own resume and cache), checked against ``sha256``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(repo, filename, local_dir=to, token=token or os.environ.get("HF_TOKEN")))
    except LocalEntryNotFoundError:
        raise DownloadError(f"{repo}/{filename}: not available offline (HF_HUB_OFFLINE is set or there is no "
                            "internet); download it elsewhere and give its path instead") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"{repo}/{filename}: {_http_advice(_status(error), 'HF_TOKEN')}") from None
    if sha256:
        _check_sha256(path, sha256, path)
    return path


def download_hub_repo(repo: str, to: Path, token: str | None = None) -> Path:
    """A diffusers-format repo (only the weights diffusers needs, safetensors preferred) into ``to/<name>``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    target = to / repo.split("/")[-1]
    patterns = ["*.json", "*.txt", "*.safetensors", "tokenizer/*"]
    try:
        snapshot_download(repo, local_dir=target, allow_patterns=patterns,
                          token=token or os.environ.get("HF_TOKEN"))
    except LocalEntryNotFoundError:
        raise DownloadError(f"{repo}: not available offline; download it elsewhere and give its folder") from None
    except HfHubHTTPError as error:
        raise DownloadError(f"{repo}: {_http_advice(_status(error), 'HF_TOKEN')}") from None
    return target


def download_civitai(model_id: int, to: Path, token: str | None = None, api: str | None = None,
                     progress: bool = True) -> Path:
    """The newest version's primary file of a Civitai model, checked against the sha256 Civitai publishes."""
    api = api or os.environ.get("CIVITAI_API", CIVITAI_API)
    token = token or os.environ.get("CIVITAI_TOKEN") or os.environ.get("CIVITAI_API_KEY")
    info = json.loads(_fetch_bytes(f"{api}/models/{model_id}", token, "CIVITAI_TOKEN"))
    versions = info.get("modelVersions") or []
    if not versions:
        raise DownloadError(f"civitai model {model_id}: it has no downloadable version")
    files = versions[0].get("files") or []
    chosen = next((item for item in files if item.get("primary")), files[0] if files else None)
    if chosen is None:
        raise DownloadError(f"civitai model {model_id}: its newest version has no file")
    sha256 = (chosen.get("hashes") or {}).get("SHA256")
    return download_url(chosen.get("downloadUrl") or versions[0]["downloadUrl"], to, filename=chosen.get("name"),
                        token=token, sha256=sha256, progress=progress, token_variable="CIVITAI_TOKEN")


def download_url(url: str, to: Path, filename: str | None = None, token: str | None = None,
                 sha256: str | None = None, progress: bool = True, token_variable: str = "a token") -> Path:
    """A plain HTTP(S) download: resumable, size- and checksum-checked, renamed into place only when whole.

    The final name is ``filename``, else the server's Content-Disposition, else the URL's last part.
    """
    to.mkdir(parents=True, exist_ok=True)
    shown = _without_query(url)
    partial = to / f".{_safe_name(filename or Path(urllib.parse.urlparse(url).path).name or 'download')}.part"
    for attempt in range(1, RETRIES + 1):
        try:
            return _transfer(url, partial, filename, token, sha256, progress, token_variable)
        except _Interrupted as interruption:
            logger.warning("%s: connection dropped (%s); resuming (%d/%d)", shown, interruption, attempt, RETRIES)
    raise DownloadError(f"{shown}: the connection kept dropping; run the same command again to resume")


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


def _check_sha256(path: Path, expected: str, final: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    if digest.hexdigest().lower() != expected.lower():
        path.unlink(missing_ok=True)
        raise DownloadError(f"{final.name}: sha256 does not match the published one (got {digest.hexdigest()[:12]}…, "
                            f"expected {expected[:12]}…); the partial file was deleted, download it again")
