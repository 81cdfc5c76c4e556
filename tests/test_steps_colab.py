"""What a Colab user meets in the steps: the GPU check, resume finding itself, one model cache for every project,
the last project, Drive not stored twice, the Hub upload, the configure form's additions, and logs in the cell."""

from __future__ import annotations

import http.server
import logging
import threading
import zipfile

import pytest
import tomllib
from conftest import make_shapes_dataset, write_images
from safetensors import safe_open

from lycolab import colab
from lycolab.colab import open_workspace
from lycolab.display import NotebookError
from lycolab.steps import configure, data, model, save, train

REAL_MODEL = "runwayml/stable-diffusion-v1-5"


@pytest.fixture
def ws(tmp_path):
    return open_workspace("colabsteps", tmp_path / "projects", use_drive=False)


def _configured(ws, tiny_model_dir, **values):
    make_shapes_dataset(ws.train_data)
    ws.remember(model=str(tiny_model_dir), v2=False)
    return configure.configure(ws, resolution=64, dataset_repeats=1, num_epochs=2, train_batch_size=2, seed=1,
                               network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, optimizer_type="AdamW",
                               mixed_precision="no", save_precision="float", xformers=False, max_token_length=75,
                               sample_prompts="sks --w 64 --h 64 --s 2", min_bucket_reso=64, **values)


