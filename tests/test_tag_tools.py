"""The tag tools: their invariants for any tags (property-based), and step 04's ``edit_tags`` on real caption files
in a workspace — every caption at once, atomic writes, searches, and edits that a later overwrite keeps."""

from __future__ import annotations

import errno
import fnmatch
import pathlib

import pytest
from conftest import make_shapes_dataset
from hypothesis import given
from hypothesis import strategies as st
from test_annotate import _images, build_tagger

from lycolab.annotate.tags import (
    clean_caption,
    edit_tag_list,
    has_tags,
    join_tags,
    normalise,
    parse_replacements,
    split_tags,
)
from lycolab.colab import open_workspace
from lycolab.display import Gallery, NotebookError
from lycolab.steps.annotate import annotate, edit_tags

# Tags close enough to collide: case, underscores and inner spaces all vary, so "Long_hair" and "long  hair" meet.
tag_text = st.text(alphabet="abAB _^", min_size=1, max_size=5).filter(lambda text: normalise(text) != "")
tag_lists = st.lists(tag_text, max_size=8)
patterns = st.lists(st.one_of(tag_text, tag_text.map(lambda text: text + "*")), max_size=3)
trigger_words = st.one_of(st.just(""), tag_text, st.lists(tag_text, min_size=2, max_size=2).map(join_tags))


def _keys(tags: list[str]) -> list[str]:
    return [normalise(tag) for tag in tags]


def _trigger_keys(trigger_word: str) -> list[str]:
    return list(dict.fromkeys(_keys(split_tags(trigger_word))))


@given(tags=tag_lists, add=tag_lists, remove=patterns, trigger_word=trigger_words, old=trigger_words)
def test_an_edit_never_leaves_a_tag_twice_puts_the_trigger_first_and_removes_what_it_should(tags, add, remove,
                                                                                             trigger_word, old):
    result = edit_tag_list(split_tags(join_tags(tags)), add, remove, None, trigger_word, [old])
    keys, trigger = _keys(result), _trigger_keys(trigger_word)
    assert len(keys) == len(set(keys))
    assert keys[: len(trigger)] == trigger
    others = keys[len(trigger):]
    removed = [normalise(pattern) for pattern in remove]
    assert not any(fnmatch.fnmatchcase(key, pattern) for key in others for pattern in removed)
    if trigger:  # an old trigger word is replaced, not kept beside the new one
        assert not set(_trigger_keys(old)) - set(trigger) & set(others)
    assert split_tags(join_tags(result)) == result  # what is written reads back as the same tags


@given(tags=tag_lists, add=tag_lists, remove=patterns, trigger_word=trigger_words, old=trigger_words)
def test_an_edit_applied_twice_changes_nothing_more(tags, add, remove, trigger_word, old):
    once = edit_tag_list(tags, add, remove, None, trigger_word, [old])
    assert edit_tag_list(once, add, remove, None, trigger_word, [old]) == once


@given(tags=tag_lists, remove=patterns, trigger_word=trigger_words)
def test_the_other_tags_keep_their_order(tags, remove, trigger_word):
    result = _keys(edit_tag_list(tags, remove=remove, trigger_word=trigger_word))
    others = [key for key in result if key not in _trigger_keys(trigger_word)]
    first_seen = list(dict.fromkeys(_keys(tags)))
    assert others == [key for key in first_seen if key in others]


@given(tags=tag_lists, old=tag_text, new=tag_text)
def test_replace_puts_the_new_tag_where_the_old_one_was_and_never_duplicates(tags, old, new):
    result = edit_tag_list(tags, replace={old: new})
    keys = _keys(result)
    assert len(keys) == len(set(keys))
    if normalise(old) != normalise(new):
        assert normalise(old) not in keys
    if normalise(old) in _keys(tags):
        assert normalise(new) in keys


@given(tags=tag_lists, undesired=patterns, trigger_word=trigger_words)
def test_clean_caption_is_idempotent(tags, undesired, trigger_word):
    once = clean_caption(join_tags(tags), undesired, trigger_word)
    assert clean_caption(once, undesired, trigger_word) == once


