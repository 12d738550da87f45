"""Several frozen text encoders as one, as SDXL, SD3 and FLUX read their prompts.

SDXL: the penultimate tokens of CLIP-L (768) and OpenCLIP bigG (1280) side by side (2048); pooled =
bigG's projection (1280); all zeros as the null condition. SD3: the penultimate tokens of CLIP-L (768) and CLIP-G (1280) side by side, zero-padded to T5-XXL's
width (4096), then T5's tokens after them along the sequence; pooled = CLIP-L's and CLIP-G's projected
vectors side by side (2048). FLUX: T5's tokens; pooled = CLIP-L's pooled vector (768).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffusion._checks import check_choice
from diffusion.conditioning.types import Conditioning
from diffusion.encoders.base import TextEncoder

NULLS = ("empty_prompt", "zeros")


class JointTextEncoder(TextEncoder):
    """prompts -> Conditioning(tokens, mask, pooled) from several encoders.

    Args:
        encoders: name -> a TextEncoder (each frozen already).
        tokens: groups of encoder names. A group's tokens are put side by side along the width (its
            encoders must give the same length), zero-padded on the width to ``token_dim``; the groups
            follow each other along the sequence. A group's mask: a position is real where any of its
            encoders' tokenizers puts a real token (the same for CLIP tokenizers of one vocabulary).
        pooled: names whose pooled vectors are put side by side; empty: no pooled vector.
        token_dim: the width to pad to; None: the widest group's.
        pretrained: the repository the parts were read from, when one (a pipeline's) holds them all
            (the configs give it to each part); only named in ``source``.
        null_as: the null condition of guidance and caption dropout: ``"empty_prompt"``, the encoding
            of "" (SD3, FLUX), or ``"zeros"``, tokens and pooled all zero, as SDXL was trained (its
            captions were dropped by zeroing) and as its pipeline samples (force_zeros_for_empty_prompt).
    """

    def __init__(self, encoders: Mapping[str, TextEncoder], tokens: Sequence[Sequence[str]],
                 pooled: Sequence[str] = (), token_dim: int | None = None,
                 pretrained: str | None = None, null_as: str = "empty_prompt") -> None:
        super().__init__()
        self.null_as = check_choice("null_as", null_as, NULLS)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.groups = [list(group) for group in tokens]
        self.pooled_names = list(pooled)
        for name in [n for g in self.groups for n in g] + self.pooled_names:
            if name not in self.encoders:
                raise ValueError(f"JointTextEncoder: no encoder named {name!r}; the encoders are "
                                 f"{sorted(self.encoders)}")
        if not self.groups or not all(self.groups):
            raise ValueError(f"JointTextEncoder: tokens must be non-empty groups of encoder names, got {self.groups}")
        for name in self.pooled_names:
            if self.encoders[name].pooled_dim is None:
                raise ValueError(f"JointTextEncoder: encoder {name!r} gives no pooled vector, but pooled names it")
        for group in self.groups:
            if len({self.encoders[n].max_length for n in group}) != 1:
                lengths = {n: self.encoders[n].max_length for n in group}
                raise ValueError(f"JointTextEncoder: the encoders of a token group must give the same length, "
                                 f"got {lengths}")
        widths = [sum(self.encoders[n].token_dim for n in group) for group in self.groups]
        self.token_dim = int(token_dim) if token_dim is not None else max(widths)
        if max(widths) > self.token_dim:
            raise ValueError(f"JointTextEncoder: token groups of widths {widths} do not fit token_dim={self.token_dim}")
        self.pooled_dim = sum(self.encoders[n].pooled_dim for n in self.pooled_names) or None
        self.max_length = sum(self.encoders[g[0]].max_length for g in self.groups)
        self.source = pretrained or "+".join(f"{name}={enc.source}" for name, enc in self.encoders.items())
        self._freeze()

    def _tokenizer_id(self) -> str:
        return "+".join(f"{name}={enc._tokenizer_id()}" for name, enc in self.encoders.items())

    def fingerprint(self) -> dict[str, str]:
        found = super().fingerprint()
        found["layout"] = f"tokens={self.groups};pooled={self.pooled_names}"
        if self.null_as != "empty_prompt":  # only then: the fingerprints of earlier caches stay as they were
            found["null_as"] = self.null_as
        for name, enc in self.encoders.items():  # the parts' own settings (layer, attention_mask, ...)
            found.update({f"{name}.{k}": v for k, v in enc.fingerprint().items() if k != "sha256"})
        return found

    def _encode(self, prompts: list[str]) -> Conditioning:
        encoded = {name: enc(prompts) for name, enc in self.encoders.items()}
        tokens, masks = [], []
        for group in self.groups:
            side = torch.cat([encoded[n].tokens for n in group], dim=-1)
            tokens.append(nn.functional.pad(side, (0, self.token_dim - side.shape[-1])))
            masks.append(torch.stack([encoded[n].mask for n in group]).any(dim=0))
        pooled = torch.cat([encoded[n].pooled for n in self.pooled_names], dim=-1) if self.pooled_names else None
        return Conditioning(tokens=torch.cat(tokens, dim=1), mask=torch.cat(masks, dim=1), pooled=pooled)

    def null_condition(self, batch_size: int = 1) -> Conditioning:
        cond = super().null_condition(batch_size)
        if self.null_as == "zeros":
            cond = Conditioning(tokens=torch.zeros_like(cond.tokens), mask=cond.mask,
                                pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled))
        return cond
