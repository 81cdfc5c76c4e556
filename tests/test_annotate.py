"""WD14 tagging with a tiny ONNX tagger built here, BLIP captions with a tiny BLIP built here, and the tag tools.
Nothing is downloaded (HF_HUB_OFFLINE=1 and the hub download is made to fail)."""

import numpy as np
import pytest
from PIL import Image

from lycolab.annotate.tags import clean_caption, dedupe, edit_folder, remove_tags, tag_frequency, with_trigger_word
from lycolab.annotate.wd14 import WD14Tagger, tag_folder

TAGS = [("general", 9, 3.0), ("sensitive", 9, -3.0), ("questionable", 9, -3.0), ("explicit", 9, -3.0),
        ("red_theme", 0, None), ("blue_theme", 0, None), ("long_hair", 0, 0.2), ("sks", 0, 5.0),
        ("hatsune_miku", 4, 0.4), ("^_^", 0, 5.0)]


def build_tagger(folder, size=32, tags=TAGS, input_name="input_1:0", batch="batch", output_name=
                 "predictions_sigmoid", opsets=(("", 13),)):
    """Same input/output layout as SmilingWolf's models: NHWC float BGR 0-255 in, sigmoid per tag out.

    The defaults are a v2 tagger's names; :func:`build_v3_tagger` gives a v3-shaped one. ``batch`` is the input's
    batch dimension: a name (dynamic) or a number (a model exported for one batch size).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, len(tags)), np.float32)
    bias = np.array([b if b is not None else -2.0 for _, _, b in tags], np.float32)
    # channel means come in BGR order: red_theme follows red minus blue, blue_theme the reverse (white padding
    # adds to both equally)
    names = [name for name, _, _ in tags]
    red, blue = names.index("red_theme"), names.index("blue_theme")
    weights[2, red], weights[0, red] = 0.05, -0.05
    weights[0, blue], weights[2, blue] = 0.05, -0.05
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
         helper.make_node("Add", ["logits", "bias"], ["scores"]),
         helper.make_node("Sigmoid", ["scores"], [output_name])],
        "tiny_tagger",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, len(tags)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets],
                              ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{category},100" for i, (name, category, _) in
                                             enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


# v3's selected_tags.csv has the same columns and categories (9 rating, 0 general, 4 character); here the rows are
# in another order (a character before the general tags, ratings last) so selection must go by category, not place
V3_TAGS = [("hatsune_miku", 4, 0.4), ("red_theme", 0, None), ("blue_theme", 0, None), ("long_hair", 0, 0.2),
           ("sks", 0, 5.0), ("^_^", 0, 5.0), ("artist_name", 1, 5.0), ("general", 9, 3.0), ("sensitive", 9, -3.0),
           ("questionable", 9, -3.0), ("explicit", 9, -3.0)]


def build_v3_tagger(folder, size=48, batch="batch", opsets=(("", 13),)):
    """A v3-shaped tagger: input ``input`` at another size, output ``output``; v3's real files also carry the
    ``ai.onnx.ml`` opset 4 stamp, which :func:`test_a_v3_opset_stamp_loads` adds."""
    return build_tagger(folder, size, V3_TAGS, "input", batch, "output", opsets)


@pytest.fixture
def tagger_dir(tmp_path, monkeypatch):
    import huggingface_hub

    def no_downloads(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_downloads)
    return build_tagger(tmp_path / "tagger")


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in (("red1", (255, 0, 0)), ("red2", (250, 10, 10)), ("blue", (0, 0, 255))):
        Image.new("RGB", (40, 24), color).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"")
    return folder


def _caption(folder, name, extension=".txt"):
    return (folder / f"{name}{extension}").read_text(encoding="utf-8").strip()


def test_wd14_writes_thresholded_tags_without_undesired_ones_and_with_the_trigger_first(tagger_dir, tmp_path):
    folder = _images(tmp_path / "images")
    result = tag_folder(folder, tagger_dir, undesired_tags=["long*"], trigger_word="sks", progress=False)
    assert len(result.written) == 3 and len(result.bad_files) == 1 and "broken.png" in result.bad_files[0]
    red = _caption(folder, "red1").split(", ")
    assert red[0] == "sks" and red.count("sks") == 1
    assert "red theme" in red and "blue theme" not in red and "long hair" not in red
    assert "hatsune miku" not in red  # 0.6 < character threshold 0.85
    assert "^_^" in red  # short kaomoji keep their underscores
    blue = _caption(folder, "blue").split(", ")
    assert "blue theme" in blue and "red theme" not in blue
    counts = tag_frequency(folder)
    assert counts["red theme"] == 2 and counts["blue theme"] == 1 and counts["sks"] == 3


def test_wd14_character_threshold_rating_and_existing_captions(tagger_dir, tmp_path):
    folder = _images(tmp_path / "images")
    (folder / "red1.txt").write_text("my own words", encoding="utf-8")
    tag_folder(folder, tagger_dir, progress=False)
    assert _caption(folder, "red1") == "my own words"  # kept by default
    tag_folder(folder, tagger_dir, mode="append", progress=False)
    assert _caption(folder, "red1").startswith("my own words, ")
    tagger = WD14Tagger(tagger_dir)
    result = tag_folder(folder, tagger, character_threshold=0.5, include_rating=True, underscores_to_spaces=False,
                        mode="overwrite", progress=False)
    assert [path.name for path in result.kept_edited] == ["red1.txt"]  # hand-made, so overwrite keeps it
    assert _caption(folder, "red1").startswith("my own words, ")
    tags = _caption(folder, "red2").split(", ")  # lycolab's own caption: re-tagged with the new settings
    assert tags[:2] == ["general", "hatsune_miku"] and "long_hair" in tags
    tag_folder(folder, tagger, character_threshold=0.5, include_rating=True, underscores_to_spaces=False,
               mode="overwrite_all", progress=False)
    tags = _caption(folder, "red1").split(", ")
    assert tags[:2] == ["general", "hatsune_miku"] and "long_hair" in tags and "my own words" not in tags


def test_wd14_preparation_matches_the_models_expectations(tagger_dir):
    tagger = WD14Tagger(tagger_dir)
    prepared = tagger.prepare(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert prepared.shape == (32, 32, 3) and prepared.dtype == np.float32
    assert tuple(prepared[16, 16]) == (0.0, 0.0, 255.0)  # BGR
    assert tuple(prepared[0, 16]) == (255.0, 255.0, 255.0)  # padded with white above and below


def test_tag_command_line(tagger_dir, tmp_path, capsys):
    from lycolab.cli import main

    folder = _images(tmp_path / "images")
    assert main(["tag", str(folder), "--model-dir", str(tagger_dir), "--undesired-tags", "red theme, ^_^",
                 "--trigger-word", "mychar"]) == 0
    assert "tagged 3 image(s)" in capsys.readouterr().out
    tags = _caption(folder, "red2").split(", ")
    assert tags[0] == "mychar" and "red theme" not in tags and "^_^" not in tags


def test_tag_tools():
    assert dedupe(["long_hair", "long hair", "smile"]) == ["long_hair", "smile"]
    assert remove_tags(["red hair", "blue_hair", "red eyes", "1girl"], ["*hair", "1girl"]) == ["red eyes"]
    assert with_trigger_word(["a", "sks", "b"], "sks") == ["sks", "a", "b"]
    assert clean_caption("a, b, a, bad_tag", ["bad tag"], "t") == "t, a, b"


def test_bulk_edit_replaces_removes_and_adds(tmp_path):
    for index, caption in enumerate(["1girl, long_hair, smile", "1girl, short hair"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(caption, encoding="utf-8")
    changed = edit_folder(tmp_path, remove=["smile"], replace={"long hair": "very long hair"}, add=["solo"],
                          trigger_word="sks")
    assert changed == 2
    assert _caption(tmp_path, "0") == "sks, 1girl, very long hair, solo"
    assert _caption(tmp_path, "1") == "sks, 1girl, short hair, solo"
    assert edit_folder(tmp_path, trigger_word="sks") == 0  # already so: nothing rewritten


def build_blip(folder):
    import torch
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "circle", "photo", "of"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = transformers.BlipConfig(
        text_config={"vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 37, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": 5, "sep_token_id": 3, "pad_token_id": 0, "eos_token_id": 3},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 37},
    )
    torch.manual_seed(0)
    transformers.BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    transformers.BlipProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


def test_blip_captions_with_prefix_length_limits_and_kept_captions(tmp_path):
    from lycolab.annotate.blip import caption_folder

    model = build_blip(tmp_path / "blip")
    folder = _images(tmp_path / "images")
    (folder / "blue.caption").write_text("mine", encoding="utf-8")
    result = caption_folder(folder, model, batch_size=2, num_beams=2, min_length=3, max_length=8, prefix="sks,",
                            progress=False)
    assert len(result.written) == 2 and [p.name for p in result.kept_existing] == ["blue.caption"]
    assert len(result.bad_files) == 1
    for path in result.written:
        text = path.read_text(encoding="utf-8").strip()
        assert text.startswith("sks, ") and 1 <= len(text.split()) - 1 <= 8
    assert _caption(folder, "blue", ".caption") == "mine"
    sampled = caption_folder(folder, model, top_p=0.9, overwrite=True, prefix="x", progress=False)
    assert len(sampled.written) == 2 and [p.name for p in sampled.kept_edited] == ["blue.caption"]
    assert _caption(folder, "blue", ".caption") == "mine"  # overwrite keeps what lycolab did not write
    every = caption_folder(folder, model, mode="overwrite_all", prefix="x", progress=False)
    assert len(every.written) == 3 and _caption(folder, "blue", ".caption").startswith("x ")


# --- v3 taggers, named choices, loading -------------------------------------------------------------------------


def test_a_v3_shaped_tagger_takes_its_size_from_the_model_and_picks_tags_by_category(tagger_dir, tmp_path):
    v3 = WD14Tagger(build_v3_tagger(tmp_path / "v3", size=48))
    assert (v3.size, v3.input_name, v3.output_name, v3.fixed_batch) == (48, "input", "output", None)
    prepared = v3.prepare(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert prepared.shape == (48, 48, 3) and tuple(prepared[24, 24]) == (0.0, 0.0, 255.0)  # BGR
    assert tuple(prepared[0, 24]) == (255.0, 255.0, 255.0)  # white padding
    v2_folder, v3_folder = _images(tmp_path / "v2_images"), _images(tmp_path / "v3_images")
    options = {"character_threshold": 0.5, "include_rating": True, "progress": False}
    tag_folder(v2_folder, tagger_dir, **options)
    tag_folder(v3_folder, v3, **options)
    for name in ("red1", "red2", "blue"):  # the same weights in both layouts give the same captions
        assert _caption(v3_folder, name) == _caption(v2_folder, name)
    red = _caption(v3_folder, "red1").split(", ")
    assert red[:2] == ["general", "hatsune miku"] and "red theme" in red and "artist name" not in red


@pytest.mark.skipif(tuple(int(part) for part in __import__("onnxruntime").__version__.split(".")[:2]) < (1, 17),
                    reason="v3 taggers carry the ai.onnx.ml opset 4 stamp, which onnxruntime reads from 1.17")
def test_a_v3_opset_stamp_loads(tagger_dir, tmp_path):
    folder = build_v3_tagger(tmp_path / "v3", opsets=(("", 13), ("ai.onnx.ml", 4)))
    images = _images(tmp_path / "images")
    assert len(tag_folder(images, folder, progress=False).written) == 3


def test_a_model_onnxruntime_cannot_load_is_one_line_naming_the_fix(tagger_dir, tmp_path):
    folder = build_v3_tagger(tmp_path / "future", opsets=(("", 999),))
    with pytest.raises(ValueError, match="onnxruntime cannot load it") as caught:
        WD14Tagger(folder)
    assert "\n" not in str(caught.value) and "onnxruntime 1.17" in str(caught.value)


def test_a_tagger_exported_for_a_fixed_batch_size_gets_full_batches(tagger_dir, tmp_path):
    images = [Image.new("RGB", (40, 24), color) for color in ((255, 0, 0), (0, 0, 255), (9, 9, 9))]
    dynamic = WD14Tagger(tagger_dir).probabilities(images)
    for batch in (1, 2):
        fixed = WD14Tagger(build_tagger(tmp_path / f"batch{batch}", batch=batch))
        assert fixed.fixed_batch == batch
        np.testing.assert_allclose(fixed.probabilities(images), dynamic, rtol=1e-6)


def test_a_model_that_does_not_take_nhwc_images_is_refused(tagger_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "nchw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    folder = build_tagger(tmp_path / "nchw")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8),
              str(folder / "model.onnx"))
    with pytest.raises(ValueError, match=r"not images as \(batch, height, width, 3\)"):
        WD14Tagger(folder)


def test_short_names_choose_the_v2_and_v3_taggers(tagger_dir):
    from lycolab.annotate.wd14 import DEFAULT_REPO, TAGGERS, tagger_source

    v3 = {"SmilingWolf/wd-vit-tagger-v3", "SmilingWolf/wd-swinv2-tagger-v3", "SmilingWolf/wd-convnext-tagger-v3",
          "SmilingWolf/wd-vit-large-tagger-v3", "SmilingWolf/wd-eva02-large-tagger-v3"}
    v2 = {"SmilingWolf/wd-v1-4-convnextv2-tagger-v2", "SmilingWolf/wd-v1-4-swinv2-tagger-v2",
          "SmilingWolf/wd-v1-4-vit-tagger-v2", "SmilingWolf/wd-v1-4-moat-tagger-v2"}
    assert v3 | v2 <= set(TAGGERS.values()) and DEFAULT_REPO in v2
    assert tagger_source("wd-v3-swinv2") == tagger_source(" WD-V3-SwinV2 ") == "SmilingWolf/wd-swinv2-tagger-v3"
    assert tagger_source("someone/tagger") == "someone/tagger" and tagger_source(tagger_dir) == tagger_dir
    with pytest.raises(ValueError, match="SmilingWolf/wd-eva02-large-tagger-v3: cannot get the tagger"):
        WD14Tagger("wd-v3-eva02-large")  # offline here: one line, naming the repo the name stands for


# --- step 04: thresholds, re-runs, edits kept, append, the manifest ----------------------------------------------


@pytest.fixture
def ws(tmp_path):
    from lycolab.colab import open_workspace

    return open_workspace("annotate", tmp_path / "projects", use_drive=False)


def _tags(folder, name, extension=".txt"):
    return _caption(folder, name, extension).split(", ")


def test_the_character_threshold_is_its_own_in_step_04(ws, tagger_dir):
    from lycolab.steps.annotate import annotate

    folder = _images(ws.train_data / "10_chars")
    annotate(ws, "wd14", str(tagger_dir), threshold=0.05, character_threshold=0.85)
    assert "hatsune miku" not in _tags(folder, "red1") and "long hair" in _tags(folder, "red1")  # 0.6 / 0.55
    annotate(ws, "wd14", str(tagger_dir), threshold=0.95, character_threshold=0.5, mode="overwrite")
    red = _tags(folder, "red1")
    assert red[0] == "hatsune miku" and "long hair" not in red  # characters first; general tags by their own


def test_rerunning_step_04_cleans_every_caption_and_replaces_the_old_trigger_word(ws, tagger_dir):
    from lycolab.steps.annotate import annotate

    folder = _images(ws.train_data / "10_chars")
    annotate(ws, "wd14", str(tagger_dir), trigger_word="oldchar")
    assert all(_tags(folder, name)[0] == "oldchar" for name in ("red1", "red2", "blue"))
    (folder / "blue.txt").write_text("oldchar, blue theme, my own tag, ^_^\n", encoding="utf-8")  # a hand edit
    summary = annotate(ws, "wd14", str(tagger_dir), undesired_tags="red theme, ^_^", trigger_word="newchar")
    assert summary.written == 0 and summary.kept == 3 and summary.edited == 3
    for name in ("red1", "red2", "blue"):
        tags = _tags(folder, name)
        assert tags[0] == "newchar" and "oldchar" not in tags and "red theme" not in tags and "^_^" not in tags
    assert _tags(folder, "blue") == ["newchar", "blue theme", "my own tag"]
    # the clean-up kept lycolab's captions lycolab's: overwrite re-tags those and keeps the hand edit
    summary = annotate(ws, "wd14", str(tagger_dir), undesired_tags="red theme", trigger_word="newchar",
                       mode="overwrite")
    assert (summary.written, summary.edited_kept) == (2, 1) and "my own tag" in _tags(folder, "blue")
    annotate(ws, "none", trigger_word="third")  # whatever the method
    assert all(_tags(folder, name)[0] == "third" and "newchar" not in _tags(folder, name)
               for name in ("red1", "red2", "blue"))
    before = {name: _caption(folder, name) for name in ("red1", "red2", "blue")}
    annotate(ws, "none")  # no trigger word given: captions and the remembered one stay
    assert {name: _caption(folder, name) for name in before} == before and ws.recall("trigger_word") == "third"


def test_overwrite_keeps_editor_and_hand_edits_and_says_how_many(ws, tagger_dir):
    from lycolab.steps.annotate import CaptionEditor, annotate, caption_manifest

    folder = _images(ws.train_data)
    (folder / "blue.txt").write_text("made by hand before lycolab", encoding="utf-8")
    first = annotate(ws, "wd14", str(tagger_dir))
    assert (first.written, first.kept) == (2, 1)
    editor = CaptionEditor([(folder / "red1.png", folder / "red1.txt")], caption_manifest(ws))
    editor.caption.value = "sks, my edit"
    editor.write()
    again = annotate(ws, "wd14", str(tagger_dir), mode="overwrite")
    assert (again.written, again.edited_kept) == (1, 2)
    assert "2 edited caption(s) kept" in str(again) and "overwrite_all" in again._repr_html_()
    assert _caption(folder, "red1") == "sks, my edit" and _caption(folder, "blue") == "made by hand before lycolab"
    every = annotate(ws, "wd14", str(tagger_dir), mode="overwrite_all")
    assert every.written == 3 and "red theme" in _tags(folder, "red1") and "blue theme" in _tags(folder, "blue")
    assert annotate(ws, "wd14", str(tagger_dir), mode="overwrite").edited_kept == 0  # all lycolab's again


def test_append_adds_only_the_tags_a_caption_lacks(tagger_dir, tmp_path):
    folder = _images(tmp_path / "images")
    (folder / "red1.txt").write_text("Long_Hair, Red Theme, mine, mine", encoding="utf-8")
    tag_folder(folder, tagger_dir, mode="append", trigger_word="sks", progress=False)
    tags = _tags(folder, "red1")
    assert tags[:4] == ["sks", "Long_Hair", "Red Theme", "mine"] and "^_^" in tags
    assert len({tag.replace("_", " ").lower() for tag in tags}) == len(tags)
    once = {name: _caption(folder, name) for name in ("red1", "red2", "blue")}
    tag_folder(folder, tagger_dir, mode="append", trigger_word="sks", progress=False)
    assert {name: _caption(folder, name) for name in once} == once  # appending again adds nothing
    result = tag_folder(folder, tagger_dir, mode="overwrite", progress=False)
    assert [path.name for path in result.kept_edited] == ["red1.txt"]  # appended to the user's: still the user's


def test_the_manifest_records_lycolabs_captions_and_is_not_training_data(ws, tagger_dir):
    import json

    from lycolab.annotate.manifest import MANIFEST_NAME, CaptionManifest
    from lycolab.data.report import check_dataset, folder_datasets
    from lycolab.steps.annotate import annotate

    folder = _images(ws.train_data / "10_chars")
    annotate(ws, "wd14", str(tagger_dir))
    manifest_file = ws.train_data / MANIFEST_NAME
    recorded = json.loads(manifest_file.read_text(encoding="utf-8"))["captions"]
    assert sorted(recorded) == ["10_chars/blue.txt", "10_chars/red1.txt", "10_chars/red2.txt"]
    report = check_dataset(folder_datasets(ws.train_data))
    assert report.usable_images == 3 and report.unused_files == [] and not report.missing_captions
    assert not list(ws.train_data.rglob("*.tmp"))
    (folder / "red1.txt").write_text(_caption(folder, "red1") + "  \n\n", encoding="utf-8")
    assert CaptionManifest(ws.train_data).written_by_lycolab(folder / "red1.txt")  # whitespace is no edit
    manifest_file.write_text("{not json", encoding="utf-8")  # damaged: every caption counts as the user's
    assert annotate(ws, "wd14", str(tagger_dir), mode="overwrite").edited_kept == 3


# --- BLIP settings reach generation ------------------------------------------------------------------------------


def test_blip_beams_and_lengths_from_step_04_reach_generate(ws, tmp_path, monkeypatch):
    import transformers

    from lycolab.display import NotebookError
    from lycolab.steps.annotate import annotate

    model = build_blip(tmp_path / "blip")
    calls = []
    generate = transformers.BlipForConditionalGeneration.generate

    def recording_generate(self, *args, **kwargs):
        output = generate(self, *args, **kwargs)
        calls.append(({key: kwargs.get(key) for key in ("num_beams", "min_length", "max_length")}, output.shape[1]))
        return output

    monkeypatch.setattr(transformers.BlipForConditionalGeneration, "generate", recording_generate)
    folder = _images(ws.train_data)
    summary = annotate(ws, "blip", str(model), caption_extension=".caption", trigger_word="sks", batch_size=2,
                       blip_num_beams=3, blip_min_length=2, blip_max_length=6)
    assert summary.written == 3 and calls
    assert all(options == {"num_beams": 3, "min_length": 2, "max_length": 6} and length <= 6
               for options, length in calls)
    assert all(_caption(folder, name, ".caption").startswith("sks, ") for name in ("red1", "red2", "blue"))
    calls.clear()
    assert annotate(ws, "blip", str(model), caption_extension=".caption").kept == 3 and not calls  # nothing to do
    with pytest.raises(NotebookError, match="append works with WD14 tags"):
        annotate(ws, "blip", str(model), mode="append")
    with pytest.raises(NotebookError, match="min_length .* is longer than max_length"):
        annotate(ws, "blip", str(model), mode="overwrite_all", blip_min_length=9, blip_max_length=4)
