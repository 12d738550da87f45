"""IP-Adapter (Ye et al. 2023) on the wrapped diffusers UNet: an image prompt through decoupled
cross-attention.

An image encoder's embedding (CLIP's projected image embedding, diffusion.encoders.image) goes
through the image projection (a linear layer to ``NUM_TOKENS`` tokens of the cross-attention width,
then LayerNorm; diffusers' ``ImageProjection``); every cross-attention layer gains its own key and
value maps of those tokens, ``to_k_ip`` and ``to_v_ip``, initialised from the text ``to_k`` and
``to_v`` (the paper, sec. 3.2), and returns ``Attention(q, K_text, V_text) + scale * Attention(q,
K_image, V_image)`` (before its output projection). Only the projection and the new maps train.

The modules are diffusers' own (``IPAdapterAttnProcessor2_0``, ``MultiIPAdapterImageProjection``),
put in place by the UNet's loader from a state dict in the layout of a released IP-Adapter file
({"image_proj": {"proj.weight", ...}, "ip_adapter": {"1.to_k_ip.weight", ...}}), so that what
trains here is what ``pipeline.load_ip_adapter`` builds from the file :func:`save_ip_adapter` writes.

The wrapped FLUX transformer takes XLabs' layout through diffusers' FLUX loader (diffusion.ip_adapter_flux:
the double-stream blocks' image attention, its maps trained from zero); the wrapped SD3 transformer InstantX's
SD3.5-Large layout through diffusers' SD3 loader (diffusion.ip_adapter_sd3: SigLIP's patch states through a
timestep-conditioned resampler, every joint attention's image branch).

Our DiT and UNet take the same adapter (each cross-attention's ``ip_kv`` from its ``kv``,
diffusion.backbones.layers.Attention, and an :class:`ImageProjection` of their own to the width the
cross-attentions read); their checkpoints hold it, there being no other program's layout to write.

The null image prompt is zero embeddings (diffusers' pipelines' negative image embeds): they project
to the tokens ``LayerNorm(proj.bias)``, not to zero tokens; ``scale = 0`` is what leaves the base UNet's
output as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.adapters import Adapter, _check_base_dtype
from diffusion.backbones.layers import check_image_embeds  # noqa: F401 - the backbones' check, named here too

#: Image tokens per image embedding: the paper's 4, which diffusers' loader assumes for this layout.
NUM_TOKENS = 4
#: The file names :func:`save_ip_adapter` writes (``pipeline.load_ip_adapter(dir, subfolder="", weight_name=...)``).
WEIGHT_NAMES = ("ip_adapter.safetensors", "ip_adapter.bin")


KINDS = ("DiffusersUNet", "FluxTransformer", "SD3Transformer", "DiT", "UNet")
#: The wrapped transformers whose IP-Adapter lives in a module of its own: kind -> that module's name.
_MMDIT = {"FluxTransformer": "diffusion.ip_adapter_flux", "SD3Transformer": "diffusion.ip_adapter_sd3"}


def _unet(backbone: nn.Module) -> nn.Module:
    unet = getattr(backbone, "unet", None)
    if type(backbone).__name__ != "DiffusersUNet" or unet is None:
        raise ValueError(f"{type(backbone).__name__} is not a wrapped diffusers UNet (backbone=sd15_unet, sd21_unet, "
                         "sdxl_unet), whose IP-Adapter is written in diffusers' layout")
    return unet


def _kind(backbone: nn.Module) -> str:
    kind = type(backbone).__name__
    if kind not in KINDS:
        raise ValueError(f"adapter=ip_adapter takes a wrapped diffusers UNet (backbone=sd15_unet, sd21_unet, "
                         f"sdxl_unet), the wrapped FLUX or SD3 transformer (backbone=flux_transformer, "
                         f"sd3_transformer) "
                         f"or our DiT or "
                         f"UNet with text cross-attention, not {kind}")
    return kind


class ImageProjection(nn.Module):
    """An image embedding (B, D) -> ``num_tokens`` tokens (B, num_tokens, width): a linear layer, then
    LayerNorm over each token (diffusers' ImageProjection, for our DiT)."""

    def __init__(self, embed_dim: int, width: int, num_tokens: int = NUM_TOKENS) -> None:
        super().__init__()
        self.embed_dim, self.num_tokens = embed_dim, num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * width)
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, N, D) image embeddings -> (B, N, num_tokens, width)."""
        return self.norm(self.proj(embeds.to(self.proj.weight.dtype)).unflatten(-1, (self.num_tokens, -1)))


def cross_attention_processors(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, processor) of the UNet's cross-attention layers, in the order diffusers numbers them
    (``attn_processors``; the i-th is key ``2 i + 1`` of a released file)."""
    return [(name, proc) for name, proc in unet.attn_processors.items()
            if not name.endswith("attn1.processor") and "motion_modules" not in name]


