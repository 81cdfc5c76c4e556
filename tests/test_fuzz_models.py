"""Damaged model files: a single-file checkpoint cut at any byte, a diffusers folder with any of its files cut,
garbled or missing, pickles given as a model.

The invariant (issue 13): ``load_stable_diffusion`` (training, generate and merge all load through it) either loads
the model or raises a ModelLoadError of one line naming the file (or folder) and the fix; pickles are never
unpickled beyond torch's ``weights_only`` loader, so code in them never runs.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lycolab.models.load import ModelLoadError, load_single_file, load_stable_diffusion

# Every file a diffusers SD folder holds that lycolab reads (the scheduler's config is not: training uses its own).
FOLDER_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json",
                "tokenizer/tokenizer_config.json")
OPTIONAL_FILES = ("model_index.json", "tokenizer/tokenizer_config.json")


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny SD exported once as an A1111-layout ``.safetensors``."""
    from lycolab.models.export import export_single_file

    parts = load_stable_diffusion(tiny_model_dir)
    folder = tmp_path_factory.mktemp("single")
    return export_single_file(parts.unet, parts.vae, parts.text_encoder, folder / "tiny.safetensors", dtype=None)


@pytest.fixture(scope="module")
def folder_copy(tiny_model_dir, tmp_path_factory) -> Path:
    """A copy of the tiny diffusers folder that tests damage one file of and then put back."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("folder") / "tiny-sd"))


def _assert_one_line_naming(error: ModelLoadError, path: Path, fix: str) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 800, message
    assert str(path) in message and fix in message, message


@given(cut=st.data())
def test_a_single_file_checkpoint_cut_at_any_byte_is_refused_naming_it(single_file, tmp_path_factory, cut):
    data = single_file.read_bytes()
    offset = cut.draw(st.one_of(st.integers(0, 64), st.integers(0, len(data) - 1)), label="offset")
    path = tmp_path_factory.mktemp("cut") / "cut.safetensors"
    path.write_bytes(data[:offset])
    with pytest.raises(ModelLoadError) as error:
        load_stable_diffusion(path)
    _assert_one_line_naming(error.value, path, "damaged or incomplete")
    assert "download it again" in str(error.value)


@given(data=st.data())
@settings(max_examples=10)  # a garbled header that still parses makes diffusers build the whole model (seconds)
def test_a_single_file_checkpoint_with_garbled_header_bytes_loads_or_is_refused_naming_it(single_file, tiny_model_dir,
                                                                                         tmp_path_factory, data):
    original = single_file.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    position = data.draw(st.integers(0, header_end - 1), label="position")
    patch = data.draw(st.binary(min_size=1, max_size=4), label="patch")
    path = tmp_path_factory.mktemp("garbled") / "garbled.safetensors"
    path.write_bytes(original[:position] + patch + original[position + len(patch):])
    try:
        load_stable_diffusion(path, config=tiny_model_dir)
    except ModelLoadError as error:
        _assert_one_line_naming(error, path, "")


@given(file=st.sampled_from(FOLDER_FILES), damage=st.sampled_from(["cut", "garble", "delete", "empty"]),
       data=st.data())
def test_a_diffusers_folder_with_any_file_damaged_loads_or_is_refused_naming_it(folder_copy, file, damage, data):
    target = folder_copy / file
    original = target.read_bytes()
    damaged = {"delete": None, "empty": b"",
               "cut": lambda: original[:data.draw(st.integers(0, len(original) - 1), label="offset")],
               "garble": lambda: data.draw(st.binary(max_size=64), label="bytes") + original[64:]}[damage]
    damaged = damaged() if callable(damaged) else damaged
    try:
        if damaged is None:
            target.unlink()
        else:
            target.write_bytes(damaged)
        try:
            parts = load_stable_diffusion(folder_copy)
        except ModelLoadError as error:
            message = str(error)
            assert "\n" not in message and len(message) < 800 and str(folder_copy) in message, message
            assert "download" in message, message
            if damaged is not None:  # a file that is there but damaged is named itself
                assert str(target) in message, message
        else:  # only what the loaders do without may be missing, only trailing whitespace may be cut
            assert len(parts.tokenizer) > 2
            assert (file in OPTIONAL_FILES if damaged is None else damaged.strip() == original.strip()), file
    finally:
        target.write_bytes(original)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth"])
@given(data=st.binary(max_size=200))
def test_any_bytes_given_as_a_pickle_checkpoint_are_refused_without_running_code(tmp_path_factory, suffix, data):
    folder = tmp_path_factory.mktemp("pickle")
    path = folder / f"model{suffix}"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as error:
        load_single_file(path)
    _assert_one_line_naming(error.value, path, "")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PAYLOAD_RAN",))


@given(cut=st.integers(0, 200))
def test_a_code_carrying_pickle_cut_anywhere_never_runs(tmp_path_factory, monkeypatch, cut):
    folder = tmp_path_factory.mktemp("evil")
    monkeypatch.chdir(folder)
    path = folder / "evil.ckpt"
    blob = pickle.dumps({"state_dict": {"model.diffusion_model.x": _Payload()}}, protocol=2)
    path.write_bytes(blob[:cut])
    with pytest.raises(ModelLoadError):
        load_stable_diffusion(path)
    assert not (folder / "PAYLOAD_RAN").exists()


def test_a_weights_only_ckpt_loads_through_torch_load_with_weights_only(single_file, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """An A1111 ``.ckpt`` of plain tensors still loads (many models exist only so), and torch.load is never called
    without ``weights_only=True`` (the unpickler that refuses code)."""
    from safetensors.torch import load_file

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single_file)}, path)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    from_ckpt = load_single_file(path, config=tiny_model_dir)
    from_safetensors = load_single_file(single_file, config=tiny_model_dir)
    assert calls and all(weights_only is True for weights_only in calls)
    for got, expected in zip(from_ckpt.unet.state_dict().values(), from_safetensors.unet.state_dict().values(),
                             strict=True):
        assert torch.equal(got, expected)


def test_a_tokenizer_without_its_vocabulary_is_refused_instead_of_reading_every_word_as_unknown(folder_copy):
    vocabulary = folder_copy / "tokenizer" / "tokenizer.json"
    original = vocabulary.read_bytes()
    vocabulary.unlink()
    try:
        with pytest.raises(ModelLoadError, match="tokenizer: no tokenizer.json .* every word would be unknown"):
            load_stable_diffusion(folder_copy)
    finally:
        vocabulary.write_bytes(original)


@pytest.mark.parametrize("damage", ["truncated_file", "broken_folder"])
def test_a_damaged_vae_is_refused_naming_it(tiny_model_dir, single_file, tmp_path, damage):
    if damage == "truncated_file":
        vae = tmp_path / "vae.safetensors"
        vae.write_bytes(single_file.read_bytes()[:1000])
    else:
        vae = Path(shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae"))
        (vae / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ModelLoadError) as error:
        load_stable_diffusion(tiny_model_dir, vae=vae)
    _assert_one_line_naming(error.value, vae, "download it again")
