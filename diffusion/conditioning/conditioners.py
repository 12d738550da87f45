"""Conditioners: turn a batch (labels, captions, or their cached embeddings) into the one
``Conditioning`` the backbone sees, give the null condition of classifier-free guidance, and
say what the backbone must be built for."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from diffusion.conditioning.labels import label_condition, null_label_condition
from diffusion.conditioning.types import Conditioning


class Conditioner(nn.Module, ABC):
    """``batch -> Conditioning``; ``make(values)`` does the same for what a user asks to sample."""

    #: What sampling asks for: "labels", "prompts", or None (nothing).
    takes: str | None = None

    @abstractmethod
    def forward(self, batch: dict[str, Any]) -> Conditioning: ...

    @abstractmethod
    def make(self, values: Any, num: int, device: torch.device) -> Conditioning: ...

    @abstractmethod
    def null(self, batch_size: int, device: torch.device) -> Conditioning: ...

    def backbone_kwargs(self) -> dict[str, int | None]:
        """The condition sizes a backbone is built with (``num_classes``, ``token_dim``, ``pooled_dim``)."""
        return {"num_classes": None, "token_dim": None, "pooled_dim": None}

    def cache(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """What a cache stores of a batch's condition; ``forward`` reads it back from a cached batch."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__}


class Unconditional(Conditioner):
    def forward(self, batch: dict[str, Any]) -> Conditioning:
        return Conditioning()

    def make(self, values: Any, num: int, device: torch.device) -> Conditioning:
        if values is not None:
            raise ValueError("this model is unconditional; sample it without labels or prompts")
        return Conditioning()

    def null(self, batch_size: int, device: torch.device) -> Conditioning:
        return Conditioning()


class ClassLabels(Conditioner):
    """``batch["label"]``; the null condition is the extra class ``num_classes`` (DiT)."""

    takes = "labels"

    def __init__(self, num_classes: int | None):
        super().__init__()
        if num_classes is None:
            raise ValueError(
                "conditioning=labels needs a class-labelled dataset, and this one has no classes (data.num_classes "
                "is null, e.g. a folder of captioned images): use conditioning=text text_encoder=... for its "
                "captions, or conditioning=none"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

    def forward(self, batch: dict[str, Any]) -> Conditioning:
        return label_condition(batch["label"])

    def make(self, values: Sequence[int] | Tensor | None, num: int, device: torch.device) -> Conditioning:
        if values is not None and not isinstance(values, Tensor) and any(isinstance(v, str) for v in values):
            raise ValueError(f"this model is conditioned on class labels 0..{self.num_classes - 1}, not prompts; "
                             "sample it with labels=[...]")
        labels = torch.arange(num) % self.num_classes if values is None else torch.as_tensor(values, dtype=torch.long)
        if labels.numel() != num or bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"need {num} labels in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return label_condition(labels.to(device))

    def null(self, batch_size: int, device: torch.device) -> Conditioning:
        return null_label_condition(batch_size, self.num_classes, device)

    def backbone_kwargs(self) -> dict[str, int | None]:
        return {"num_classes": self.num_classes, "token_dim": None, "pooled_dim": None}

    def cache(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"label": torch.as_tensor(batch["label"])}

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "num_classes": self.num_classes}


class TextPrompts(Conditioner):
    """``batch["caption"]`` through a frozen text encoder, or the cached ``tokens``/``mask``/
    ``pooled`` of the batch when training from a cache. A sample without a caption
    (``has_caption`` False) gets the null condition: it trains unconditionally."""

    takes = "prompts"

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self._null: Conditioning | None = None  # the empty prompt's encoding, computed once

    def forward(self, batch: dict[str, Any]) -> Conditioning:
        if "tokens" in batch:  # cached embeddings
            cond = Conditioning(tokens=batch["tokens"], mask=batch["mask"], pooled=batch.get("pooled"))
        else:
            cond = self.encoder(list(batch["caption"]))
        has_caption = batch.get("has_caption")
        if has_caption is not None:  # every step, even when all have one: asking would wait on the device
            keep = torch.as_tensor(has_caption, device=cond.tokens.device).bool()
            null = self.null(len(keep), cond.tokens.device)
            cond = Conditioning(**{
                name: torch.where(keep.view(-1, *[1] * (value.ndim - 1)), value, getattr(null, name).to(value.dtype))
                for name, value in cond.items()
            })
        return cond

    def make(self, values: Sequence[str] | None, num: int, device: torch.device) -> Conditioning:
        prompts = [""] * num if values is None else list(values)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"this model is conditioned on text prompts, not labels; sample it with "
                             f"prompts='[\"a prompt\", ...]' (got {prompts[:4]!r})")
        if len(prompts) != num:
            raise ValueError(f"need {num} prompts, got {len(prompts)}")
        return self.encoder(prompts).to(device)

    def null(self, batch_size: int, device: torch.device) -> Conditioning:
        # The encoder is frozen, so its null condition never changes: encode "" once, not per step.
        if self._null is None or self._null.tokens.device != torch.device(device):
            with torch.no_grad():  # kept across steps: no graph (an encoder may pass gradients, Textual Inversion)
                self._null = self.encoder.null_condition(1).to(device)
        return self._null.expand(batch_size)

    def backbone_kwargs(self) -> dict[str, int | None]:
        return {"num_classes": None, "token_dim": self.encoder.token_dim, "pooled_dim": self.encoder.pooled_dim}

    def cache(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        cond = self.encoder(list(batch["caption"]))
        stored = {name: value for name, value in cond.items()}
        if "has_caption" in batch:
            stored["has_caption"] = torch.as_tensor(batch["has_caption"])
        return stored

    def fingerprint(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "encoder": self.encoder.fingerprint()}
