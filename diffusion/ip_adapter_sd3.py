"""IP-Adapter on the wrapped SD3 transformer (SD3Transformer, diffusers' SD3Transformer2DModel), in
InstantX's SD3.5-Large layout as diffusers reads it (``SD3IPAdapterMixin.load_ip_adapter``,
``SD3Transformer2DModel._load_ip_adapter_weights``).

The image embeddings are SigLIP's penultimate hidden states (B, N patches, D; diffusion.encoders.image.
SiglipImageEncoder). A timestep-conditioned resampler (diffusers' ``IPAdapterTimeImageProjection``: 4
blocks of ``num_queries`` learnt queries attending to the patches and themselves, AdaLN from SD3's
timestep) turns them into ``num_queries`` tokens of the transformer's inner width, and gives its time
embedding. Every attention of the joint blocks gains an AdaLayerNorm of those tokens (from that time
embedding) and ``to_k_ip`` / ``to_v_ip``; its image stream adds ``scale * Attention(RMS(q), [RMS(k);
RMS(k_ip)], [v; v_ip])`` before the output projection (``SD3IPAdapterJointAttnProcessor2_0``). The
transformer computes the tokens inside its forward from ``joint_attention_kwargs["ip_adapter_image_embeds"]``
and its own timestep, which is how StableDiffusion3Pipeline passes them (a tensor, one adapter).

Initialisation: InstantX published the weights and inference code, not their training recipe, so the new
modules are initialised as diffusers' constructors build them (PyTorch's nn.Linear / nn.LayerNorm defaults,
the resampler's queries ``randn / sqrt(hidden_dim)``; the global RNG). No initialisation makes a new adapter
start as the base: the image branch attends to the image's own (RMS-normed) keys besides the image tokens,
so even zero ``to_k_ip`` / ``to_v_ip`` add a term; only ``scale = 0`` gives the base's output.

File layout (``ip_adapter.safetensors``), InstantX's: ``image_proj.{latents, proj_in, proj_out, norm_out,
time_embedding}.*``, ``image_proj.layers.{j}.{0.norm1, 0.norm2, 0.to_q, 0.to_kv, 0.to_out, 1.0, 1.1, 1.3,
2.1}.*`` (the resampler blocks, as the loader renames them) and ``ip_adapter.{i}.{norm_ip.linear, to_k_ip,
to_v_ip}.*``, ``i`` the i-th attention processor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: The resampler's shape in InstantX's SD3.5-Large adapter (its depth 4 and head width 64 are what the loader builds).
RESAMPLER = dict(hidden_dim=1280, heads=20, num_queries=64, timestep_in_dim=320)
#: Our names of a resampler block's modules (diffusers') -> InstantX's, which the loader renames back.
_BLOCK_NAMES = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_kv": "0.to_kv",
                "attn.to_out.0": "0.to_out", "adaln_norm": "1.0", "ff.net.0.proj": "1.1", "ff.net.2": "1.3",
                "adaln_proj": "2.1"}


def transformer_of(backbone: nn.Module) -> nn.Module:
    transformer = getattr(backbone, "transformer", None)
    if type(backbone).__name__ != "SD3Transformer" or transformer is None:
        raise ValueError(f"{type(backbone).__name__} is not the wrapped SD3 transformer (backbone=sd3_transformer)")
    return transformer


def ip_processors(transformer: nn.Module) -> list[nn.Module]:
    """The joint blocks' attention processors, in the order diffusers' loader numbers them (key ``i``; the
    resampler's own attentions, once loaded, are not numbered)."""
    return [proc for name, proc in transformer.attn_processors.items() if name.startswith("transformer_blocks.")]


def has_ip_adapter(transformer: nn.Module) -> bool:
    return getattr(transformer, "image_proj", None) is not None


def image_embed_dim(transformer: nn.Module) -> int | None:
    """The width of the image embeddings the transformer's IP-Adapter takes; None without one."""
    return int(transformer.image_proj.proj_in.in_features) if has_ip_adapter(transformer) else None


def _to_instantx(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            _, j, rest = key.split(".", 2)
            for ours, theirs in _BLOCK_NAMES.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours):]
                    break
            key = f"layers.{j}.{rest}"
        out[key] = value.detach().float().cpu().contiguous()
    return out


