"""Frozen image encoders for image prompts (IP-Adapter, Ye et al. 2023): images -> (B, N, D) embeddings.

``CLIPImageEncoder`` is Hugging Face's ``CLIPVisionModelWithProjection``, what diffusers' IP-Adapter
pipelines run as ``image_encoder``: its ``image_embeds`` (the projected CLS state, (B, D)) is what the
IP-Adapter's image projection reads, here as one token (B, 1, D). Our images ([-1, 1], any size)
are preprocessed in torch as ``CLIPImageProcessor`` does (the processor diffusers' pipelines feed the
encoder with): the shortest side resized to ``size`` (bicubic, antialiased, its width and height
passes clamped to the pixel range as the processor's 8-bit resize clamps them), a centre crop of
``crop_size``, and CLIP's mean and std; on an 8-bit image it equals the processor's up to the
rounding to 8 bits after resizing.

``OpenCLIPImageEncoder`` is open_clip's image tower: ``model.encode_image`` (the projected pooled state,
unnormalised, as CLIPVisionModelWithProjection's ``image_embeds``), preprocessed as open_clip's own
evaluation transform (torchvision's shortest-side ``Resize``, ``CenterCrop``, the model's mean and std).

``SiglipImageEncoder`` is SigLIP's vision tower as StableDiffusion3Pipeline runs it for its IP-Adapter:
the penultimate hidden states of all patches (B, N, D).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion._checks import check_choice
from diffusion.frozen import FrozenModule, weights_sha256

#: OpenAI CLIP's pixel statistics (CLIPImageProcessor's image_mean and image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImageEncoder(FrozenModule):
    """What every image encoder shares: ``forward(images (B, 3, H, W) in [-1, 1]) -> (B, num_tokens,
    embed_dim)`` float32, as ``_embed(preprocess(images))`` in the weights' dtype without gradients;
    zeros as the null prompt; a fingerprint naming the weights and the preprocessing
    (:meth:`_preprocessing`)."""

    embed_dim: int
    num_tokens: int
    source: str

    def check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images of shape (B, 3, H, W) in [-1, 1], got "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects float images in [-1, 1], got dtype {images.dtype} "
                             "(uint8 pixels: divide by 127.5 and subtract 1)")

    def preprocess(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _embed(self, pixels: Tensor) -> Tensor:
        """(B, 3, h, w) preprocessed pixels in the weights' dtype -> (B, num_tokens, embed_dim)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            pixels = self.preprocess(images.to(self.device))
            embeds = self._embed(pixels.to(self.dtype))
        return embeds.float()

    def null_embeds(self, batch_size: int = 1) -> Tensor:
        """The null image prompt: zeros (B, num_tokens, embed_dim), the image embeddings diffusers' pipelines
        take for the unconditional branch of an IP-Adapter."""
        return torch.zeros(batch_size, self.num_tokens, self.embed_dim, device=self.device)

    def _preprocessing(self) -> dict[str, str]:
        """The preprocessing's settings that change the embeddings (sizes), for the fingerprint."""
        return {"size": str(self.size)}

    def fingerprint(self) -> dict[str, str]:
        """What determines the embeddings, e.g. to check that cached image embeddings match this encoder."""
        return {
            "class": type(self).__name__,
            "source": self.source,
            "sha256": weights_sha256(self),
            "dtype": str(self.dtype).removeprefix("torch."),
            **self._preprocessing(),
            "embed_dim": str(self.embed_dim),
            "num_tokens": str(self.num_tokens),
        }


def _hf_vision_model(owner: str, model_class: str, config_class: str, pretrained: str | None, subfolder: str | None,
                     config: Mapping[str, Any] | None, dtype: str) -> tuple[Any, str]:
    """(a transformers ``model_class`` from ``pretrained`` or, randomly initialised, from ``config``
    arguments of ``config_class``, in ``dtype``; its source)."""
    import transformers

    check_choice("image_encoder.dtype", dtype, tuple(DTYPES))
    if (pretrained is None) == (config is None):
        raise ValueError(f"{owner} needs exactly one of pretrained (a hub id or a directory of a "
                         f"{model_class}) and config ({config_class} arguments), got "
                         f"pretrained={pretrained!r} and config={'a dict' if config is not None else None}")
    if pretrained is not None:
        sub = {} if subfolder is None else {"subfolder": subfolder}
        model = getattr(transformers, model_class).from_pretrained(pretrained, dtype=DTYPES[dtype], **sub)
        return model, pretrained if subfolder is None else f"{pretrained}/{subfolder}"
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**dict(config)))
    return model.to(DTYPES[dtype]), "config"


