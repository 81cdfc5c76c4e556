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


def build_tagger(folder, size=32):
    """Same input/output layout as SmilingWolf's models: NHWC float BGR 0-255 in, sigmoid per tag out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, len(TAGS)), np.float32)
    bias = np.array([b if b is not None else -2.0 for _, _, b in TAGS], np.float32)
    # channel means come in BGR order: red_theme follows red minus blue, blue_theme the reverse (white padding
    # adds to both equally)
    weights[2, 4], weights[0, 4] = 0.05, -0.05
    weights[0, 5], weights[2, 5] = 0.05, -0.05
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1:0"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
         helper.make_node("Add", ["logits", "bias"], ["scores"]),
         helper.make_node("Sigmoid", ["scores"], ["predictions_sigmoid"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"] + [f"{i},{name},{category},100" for i, (name, category, _) in
                                             enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


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
    tag_folder(folder, tagger, character_threshold=0.5, include_rating=True, underscores_to_spaces=False,
               mode="overwrite", progress=False)
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
    assert len(sampled.written) == 3
