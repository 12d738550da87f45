"""The one conditioning type every backbone accepts.

A batch's condition is any combination of text tokens (with a padding mask),
a pooled vector, class labels, image sizes and image conditions (a ControlNet's control, latents
concatenated to the input, IP-Adapter's image embeddings). Every field is a plain tensor or None, so a
generic classifier-free-guidance wrapper can `torch.cat` fields along the
batch and leave None fields None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

#: The fields that describe the input rather than the prompt. Condition dropout never drops them, and
#: both branches of classifier-free guidance get them: a ControlNet's control stays in both (Zhang et al.
#: 2023, sec. 3.4), and so do an inpainting mask and image, and SDXL's sizes.
KEPT_FIELDS = ("time_ids", "control", "concat")

# Index types accepted by `Conditioning.select` / `__getitem__`.
BatchIndex = int | slice | Sequence[int] | Tensor


@dataclass(frozen=True, eq=False)  # eq=False: `==` on tensor fields is ambiguous; compare fields instead
class Conditioning:
    """Condition of a batch of B samples; every field is optional.

    tokens: (B, L, D) float, e.g. a text encoder's last hidden states.
    mask:   (B, L) bool, True = real token, False = padding. Only with tokens.
    pooled: (B, P) float, e.g. a pooled text embedding; goes through adaLN /
            the time embedding of the backbone.
    labels: (B,) int64 class indices; index `num_classes` is the null class.
    time_ids: (B, 6) int64, each training image's (original h, w, crop top, left, target h, w) in
            pixels: SDXL's size and crop micro-conditioning (diffusion.conditioning.micro). Integers,
            so that a half-precision ``.to(dtype)`` cannot round a size.
    control: (B, K, C, H, W) float, the conditioning images of K ControlNets (one in training; several
            at sampling), in the space each ControlNet reads (pixels or latents; diffusion.adapters).
    concat: (B, C, h, w) float, latents concatenated to x_t on the channel axis (an inpainting mask and
            masked image, a low-resolution image): the backbone's extra, zero-initialised input channels.
    image_embeds: (B, N, D) float, an image encoder's embeddings of an image prompt (IP-Adapter); zeros
            are its null condition.
    """

    tokens: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    labels: Tensor | None = None
    time_ids: Tensor | None = None
    control: Tensor | None = None
    concat: Tensor | None = None
    image_embeds: Tensor | None = None

    def __post_init__(self) -> None:
        _check_ndim("tokens", self.tokens, 3, "(B, L, D)")
        _check_ndim("mask", self.mask, 2, "(B, L)")
        _check_ndim("pooled", self.pooled, 2, "(B, P)")
        _check_ndim("labels", self.labels, 1, "(B,)")
        _check_ndim("time_ids", self.time_ids, 2, "(B, 6)")
        _check_ndim("control", self.control, 5, "(B, K, C, H, W)")
        _check_ndim("concat", self.concat, 4, "(B, C, h, w)")
        _check_ndim("image_embeds", self.image_embeds, 3, "(B, N, D)")
        if self.mask is not None:
            if self.tokens is None:
                raise ValueError("Conditioning.mask was given without tokens; a mask only describes tokens.")
            if self.mask.dtype != torch.bool:
                raise ValueError(f"Conditioning.mask must be bool (True = real token), got dtype {self.mask.dtype}.")
            if self.mask.shape != self.tokens.shape[:2]:
                raise ValueError(
                    f"Conditioning.mask shape must be tokens' (B, L) = {tuple(self.tokens.shape[:2])}, "
                    f"got {tuple(self.mask.shape)}."
                )
        if self.labels is not None and self.labels.dtype != torch.long:
            raise ValueError(f"Conditioning.labels must be int64 class indices, got dtype {self.labels.dtype}.")
        if self.time_ids is not None and (self.time_ids.dtype != torch.long or self.time_ids.shape[1] != 6):
            raise ValueError(f"Conditioning.time_ids must be int64 of shape (B, 6), got {self.time_ids.dtype} "
                             f"{tuple(self.time_ids.shape)}.")
        sizes = {name: t.shape[0] for name, t in self.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning fields disagree on the batch size: {sizes}.")

    # -- inspection ---------------------------------------------------------------
    def items(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) for the fields that are set."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    @property
    def batch_size(self) -> int | None:
        """B, or None for the empty (unconditional) Conditioning."""
        fields = self.items()
        return fields[0][1].shape[0] if fields else None

    @property
    def is_empty(self) -> bool:
        return not self.items()

    def replace(self, **changes: Tensor | None) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def keeping(self, cond: Conditioning) -> Conditioning:
        """This (null) condition with ``cond``'s :data:`KEPT_FIELDS`: what classifier-free guidance and
        condition dropout leave as they are, so that the two branches differ by the prompt alone."""
        return self.replace(**{name: getattr(cond, name) for name in KEPT_FIELDS})

    # -- movement -----------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every field to `device`; `dtype` applies to float fields only (mask, labels and time_ids keep theirs)."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Conditioning(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    # -- batch selection and concatenation -------------------------------------
    def select(self, index: BatchIndex) -> Conditioning:
        """Samples `index` of the batch; an int keeps the batch dimension (B=1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, (slice, Tensor)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        return Conditioning(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in dataclasses.fields(self)}
        )

    __getitem__ = select

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a B=1 Conditioning (e.g. a null condition) to `batch_size` samples (a view, no copy)."""
        if self.is_empty or self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"Can only expand a Conditioning of batch size 1 to {batch_size}, got batch size {self.batch_size}.")
        return Conditioning(
            **{
                f.name: None if (t := getattr(self, f.name)) is None else t.expand(batch_size, *t.shape[1:])
                for f in dataclasses.fields(self)
            }
        )

    @classmethod
    def cat(cls, conds: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch, e.g. [cond, uncond] for one classifier-free-guidance call.

        A field must be set in all or in none of the inputs.
        """
        if not conds:
            raise ValueError("Conditioning.cat needs at least one Conditioning, got none.")
        out: dict[str, Tensor | None] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(c, f.name) for c in conds]
            present = [v is not None for v in values]
            if all(present):
                out[f.name] = torch.cat(values, dim=0)
            elif any(present):
                raise ValueError(
                    f"Conditioning.cat: field '{f.name}' is set in some inputs and None in others "
                    f"(set: {present}); build the null condition with the same fields as the condition."
                )
            else:
                out[f.name] = None
        return cls(**out)


def _check_ndim(name: str, t: Tensor | None, ndim: int, shape: str) -> None:
    if t is not None and t.ndim != ndim:
        raise ValueError(f"Conditioning.{name} must have shape {shape} ({ndim} dims), got shape {tuple(t.shape)}.")