def has_ip_adapter(unet: nn.Module) -> bool:
    return unet.config.encoder_hid_dim_type == "ip_image_proj" and unet.encoder_hid_proj is not None


def image_embed_dim(unet: nn.Module) -> int | None:
    """The width of the image embeddings the UNet's IP-Adapter takes; None without one."""
    if not has_ip_adapter(unet):
        return None
    return int(unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features)


def check_embed_dim(embed_dim: int) -> None:
    if embed_dim < 1:
        raise ValueError(f"adapter.image_embed_dim={embed_dim}: the image encoder's embedding width must be >= 1")


def projection_layout(proj: nn.Linear, norm: nn.LayerNorm) -> dict[str, Tensor]:
    """The image projection (diffusers' ImageProjection: a linear map to the tokens, LayerNorm) as released
    files hold it: ``proj.*``, ``norm.*``."""
    return {"proj.weight": proj.weight, "proj.bias": proj.bias, "norm.weight": norm.weight, "norm.bias": norm.bias}


def released(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors as a released file stores them: detached, float32, on the CPU, contiguous."""
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def initial_state_dict(unet: nn.Module, embed_dim: int) -> dict[str, dict[str, Tensor]]:
    """A new IP-Adapter for ``unet`` in a released file's layout: the projection as nn.Linear and
    nn.LayerNorm initialise (from the global RNG), ``to_k_ip`` / ``to_v_ip`` copies of each
    cross-attention layer's ``to_k`` / ``to_v``."""
    width = int(unet.config.cross_attention_dim)
    image_proj = {k: v.detach() for k, v in projection_layout(nn.Linear(embed_dim, NUM_TOKENS * width),
                                                               nn.LayerNorm(width)).items()}
    layers: dict[str, Tensor] = {}
    for i, (name, _) in enumerate(cross_attention_processors(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.to_k.bias is not None or attn.to_v.bias is not None:
            raise ValueError(f"{name}: its to_k / to_v have a bias, which IP-Adapter's to_k_ip / to_v_ip lack")
        layers[f"{2 * i + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().clone().float()
        layers[f"{2 * i + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().clone().float()
    if not layers:
        raise ValueError("adapter=ip_adapter: the UNet has no cross-attention layer to add image tokens to")
    return {"image_proj": image_proj, "ip_adapter": layers}


def add_ip_adapter(unet: nn.Module, embed_dim: int, state: dict[str, dict[str, Tensor]] | None = None) -> None:
    """Put an IP-Adapter into ``unet`` (in place): ``state`` (a released file's layout), or a new one
    (:func:`initial_state_dict`). Its scale starts at 1."""
    if unet.config.encoder_hid_dim_type is not None:
        raise ValueError(f"the UNet has encoder_hid_dim_type={unet.config.encoder_hid_dim_type!r} already (an "
                         "IP-Adapter or a text projection); adapter=ip_adapter adds one to a plain SD UNet")
    check_embed_dim(embed_dim)
    state = state if state is not None else initial_state_dict(unet, embed_dim)
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)


def ip_adapter_state_dict(unet: nn.Module) -> dict[str, dict[str, Tensor]]:
    """The UNet's IP-Adapter in a released file's layout (what diffusers' loader reads)."""
    if not has_ip_adapter(unet):
        raise ValueError("the UNet carries no IP-Adapter (adapter=ip_adapter)")
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    layers = {}
    for i, (_, proc) in enumerate(cross_attention_processors(unet)):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        layers[f"{2 * i + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {"image_proj": released(projection_layout(projection.image_embeds, projection.norm)),
            "ip_adapter": released(layers)}


def save_ip_adapter(backbone: nn.Module, directory: str | Path) -> list[Path]:
    """``ip_adapter.safetensors`` (keys ``image_proj.*`` and ``ip_adapter.*``) and ``ip_adapter.bin`` (the
    nested dict, as h94/IP-Adapter's ``.bin`` files) of a DiffusersUNet's, a FluxTransformer's
    (diffusion.ip_adapter_flux: XLabs' layout) or an SD3Transformer's IP-Adapter (diffusion.ip_adapter_sd3:
    InstantX's); diffusers reads either with ``pipeline.load_ip_adapter(directory, subfolder="",
    weight_name=...)`` (a FluxPipeline's with ``image_encoder_pretrained_model_name_or_path=None``, a
    StableDiffusion3Pipeline's with ``image_encoder_folder=None``, when the pipeline has its image encoder)."""
    from safetensors.torch import save_file

    mmdit = _mmdit(backbone)
    if mmdit is not None:
        state = mmdit.ip_adapter_state_dict(mmdit.transformer_of(backbone))
    else:
        state = ip_adapter_state_dict(_unet(backbone))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{key}": value for part, values in state.items() for key, value in values.items()}
    safetensors, binary = directory / WEIGHT_NAMES[0], directory / WEIGHT_NAMES[1]
    save_file(flat, safetensors)
    torch.save(state, binary)
    return [safetensors, binary]


def without_ip_adapter(backbone: nn.Module) -> nn.Module:
    """A copy of a DiffusersUNet (or FluxTransformer, SD3Transformer) with its IP-Adapter taken out: the
    base (its state_dict has the keys of one built without it), e.g. for a pipeline's ``unet/`` or
    ``transformer/`` next to ``ip_adapter.safetensors``."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    mmdit = _mmdit(backbone)
    if mmdit is not None:
        if not mmdit.has_ip_adapter(mmdit.transformer_of(backbone)):
            raise ValueError(f"the {backbone.family} transformer carries no IP-Adapter (adapter=ip_adapter)")
        model = copy.deepcopy(backbone)
        mmdit.remove_ip_adapter(model.transformer)
        return model
    unet = _unet(backbone)
    if not has_ip_adapter(unet):
        raise ValueError("the UNet carries no IP-Adapter (adapter=ip_adapter)")
    model = copy.deepcopy(backbone)
    model.unet.encoder_hid_proj = None
    model.unet.config.encoder_hid_dim_type = None
    model.unet.set_attn_processor(AttnProcessor2_0())  # what a UNet is built with
    return model


def _mmdit(backbone: nn.Module):
    """The IP-Adapter module of a wrapped FLUX / SD3 transformer (diffusion.ip_adapter_flux / _sd3); None otherwise."""
    import importlib

    name = _MMDIT.get(type(backbone).__name__)
    return None if name is None else importlib.import_module(name)


def _our_cross_attentions(backbone: nn.Module) -> list[nn.Module]:
    """The cross-attentions of our DiT or UNet (diffusion.backbones.layers.Attention)."""
    from diffusion.backbones.layers import Attention

    return [m for m in backbone.modules() if isinstance(m, Attention) and m.is_cross]


def add_our_ip_adapter(backbone: nn.Module, embed_dim: int) -> None:
    """Give our DiT or UNet an IP-Adapter (in place): an :class:`ImageProjection` to the width its
    cross-attentions read (the DiT's blocks', the UNet's token_dim) and, in each, ``ip_kv``, a copy of
    its text ``kv`` (the paper's initialisation)."""
    import copy

    kind = type(backbone).__name__
    attentions = _our_cross_attentions(backbone)
    if not attentions:
        raise ValueError(f"adapter=ip_adapter: this {kind} has no cross-attention (token_dim is null); build it with "
                         "text conditioning, whose cross-attention the image tokens join")
    if backbone.image_projection is not None:
        raise ValueError(f"the {kind} has an IP-Adapter already")
    check_embed_dim(embed_dim)
    backbone.image_projection = ImageProjection(embed_dim, attentions[0].kv.in_features)
    for attn in attentions:
        attn.ip_kv = copy.deepcopy(attn.kv).requires_grad_(True)


def has_any_ip_adapter(backbone: nn.Module) -> bool:
    if type(backbone).__name__ in ("DiT", "UNet"):
        return getattr(backbone, "image_projection", None) is not None
    mmdit = _mmdit(backbone)
    if mmdit is not None:
        return mmdit.has_ip_adapter(backbone.transformer)
    return type(backbone).__name__ == "DiffusersUNet" and has_ip_adapter(backbone.unet)


def set_ip_scale(backbone: nn.Module, scale: float) -> None:
    """The weight of the image attention in every cross-attention layer (1 in training; 0 leaves the
    base model's output), as diffusers' ``pipeline.set_ip_adapter_scale``."""
    if not has_any_ip_adapter(backbone):
        raise ValueError(f"{getattr(backbone, 'name', type(backbone).__name__)} carries no IP-Adapter, so it has no "
                         "ip_scale: train or load one with adapter=ip_adapter")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"ip_scale={scale!r}: give a number (1 as trained, 0 ignores the image prompt)")
    if type(backbone).__name__ in ("DiT", "UNet"):
        for attn in _our_cross_attentions(backbone):
            attn.ip_scale = float(scale)
        return
    mmdit = _mmdit(backbone)
    if mmdit is not None:
        mmdit.set_ip_scale(backbone.transformer, scale)
        return
    for _, proc in cross_attention_processors(backbone.unet):
        proc.scale = [float(scale)] * len(proc.scale)


def is_ip_parameter(name: str) -> bool:
    """Whether a backbone parameter is the IP-Adapter's: the image projection or a new key/value map
    (a DiffusersUNet's or FluxTransformer's to_k_ip / to_v_ip, a DiT's ip_kv)."""
    projections = ("unet.encoder_hid_proj.", "transformer.encoder_hid_proj.", "transformer.image_proj.",
                   "image_projection.")
    maps = (".to_k_ip.", ".to_v_ip.", ".ip_kv.", ".norm_ip.")  # norm_ip: SD3's AdaLayerNorm of the image tokens
    return name.startswith(projections) or any(m in name for m in maps)


class IPAdapter(Adapter):
    """adapter=ip_adapter: the backbone's weights fixed, an IP-Adapter added and trained (the image
    projection, each cross-attention layer's to_k_ip and to_v_ip). ``image_embed_dim``: the width of
    the image encoder's embeddings (its ``embed_dim``: 1024 for IP-Adapter SD 1.5's OpenCLIP ViT-H/14).
    ``scale``: the image attention's weight the backbone starts with (1 as trained; sampling may set
    another with :func:`set_ip_scale`). ``base``: as adapter=lora's. The end of training and export.py
    write :data:`WEIGHT_NAMES` (diffusers' layout) from the EMA backbone of a DiffusersUNet, a
    FluxTransformer or an SD3Transformer. ``resampler``: SD3's time image projection's shape
    (diffusion.ip_adapter_sd3.RESAMPLER: InstantX's hidden_dim 1280, heads 20, num_queries 64,
    timestep_in_dim 320 unless given); an SD3Transformer only."""

    name = "ip_adapter"
    trains_base = False

    def __init__(self, image_embed_dim: int | None = None, scale: float = 1.0, base: str | None = None,
                 base_dtype: str = "float32", resampler: dict[str, int] | None = None) -> None:
        # None: the image encoder's (build_module reads it off image_condition=image_prompt's encoder).
        if image_embed_dim is not None and (not isinstance(image_embed_dim, int) or isinstance(image_embed_dim, bool)
                                            or image_embed_dim < 1):
            raise ValueError(f"adapter.image_embed_dim={image_embed_dim!r}: give the image encoder's embedding width "
                             "(an integer, e.g. 1024 for OpenCLIP ViT-H/14)")
        if _check_base_dtype(base_dtype) != "float32":
            raise ValueError(f"adapter.base_dtype={base_dtype}: adapter=ip_adapter keeps the UNet's base weights "
                             "float32 (diffusers' IP-Adapter attention mixes the base's and the adapter's dtypes); "
                             "use precision=bf16 (autocast) for speed")
        self.image_embed_dim = image_embed_dim
        self.scale = float(scale)
        self.base = base
        self.base_dtype = base_dtype
        self.resampler = dict(resampler) if resampler else {}

    def apply(self, backbone: nn.Module) -> nn.Module:
        if self.image_embed_dim is None:
            raise ValueError("adapter=ip_adapter: image_embed_dim is not set and no image encoder gave it; add "
                             "image_condition=image_prompt (its encoder's embed_dim), or set adapter.image_embed_dim")
        kind = _kind(backbone)
        if self.resampler and kind != "SD3Transformer":
            raise ValueError(f"adapter.resampler={self.resampler}: only SD3's IP-Adapter has a resampler; drop it for "
                             f"{kind}")
        backbone.requires_grad_(False)
        if kind in ("DiT", "UNet"):
            add_our_ip_adapter(backbone, self.image_embed_dim)
        elif kind in _MMDIT:
            mmdit = _mmdit(backbone)
            mmdit.add_ip_adapter(mmdit.transformer_of(backbone), self.image_embed_dim, **self.resampler)
        else:
            add_ip_adapter(_unet(backbone), self.image_embed_dim)
        for name, param in backbone.named_parameters():
            param.requires_grad_(is_ip_parameter(name))
        set_ip_scale(backbone, self.scale)
        return backbone

    def write_outputs(self, module: nn.Module, directory: str | Path) -> list[Path]:
        if type(module.ema.module).__name__ not in ("DiffusersUNet", *_MMDIT):
            return []  # our DiT's and UNet's adapters live in their checkpoints only
        return save_ip_adapter(module.ema.module, directory)
