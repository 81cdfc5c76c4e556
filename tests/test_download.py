"""Downloads against local HTTP servers on 127.0.0.1: resume after a dropped connection, checksums, errors,
Civitai resolution, tokens that never reach logs or messages, and a fake Hugging Face hub serving the tiny model as a
diffusers repo among the decoys real repos carry (root checkpoints, fp16 and non-EMA copies, .bin and flax weights)."""

import hashlib
import http.server
import json
import logging
import os
import re
import stat
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save

from lycolab.models.download import (
    DownloadError,
    download,
    download_civitai,
    download_url,
    load_presets,
    pipeline_files,
    single_checkpoint,
)

PAYLOAD = bytes(range(256)) * 12_000  # ~3 MB
TOKEN = "SECRET-TOKEN-123"


class Handler(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).seen.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        path = self.path.split("?")[0]
        if path == "/missing":
            return self.send_error(404)
        if path.startswith("/auth/") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.send_error(401)
        if path.startswith("/api/v1/models/123"):
            sha256 = hashlib.sha256(PAYLOAD).hexdigest().upper()
            body = json.dumps({"modelVersions": [{"id": 9, "downloadUrl": f"{self.base}/files/x", "files": [
                {"name": "civitai_model.safetensors", "primary": True, "downloadUrl": f"{self.base}/auth/civ",
                 "hashes": {"SHA256": sha256}}]}, {"id": 7, "files": [
                     {"name": "older_version.safetensors", "primary": True, "downloadUrl": f"{self.base}/auth/old",
                      "hashes": {"SHA256": sha256}}]}]}).encode()
            return self._send(200, body, {"Content-Type": "application/json"})
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        if path.startswith("/drop/") and start == 0:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops a third of the way in
            return None
        headers = {"Content-Disposition": 'attachment; filename="served name.safetensors"'} \
            if path.startswith("/named/") else {}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"
        return self._send(206 if start else 200, PAYLOAD[start:], headers)

    def _send(self, status, body, headers):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Handler.base = f"http://127.0.0.1:{httpd.server_port}"
    Handler.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Handler.base
    httpd.shutdown()


