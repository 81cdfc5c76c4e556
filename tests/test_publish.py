"""Publishing to the Hugging Face Hub: the generated model card, and uploads against a fake hub on 127.0.0.1.

The fake implements only what huggingface_hub's ``create_repo`` + ``create_commit`` call (read from the installed
version's hf_api.py and _commit_api.py): ``POST /api/repos/create``, ``POST /api/validate-yaml`` (README.md front
matter), ``POST /api/models/{repo}/preupload/{revision}`` and ``POST /api/models/{repo}/commit/{revision}``; plus
``GET /api/models/{repo}``, which create_repo(exist_ok=True) asks after a 401/403. Preupload answers "regular" for
every file, so all content arrives base64-encoded inside the commit's NDJSON (no LFS or Xet transfer is exercised).
Any other request is recorded as unexpected and fails the test.
"""

import base64
import http.server
import json
import logging
import re
import socket
import threading
import traceback

import pytest
from PIL import Image, PngImagePlugin

from lycolab.errors import user_errors
from lycolab.publish import TAGS, PublishError, model_card, read_metadata, upload_to_hub

TOKEN = "hf_FakeSecretToken1234567890abcdef"
REPO = "someone/my-loha"
TRAINING_METADATA = {
    "ss_learning_rate": "0.0001",
    "ss_unet_lr": "0.0002",
    "ss_text_encoder_lr": "5e-05",
    "ss_num_epochs": "10",
    "ss_epoch": "10",
    "ss_max_train_steps": "1600",
    "ss_resolution": "(512, 512)",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)",
    "ss_lr_scheduler": "cosine_with_restarts",
    "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_clip_skip": "2",
    "ss_mixed_precision": "fp16",
    "ss_tag_frequency": json.dumps({"10_sks": {"sks": 20, "1girl": 18, "smile": 7, "a|b": 7},
                                    "5_extra": {"1girl": 4, "outdoors": 3}}),
}
# colon, quotes, comment sign, YAML markers and a newline: each would break hand-written YAML
AWKWARD_TRIGGERS = ['sks: "the dog" # not a comment', "- it's\n---", "*alias & !tag"]


# ---- a fake hub


