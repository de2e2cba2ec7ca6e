"""Learned text embeddings that stand for "no prompt" in classifier-free sampling (Improved VQ-Diffusion, sec. 3.3).

Classifier-free guidance needs the denoiser's prediction without the text condition. Improved VQ-Diffusion learns
that unconditional condition as a parameter of the text encoder's output shape, `(length, hidden_size)`; without
learned embeddings the pipeline encodes the empty prompt instead.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt, model_validator
from torch import nn

from vqbatch.configuration import ComponentConfig
from vqbatch.models.modeling import PretrainedModel

EMBEDDINGS_KEY = "embeddings"


class LearnedClassifierFreeSamplingEmbeddingsConfig(ComponentConfig):
    learnable: bool  # False: no parameter, the pipeline encodes the empty prompt instead
    hidden_size: PositiveInt | None = None  # width of the text encoder's output
    length: PositiveInt | None = None  # number of text tokens (the tokenizer's max length)

    @model_validator(mode="after")
    def sizes_given_when_learnable(self) -> "LearnedClassifierFreeSamplingEmbeddingsConfig":
        if self.learnable and (self.hidden_size is None or self.length is None):
            raise ValueError(f"learnable=True needs hidden_size and length as positive integers, got "
                             f"hidden_size={self.hidden_size!r}, length={self.length!r}")
        return self


class LearnedClassifierFreeSamplingEmbeddings(PretrainedModel):
    """The unconditional text condition: `embeddings` of shape `(length, hidden_size)`, or None if not learnable.

    Checkpoint layout matches diffusers: a not-learnable component still has a weights file whose only entry is an
    empty `embeddings` tensor; it is read and written as such, while the attribute itself is None.
    """

    config_class = LearnedClassifierFreeSamplingEmbeddingsConfig
    diffusers_name = "LearnedClassifierFreeSamplingEmbeddings"

    def __init__(self, learnable: bool, hidden_size: int | None = None, length: int | None = None):
        super().__init__()
        self.config = LearnedClassifierFreeSamplingEmbeddingsConfig.from_dict(
            {"learnable": learnable, "hidden_size": hidden_size, "length": length})
        self.learnable = learnable
        if learnable:
            self.embeddings = nn.Parameter(torch.zeros(length, hidden_size))  # (T, D), trained from zero
        else:
            self.register_parameter(EMBEDDINGS_KEY, None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.embeddings is None:
            destination[prefix + EMBEDDINGS_KEY] = torch.empty(0)  # diffusers' file entry for "no embeddings"

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + EMBEDDINGS_KEY
        if self.embeddings is None and key in state_dict and state_dict[key].numel() == 0:
            del state_dict[key]  # a copy: load_state_dict never hands modules the caller's dict
        super()._load_from_state_dict(state_dict, prefix, *args)
