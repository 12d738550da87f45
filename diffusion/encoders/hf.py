"""A Hugging Face transformers text encoder (CLIP text, T5 encoder, BERT-like), architecture read from its config.

Pooled vector ("auto"): CLIP -> the projected text embedding when the checkpoint has a projection
(CLIPTextModelWithProjection, or a full CLIPModel such as openai/clip-vit-large-patch14), else
the EOS state (pooler_output); T5 -> the masked mean of the token states (T5 has no pooled
output of its own); others (BERT-like) -> the [CLS] (first) token state.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.conditioning.types import Conditioning
from diffusion.encoders.base import TextEncoder

POOLINGS = ("auto", "mean", "cls", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYERS = ("last", "penultimate")
# Encoder-only classes of the encoder-decoder families: their AutoModel would build the decoder too.
_ENCODER_ONLY = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


class HFTextEncoder(TextEncoder):
    """`pretrained`: a hub id or local directory holding the model (in `subfolder`) and its tokenizer
    (in `tokenizer_subfolder`, e.g. "tokenizer" next to "text_encoder" in a diffusers repository).

    Prompts are padded to `max_length` and truncated; the model sees the padding mask, so the states
    of real tokens do not depend on `max_length`. Loaded in float32; `.to(dtype)` after if wanted.
    ``attention_mask=False`` runs the model without it, as Stable Diffusion 1.x's pipeline runs CLIP:
    the causal CLIP's real tokens are unchanged, its padding states are those SD's UNet was trained on.
    ``layer="penultimate"`` gives the tokens of the second-to-last layer as they are (no final layer
    norm, diffusers' ``hidden_states[-2]``), as SDXL and SD3 read their CLIPs; the pooled vector
    stays the last layer's. ``dtype="bfloat16"`` (or float16) stores the frozen weights in that dtype,
    half their memory, as diffusers' training scripts do with ``weight_dtype``; the tokens and pooled
    vector come out in float32 all the same (fingerprints, hence caches, tell the dtypes apart).
    """

    def __init__(
        self,
        pretrained: str,
        max_length: int = 77,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        pooling: str = "auto",
        attention_mask: bool = True,
        layer: str = "last",
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_choice("text_encoder.dtype", dtype, tuple(DTYPES))
        check_choice("pooling", pooling, POOLINGS)
        check_choice("layer", layer, LAYERS)
        self.layer = layer
        import transformers

        sub = {} if subfolder is None else {"subfolder": subfolder}
        config = transformers.AutoConfig.from_pretrained(pretrained, **sub)
        kind, cls = _model_class(config)
        self.model = cls.from_pretrained(pretrained, dtype=DTYPES[dtype], **sub)
        tok_sub = {} if tokenizer_subfolder is None else {"subfolder": tokenizer_subfolder}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained, **tok_sub)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"HFTextEncoder: the tokenizer of {pretrained!r} has no pad token; expected one for padding.")

        mc = self.model.config
        limit = getattr(mc, "max_position_embeddings", None)  # None: relative positions (T5)
        if max_length < 1 or (limit is not None and max_length > limit):
            raise ValueError(f"HFTextEncoder: max_length must lie in [1, {limit}] for {pretrained!r}, got {max_length}.")
        self.max_length = max_length
        self.token_dim = int(mc.hidden_size)
        self.pooling = {"clip": "clip", "t5": "mean"}.get(kind, "cls") if pooling == "auto" else pooling
        projection = getattr(self.model, "text_projection", None)
        if self.pooling == "none":
            self.pooled_dim = None
        elif self.pooling == "clip" and projection is not None:
            self.pooled_dim = int(projection.out_features)
        else:
            self.pooled_dim = self.token_dim
        self.source = pretrained if subfolder is None else f"{pretrained}/{subfolder}"
        self.attention_mask = attention_mask
        self._freeze()

    def _tokenizer_id(self) -> str:
        return tokenizer_id(self.tokenizer)

    def fingerprint(self) -> dict[str, str]:
        found = super().fingerprint()
        if not self.attention_mask:  # only then: the fingerprints of earlier caches stay as they were
            found["attention_mask"] = "false"
        if self.layer != "last":
            found["layer"] = self.layer
        return found

    #: A rewrite of each prompt before tokenizing: Textual Inversion's expansion of a multi-vector placeholder.
    prompt_rewrite = None

    def _encode(self, prompts: list[str]) -> Conditioning:
        if self.prompt_rewrite is not None:
            prompts = [self.prompt_rewrite(p) for p in prompts]
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        # Non-blocking: a blocking copy to an accelerator would wait for all the work queued there.
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.device, non_blocking=True).bool()  # (B, L), True = real token
        penultimate = self.layer == "penultimate"
        # The hidden states only when read: a model called without the flag returns none of them.
        extra = {"output_hidden_states": True} if penultimate else {}
        out = self.model(input_ids=ids, attention_mask=mask.long() if self.attention_mask else None, **extra)
        tokens: Tensor = out.hidden_states[-2] if penultimate else out.last_hidden_state  # (B, L, D)
        if self.pooling == "none":
            pooled = None
        elif self.pooling == "clip":  # the projected embedding, else the EOS state
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        elif self.pooling == "mean":
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # "cls": the first token's state
            pooled = tokens[:, 0]
        # float32 out whatever the weights' dtype: what the backbones and the caches take.
        return Conditioning(tokens=tokens.float(), mask=mask, pooled=None if pooled is None else pooled.float())


def tokenizer_id(tokenizer) -> str:
    """The tokenizer's class and a digest of its vocabulary and rules, for fingerprints."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return type(tokenizer).__name__
    # Without the truncation/padding settings, which each call sets anew.
    spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{digest}"


def _model_class(config) -> tuple[str, type]:
    """(kind, model class) for a transformers config: "clip", "t5" (encoder only) or "other" (AutoModel)."""
    import transformers

    archs = config.architectures or []
    if config.model_type in ("clip", "clip_text_model"):
        with_projection = any(a in ("CLIPModel", "CLIPTextModelWithProjection") for a in archs)
        return "clip", transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    if config.model_type in _ENCODER_ONLY:
        return "t5", getattr(transformers, _ENCODER_ONLY[config.model_type])
    return "other", transformers.AutoModel
