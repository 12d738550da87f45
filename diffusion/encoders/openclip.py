"""OpenCLIP text tower (e.g. ViT-H-14 laion2b_s32b_b79k, the text encoder of Stable Diffusion 2.x).

Tokens are the per-token states after `ln_final`, of the last layer, or with
``layer="penultimate"`` of the one before (then `ln_final`), as Stable Diffusion 2.x takes them;
pooled is exactly `model.encode_text` (the EOT state through text_projection, always of the last
layer), or none with ``pooled=False``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion.conditioning.types import Conditioning
from diffusion.encoders.base import TextEncoder


class OpenCLIPTextEncoder(TextEncoder):
    """`model_name` + `pretrained` (a tag such as "laion2b_s32b_b79k", or a checkpoint file), or
    `model_config` (an open_clip model config dict: embed_dim, vision_cfg, text_cfg) for a custom
    architecture, randomly initialised unless `pretrained` names a checkpoint file.

    Only causal CLIP-style text towers with the BPE tokenizer are supported (the classic `CLIP`
    models); the image tower is dropped after loading (ViT-H-14: 630M of its 990M parameters).
    `max_length` defaults to the model's context length and may be shorter (the tower is causal,
    so the states of the kept positions are unchanged).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        max_length: int | None = None,
        model_config: Mapping[str, Any] | None = None,
        layer: str = "last",
        pooled: bool = True,
    ) -> None:
        super().__init__()
        import open_clip

        from diffusion._checks import check_choice

        self.layer = check_choice("layer", layer, ("last", "penultimate"))

        name = model_name if model_config is None else _register(model_name, model_config)
        model = open_clip.create_model(name, pretrained=pretrained)
        if hasattr(model, "visual"):
            model.visual = None  # only the text tower is used
        self.model = model
        tower = self._tower
        causal = tower is not None and getattr(tower, "attn_mask", None) is not None
        if not causal or getattr(tower, "cls_emb", None) is not None:
            raise ValueError(
                f"OpenCLIPTextEncoder expects a causal CLIP text tower without class token, got {model_name!r} "
                f"({type(model).__name__}); models with a HF or bidirectional text tower are not supported."
            )
        self.tokenizer = open_clip.get_tokenizer(name)
        if not hasattr(self.tokenizer, "eot_token_id"):
            raise ValueError(
                f"OpenCLIPTextEncoder expects the CLIP BPE tokenizer, got {type(self.tokenizer).__name__} for {model_name!r}."
            )

        if self.layer == "penultimate" and len(tower.transformer.resblocks) < 2:
            raise ValueError(f"OpenCLIPTextEncoder: layer='penultimate' needs a text tower of 2 or more layers, "
                             f"{model_name!r} has {len(tower.transformer.resblocks)}")
        context = tower.positional_embedding.shape[0]
        self.max_length = context if max_length is None else max_length
        if not 2 <= self.max_length <= context:
            raise ValueError(
                f"OpenCLIPTextEncoder: max_length must lie in [2, {context}] (the context length of {model_name}), "
                f"got {max_length}."
            )
        self.token_dim = tower.positional_embedding.shape[1]
        proj = tower.text_projection
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool == "none" or not pooled:
            self.pooled_dim = None
        elif proj is None:
            self.pooled_dim = self.token_dim
        else:
            self.pooled_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self._pool = pool
        self._eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if model_config is None:
            self.source = f"{model_name}:{pretrained}"
        else:
            self.source = "config" if pretrained is None else f"config:{pretrained}"
        self._freeze()

    @property
    def _tower(self) -> nn.Module | None:
        # `CLIP` holds the text modules itself; `CustomTextCLIP` holds them in `.text`.
        if hasattr(self.model, "token_embedding"):
            return self.model
        return getattr(self.model, "text", None)

    def fingerprint(self) -> dict[str, str]:
        found = super().fingerprint()
        if self.layer != "last":  # only then: the fingerprints of earlier caches stay as they were
            found["layer"] = self.layer
        return found

    def _tokenizer_id(self) -> str:
        return f"{type(self.tokenizer).__name__}(eot={self.tokenizer.eot_token_id})"

    def _encode(self, prompts: list[str]) -> Conditioning:
        from open_clip.transformer import text_global_pool

        t = self._tower
        # (B, L); non-blocking: a blocking copy to an accelerator would wait for all the work queued there.
        ids = self.tokenizer(prompts, context_length=self.max_length).to(self.device, non_blocking=True)
        L = ids.shape[1]
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(ids).to(cast) + t.positional_embedding[:L].to(cast)
        states = self._states(t, x, t.attn_mask[:L, :L])
        tokens = t.ln_final(states[self.layer])  # (B, L, D)
        # The BPE tokenizer pads with id 0 (a real token, "!") after EOT: the mask comes from EOT's position.
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1)  # first EOT (truncation keeps one)
        mask = torch.arange(L, device=ids.device)[None, :] <= eot[:, None]
        pooled = None
        if self.pooled_dim is not None:  # as model.encode_text
            last = tokens if self.layer == "last" else t.ln_final(states["last"])
            pooled = text_global_pool(last, ids, self._pool, eos_token_id=self._eos)
            proj = t.text_projection
            if proj is not None:
                pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return Conditioning(tokens=tokens, mask=mask, pooled=pooled)

    def _states(self, tower: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The "last" layer's states (B, L, D), and the "penultimate" one's when that layer is asked for;
        the last layer is run only when it is used (for the tokens or the pooled vector)."""
        if self.layer == "last":
            return {"last": tower.transformer(x, attn_mask=attn_mask)}
        transformer = tower.transformer
        batch_first = getattr(transformer, "batch_first", True)
        h = x if batch_first else x.transpose(0, 1)
        for block in transformer.resblocks[:-1]:
            h = block(h, attn_mask=attn_mask)
        states = {"penultimate": h}
        if self.pooled_dim is not None:
            states["last"] = transformer.resblocks[-1](h, attn_mask=attn_mask)
        return {k: v if batch_first else v.transpose(0, 1) for k, v in states.items()}


def _register(model_name: str, model_config: Mapping[str, Any], owner: str = "OpenCLIPTextEncoder") -> str:
    """Register `model_config` with open_clip under a name unique to its content, so it never replaces
    a built-in config (e.g. the real "ViT-H-14") in open_clip's global registry; return that name."""
    import open_clip
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(model_config, resolve=True) if isinstance(model_config, DictConfig) else dict(model_config)
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ValueError(
            f"{owner}: model_config expects keys embed_dim, vision_cfg, text_cfg; missing {sorted(missing)}."
        )
    text = json.dumps(cfg, sort_keys=True)
    name = f"{model_name}-custom-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:  # open_clip keeps the parsed config after the scan
            path = Path(tmp) / f"{name}.json"
            path.write_text(text)
            open_clip.add_model_config(path)
    return name