def test_tag_tool_examples():
    assert edit_tag_list(["a", "sks", "b"], trigger_word="sks, 1girl") == ["sks", "1girl", "a", "b"]
    assert edit_tag_list(["old", "a"], trigger_word="new", old_trigger_words=["old"]) == ["new", "a"]
    assert edit_tag_list(["old", "a"], old_trigger_words=["old"]) == ["old", "a"]  # no new one: the old stays
    assert edit_tag_list(["a", "b", "c"], replace={"b": "x, y", "c": ""}) == ["a", "x", "y"]
    assert edit_tag_list(["long_hair", "smile"], add=["Long Hair", "solo"]) == ["long_hair", "smile", "solo"]
    assert parse_replacements("long hair=>very long hair, smile=>") == {"long hair": "very long hair", "smile": ""}
    with pytest.raises(ValueError, match="has no '=>'"):
        parse_replacements("long hair->short hair")
    assert has_tags("1girl, long_hair, red eyes", ["Long Hair", "red*"]) and not has_tags("1girl", ["solo"])


# --- edit_tags on a workspace --------------------------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path):
    workspace = open_workspace("tags", tmp_path / "projects", use_drive=False)
    make_shapes_dataset(workspace.train_data)  # 2_shapes/0..3.txt: "sks, <color> <shape>, <background> background"
    return workspace


def _caption(ws, index: int) -> str:
    return (ws.train_data / "2_shapes" / f"{index}.txt").read_text(encoding="utf-8").strip()


def test_edit_tags_changes_every_caption_at_once_and_keeps_the_rest_in_order(ws):
    result = edit_tags(ws, add="solo, sks", remove="*background", replace="red circle=>crimson circle",
                       trigger_word="mychar")
    assert result.captions == 4 and len(result.changed) == 4
    assert _caption(ws, 0) == "mychar, sks, crimson circle, solo"
    assert _caption(ws, 1) == "mychar, sks, yellow square, solo"
    assert ws.recall("trigger_word") == "mychar"
    assert edit_tags(ws, add="solo", trigger_word="mychar").changed == []  # already so: nothing rewritten
    edit_tags(ws, trigger_word="ohwx")  # the remembered trigger word is replaced, not kept beside the new one
    assert _caption(ws, 0) == "ohwx, sks, crimson circle, solo"
    assert not list(ws.train_data.rglob("*.tmp"))


def test_edit_tags_search_lists_the_images_with_a_tag(ws):
    result = edit_tags(ws, search="*circle")
    assert result.changed == [] and [image.name for image, _ in result.matches] == ["0.png", "3.png"]
    assert isinstance(result.gallery(), Gallery) and "images found" in str(result)
    assert "data:image/jpeg;base64" in result._repr_html_()
    assert [caption for _, caption in edit_tags(ws, search="*circle, purple*").matches] == [
        "sks, purple circle, orange background"]  # every tag searched for
    assert edit_tags(ws, search="no such tag").matches == []


def test_a_bad_replace_entry_is_one_line_and_changes_nothing(ws):
    before = [_caption(ws, index) for index in range(4)]
    with pytest.raises(NotebookError, match="write old=>new"):
        edit_tags(ws, remove="sks", replace="red circle")
    assert [_caption(ws, index) for index in range(4)] == before


def test_a_failed_write_keeps_the_previous_caption(ws, monkeypatch):
    write_text = pathlib.Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    with pytest.raises(NotebookError, match="disk is full"):
        edit_tags(ws, add="solo")
    assert _caption(ws, 0) == "sks, red circle, blue background" and not list(ws.train_data.rglob("*.tmp"))


def test_tag_tool_edits_count_as_the_users_so_overwrite_keeps_them(ws, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("nothing may download"))
    tagger = str(build_tagger(tmp_path / "tagger"))
    folder = _images(ws.train_data / "10_chars")
    annotate(ws, "wd14", tagger)
    changed = edit_tags(ws, replace="red theme=>scarlet theme").changed
    assert sorted(path.name for path in changed) == ["red1.txt", "red2.txt"]
    summary = annotate(ws, "wd14", tagger, mode="overwrite")
    assert summary.written == 1 and summary.edited_kept == 2 + 4  # the two edits and the four hand-made captions
    assert "scarlet theme" in (folder / "red1.txt").read_text(encoding="utf-8")