def initial_state_dict(transformer: nn.Module, embed_dim: int, hidden_dim: int = RESAMPLER["hidden_dim"],
                       heads: int = RESAMPLER["heads"], num_queries: int = RESAMPLER["num_queries"],
                       timestep_in_dim: int = RESAMPLER["timestep_in_dim"]) -> dict[str, dict[str, Tensor]]:
    """A new SD3 IP-Adapter in InstantX's layout, its modules as diffusers' constructors initialise them."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    for name, value in (("image_embed_dim", embed_dim), ("hidden_dim", hidden_dim), ("heads", heads),
                        ("num_queries", num_queries), ("timestep_in_dim", timestep_in_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"adapter.{name}={value!r}: SD3's IP-Adapter resampler needs a positive integer")
    if timestep_in_dim % 2:
        raise ValueError(f"adapter.resampler.timestep_in_dim={timestep_in_dim}: the sinusoidal timestep embedding "
                         "needs an even width")
    inner = int(transformer.config.attention_head_dim) * int(transformer.config.num_attention_heads)
    # diffusers' loader builds 4 blocks with heads of 64 (it reads heads off to_q's rows / 64).
    resampler = IPAdapterTimeImageProjection(embed_dim=embed_dim, output_dim=inner, hidden_dim=hidden_dim,
                                             depth=4, dim_head=64, heads=heads, num_queries=num_queries,
                                             timestep_in_dim=timestep_in_dim)
    layers: dict[str, Tensor] = {}
    for i, _ in enumerate(ip_processors(transformer)):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=inner, ip_hidden_states_dim=inner,
                                                 head_dim=int(transformer.config.attention_head_dim),
                                                 timesteps_emb_dim=hidden_dim)
        layers.update({f"{i}.{k}": v.detach().float() for k, v in proc.state_dict().items()})
    return {"image_proj": _to_instantx(resampler.state_dict()), "ip_adapter": layers}


def add_ip_adapter(transformer: nn.Module, embed_dim: int, state: dict[str, dict[str, Tensor]] | None = None,
                   **resampler: int) -> None:
    """Put an IP-Adapter into ``transformer`` (in place) with diffusers' loader: ``state`` (InstantX's layout)
    or a new one (:func:`initial_state_dict`, ``resampler`` its shape). Its scale starts at 1."""
    if has_ip_adapter(transformer):
        raise ValueError("the SD3 transformer has an IP-Adapter already; adapter=ip_adapter adds one to a plain one")
    unknown = sorted(set(resampler) - set(RESAMPLER))
    if unknown:
        raise ValueError(f"adapter.resampler: unknown option(s) {unknown}; SD3's resampler takes {sorted(RESAMPLER)}")
    state = state if state is not None else initial_state_dict(transformer, embed_dim, **resampler)
    transformer._load_ip_adapter_weights(state, low_cpu_mem_usage=False)
    set_ip_scale(transformer, 1.0)  # the processors are built with 0.5


def ip_adapter_state_dict(transformer: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The transformer's IP-Adapter in InstantX's layout (what diffusers' SD3 loader reads)."""
    if not has_ip_adapter(transformer):
        raise ValueError("the SD3 transformer carries no IP-Adapter (adapter=ip_adapter)")
    layers = {f"{i}.{k}": v.detach().float().cpu().contiguous()
              for i, proc in enumerate(ip_processors(transformer)) for k, v in proc.state_dict().items()}
    return {"image_proj": _to_instantx(transformer.image_proj.state_dict()), "ip_adapter": layers}


def remove_ip_adapter(transformer: nn.Module) -> None:
    """Take the IP-Adapter out (in place): the processor SD3 is built with (JointAttnProcessor2_0, its
    dual-attention blocks' second attention's too), no image projection, so the state_dict has a plain one's keys."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.image_proj = None  # before: its attentions would be counted among the processors
    transformer.set_attn_processor(JointAttnProcessor2_0())


def set_ip_scale(transformer: nn.Module, scale: float) -> None:
    for proc in ip_processors(transformer):
        proc.scale = float(scale)