def test_training_refuses_a_cpu_runtime_for_a_real_model_in_one_line(ws, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(train, "has_accelerator", lambda: False)
    with pytest.raises(ValueError, match="no GPU: in Colab choose Runtime → Change runtime type → T4 GPU"):
        train.check_runtime(REAL_MODEL, train_on_cpu=False)
    train.check_runtime(REAL_MODEL, train_on_cpu=True)  # ticked: allowed
    train.check_runtime(str(tiny_model_dir), train_on_cpu=False)  # the tiny demo model trains on a CPU
    _configured(ws, tiny_model_dir)
    text = ws.config_file.read_text(encoding="utf-8").replace(str(tiny_model_dir), REAL_MODEL)
    ws.config_file.write_text(text, encoding="utf-8")
    with pytest.raises(NotebookError, match="tick train_on_cpu") as caught:
        train.run(ws, live=False)
    assert "\n" not in str(caught.value)
    assert not list(ws.output.glob("*.safetensors")), "refused before anything was loaded or written"


def test_resume_finds_an_unfinished_runs_state_and_a_finished_one_starts_anew(ws, tiny_model_dir, caplog):
    _configured(ws, tiny_model_dir, save_state=True, save_last_n_epochs_state=1)
    with caplog.at_level(logging.INFO, logger="lycolab"):
        first = train.run(ws, live=False)
    assert "no unfinished run of colabsteps to resume" in caplog.text and first.resumed_from is None
    (ws.output / "colabsteps.safetensors").unlink()  # a disconnect after epoch 1 was saved
    for folder in ws.output.glob("colabsteps-state"):
        import shutil

        shutil.rmtree(folder)
    resumed = train.run(ws, live=False)
    assert resumed.resumed_from == ws.output / "colabsteps-000001-state"
    with safe_open(str(ws.output / "colabsteps.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "8"
    assert train.run(ws, live=False).resumed_from is None  # the newest state ends a finished run
    assert train.run(ws, resume=False, live=False).resumed_from is None


def test_an_estimate_is_shown_for_the_chosen_gpu(ws, tiny_model_dir):
    _configured(ws, tiny_model_dir)
    shown = configure.estimate(ws, "T4")
    assert shown.steps == 8 and shown.device.startswith("T4") and "estimate" in str(shown)
    assert train.estimate(ws, num_epochs="4").steps == 16


class _Files(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def file_server(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    _Files.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_base_model_is_downloaded_once_into_the_cache_every_project_shares(tmp_path, file_server,
                                                                            tiny_model_dir):
    folder, base = file_server
    (folder / "model.safetensors").write_bytes((tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
                                               .read_bytes())
    first = open_workspace("one", tmp_path / "projects", use_drive=False)
    second = open_workspace("two", tmp_path / "projects", use_drive=False)
    chosen = model.get_model(first, f"{base}/model.safetensors")
    assert chosen.model == tmp_path / "projects" / "_models" / "model.safetensors"
    again = model.get_model(second, f"{base}/model.safetensors")
    assert again.model == chosen.model and _Files.requests == ["/model.safetensors"], "no second download"


def test_a_zip_at_a_url_is_downloaded_and_extracted(ws, file_server, tmp_path):
    folder, base = file_server
    write_images(tmp_path / "img", [(64, 64), (64, 96)], captions=["a cat"])
    with zipfile.ZipFile(folder / "set.zip", "w") as bundle:
        for image in (tmp_path / "img").iterdir():
            bundle.write(image, f"5_cat/{image.name}")
    result = data.get_data(ws, "zip", f"{base}/set.zip")
    assert sorted(path.name for path in result.added) == ["img_000.png", "img_000.txt", "img_001.png",
                                                          "img_001.txt"]
    assert (ws.train_data / "5_cat" / "img_001.png").is_file()


def test_near_duplicates_are_listed_then_moved_aside_not_deleted(ws):
    import shutil

    folder = make_shapes_dataset(ws.train_data) / "2_shapes"
    shutil.copy(folder / "0.png", folder / "0_copy.png")
    shutil.copy(folder / "0.txt", folder / "0_copy.txt")
    listed = data.move_duplicates_aside(ws, move=False)
    assert len(listed.rows) == 1 and "0.png" in listed.rows[0]["images"] and "0_copy.png" in listed.rows[0]["images"]
    moved = data.move_duplicates_aside(ws, move=True)
    assert len(moved.rows) == 1 and len(list(folder.glob("*.png"))) == 4
    duplicates = ws.root / "duplicates" / "2_shapes"
    assert len(list(duplicates.glob("*.png"))) == 1 and len(list(duplicates.glob("*.txt"))) == 1


def test_an_empty_project_name_opens_the_last_project_used(tmp_path):
    projects = tmp_path / "projects"
    assert open_workspace("", projects, use_drive=False).name == "my_lora"
    open_workspace("portrait", projects, use_drive=False)
    assert open_workspace("", projects, use_drive=False).name == "portrait"
    assert open_workspace("  ", projects, use_drive=False).root == projects / "portrait"


def test_saving_stores_nothing_twice_when_the_workspace_is_on_drive(tmp_path, monkeypatch):
    monkeypatch.setattr(colab, "DRIVE_MOUNT", tmp_path / "drive")
    ws = open_workspace("ondrive", tmp_path / "drive" / "MyDrive" / "lycolab", use_drive=False)
    (ws.output / "a.safetensors").write_bytes(b"x" * 10)
    table = save.save_to_drive(ws, str(tmp_path / "drive" / "MyDrive" / "backups"))
    assert all("already on Drive" in row["saved"] for row in table.rows) and len(table.rows) == 3
    assert not (tmp_path / "drive" / "MyDrive" / "backups").exists() or not any(
        (tmp_path / "drive" / "MyDrive" / "backups").iterdir())
    local = save.save_to_drive(ws, str(tmp_path / "elsewhere"))  # off Drive: zipped as before
    assert len(list((tmp_path / "elsewhere").glob("*.zip"))) == 3 and len(local.rows) == 3


def test_publishing_uploads_the_final_adapter_samples_and_card_without_showing_the_token(
        ws, tiny_model_dir, monkeypatch, capfd, caplog):
    import huggingface_hub.constants
    from test_publish import FakeHub

    token = "hf_publishStepTokenNeverShown42"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    _configured(ws, tiny_model_dir)
    ws.remember(trigger_word="sks")
    train.run(ws, live=False)
    assert save.publish_to_hub(ws, "").title == "not uploaded"
    with caplog.at_level(logging.DEBUG), FakeHub() as hub:
        shown = save.publish_to_hub(ws, "someone/my-lora", private=True, endpoint=hub.url)
    files = hub.commits[0]["files"]
    assert files["colabsteps.safetensors"] == (ws.output / "colabsteps.safetensors").read_bytes()
    assert sum(name.startswith("samples/") for name in files) == 1  # the newest round: one prompt
    card = files["README.md"].decode()
    assert "instance_prompt: sks" in card and "sks" in card.split("---")[2]
    assert hub.created[0].get("visibility", "private" if hub.created[0].get("private") else "") == "private"
    captured = capfd.readouterr()
    assert token not in str(shown) + captured.out + captured.err + caplog.text + card


def test_configure_adds_regularization_images_and_its_other_options(ws, tiny_model_dir, tmp_path):
    write_images(ws.reg_data / "1_person", [(64, 64)] * 3)
    adapter = tmp_path / "previous.safetensors"
    adapter.write_bytes(b"")
    make_shapes_dataset(ws.train_data)
    for caption in ws.train_data.rglob("*.txt"):
        caption.rename(caption.with_suffix(".caption"))
    ws.remember(caption_extension=".caption", v2=True, model=str(tiny_model_dir))
    with pytest.raises(NotebookError, match="network_weights .*missing.safetensors: file not found"):
        configure.configure(ws, resolution=64, min_bucket_reso=64,
                            network_weights=str(tmp_path / "missing.safetensors"))
    plan = configure.configure(ws, resolution=64, dataset_repeats=1, num_epochs=2, train_batch_size=2,
                               min_bucket_reso=64, class_prompt="person", reg_repeats=2, network_dim=64,
                               network_category="LoHa", sample_prompts="a\\nb", sample_prompt_lines="c\n\nd\n",
                               vae_batch_size=3, save_last_n_epochs=2, save_state=True, network_weights=str(adapter))
    with ws.config_file.open("rb") as handle:
        written = {key: value for section in tomllib.load(handle).values() for key, value in section.items()}
    assert (written["clip_skip"], written["vae_batch_size"], written["save_last_n_epochs"],
            written["save_last_n_epochs_state"], written["network_weights"]) == (1, 3, 2, 1, str(adapter))
    assert written["prior_loss_weight"] == 1.0
    with ws.dataset_config.open("rb") as handle:
        subsets = tomllib.load(handle)["datasets"][0]["subsets"]
    regs = [subset for subset in subsets if subset.get("is_reg")]
    assert len(regs) == 1 and regs[0]["class_tokens"] == "person" and regs[0]["num_repeats"] == 1  # 1_ prefix
    assert {subset.get("caption_extension", ".caption") for subset in subsets} == {".caption"}  # 04's, as auto
    assert (ws.config / "sample_prompt.txt").read_text().splitlines() == ["a", "b", "c", "d"]
    assert any("LoHa: network_dim 64" in note for note in plan.advice)
    assert any("regularization" in note for note in plan.advice)


def test_lycolabs_log_lines_go_to_the_running_cells_output(capsys):
    from lycolab.log_display import CurrentCellHandler, show_logs_here

    assert show_logs_here() is None, "outside IPython nothing is configured"
    handler = show_logs_here(force=True)
    try:
        assert show_logs_here(force=True) is handler  # once, however many notebooks' cells call it
        logging.getLogger("lycolab.data.dataset").info("bucket 0: resolution (512, 512), count: 8")
        logging.getLogger("lycolab.training").warning("xformers is not installed; using SDPA")
        logging.getLogger("lycolab.x").debug("not shown at INFO")
        assert capsys.readouterr().out == "bucket 0: resolution (512, 512), count: 8\nwarning: xformers is not " \
                                          "installed; using SDPA\n"
        assert isinstance(handler, CurrentCellHandler)
    finally:
        logging.getLogger("lycolab").removeHandler(handler)


@pytest.mark.parametrize("pasted", ['decouple=True weight_decay=0.01 betas=0.9,0.999',
                                    'decouple=True, weight_decay=0.01, betas=[0.9,0.999]',
                                    '["decouple=True", "weight_decay=0.01", "betas=0.9,0.999"]'])
def test_optimizer_args_pasted_from_any_old_notebook_mean_the_same(ws, tiny_model_dir, pasted):
    from lycolab.config import load_config
    from lycolab.training.optim import parse_optimizer_args

    _configured(ws, tiny_model_dir, optimizer_args=pasted)
    arguments = parse_optimizer_args(load_config(ws.config_file).optimizer_args)
    assert arguments["decouple"] is True and arguments["weight_decay"] == 0.01
    assert tuple(arguments["betas"]) == (0.9, 0.999)
