"""Downloads against a local HTTP server on 127.0.0.1: resume after a dropped connection, checksums, errors,
Civitai resolution, and tokens that never reach logs or messages."""

import hashlib
import http.server
import json
import logging
import threading

import pytest

from lycolab.models.download import DownloadError, download, download_civitai, download_url, load_presets

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
            body = json.dumps({"modelVersions": [{"downloadUrl": f"{self.base}/files/x", "files": [
                {"name": "civitai_model.safetensors", "primary": True, "downloadUrl": f"{self.base}/auth/civ",
                 "hashes": {"SHA256": hashlib.sha256(PAYLOAD).hexdigest().upper()}}]}]}).encode()
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
    assert main(["download", f"{server}/missing", "--to", str(tmp_path)]) == 2
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
