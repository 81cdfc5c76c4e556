import collections

import torch

from lycolab.models.text import encode_prompts, tokenize


def test_tiny_unet_has_every_module_kind_adapters_target(tiny_sd):
    kinds = collections.Counter(type(module).__name__ for module in tiny_sd.unet.modules())
    for kind in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
        assert kinds[kind] >= 1, kind
    assert len(tiny_sd.unet.down_blocks) >= 2 and len(tiny_sd.unet.up_blocks) >= 2
    assert tiny_sd.text_encoder.config.num_hidden_layers >= 3


def test_tiny_sd_is_deterministic():
    from lycolab.models.tiny import build_tiny_sd

    first, second = build_tiny_sd(), build_tiny_sd()
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)


def test_tokenizer_splits_caption_words(tiny_sd):
    tokens = tiny_sd.tokenizer.tokenize("red hair, blue eyes")
    assert tokens == ["red</w>", "hair</w>", ",</w>", "blue</w>", "eyes</w>"]


def test_saved_folder_loads_in_diffusers_pipeline_offline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("red circle", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_clip_skip_two_uses_penultimate_layer_with_final_norm(tiny_sd):
    encoder, tokenizer = tiny_sd.text_encoder, tiny_sd.tokenizer
    with torch.no_grad():
        last = encode_prompts(encoder, tokenizer, ["red circle"], clip_skip=1)
        skipped = encode_prompts(encoder, tokenizer, ["red circle"], clip_skip=2)
        hidden = encoder(tokenize(tokenizer, ["red circle"]), output_hidden_states=True).hidden_states[-2]
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    assert last.shape == skipped.shape == (1, 77, 32)
    torch.testing.assert_close(skipped, expected)
    assert not torch.allclose(last, skipped)


def test_long_prompts_are_encoded_in_chunks_of_75(tiny_sd):
    prompt = ", ".join(["red circle"] * 60)
    with torch.no_grad():
        for length in (150, 225):
            states = encode_prompts(tiny_sd.text_encoder, tiny_sd.tokenizer, [prompt, "blue"], max_token_length=length)
            assert states.shape == (2, length + 2, 32)


def test_long_prompt_chunks_are_each_wrapped_in_bos_and_eos(tiny_sd):
    from lycolab.models.text import tokenize

    prompt = ", ".join(f"word{index % 7} circle" for index in range(70))
    ids = tokenize(tiny_sd.tokenizer, [prompt], 150)
    bos, eos = ids[:, :1], ids[:, -1:]
    with torch.no_grad():
        first = tiny_sd.text_encoder(torch.cat([bos, ids[:, 1:76], eos], dim=1))[0]
        second = tiny_sd.text_encoder(torch.cat([bos, ids[:, 76:151], eos], dim=1))[0]
        expected = torch.cat([first[:, :1], first[:, 1:76], second[:, 1:76], second[:, 76:]], dim=1)
        states = encode_prompts(tiny_sd.text_encoder, tiny_sd.tokenizer, [prompt], max_token_length=150)
    assert (ids[0, 75] != tiny_sd.tokenizer.eos_token_id).item(), "the prompt must really cross the boundary"
    torch.testing.assert_close(states, expected)


def test_v2_style_tiny_model_is_detected_as_v2():
    from lycolab.models.load import is_v2
    from lycolab.models.tiny import build_tiny_sd

    assert is_v2(build_tiny_sd(v2=True).unet) and not is_v2(build_tiny_sd().unet)
