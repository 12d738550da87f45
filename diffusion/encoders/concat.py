"""Several frozen text encoders read as one, as SDXL reads its two (CLIP ViT-L/14 and OpenCLIP
ViT-bigG/14): each encodes the prompts, their token states are concatenated along the width
(768 + 1280 = 2048 for SDXL), and the pooled vector is one encoder's (bigG's projection)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffusion._checks import check_choice
from diffusion.conditioning.types import Conditioning
from diffusion.encoders.base import TextEncoder


class ConcatTextEncoders(TextEncoder):
    """``encoders``: text encoders of one ``max_length``; tokens (B, L, sum of widths); mask: a
    position is real where any encoder's tokenizer puts a real token there (the same for CLIP
    tokenizers of one vocabulary); pooled: encoder ``pooled_from``'s.

    ``null_as="zeros"``: the null condition of guidance and of caption dropout is all zeros, tokens and
    pooled, as SDXL was trained (its captions were dropped by zeroing) and as diffusers' SDXL pipeline
    samples (``force_zeros_for_empty_prompt``); ``"empty_prompt"``: the encoding of "".
    """

    def __init__(self, encoders: Sequence[TextEncoder], pooled_from: int | None = -1, null_as: str = "empty_prompt") -> None:
        super().__init__()
        encoders = list(encoders)
        if len(encoders) < 2:
            raise ValueError(f"ConcatTextEncoders needs two or more encoders, got {len(encoders)}")
        lengths = [e.max_length for e in encoders]
        if len(set(lengths)) != 1:
            raise ValueError(f"ConcatTextEncoders: the encoders' max_length differ ({lengths}); concatenating tokens "
                             "needs one length: set each encoder's max_length alike (77 for SDXL)")
        self.null_as = check_choice("null_as", null_as, ("empty_prompt", "zeros"))
        if pooled_from is not None:
            if not -len(encoders) <= pooled_from < len(encoders):
                raise ValueError(f"ConcatTextEncoders: pooled_from={pooled_from} names no encoder of {len(encoders)}")
            if encoders[pooled_from].pooled_dim is None:
                raise ValueError(f"ConcatTextEncoders: encoder {pooled_from} (pooled_from) gives no pooled vector; "
                                 "build it with one (pooling=auto for a CLIP with projection)")
        self.encoders = nn.ModuleList(encoders)
        self.pooled_from = pooled_from
        self.max_length = lengths[0]
        self.token_dim = sum(e.token_dim for e in encoders)
        self.pooled_dim = None if pooled_from is None else encoders[pooled_from].pooled_dim
        self.source = "+".join(e.source for e in encoders)
        self._freeze()

    def _encode(self, prompts: list[str]) -> Conditioning:
        conds = [encoder(prompts) for encoder in self.encoders]
        tokens = torch.cat([c.tokens for c in conds], dim=-1)
        mask = torch.stack([c.mask for c in conds]).any(dim=0)
        pooled = None if self.pooled_from is None else conds[self.pooled_from].pooled
        return Conditioning(tokens=tokens, mask=mask, pooled=pooled)

    def null_condition(self, batch_size: int = 1) -> Conditioning:
        cond = super().null_condition(batch_size)
        if self.null_as == "zeros":
            cond = Conditioning(tokens=torch.zeros_like(cond.tokens), mask=cond.mask,
                                pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled))
        return cond

    def _tokenizer_id(self) -> str:
        return "+".join(e._tokenizer_id() for e in self.encoders)

    def fingerprint(self) -> dict[str, str]:
        found = super().fingerprint()
        found["encoders"] = str([e.fingerprint() for e in self.encoders])
        found["pooled_from"] = str(self.pooled_from)
        found["null_as"] = self.null_as
        return found