def test_plain_download_is_whole_and_leaves_no_partial_file(server, tmp_path):
    path = download(f"{server}/files/model.safetensors", tmp_path, progress=False)
    assert path == tmp_path / "model.safetensors" and path.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    named = download_url(f"{server}/named/abc?x=1", tmp_path / "n", progress=False)
    assert named.name == "served name.safetensors"


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        path = download_url(f"{server}/drop/model.bin", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    ranges = [header for request_path, header, _ in Handler.seen if request_path == "/drop/model.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(PAYLOAD) // 3}-"
    assert "resuming" in caplog.text


def test_bad_checksum_is_rejected_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(DownloadError, match="sha256 does not match"):
        download_url(f"{server}/files/model.safetensors", tmp_path, sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    good = hashlib.sha256(PAYLOAD).hexdigest()
    assert download_url(f"{server}/files/model.safetensors", tmp_path, sha256=good, progress=False).is_file()


def test_http_errors_are_one_clear_line(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404: not found") as error:
        download(f"{server}/missing", tmp_path, progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(DownloadError, match="needs a login — set a token"):
        download_url(f"{server}/auth/file.bin", tmp_path, progress=False)


def test_civitai_model_is_resolved_checked_and_the_token_never_shows(server, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    monkeypatch.setenv("CIVITAI_API", f"{server}/api/v1")
    with caplog.at_level(logging.DEBUG):
        path = download("civitai:123", tmp_path, progress=False)
        with pytest.raises(DownloadError) as error:
            download(f"{server}/missing?token={TOKEN}", tmp_path, progress=False)
    assert path.name == "civitai_model.safetensors" and path.read_bytes() == PAYLOAD
    assert ("/auth/civ", None, f"Bearer {TOKEN}") in Handler.seen  # sent as a header...
    assert TOKEN not in caplog.text and TOKEN not in str(error.value)  # ...and shown nowhere
    with pytest.raises(DownloadError, match="needs a login — set CIVITAI_TOKEN"):
        download_civitai(123, tmp_path / "no_token", token="wrong", api=f"{server}/api/v1", progress=False)


def test_a_civitai_page_url_with_model_version_id_gets_that_version(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    monkeypatch.setenv("CIVITAI_API", f"{server}/api/v1")
    page = "https://civitai.com/models/123/some-model?modelVersionId=7"
    assert download(page, tmp_path / "page", progress=False).name == "older_version.safetensors"
    assert download("civitai:123@7", tmp_path / "short", progress=False).name == "older_version.safetensors"
    assert download("civitai:123", tmp_path / "newest", progress=False).name == "civitai_model.safetensors"
    with pytest.raises(DownloadError, match="has no version 5 \\(it has 9, 7\\)"):
        download("https://civitai.com/models/123?modelVersionId=5", tmp_path / "none", progress=False)


def test_presets_cover_the_guides_models_and_offline_hub_gives_advice(tmp_path, monkeypatch):
    presets = load_presets()
    assert {"sd15", "sd21-base", "sd21-768v", "anything-v5", "counterfeit-v3", "abyssorangemix3", "anime-vae"} \
        <= set(presets)
    assert all((preset.repo and preset.filename) or preset.url for preset in presets.values())
    assert presets["sd21-768v"].v2 and presets["sd21-768v"].v_parameterization
    assert presets["anime-vae"].kind == "vae"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="not available offline"):
        download("sd15", tmp_path, progress=False)


def test_download_command_lists_presets_and_reports_errors_in_one_line(server, tmp_path, capsys):
    from lycolab.cli import main

    assert main(["download", "--list"]) == 0
    assert "anything-v5" in capsys.readouterr().out
    assert main(["download", f"{server}/files/m.safetensors", "--to", str(tmp_path)]) == 0
    assert (tmp_path / "m.safetensors").read_bytes() == PAYLOAD
    assert capsys.readouterr().out.strip() == str(tmp_path / "m.safetensors")
    assert main(["download", f"{server}/missing", "--to", str(tmp_path)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "HTTP 404" in error and "\n" not in error


def test_disk_full_is_reported_with_the_size_needed_and_can_resume(server, tmp_path, monkeypatch):
    import errno
    import io

    import lycolab.models.download as download_module

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    with pytest.raises(DownloadError, match=r"disk full while downloading model.safetensors \(3.1 MB needed\)"):
        download_url(f"{server}/files/model.safetensors", tmp_path, progress=False)
    monkeypatch.undo()
    assert download_url(f"{server}/files/model.safetensors", tmp_path, progress=False).read_bytes() == PAYLOAD


# --- a fake Hugging Face hub -------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DECOY = b"a file no pipeline download may ask for"


class Hub(http.server.BaseHTTPRequestHandler):
    """The three calls huggingface_hub makes: the repo's file list (``/api/models/…``), then HEAD and GET per file
    (``/{repo}/resolve/{commit}/{path}``). Every file asked for is recorded."""

    protocol_version = "HTTP/1.1"
    repos: dict = {}
    requested: list = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):  # noqa: N802 - http.server's name
        self._answer(with_body=False)

    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer(with_body=True)

    def _answer(self, with_body):
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/").split("/")
        if parts[:2] == ["api", "models"] and "/".join(parts[2:4]) in self.repos:
            files = sorted(self.repos["/".join(parts[2:4])])
            listing = {"id": "/".join(parts[2:4]), "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
            return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, with_body)
        if len(parts) > 4 and parts[2] == "resolve":
            type(self).requested.append("/".join(parts[4:]))
            content = self.repos.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))
            if content is not None:
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
                return self._send(200, content, headers, with_body)
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, with_body)
        return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, with_body)

    def _send(self, status, body, headers, with_body):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)


def _half(path: Path) -> bytes:
    """The weights of ``path`` in fp16, as a repo's ``*.fp16.safetensors`` holds them."""
    return save({key: value.half() for key, value in load_file(path).items()}, {"format": "pt"})


def _tiny_repo(model_dir: Path) -> dict[str, bytes]:
    """The tiny model's diffusers folder plus what real SD repos keep beside the pipeline's files."""
    files = {path.relative_to(model_dir).as_posix(): path.read_bytes() for path in model_dir.rglob("*")
             if path.is_file()}
    decoys = ["v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt",
              "v1-inference.yaml", "README.md", "unet/diffusion_pytorch_model.non_ema.safetensors",
              "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.bin",
              "unet/diffusion_flax_model.msgpack", "text_encoder/pytorch_model.bin", "text_encoder/flax_model.msgpack",
              "vae/diffusion_pytorch_model.bin", "vae/diffusion_flax_model.msgpack", "safety_checker/config.json",
              "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json"]
    files.update(dict.fromkeys(decoys, DECOY))  # safety_checker, feature_extractor: [null, null] in model_index
    for plain, half in (("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"),
                        ("text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors")):
        files[half] = _half(model_dir / plain)
    return files  # the VAE has no fp16 copy: a variant download falls back to its full weights


@pytest.fixture(scope="module")
def hub_repos(tiny_model_dir):
    tiny = _tiny_repo(tiny_model_dir)
    only_half = {name: content for name, content in tiny.items()
                 if name not in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin")}
    vae = {name[len("vae/"):]: content for name, content in tiny.items() if name.startswith("vae/")}
    return {"owner/tiny-sd": tiny, "owner/only-half": only_half, "owner/tiny-vae": vae,
            "owner/checkpoint": {"README.md": DECOY, "anything.safetensors": PAYLOAD, "anything.ckpt": DECOY,
                                 "samples/a.safetensors": DECOY},
            "owner/checkpoints": {"a.safetensors": DECOY, "b.safetensors": DECOY}}


@pytest.fixture
def hub(hub_repos, monkeypatch):
    """The fake hub as HF_ENDPOINT, online (conftest sets HF_HUB_OFFLINE), with files made under umask 022."""
    import huggingface_hub.constants

    Hub.repos, Hub.requested = hub_repos, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_port}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    umask = os.umask(0o022)
    yield Hub
    os.umask(umask)
    httpd.shutdown()


def _tree(folder: Path) -> dict[str, int]:
    """The downloaded files (huggingface_hub's own .cache/ bookkeeping aside) with their permission bits."""
    return {path.relative_to(folder).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in folder.rglob("*")
            if path.is_file() and ".cache" not in path.relative_to(folder).parts}


def test_hub_repo_download_requests_only_the_pipeline_files_and_loads(hub, tiny_model_dir, tmp_path):
    from lycolab.models.load import load_stable_diffusion

    folder = download("owner/tiny-sd", tmp_path)
    pipeline = {path.relative_to(tiny_model_dir).as_posix() for path in tiny_model_dir.rglob("*") if path.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in pipeline and "model_index.json" in pipeline
    assert set(hub.requested) == pipeline  # no root checkpoint, fp16, non-EMA, .bin, flax or null component
    assert folder == tmp_path / "tiny-sd" and [path.name for path in tmp_path.iterdir()] == ["tiny-sd"]
    assert _tree(folder) == dict.fromkeys(pipeline, 0o644)  # 0666 & ~umask, like any file the user makes
    parts = load_stable_diffusion(folder)
    expected = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(parts.unet.state_dict()[key], value) for key, value in expected.items())
    hub.requested.clear()
    assert download("owner/tiny-sd", tmp_path) == folder  # again: up to date, nothing fetched a second time
    assert not [name for name in hub.requested if name.endswith(".safetensors")]


def test_variant_download_takes_fp16_weights_and_full_ones_where_a_component_has_none(hub, tiny_model_dir,
                                                                                       tmp_path):
    from lycolab.cli import main
    from lycolab.models.load import load_stable_diffusion

    assert main(["download", "owner/tiny-sd", "--to", str(tmp_path), "--variant", "fp16"]) == 0
    weights = sorted({name for name in hub.requested if name.endswith(".safetensors")})  # HEAD, then GET
    assert weights == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    parts = load_stable_diffusion(tmp_path / "tiny-sd")  # finds the fp16 files without being told the variant
    for model, original in ((parts.unet, "unet/diffusion_pytorch_model.safetensors"),
                            (parts.text_encoder, "text_encoder/model.safetensors")):
        state = model.state_dict()
        for key, value in load_file(tiny_model_dir / original).items():
            assert torch.equal(state[key].half(), value.half())  # fp16 is what was stored: equal after rounding


def test_repo_with_only_variant_weights_names_the_variant_to_ask_for(hub, tmp_path):
    with pytest.raises(DownloadError) as error:
        download("owner/only-half", tmp_path)
    message = str(error.value)
    assert message == ("owner/only-half: unet/ has only fp16, non_ema weights; download with the variant fp16 "
                       "(--variant fp16)")
    assert not [name for name in hub.requested if name != "model_index.json"]
    assert list(tmp_path.iterdir()) == []  # the started .part folder is gone


def test_single_file_repos_give_one_checkpoint_or_list_the_choices(hub, tmp_path):
    from diffusers import AutoencoderKL

    assert download("owner/checkpoint", tmp_path).read_bytes() == PAYLOAD
    assert set(hub.requested) == {"anything.safetensors"}
    assert _tree(tmp_path) == {"anything.safetensors": 0o644}
    with pytest.raises(DownloadError, match=r"2 checkpoints \(a.safetensors, b.safetensors\); choose one: "
                       r"owner/checkpoints/FILE$"):
        download("owner/checkpoints", tmp_path)
    hub.requested.clear()
    vae = download("owner/tiny-vae", tmp_path)  # one model at the top level, as VAE repos are
    assert set(hub.requested) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert AutoencoderKL.from_pretrained(vae).config.latent_channels == 4


def test_hub_errors_are_one_line(hub, tmp_path):
    with pytest.raises(DownloadError, match=r"^owner/missing: no such repo, or a private one") as error:
        download("owner/missing", tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("owner/tiny-sd/unet/nothing.safetensors", tmp_path)
    with pytest.raises(DownloadError, match="applies to a hub repo"):
        download("owner/tiny-sd/unet/config.json", tmp_path, variant="fp16")
    with pytest.raises(DownloadError, match="give the name repos use"):
        download("owner/tiny-sd", tmp_path, variant="../fp16")


def test_plain_downloads_get_the_umask_mode(server, tmp_path):
    umask = os.umask(0o022)
    try:
        path = download_url(f"{server}/files/model.safetensors", tmp_path, progress=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- which files a pipeline takes, over generated repos -----------------------------------------------------------

STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_NAMES = [f"{stem}{tag}.{fmt}" for stem in STEMS for tag in ("", ".fp16", ".non_ema")
                for fmt in ("safetensors", "bin")] + ["diffusion_flax_model.msgpack", "model.onnx",
                                                       "diffusion_pytorch_model.safetensors.index.json",
                                                       "diffusion_pytorch_model-00001-of-00002.safetensors",
                                                       "diffusion_pytorch_model-00002-of-00002.safetensors"]
CONFIG_NAMES = ["config.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer_config.json"]
ROOT_NAMES = ["v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "README.md", "v1-inference.yaml"]
FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor")


@st.composite
def repos(draw):
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False}
    names = ["model_index.json"] + draw(st.lists(st.sampled_from(ROOT_NAMES), unique=True, max_size=2))
    for folder in draw(st.lists(st.sampled_from(FOLDERS), unique=True, max_size=4)):
        index[folder] = draw(st.sampled_from([["diffusers", "SomeClass"], [None, None]]))
        files = st.lists(st.sampled_from(CONFIG_NAMES + WEIGHT_NAMES), unique=True, max_size=6)  # small: fast
        names += [f"{folder}/{name}" for name in draw(files)]
    return names, index, draw(st.sampled_from([None, "fp16"]))


def _weight_set(name: str) -> tuple[str, str | None] | None:
    """(stem, variant) of a weights file, shard or shard index; None for anything else."""
    for pattern in (r"([a-z_]+)(?:\.(\w+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)",
                    r"([a-z_]+)\.(?:safetensors|bin)\.index(?:\.(\w+))?\.json"):
        match = re.fullmatch(pattern, name)
        if match:
            return match.group(1), match.group(2)
    return None


@given(repos())
def test_a_pipeline_takes_configs_and_one_set_of_weights_per_component(repo):
    names, index, variant = repo
    try:
        chosen = pipeline_files(names, index, variant, "owner/repo")
    except DownloadError as error:  # only for a component with weights but none a pipeline may take
        assert "\n" not in str(error) and str(error).startswith("owner/repo: ")
        return
    components = [key for key, value in index.items() if isinstance(value, list) and value[0]]
    assert len(chosen) == len(set(chosen)) and set(chosen) <= set(names)
    assert [name for name in chosen if "/" not in name] == ["model_index.json"]  # never a root checkpoint
    assert all(name.split("/")[0] in components for name in chosen if "/" in name)  # nor a null component
    for folder in components:
        inside = [name.split("/")[1] for name in names if name.startswith(f"{folder}/")]
        taken = [name.split("/")[1] for name in chosen if name.startswith(f"{folder}/")]
        weights = [name for name in taken if _weight_set(name)]
        assert set(taken) - set(weights) == {name for name in inside if name in CONFIG_NAMES}
        assert len({_weight_set(name) for name in weights}) <= 1  # one set of weights
        assert all(_weight_set(name)[1] in (None, variant) for name in weights)  # no non_ema, no unasked variant
        if any(name.endswith(".safetensors") and name.split(".")[0] in STEMS and _weight_set(name)[1] in
               (None, variant) for name in inside):
            assert weights and not [name for name in weights if name.endswith(".bin")]  # safetensors first
        if variant and any(f"{stem}.{variant}.safetensors" in inside for stem in STEMS):
            assert _weight_set(weights[0])[1] == variant  # the variant when the repo has it


def test_single_checkpoint_rule():
    assert single_checkpoint(["README.md", "x.ckpt", "x.safetensors", "sub/y.safetensors"], "o/r") == "x.safetensors"
    assert single_checkpoint(["x.ckpt", "x.yaml"], "o/r") == "x.ckpt"  # read with weights_only=True by the loader
    with pytest.raises(DownloadError, match="neither a diffusers model"):
        single_checkpoint(["README.md", "sub/y.safetensors"], "o/r")


@pytest.mark.parametrize(("link", "direct"), [
    ("https://drive.google.com/file/d/1AbC-d_9/view?usp=sharing",
     "https://drive.usercontent.google.com/download?id=1AbC-d_9&export=download&confirm=t"),
    ("https://drive.google.com/open?id=1AbC-d_9",
     "https://drive.usercontent.google.com/download?id=1AbC-d_9&export=download&confirm=t"),
    ("https://huggingface.co/owner/repo/blob/main/model.safetensors",
     "https://huggingface.co/owner/repo/resolve/main/model.safetensors"),
    ("https://huggingface.co/datasets/owner/set/blob/main/images.zip",
     "https://huggingface.co/datasets/owner/set/resolve/main/images.zip"),
    ("https://example.org/blob/x.zip", "https://example.org/blob/x.zip"),
])
def test_links_copied_from_a_browser_become_download_urls(link, direct):
    from lycolab.models.download import direct_url

    assert direct_url(link) == direct


def test_a_file_already_downloaded_is_used_without_a_request(server, tmp_path):
    first = download_url(f"{server}/files/model.safetensors", tmp_path, progress=False)
    before = len(Handler.seen)
    again = download_url(f"{server}/files/model.safetensors", tmp_path, progress=False)
    assert again == first and len(Handler.seen) == before
    with pytest.raises(DownloadError, match="sha256 does not match"):  # a stale copy is not trusted
        download_url(f"{server}/files/model.safetensors", tmp_path, sha256="0" * 64, progress=False)