class FakeHub:
    """Records what huggingface_hub sends; ``fail_status`` answers every request with that status instead, echoing
    the Authorization header in the error body (as a careless server might) so scrubbing is tested too."""

    def __init__(self, fail_status: int | None = None):
        self.fail_status = fail_status
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.created: list[dict] = []
        self.preuploads: list[dict] = []
        self.commits: list[dict] = []  # {"header": …, "files": {path: bytes}}
        self.unexpected: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request, method: str) -> None:
        path = request.path.split("?")[0]
        body = _read_body(request)
        self.requests.append((method, path, request.headers.get("Authorization")))
        if self.fail_status:
            message = f"Invalid credentials in Authorization header: {request.headers.get('Authorization')}"
            return _reply(request, self.fail_status, {"error": message})
        repo = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/preupload/[^/]+|/commit/[^/]+)?", path)
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            owner = payload["organization"] or "fake-user"  # a bare name goes to the token's user
            return _reply(request, 200, {"url": f"{self.url}/{owner}/{payload['name']}"})
        if method == "POST" and path == "/api/validate-yaml":
            return self.validate_yaml(request, json.loads(body)["content"])
        if method == "POST" and repo and repo.group(2) and repo.group(2).startswith("/preupload/"):
            files = json.loads(body)["files"]
            self.preuploads.append({"repo": repo.group(1), "files": files})
            return _reply(request, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
        if method == "POST" and repo and repo.group(2) and repo.group(2).startswith("/commit/"):
            return self.commit(request, repo.group(1), body)
        self.unexpected.append(f"{method} {path}")
        _reply(request, 404, {"error": "not implemented by the fake hub"})

    def validate_yaml(self, request, content: str) -> None:
        import yaml

        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            assert match and isinstance(yaml.safe_load(match.group(1)), dict)
        except (AssertionError, yaml.YAMLError):
            return _reply(request, 400, {"errors": [{"message": "YAML front matter is not a mapping"}]})
        _reply(request, 200, {"errors": [], "warnings": []})

    def commit(self, request, repo: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        files = {}
        for line in lines[1:]:
            if line["key"] == "file" and line["value"]["encoding"] == "base64":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            else:
                self.unexpected.append(f"commit line {line['key']}")
        self.commits.append({"repo": repo, "header": lines[0], "files": files})
        _reply(request, 200, {"commitUrl": f"{self.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                              "pullRequestUrl": None})


def _read_body(request) -> bytes:
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(request.rfile.readline().strip() or b"0", 16):
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
        request.rfile.readline()
        return b"".join(chunks)
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


def _reply(request, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


@pytest.fixture
def online(monkeypatch):
    """The hub client online (conftest sets HF_HUB_OFFLINE=1, which huggingface_hub reads once into constants)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


# ---- adapters and samples


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A real LoHa (LyCORIS, convs) and a real LoRA file from the tiny SD, with sd-scripts' training metadata."""
    from lycolab.models.tiny import build_tiny_sd
    from lycolab.networks import create_network

    folder = tmp_path_factory.mktemp("adapters")
    loha_parts, lora_parts = build_tiny_sd(), build_tiny_sd()
    loha = create_network(loha_parts.unet, text_encoders=[loha_parts.text_encoder], algo="loha", dim=4, alpha=2,
                          conv_dim=2, conv_alpha=1)
    lora = create_network(lora_parts.unet, text_encoders=[lora_parts.text_encoder], algo="lora", dim=4, alpha=2)
    return {"loha": loha.save_weights(folder / "my_loha.safetensors", metadata=TRAINING_METADATA),
            "lora": lora.save_weights(folder / "my_lora.safetensors", metadata=TRAINING_METADATA)}


@pytest.fixture
def samples(tmp_path):
    """Two sample PNGs; the second carries A1111's ``parameters`` text with a prompt and a negative prompt."""
    first, second = tmp_path / "sample_00.png", tmp_path / "sample_01.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(first)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "sks, smiling: \"wide\"\nNegative prompt: blurry, lowres\nSteps: 20, Seed: 1")
    Image.new("RGB", (16, 24), (30, 30, 200)).save(second, pnginfo=info)
    return [first, second]


def front_matter(card: str) -> dict:
    """The card's metadata as the Hub client parses it (huggingface_hub's RepoCard: its regex, then PyYAML)."""
    from huggingface_hub import RepoCard

    return RepoCard(card).data.to_dict()


def settings_table(card: str) -> dict[str, str]:
    """``metadata key → value`` from the card's settings table, Markdown escapes undone."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \| `(.+?)` \|$", card, re.M)
    return {key: re.sub(r"\\(.)", r"\1", value) for label, value, key in rows if label != "Setting"}


# ---- the card


def test_card_front_matter_has_base_model_tags_trigger_words_and_sample_widget(adapters, samples):
    card = model_card(adapters["loha"], samples, AWKWARD_TRIGGERS, base_model="sd15", license="openrail",
                      sample_prompts=["sks, red square --not parsed"])

    data = front_matter(card)

    triggers = [" ".join(word.split()) for word in AWKWARD_TRIGGERS]  # one line each
    assert data["license"] == "openrail"
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["tags"] == list(TAGS)
    assert data["instance_prompt"] == ", ".join(triggers)
    assert data["widget"] == [
        {"text": "sks, red square --not parsed", "output": {"url": "samples/sample_00.png"}},
        {"text": 'sks, smiling: "wide"', "parameters": {"negative_prompt": "blurry, lowres"},
         "output": {"url": "samples/sample_01.png"}},
    ]
    assert "<Gallery />" in card
    for word in triggers:
        assert f"`{word}`" in card  # in the body too, as code the user can copy


def test_card_base_model_comes_from_a_hub_id_or_the_checkpoint_name_and_never_shows_a_local_path(adapters, tmp_path):
    assert front_matter(model_card(adapters["loha"], base_model="owner/custom-model"))["base_model"] == \
        "owner/custom-model"
    # no base model given: ss_sd_model_name (v1-5-pruned-emaonly.safetensors) is the sd15 preset's file
    assert front_matter(model_card(adapters["loha"]))["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"

    local = tmp_path / "private" / "my-merge"
    local.mkdir(parents=True)
    card = model_card(adapters["loha"], base_model=str(local))

    assert "base_model" not in front_matter(card)
    assert str(local) not in card and "my-merge" in card


def test_card_settings_table_equals_the_adapter_metadata(adapters):
    metadata = read_metadata(adapters["loha"])
    card = model_card(adapters["loha"])

    table = settings_table(card)

    network_args = json.loads(metadata["ss_network_args"])
    assert network_args["algo"] == "loha"
    expected = {key: metadata[key] for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha",
                                               *TRAINING_METADATA) if key not in ("ss_tag_frequency",)}
    expected.update({f"ss_network_args.{name}": str(value) for name, value in network_args.items()})
    assert {key: table[key] for key in expected} == expected
    # the top tags over both folders, most frequent first, ties by name
    assert "`1girl` (22), `sks` (20), `a|b` (7), `smile` (7), `outdoors` (3)" in card


def test_card_usage_gives_the_a1111_tag_and_diffusers_only_for_lora_files(adapters):
    lora = model_card(adapters["lora"], repo_id=REPO, extra_notes="Trained on *my* photos.")
    loha = model_card(adapters["loha"])

    assert "`<lora:my_lora:1>`" in lora and "`<lora:my_loha:1>`" in loha
    assert f'pipe.load_lora_weights("{REPO}", weight_name="my_lora.safetensors")' in lora
    assert "load_lora_weights(" not in loha and "not LoHa ones" in loha
    assert lora.rstrip().endswith("## Notes\n\nTrained on *my* photos.")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "pickle"])
def test_damaged_or_missing_adapter_gives_one_line_error_naming_the_file(adapters, tmp_path, damage):
    path = tmp_path / ("bad.ckpt" if damage == "pickle" else "bad.safetensors")
    if damage == "truncated":
        path.write_bytes(adapters["loha"].read_bytes()[:200])
    elif damage in ("garbage", "pickle"):
        path.write_bytes(b"\x00" * 64)

    with pytest.raises(PublishError) as caught:
        model_card(path)

    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(caught.value, user_errors())


def test_two_samples_with_one_name_are_refused(adapters, samples, tmp_path):
    other = tmp_path / "elsewhere" / samples[0].name
    other.parent.mkdir()
    other.write_bytes(samples[0].read_bytes())

    with pytest.raises(PublishError, match="two samples named sample_00.png"):
        model_card(adapters["loha"], [samples[0], other])


# ---- uploads


@pytest.mark.parametrize("private", [True, False])
def test_upload_sends_adapter_samples_and_card_in_one_commit(online, adapters, samples, private):
    card = model_card(adapters["loha"], samples, ["sks"], repo_id=REPO)

    with FakeHub() as hub:
        url = upload_to_hub(REPO, adapters["loha"], samples, card=card, token=TOKEN, private=private,
                            endpoint=hub.url, commit_message="first version")

    assert url == f"{hub.url}/{REPO}"
    assert hub.unexpected == []
    assert len(hub.created) == 1 and hub.created[0]["organization"] == "someone"
    created = hub.created[0]
    assert created.get("visibility", "private" if created.get("private") else "public") == \
        ("private" if private else "public")
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["header"]["value"]["summary"] == "first version"
    assert commit["files"] == {
        "my_loha.safetensors": adapters["loha"].read_bytes(),
        "samples/sample_00.png": samples[0].read_bytes(),
        "samples/sample_01.png": samples[1].read_bytes(),
        "README.md": card.encode("utf-8"),
    }
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}


def test_upload_without_a_card_generates_one_and_takes_the_token_from_hf_token(online, adapters, samples,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    with FakeHub() as hub:
        upload_to_hub(REPO, adapters["lora"], samples, endpoint=hub.url)

    readme = hub.commits[0]["files"]["README.md"].decode()
    assert readme == model_card(adapters["lora"], samples, repo_id=REPO)
    assert [entry["output"]["url"] for entry in front_matter(readme)["widget"]] == \
        ["samples/sample_00.png", "samples/sample_01.png"]
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}


def test_a_bare_repo_name_is_committed_to_the_repo_the_hub_created(online, adapters):
    with FakeHub() as hub:
        url = upload_to_hub("my-loha", adapters["lora"], token=TOKEN, endpoint=hub.url)

    assert url == f"{hub.url}/fake-user/my-loha"
    assert [commit["repo"] for commit in hub.commits] == ["fake-user/my-loha"]


def test_no_token_says_to_add_hf_token_to_colab_secrets(online, adapters, monkeypatch):
    import lycolab.colab

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(lycolab.colab, "in_colab", lambda: False)

    with FakeHub() as hub, pytest.raises(PublishError) as caught:
        upload_to_hub(REPO, adapters["lora"], endpoint=hub.url)

    message = str(caught.value)
    assert "HF_TOKEN" in message and "Secrets" in message and "\n" not in message
    assert hub.requests == []  # nothing was sent


@pytest.mark.parametrize("status, advice", [(401, "refused the token"), (403, "may not write"),
                                            (404, "not found")])
def test_refused_upload_gives_one_line_error_without_the_token(online, adapters, status, advice, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")

    with FakeHub(fail_status=status) as hub, pytest.raises(PublishError) as caught:
        upload_to_hub(REPO, adapters["lora"], token=TOKEN, endpoint=hub.url)

    message = str(caught.value)
    assert REPO in message and advice in message and f"HTTP {status}" in message and "\n" not in message
    assert "Invalid credentials" in message  # the server's words are kept …
    assert TOKEN not in message  # … but not the token it echoed
    assert hub.commits == []
    shown = "".join(traceback.format_exception(caught.value)) + "".join(capfd.readouterr()) + caplog.text
    assert TOKEN not in shown


def test_token_never_reaches_logs_output_return_value_or_card(online, adapters, samples, caplog, capfd,
                                                              monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_DEBUG", True)  # hub client logs each request as curl
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")

    with FakeHub() as hub:
        url = upload_to_hub(REPO, adapters["loha"], samples, token=TOKEN, endpoint=hub.url)

    assert any("Request" in record.getMessage() for record in caplog.records)  # the client did log at DEBUG
    logged = caplog.text + "".join(capfd.readouterr())
    readme = hub.commits[0]["files"]["README.md"].decode()
    assert TOKEN not in logged and TOKEN not in url and TOKEN not in readme


def test_a_card_holding_the_token_is_refused_before_upload(online, adapters):
    with FakeHub() as hub, pytest.raises(PublishError) as caught:
        upload_to_hub(REPO, adapters["lora"], card=f"---\ntags: [x]\n---\nmy token is {TOKEN}\n", token=TOKEN,
                      endpoint=hub.url)

    assert TOKEN not in str(caught.value) and hub.requests == []


def test_card_the_hub_rejects_gives_one_line_error(online, adapters):
    with FakeHub() as hub, pytest.raises(PublishError) as caught:
        upload_to_hub(REPO, adapters["lora"], card="---\n- not: a mapping\n---\n# card\n", token=TOKEN,
                      endpoint=hub.url)

    message = str(caught.value)
    assert REPO in message and "front matter" in message and "\n" not in message
    assert hub.commits == []


def test_unreachable_hub_gives_one_line_error(online, adapters):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with pytest.raises(PublishError) as caught:
        upload_to_hub(REPO, adapters["lora"], token=TOKEN, endpoint=closed)

    message = str(caught.value)
    assert "cannot reach" in message and closed in message and "\n" not in message and TOKEN not in message


def test_offline_mode_gives_one_line_error(adapters, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        upload_to_hub(REPO, adapters["lora"], token=TOKEN, endpoint="http://127.0.0.1:9")


def test_card_of_an_sdxl_adapter_says_sdxl_and_uses_the_sdxl_pipeline(tmp_path):
    import torch

    from lycolab.models.tiny_sdxl import build_tiny_sdxl
    from lycolab.networks import create_network

    parts = build_tiny_sdxl()
    network = create_network(parts.unet, None, dim=2, alpha=1)
    path = network.save_weights(tmp_path / "xl.safetensors", dtype=torch.float16,
                                metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    card = model_card(path, base_model="stabilityai/stable-diffusion-xl-base-1.0")
    assert "for Stable Diffusion XL" in card
    assert "StableDiffusionXLPipeline.from_pretrained(\"stabilityai/stable-diffusion-xl-base-1.0\"" in card