class CLIPImageEncoder(ImageEncoder):
    """forward(images (B, 3, H, W) in [-1, 1]) -> image_embeds (B, 1, embed_dim), float32.

    Args:
        pretrained: a hub id or local directory of a ``CLIPVisionModelWithProjection`` (e.g.
            h94/IP-Adapter with ``subfolder="models/image_encoder"``, ViT-H/14 for SD 1.5's
            ip-adapter_sd15). Exactly one of ``pretrained`` and ``config``.
        subfolder: where the encoder lies in the repository.
        config: ``CLIPVisionConfig`` arguments, for a randomly initialised encoder (tests).
        size: the shortest side the image is resized to; None: the model's ``image_size`` (224).
        crop_size: the side of the centre crop; None: the model's ``image_size``.
        dtype: what the frozen weights are stored in; the embeddings come out float32.
    """

    num_tokens = 1

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        config: Mapping[str, Any] | None = None,
        size: int | None = None,
        crop_size: int | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.model, self.source = _hf_vision_model("CLIPImageEncoder", "CLIPVisionModelWithProjection",
                                                   "CLIPVisionConfig", pretrained, subfolder, config, dtype)
        image_size = int(self.model.config.image_size)
        self.size = int(size) if size is not None else image_size
        self.crop_size = int(crop_size) if crop_size is not None else image_size
        if not 1 <= self.crop_size <= self.size:
            raise ValueError(f"CLIPImageEncoder: crop_size={self.crop_size} must lie in [1, size={self.size}] (the "
                             "crop is taken from the image resized to that shortest side)")
        self.embed_dim = int(self.model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIPImageProcessor's pixel_values of images in [-1, 1]: (B, 3, crop_size, crop_size), float32."""
        self.check_images(images)
        x = _resize_shortest((images.float() + 1) / 2, self.size, "bicubic")
        top, left = (int((n - self.crop_size) / 2.0) for n in x.shape[-2:])
        x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean) / self.std

    def _embed(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).image_embeds.unsqueeze(1)  # one token: the projected CLS state

    def _preprocessing(self) -> dict[str, str]:
        return {"size": str(self.size), "crop_size": str(self.crop_size)}


class OpenCLIPImageEncoder(CLIPImageEncoder):
    """forward(images (B, 3, H, W) in [-1, 1]) -> ``model.encode_image`` (B, 1, embed_dim), float32.

    The image tower alone is kept (the text tower is dropped after loading). Preprocessing follows the
    model's ``preprocess_cfg`` (its size, mean, std and interpolation), as open_clip's evaluation
    transform on a PIL image: on an 8-bit image it equals it up to the rounding to 8 bits after resizing.

    Args:
        model_name: an open_clip model name ("ViT-H-14"), or "hf-hub:org/repo" (then ``pretrained`` None).
        pretrained: a pretrained tag of ``model_name`` ("laion2b_s32b_b79k"), a local checkpoint file,
            or None (the hf-hub form; random weights with ``model_config``).
        model_config: an open_clip model config (embed_dim, vision_cfg, text_cfg), registered under a
            name of its content (as OpenCLIPTextEncoder's), for a custom or tiny random model (tests).
        dtype: what the frozen weights are stored in; the embeddings come out float32.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        dtype: str = "float32",
    ) -> None:
        FrozenModule.__init__(self)
        import open_clip

        from diffusion.encoders.openclip import _register

        check_choice("image_encoder.dtype", dtype, tuple(DTYPES))
        name = model_name if model_config is None else _register(model_name, model_config, "OpenCLIPImageEncoder")
        model = open_clip.create_model(name, pretrained=pretrained)
        visual = getattr(model, "visual", None)
        if visual is None or not isinstance(getattr(visual, "output_dim", None), int):
            raise ValueError(f"OpenCLIPImageEncoder expects an open_clip model with an image tower (.visual with "
                             f"output_dim), got {model_name!r} ({type(model).__name__})")
        cfg = dict(open_clip.get_model_preprocess_cfg(model))
        size = cfg.get("size", visual.image_size)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        resize_mode, interpolation = cfg.get("resize_mode") or "shortest", cfg.get("interpolation") or "bicubic"
        if size[0] != size[1] or resize_mode != "shortest" or interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"OpenCLIPImageEncoder supports square inputs resized by their shortest side, bicubic "
                             f"or bilinear; {model_name!r} preprocesses with size={size}, resize_mode={resize_mode!r}, "
                             f"interpolation={interpolation!r}")
        self.model = visual.to(DTYPES[dtype])  # encode_image is visual(pixels), unnormalised
        self.size = self.crop_size = int(size[0])
        self.interpolation = interpolation
        self.embed_dim = int(visual.output_dim)
        if model_config is None:
            self.source = model_name if pretrained is None else f"{model_name}:{pretrained}"
        else:
            self.source = "config" if pretrained is None else f"config:{pretrained}"
        mean, std = cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """open_clip's evaluation transform of images in [-1, 1]: (B, 3, size, size), float32."""
        self.check_images(images)
        x = _resize_shortest((images.float() + 1) / 2, self.size, self.interpolation)
        # torchvision's CenterCrop rounds the offsets (CLIPImageProcessor truncates them).
        top, left = (int(round((n - self.crop_size) / 2.0)) for n in x.shape[-2:])
        x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        return (x - self.mean) / self.std

    def _embed(self, pixels: Tensor) -> Tensor:
        return self.model(pixels).unsqueeze(1)

    def fingerprint(self) -> dict[str, str]:
        return {**super().fingerprint(), "interpolation": self.interpolation}


