"""The notebook steps' library side: data sources, annotation modes, the form mapping, saving, display, errors."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import tomllib
from conftest import make_shapes_dataset, write_images

from lycolab.colab import open_workspace
from lycolab.display import Gallery, NotebookError, Table
from lycolab.steps import annotate, configure, data, save


@pytest.fixture
def ws(tmp_path):
    return open_workspace("steps", tmp_path / "ws", use_drive=False)


def test_zip_entries_that_leave_the_folder_are_refused(ws, tmp_path):
    archive = tmp_path / "evil.zip"
    write_images(tmp_path / "img", [(64, 64)])
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(tmp_path / "img" / "img_000.png", "a/good.png")
        bundle.writestr("../escape.png", b"x")
        bundle.writestr("__MACOSX/a/._good.png", b"x")
        bundle.writestr("notes.pdf", b"x")
    result = data.get_data(ws, "zip", str(archive))
    assert [path.relative_to(ws.train_data).as_posix() for path in result.added] == ["a/good.png"]
    assert result.skipped == ["../escape.png (path leaves the folder)"]
    assert not (ws.root / "escape.png").exists() and not (ws.train_data.parent / "escape.png").exists()
    with pytest.raises(NotebookError, match="not a zip file"):
        data.get_data(ws, "zip", str(tmp_path / "img" / "img_000.png"))


def test_a_folder_is_copied_with_captions_and_subfolders(ws, tmp_path):
    make_shapes_dataset(tmp_path / "drive")
    result = data.get_data(ws, "folder", str(tmp_path / "drive"), subfolder="set1")
    assert len(result.added) == 8 and (ws.train_data / "set1" / "2_shapes" / "0.txt").is_file()
    assert "images added" in result._repr_html_() and "4" in str(result)
    with pytest.raises(NotebookError, match="not found; give the folder path"):
        data.get_data(ws, "folder", str(tmp_path / "missing"))


class _Images(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_image_urls_are_downloaded_and_failures_reported(ws, tmp_path):
    write_images(tmp_path / "site", [(64, 64), (64, 32)])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: _Images(*a, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{base}/img_000.png\n{base}/img_001.png?sig=secret\n{base}/missing.png\n", encoding="utf-8")
    try:
        result = data.get_data(ws, "urls", str(listing))
    finally:
        server.shutdown()
    assert sorted(path.name for path in result.added) == ["img_000.png", "img_001.png"]
    assert len(result.skipped) == 1 and "missing.png" in result.skipped[0] and "secret" not in str(result)
    with pytest.raises(NotebookError, match="no http"):
        data.get_data(ws, "urls", "nothing here")


def test_a_hub_dataset_offline_is_one_clear_line(ws):
    with pytest.raises(NotebookError, match="hub cannot be reached; upload the images as a zip"):
        data.get_data(ws, "hub", "someone/some-dataset")


def test_unknown_source_and_report_on_an_empty_folder(ws):
    with pytest.raises(NotebookError, match="source must be one of upload, zip, folder, urls, hub"):
        data.get_data(ws, "ftp")
    report = data.dataset_report(ws, 64)
    assert not report.usable and "nothing usable" in report._repr_html_()


def test_annotation_none_cleans_existing_captions_and_the_browser_saves_edits(ws, monkeypatch):
    make_shapes_dataset(ws.train_data)
    summary = annotate.annotate(ws, "none", undesired_tags="red circle", trigger_word="mychar")
    assert summary.edited == 4
    caption = (ws.train_data / "2_shapes" / "0.txt").read_text(encoding="utf-8").strip()
    assert caption == "mychar, sks, blue background"
    assert annotate.tag_table(ws, 3).rows[0] == {"tag": "mychar", "images": 4}
    editor = annotate.caption_browser(ws)
    browser = editor.children  # slider, image, caption, buttons
    browser[0].value = 1
    assert browser[2].value.startswith("mychar, sks")
    browser[2].value = "mychar, edited"
    browser[3].children[0].click()
    assert (ws.train_data / "2_shapes" / "1.txt").read_text(encoding="utf-8") == "mychar, edited\n"
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # no widgets: a gallery instead
    gallery = annotate.caption_browser(ws, 2)
    assert isinstance(gallery, Gallery) and len(gallery.images) == 2 and "data:image/jpeg;base64" in \
        gallery._repr_html_()
    with pytest.raises(NotebookError, match="method must be one of wd14, blip, none"):
        annotate.annotate(ws, "clip")


@pytest.mark.parametrize(("category", "module", "args"), [
    ("LoRA", "networks.lora", []),
    ("LoCon", "networks.lora", ["conv_dim=8", "conv_alpha=4"]),
    ("LoCon_Lycoris", "lycoris.kohya", ["algo=locon", "conv_dim=8", "conv_alpha=4"]),
    ("LoHa", "lycoris.kohya", ["algo=loha", "conv_dim=8", "conv_alpha=4"]),
    ("LoKr", "lycoris.kohya", ["algo=lokr", "conv_dim=8", "conv_alpha=4"]),
])
def test_the_guides_network_categories_map_to_sd_scripts_keys(ws, tiny_model_dir, category, module, args):
    make_shapes_dataset(ws.train_data)
    ws.remember(model=str(tiny_model_dir), v2=False)
    plan = configure.configure(ws, network_category=category, resolution=64, dataset_repeats=3, num_epochs=2,
                               train_batch_size=2, seed=5, sample_prompts="a --w 64 --h 64")
    with ws.config_file.open("rb") as handle:
        written = {key: value for section in tomllib.load(handle).values() for key, value in section.items()}
    assert written["network_module"] == module and written.get("network_args", []) == args
    assert (written["network_dim"], written["network_alpha"], written["unet_lr"], written["text_encoder_lr"]) == (
        32, 16.0, 1e-4, 5e-5)
    assert (written["optimizer_type"], written["mixed_precision"], written["clip_skip"],
            written["max_token_length"]) == ("AdamW8bit", "fp16", 2, 225)
    assert written["output_dir"] == str(ws.output) and written["sample_every_n_epochs"] == 1
    assert (plan.images, plan.images_per_epoch, plan.steps_per_epoch, plan.total_steps) == (4, 8, 4, 8)


def test_notebook_offers_every_network_category_of_the_registry():
    import re

    source = (Path(__file__).parent.parent / "notebooks" / "src" / "05_configure.py").read_text()
    choices = re.search(r'^network_category = .*#@param (\[.*\])$', source, re.MULTILINE).group(1)
    assert json.loads(choices) == list(configure.network_categories())


def test_dora_and_network_args_from_the_form_reach_the_config(ws, tiny_model_dir):
    make_shapes_dataset(ws.train_data)
    ws.remember(model=str(tiny_model_dir), v2=False)
    configure.configure(ws, network_category="LoHa", dora_wd=True, network_args="rank_dropout=0.1 use_tucker=true",
                        resolution=64, sample_prompts="a --w 64 --h 64")
    with ws.config_file.open("rb") as handle:
        written = {key: value for section in tomllib.load(handle).values() for key, value in section.items()}
    assert written["network_args"] == ["algo=loha", "conv_dim=8", "conv_alpha=4", "dora_wd=True", "rank_dropout=0.1",
                                       "use_tucker=true"]
    with pytest.raises(NotebookError, match="dora_wd \\(DoRA\\) is not available for LoRA; choose LoCon_Lycoris"):
        configure.configure(ws, network_category="LoRA", dora_wd=True)
    with pytest.raises(NotebookError, match="network_args: conv_dim already come from the form"):
        configure.configure(ws, network_category="LoHa", network_args="conv_dim=4")


def test_configure_names_what_is_missing_or_wrong(ws, tiny_model_dir):
    with pytest.raises(NotebookError, match="no base model: run step 02"):
        configure.configure(ws)
    ws.remember(model=str(tiny_model_dir))
    make_shapes_dataset(ws.train_data)
    with pytest.raises(NotebookError, match="network_category must be one of LoRA, LoCon"):
        configure.configure(ws, network_category="LoRAX")
    with pytest.raises(NotebookError, match="model_version must be auto or one of"):
        configure.configure(ws, model_version="SD 3")
    with pytest.raises(NotebookError, match="is an SD 1.x model"):
        configure.configure(ws, model_version="SDXL")
    with pytest.raises(NotebookError, match="lr_scheduler must be one of"):
        configure.configure(ws, lr_scheduler="sometimes", resolution=64)


def test_save_copies_folders_when_not_zipping(ws, tmp_path):
    (ws.output / "a.safetensors").write_bytes(b"x" * 10)
    make_shapes_dataset(ws.train_data)
    table = save.save_to_drive(ws, str(tmp_path / "drive"), include_train_data=True, as_zip=False)
    assert (tmp_path / "drive" / "output" / "a.safetensors").read_bytes() == b"x" * 10
    assert (tmp_path / "drive" / "train_data" / "2_shapes" / "0.png").is_file()
    assert len(table.rows) == 4
    assert save.default_destination(ws) == ws.root.parent / "backups" / "steps"


def test_tables_and_errors_render_for_notebooks_and_terminals():
    table = Table([{"a": 1, "b": "<x>"}, {"a": 22}], title="t", notes=["n"])
    assert str(table).splitlines() == ["t", "a   b  ", "1   <x>", "22     ", "n"]
    assert "&lt;x&gt;" in table._repr_html_()
    assert NotebookError("bad value")._render_traceback_() == ["\033[31merror:\033[0m bad value"]


def test_workspace_remembers_choices_across_openings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = open_workspace("p", tmp_path, use_drive=False)
    first.remember(model="/m", v2=True)
    first.remember(vae="")
    again = open_workspace("p", str(tmp_path), use_drive=False)
    assert (again.recall("model"), again.recall("v2"), again.recall("vae"), again.recall("x", 3)) == ("/m", True, "", 3)
    assert open_workspace("p", "", use_drive=False).root == tmp_path / "workspace" / "p"
