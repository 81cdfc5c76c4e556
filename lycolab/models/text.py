"""Prompt → U-Net conditioning with sd-scripts' clip_skip and long-prompt (75/150/225 token) rules.

Training and sampling must encode text identically, or samples drift from what was trained; both call here.
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 75  # CLIP's 77 positions minus BOS and EOS


def tokenize(tokenizer, prompts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids of shape (batch, max_token_length + 2), padded, BOS first and EOS last."""
    length = (max_token_length or CHUNK_TOKENS) + 2
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


def _chunk_ids(input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Split (B, 75k+2) ids into k chunks of 77, each wrapped in BOS … EOS as CLIP was trained (sd-scripts' rule)."""
    bos, eos = input_ids[:, :1], input_ids[:, -1:]
    body = input_ids[:, 1:-1]
    chunks = []
    for start in range(0, body.shape[1], CHUNK_TOKENS):
        piece = body[:, start : start + CHUNK_TOKENS]
        chunks.append(torch.cat([bos, piece, eos], dim=1))
    return chunks


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
    states = [_encode_chunk(text_encoder, chunk, clip_skip) for chunk in _chunk_ids(input_ids)]
    if len(states) == 1:
        return states[0]
    pieces = [states[0][:, :1]] + [state[:, 1:-1] for state in states] + [states[-1][:, -1:]]
    return torch.cat(pieces, dim=1)


def _encode_chunk(text_encoder, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    output = text_encoder(input_ids, output_hidden_states=True)
    hidden = output.hidden_states[-clip_skip]
    # transformers < 5 nests the layers under ``text_model``; 5.x puts them on the model itself.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
