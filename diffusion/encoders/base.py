"""Frozen text encoders: prompts -> one `Conditioning` (tokens, padding mask, pooled vector)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from diffusion.frozen import FrozenModule, weights_sha256
from diffusion.conditioning.types import Conditioning


class TextEncoder(FrozenModule, ABC):
    """Frozen, eval, no grad. Subclasses set the attributes below and call `_freeze()` last in `__init__`.

    tokens (B, max_length, token_dim) float; mask (B, max_length) bool, True = real token (special
    tokens included), False = padding; pooled (B, pooled_dim) or None when `pooled_dim` is None.
    """

    token_dim: int
    pooled_dim: int | None
    max_length: int
    source: str = "config"
    # True when a trainable part reads this encoder (Textual Inversion's new token rows): forward then
    # keeps the caller's gradient mode, so gradients reach those rows; its own weights take none.
    passes_gradients: bool = False

    @abstractmethod
    def _encode(self, prompts: list[str]) -> Conditioning:
        """Encode a non-empty list of prompts; called under no_grad."""

    @abstractmethod
    def _tokenizer_id(self) -> str:
        """What identifies the tokenizer, for the fingerprint."""

    def forward(self, prompts: Sequence[str]) -> Conditioning:
        # A bare string is a Sequence[str] too: it would be encoded as one prompt per character.
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            got = type(prompts).__name__ if isinstance(prompts, str) else [type(p).__name__ for p in prompts][:4]
            raise ValueError(f"{type(self).__name__} expects a list of prompt strings, got {got!r}.")
        if len(prompts) == 0:
            raise ValueError(f"{type(self).__name__} expects at least one prompt, got an empty list.")
        with nullcontext() if self.passes_gradients else torch.no_grad():
            return self._encode(list(prompts))

    def null_condition(self, batch_size: int = 1) -> Conditioning:
        """The encoding of the empty prompt "", expanded (a view) to `batch_size`: the unconditional input
        of classifier-free guidance."""
        if batch_size < 1:
            raise ValueError(f"null_condition expects batch_size >= 1, got {batch_size}.")
        return self([""]).expand(batch_size)

    def fingerprint(self) -> dict[str, str]:
        """What determines the encodings, e.g. to check that cached text embeddings match this encoder."""
        return {
            "class": type(self).__name__,
            "source": self.source,
            "sha256": weights_sha256(self),
            "tokenizer": self._tokenizer_id(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": str(self.max_length),
            "token_dim": str(self.token_dim),
            "pooled_dim": str(self.pooled_dim),
        }