def _resize_shortest(x: Tensor, size: int, mode: str) -> Tensor:
    """x (B, 3, H, W) in [0, 1] with its shortest side resized to ``size``, the longest truncated as
    torchvision's ``Resize(size)`` and CLIPImageProcessor truncate it, as their 8-bit resize (PIL's, and
    torchvision's on uint8) does it."""
    h, w = x.shape[-2:]
    return _resize_8bit(x, (size, int(size * w / h)) if h <= w else (int(size * h / w), size), mode)


def _resize_8bit(x: Tensor, hw: tuple[int, int], mode: str) -> Tensor:
    """x (B, 3, H, W) in [0, 1] resized to ``hw`` as an 8-bit resize does it: the width pass, then the
    height pass, each result clamped to the pixel range (8-bit pixels are stored between the passes)."""
    for shape in ((x.shape[-2], hw[1]), hw):
        x = F.interpolate(x, size=shape, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    return x


#: SigLIP's pixel statistics (SiglipImageProcessor's image_mean and image_std).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class SiglipImageEncoder(ImageEncoder):
    """forward(images (B, 3, H, W) in [-1, 1]) -> the penultimate hidden states (B, patches, embed_dim), float32.

    What StableDiffusion3Pipeline's ``encode_image`` gives its IP-Adapter (InstantX's SD3.5-Large, whose
    time-conditioned resampler reads every patch token): ``SiglipVisionModel(pixels,
    output_hidden_states=True).hidden_states[-2]``. Preprocessed in torch as ``SiglipImageProcessor``
    does: resized to ``size`` x ``size`` (bicubic, antialiased, each pass clamped to the pixel range as
    its 8-bit resize), rescaled to [0, 1], normalised with mean = std = 0.5 (no crop).

    Args:
        pretrained: a hub id or local directory of a ``SiglipVisionModel`` (google/siglip-so400m-patch14-384,
            as diffusers' SD3 IP-Adapter docs; a full SigLIP checkpoint loads its vision tower). Exactly
            one of ``pretrained`` and ``config``.
        subfolder: where the encoder lies in the repository.
        config: ``SiglipVisionConfig`` arguments, for a randomly initialised encoder (tests).
        size: the side the image is resized to; None: the model's ``image_size`` (384).
        dtype: what the frozen weights are stored in; the embeddings come out float32.
    """

    def __init__(
        self,
        pretrained: str | None = "google/siglip-so400m-patch14-384",
        subfolder: str | None = None,
        config: Mapping[str, Any] | None = None,
        size: int | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.model, self.source = _hf_vision_model("SiglipImageEncoder", "SiglipVisionModel", "SiglipVisionConfig",
                                                   pretrained, subfolder, config, dtype)
        c = self.model.config
        if c.num_hidden_layers < 2:
            raise ValueError(f"SiglipImageEncoder: the model has {c.num_hidden_layers} layer(s); its output is the "
                             "penultimate hidden state, which needs at least 2")
        self.size = int(size) if size is not None else int(c.image_size)
        if self.size % int(c.patch_size):
            raise ValueError(f"SiglipImageEncoder: size={self.size} is not a multiple of the patch size {c.patch_size}")
        self.embed_dim = int(c.hidden_size)
        self.num_tokens = (self.size // int(c.patch_size)) ** 2
        self.register_buffer("mean", torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SIGLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """SiglipImageProcessor's pixel_values of images in [-1, 1]: (B, 3, size, size), float32."""
        self.check_images(images)
        x = _resize_8bit((images.float() + 1) / 2, (self.size, self.size), "bicubic")
        return (x - self.mean) / self.std

    def _embed(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
