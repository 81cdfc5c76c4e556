"""Prompt → U-Net conditioning with sd-scripts' clip_skip and long-prompt (75/150/225 token) rules, for SD 1.x/2.x
(one CLIP) and SDXL (CLIP-L and OpenCLIP bigG side by side, plus bigG's pooled embedding).

Training and sampling must encode text identically, or samples drift from what was trained; both call here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS


def tokenize(tokenizer, prompts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids of shape (batch, max_token_length + 2), padded, BOS first and EOS last."""
    length = (max_token_length or CHUNK_TOKENS) + 2
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


def _chunk_ids(input_ids: torch.Tensor, tokenizer=None) -> list[torch.Tensor]:
    """Split (B, 75k+2) ids into k chunks of 77, each wrapped in BOS … EOS as CLIP was trained (sd-scripts' rule).

    A tokenizer that pads with its own token (SD 2.x's and SDXL's second, which pad with ``!``) needs sd-scripts'
    two repairs, or a chunk can hold no EOS at all (the pooled embedding is read at the first EOS): a chunk whose
    last word runs up to its end gets EOS instead of the padding, and a chunk that is only padding starts BOS EOS.
    """
    bos, last = input_ids[:, :1], input_ids[:, -1:]
    body = input_ids[:, 1:-1]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", eos_id)
    chunks = []
    for start in range(0, body.shape[1], CHUNK_TOKENS):
        chunk = torch.cat([bos, body[:, start : start + CHUNK_TOKENS], last], dim=1)
        if eos_id is not None and pad_id != eos_id:
            word_at_end = (chunk[:, -2] != eos_id) & (chunk[:, -2] != pad_id)
            chunk[word_at_end, -1] = eos_id
            chunk[chunk[:, 1] == pad_id, 1] = eos_id
        chunks.append(chunk)
    return chunks


def _join_chunks(states: list[torch.Tensor]) -> torch.Tensor:
    """Chunk states back into one sequence: the first BOS, every chunk's body, the last chunk's final position."""
    if len(states) == 1:
        return states[0]
    pieces = [states[0][:, :1]] + [state[:, 1:-1] for state in states] + [states[-1][:, -1:]]
    return torch.cat(pieces, dim=1)


def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: list[str],
    clip_skip: int | None = None,
    max_token_length: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hidden states (batch, max_token_length + 2, hidden) for the U-Net's cross-attention.

    ``clip_skip=2`` takes the penultimate layer and applies the final layer norm, exactly as sd-scripts and A1111.
    Long prompts are encoded chunk by chunk; the chunks' BOS/EOS states are dropped between chunks so the result has
    one BOS at the start and one EOS at the end (sd-scripts' layout).
    """
    device = device or next(text_encoder.parameters()).device
    input_ids = tokenize(tokenizer, prompts, max_token_length).to(device)
    return _join_chunks([_encode_chunk(text_encoder, chunk, clip_skip) for chunk in _chunk_ids(input_ids, tokenizer)])


def _encode_chunk(text_encoder, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    output = text_encoder(input_ids, output_hidden_states=True)
    hidden = output.hidden_states[-clip_skip]
    # transformers < 5 nests the layers under ``text_model``; 5.x puts them on the model itself.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


@dataclass
class Conditioning:
    """What the U-Net is given for a batch of prompts: cross-attention states, and for SDXL the pooled embedding
    that joins the size/crop numbers in the added conditioning."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.states.to(dtype), None if self.pooled is None else self.pooled.to(dtype))


def encode_sdxl_prompts(text_encoders, tokenizers, prompts: list[str], max_token_length: int | None = None,
                        device: torch.device | str | None = None) -> Conditioning:
    """SDXL's conditioning as sd-scripts computes it: both encoders' penultimate hidden states (no final layer norm)
    side by side (768 + 1280 = 2048 wide), and bigG's projected EOS state of the first chunk as the pooled embedding.
    clip_skip does not apply to SDXL (sd-scripts ignores it too)."""
    encoder_1, encoder_2 = text_encoders
    device = device or next(encoder_1.parameters()).device
    states = []
    pooled = None
    for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        chunks = _chunk_ids(tokenize(tokenizer, prompts, max_token_length).to(device), tokenizer)
        outputs = [encoder(chunk, output_hidden_states=True) for chunk in chunks]
        states.append(_join_chunks([output.hidden_states[-2] for output in outputs]))
        if encoder is encoder_2:
            pooled = outputs[0].text_embeds
    return Conditioning(torch.cat(states, dim=-1), pooled)


def encode_conditioning(parts, prompts: list[str], clip_skip: int | None = None, max_token_length: int | None = None,
                        device: torch.device | str | None = None) -> Conditioning:
    """The conditioning of ``prompts`` for the loaded model (``StableDiffusionParts``), SD or SDXL."""
    if getattr(parts, "text_encoder_2", None) is not None:
        return encode_sdxl_prompts([parts.text_encoder, parts.text_encoder_2], [parts.tokenizer, parts.tokenizer_2],
                                   prompts, max_token_length, device)
    return Conditioning(encode_prompts(parts.text_encoder, parts.tokenizer, prompts, clip_skip, max_token_length,
                                       device))


def sdxl_time_ids(original_sizes_hw, crop_top_lefts, target_sizes_hw) -> torch.Tensor:
    """SDXL's six size/crop numbers per image, in the order the U-Net was trained on: original height and width,
    crop top and left, target height and width (diffusers embeds each as the U-Net's ``time_ids``)."""
    rows = [[*original, *crop, *target]
            for original, crop, target in zip(original_sizes_hw, crop_top_lefts, target_sizes_hw, strict=True)]
    return torch.tensor(rows, dtype=torch.float32)
