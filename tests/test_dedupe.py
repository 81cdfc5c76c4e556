"""Near-duplicates moved aside with their captions, the best copy kept, nothing overwritten or deleted."""

from __future__ import annotations

import pytest
from PIL import Image

from lycolab.colab import open_workspace
from lycolab.data.dedupe import move_duplicates
from lycolab.data.report import find_near_duplicates
from lycolab.demo import draw_shape_image


@pytest.fixture
def ws(tmp_path):
    return open_workspace("dedupe", tmp_path / "projects", use_drive=False)


def _save(path, size=(64, 64), shape=("circle", "red", "blue"), caption=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape_image(size, *shape).save(path, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _relative(paths, root):
    return sorted(path.relative_to(root).as_posix() for path in paths)


def test_the_largest_copy_stays_and_the_others_move_with_their_captions(ws):
    train, duplicates = ws.train_data, ws.root / "duplicates"
    _save(train / "10_char" / "big.png", (128, 128), caption="big")
    _save(train / "10_char" / "small.png", (64, 64), caption="small")
    _save(train / "other" / "copy.jpg", (96, 96), caption="copy", quality=80)
    (train / "other" / "copy.npz").write_bytes(b"latents")
    _save(train / "10_char" / "square.png", shape=("square", "yellow", "black"), caption="distinct")
    moved = move_duplicates(train, duplicates)
    assert _relative(moved, duplicates) == ["10_char/small.png", "other/copy.jpg"]
    assert (duplicates / "10_char" / "small.txt").read_text(encoding="utf-8") == "small"
    assert (duplicates / "other" / "copy.txt").is_file() and (duplicates / "other" / "copy.npz").is_file()
    left = [path for path in train.rglob("*") if path.is_file()]
    assert _relative(left, train) == ["10_char/big.png", "10_char/big.txt", "10_char/square.png",
                                      "10_char/square.txt"]
    assert move_duplicates(train, duplicates) == []  # nothing left to move


def test_a_taken_name_in_the_destination_is_never_overwritten(ws):
    train, duplicates = ws.train_data, ws.root / "duplicates"
    _save(train / "a.png", (128, 128))
    _save(train / "b.png", (64, 64), caption="b's caption")
    (duplicates).mkdir()
    (duplicates / "b.png").write_bytes(b"an earlier duplicate")
    (duplicates / "b (1).txt").write_text("also earlier", encoding="utf-8")
    moved = move_duplicates(train, duplicates)
    assert [path.name for path in moved] == ["b (2).png"]
    assert (duplicates / "b (2).txt").read_text(encoding="utf-8") == "b's caption"
    assert (duplicates / "b.png").read_bytes() == b"an earlier duplicate"
    assert (duplicates / "b (1).txt").read_text(encoding="utf-8") == "also earlier"


def test_ties_keep_the_larger_file_then_the_first_path(ws):
    train, duplicates = ws.train_data, ws.root / "duplicates"
    _save(train / "b.png", (64, 64))
    _save(train / "a.png", (64, 64))
    _save(train / "c.bmp", (64, 64))  # same pixels, a larger (uncompressed) file
    assert [path.name for path in move_duplicates(train, duplicates)] == ["a.png", "b.png"]
    _save(train / "d.png", (64, 64))
    _save(train / "e.png", (64, 64))
    (train / "c.bmp").rename(duplicates / "c.bmp")  # d and e: identical files, so the first path stays
    assert [path.name for path in move_duplicates(train, duplicates)] == ["e.png"]


def test_a_caption_another_image_still_reads_is_copied_not_moved(ws):
    train, duplicates = ws.train_data, ws.root / "duplicates"
    _save(train / "a.png", (128, 128), caption="shared")
    _save(train / "a.jpg", (64, 64), quality=95)
    moved = move_duplicates(train, duplicates)
    assert [path.name for path in moved] == ["a.jpg"]
    assert (train / "a.txt").read_text(encoding="utf-8") == "shared"
    assert (duplicates / "a.txt").read_text(encoding="utf-8") == "shared"


def test_the_destination_must_be_outside_the_folder_and_the_distance_is_honoured(ws):
    train = ws.train_data
    _save(train / "a.png", (128, 128))
    _save(train / "b.png", (64, 64))
    with pytest.raises(ValueError, match="would still be trained on"):
        move_duplicates(train, train / "duplicates")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(train / "black.png")  # far from the circle's hash
    assert find_near_duplicates([train / "a.png", train / "black.png"]) == []
    assert [path.name for path in move_duplicates(train, ws.root / "duplicates", distance=0)] == ["b.png"]
    assert [path.name for path in move_duplicates(train, ws.root / "duplicates", distance=64)] == ["black.png"]
    assert sorted(path.name for path in train.iterdir()) == ["a.png"]
