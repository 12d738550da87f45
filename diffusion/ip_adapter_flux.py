"""IP-Adapter on the wrapped FLUX transformer (FluxTransformer, diffusers' FluxTransformer2DModel), in
XLabs' layout as diffusers reads it (``FluxIPAdapterMixin.load_ip_adapter``).

An image embedding (B, N, D) goes through the image projection (a linear layer to ``NUM_TOKENS`` tokens
of the text width ``joint_attention_dim``, then LayerNorm: diffusers' ``ImageProjection``). Every
double-stream block's attention gains ``to_k_ip`` / ``to_v_ip`` (with biases) from those tokens to the
inner width; its image stream adds ``scale * Attention(q, K_image, V_image)`` (q before RoPE) after the
feed-forward (diffusers' ``FluxIPAdapterAttnProcessor``). The single-stream blocks are unchanged.

Initialisation: the UNet recipe (the new maps as copies of the text ``to_k`` / ``to_v``) does not fit,
the text key/value maps of a double block reading the context embedder's output (the inner width), not
the T5 width the image tokens have. XLabs' x-flux trains its IP-Adapter's key and value maps from zero
(weights and biases), so a new adapter starts exactly as the base transformer, whatever the scale; the
projection is as nn.Linear / nn.LayerNorm initialise it. (With both maps zero, only ``to_v_ip`` has a
gradient at the first step; the rest follow once it is nonzero.)

File layout (``ip_adapter.safetensors``): ``image_proj.{proj,norm}.{weight,bias}`` and
``ip_adapter.{i}.to_{k,v}_ip.{weight,bias}``, ``i`` the i-th double-stream block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion.ip_adapter import check_embed_dim, projection_layout, released

#: Image tokens per embedding: what diffusers' FLUX loader assumes unless the projection is 65536 wide.
NUM_TOKENS = 4


def transformer_of(backbone: nn.Module) -> nn.Module:
    transformer = getattr(backbone, "transformer", None)
    if type(backbone).__name__ != "FluxTransformer" or transformer is None:
        raise ValueError(f"{type(backbone).__name__} is not the wrapped FLUX transformer "
                         "(backbone=flux_transformer)")
    return transformer


def ip_processors(transformer: nn.Module) -> list[nn.Module]:
    """The double-stream blocks' attention processors, in the order diffusers numbers them (key ``i``)."""
    return [proc for name, proc in transformer.attn_processors.items()
            if not name.startswith("single_transformer_blocks")]


def has_ip_adapter(transformer: nn.Module) -> bool:
    # diffusers' loader sets the attribute on the config (not a key: FLUX's config has no such argument).
    return getattr(transformer.config, "encoder_hid_dim_type", None) == "ip_image_proj" and \
        getattr(transformer, "encoder_hid_proj", None) is not None


def image_embed_dim(transformer: nn.Module) -> int | None:
    """The width of the image embeddings the transformer's IP-Adapter takes; None without one."""
    if not has_ip_adapter(transformer):
        return None
    return int(transformer.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features)


def initial_state_dict(transformer: nn.Module, embed_dim: int) -> dict[str, dict[str, Tensor]]:
    """A new FLUX IP-Adapter in XLabs' layout: the projection as nn.Linear / nn.LayerNorm initialise
    (the global RNG), every double block's ``to_k_ip`` / ``to_v_ip`` zero (x-flux's initialisation)."""
    width, inner = int(transformer.config.joint_attention_dim), int(transformer.inner_dim)
    if NUM_TOKENS * width == 65536:
        raise ValueError(f"joint_attention_dim={width}: diffusers' FLUX loader reads a 65536-wide projection as 16 "
                         "tokens, not the 4 this adapter trains")
    image_proj = {k: v.detach() for k, v in projection_layout(nn.Linear(embed_dim, NUM_TOKENS * width),
                                                               nn.LayerNorm(width)).items()}
    layers: dict[str, Tensor] = {}
    for i in range(len(transformer.transformer_blocks)):
        for kv in ("k", "v"):
            layers[f"{i}.to_{kv}_ip.weight"] = torch.zeros(inner, width)
            layers[f"{i}.to_{kv}_ip.bias"] = torch.zeros(inner)
    if not layers:
        raise ValueError("adapter=ip_adapter: the FLUX transformer has no double-stream block to add image tokens to")
    return {"image_proj": image_proj, "ip_adapter": layers}


def add_ip_adapter(transformer: nn.Module, embed_dim: int, state: dict[str, dict[str, Tensor]] | None = None) -> None:
    """Put an IP-Adapter into ``transformer`` (in place) with diffusers' loader: ``state`` (XLabs' layout)
    or a new one (:func:`initial_state_dict`). Its scale starts at 1."""
    if has_ip_adapter(transformer):
        raise ValueError("the FLUX transformer has an IP-Adapter already; adapter=ip_adapter adds one to a plain one")
    check_embed_dim(embed_dim)
    state = state if state is not None else initial_state_dict(transformer, embed_dim)
    transformer._load_ip_adapter_weights([state], low_cpu_mem_usage=False)


def ip_adapter_state_dict(transformer: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The transformer's IP-Adapter in XLabs' layout (what diffusers' FLUX loader reads)."""
    if not has_ip_adapter(transformer):
        raise ValueError("the FLUX transformer carries no IP-Adapter (adapter=ip_adapter)")
    projection = transformer.encoder_hid_proj.image_projection_layers[0]
    layers = {}
    for i, proc in enumerate(ip_processors(transformer)):
        for kv, maps in (("k", proc.to_k_ip), ("v", proc.to_v_ip)):
            layers[f"{i}.to_{kv}_ip.weight"], layers[f"{i}.to_{kv}_ip.bias"] = maps[0].weight, maps[0].bias
    return {"image_proj": released(projection_layout(projection.image_embeds, projection.norm)),
            "ip_adapter": released(layers)}


def remove_ip_adapter(transformer: nn.Module) -> None:
    """Take the IP-Adapter out (in place): the processors FLUX is built with, no image projection (as
    diffusers' ``unload_ip_adapter``), so the state_dict has a plain transformer's keys."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer.encoder_hid_proj = None
    transformer.config.encoder_hid_dim_type = None
    transformer.set_attn_processor(FluxAttnProcessor())


def set_ip_scale(transformer: nn.Module, scale: float) -> None:
    for proc in ip_processors(transformer):
        proc.scale = [float(scale)] * len(proc.scale)
