"""The text side of the default model: the offline CLIP tokenizer, a small CLIP text encoder, and prompt dropping.

The encoder has CLIP's architecture (transformers' `CLIPTextModel`) at a small size and is trained jointly with the
diffusion transformer, through the cross-attention, on the diffusion loss: the shapes captions are a tiny, closed
language, so the encoder only has to tell the transformer which attribute words were said and to which shape they
belong, and that is exactly what the denoising loss rewards. A separate objective (contrastive, as CLIP) would need
an image encoder as well and teach nothing the transformer does not need.

Classifier-free guidance (Improved VQ-Diffusion, sec. 3.3) needs an unconditional prediction: for a `drop_rate`
share of the samples the condition is replaced by the learned "no prompt" embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from vqbatch.models.embeddings import LearnedClassifierFreeSamplingEmbeddings
from vqbatch.pipeline import encode_prompts
from vqbatch.tiny import NUM_MERGES, TRAINING_TEXT, write_tokenizer_files


def build_tokenizer(folder: str | Path, captions: list[str]) -> CLIPTokenizer:
    """The offline CLIP BPE tokenizer of `vqbatch.tiny`, its merges learned from its general text and `captions`
    (so every caption word is one token), written to `folder` and loaded from it."""
    text = TRAINING_TEXT + "\n".join(captions)
    return CLIPTokenizer.from_pretrained(write_tokenizer_files(folder, 2 * NUM_MERGES, text), local_files_only=True)


def build_text_encoder(tokenizer: CLIPTokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                       max_length: int) -> CLIPTextModel:
    """A small CLIP text encoder whose context (`max_length` tokens) is also the padded prompt length."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = max_length
    return CLIPTextModel(config)


def longest_prompt(tokenizer: CLIPTokenizer, prompts: list[str]) -> int:
    return max(len(ids) for ids in tokenizer(prompts).input_ids)


def conditions(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
               unconditional: LearnedClassifierFreeSamplingEmbeddings, prompts: list[str],
               dropped: torch.Tensor) -> torch.Tensor:
    """The transformer's text input (B, L, D): normalised prompt encodings, learned embeddings where `dropped`."""
    encoded = encode_prompts(tokenizer, text_encoder, prompts)  # (B, L, D), as the pipeline encodes them
    return torch.where(dropped.view(-1, 1, 1), unconditional.embeddings.unsqueeze(0), encoded)
