"""Feature extractors loaded with transformers from a hub id or a local directory: DINOv2 (FD-DINOv2) and
CLIP (CLIP score, CMMD). Same interface as InceptionFeatures: uint8 RGB images in, `name`,
`feature_dims`, `fingerprint()`, `features(images) -> {key: (B, dim) float32}`.

Preprocessing is done in torch on the extractor's device. The resizes are PIL's bicubic resize of
uint8 images (what dgm-eval and OpenAI's CLIP preprocessing run), reproduced in torch to +-1 level
(resize_bicubic), before scaling to [0, 1] and normalising.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.encoders.hf import tokenizer_id
from diffusion.evaluation.extractor import FeatureExtractor, state_dict_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as CLIPImageProcessor has them
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """float 0..255 (B, C, H, W) -> `size` as PIL's bicubic resize of a uint8 image: antialiased (PIL's
    a = -0.5 filter, which torch's antialiased bicubic uses), the width first, then the height, each
    pass rounded half up and clipped to 0..255 as PIL stores it. Equal to PIL but for +-1 on a few pixels
    (PIL's fixed-point weights); a single float pass would differ by up to ~20 levels on sharp edges,
    where the bicubic overshoot is clipped between PIL's passes. Unchanged at the same size."""
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", align_corners=False, antialias=True)
        x = (x + 0.5).floor().clamp(0, 255)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = (x + 0.5).floor().clamp(0, 255)
    return x


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """0..255 -> [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x / 255 - m) / s


class _HubFeatures(FeatureExtractor):
    """Holds the model id, the preprocessing description and the (cached) weights hash."""

    preprocessing: str

    def __init__(self, model: str, precision: str) -> None:
        super().__init__(precision)
        self.model_id = model
        self._weights_sha256: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        if self._weights_sha256 is None:  # hashing ~1 GB of ViT-L weights takes seconds: once
            self._weights_sha256 = state_dict_sha256(self.model)
        return {
            "extractor": self.name,
            "model": self.model_id,
            "weights_sha256": self._weights_sha256,
            "preprocessing": self.preprocessing,
            "precision": self.precision,
        }


class DINOv2Features(_HubFeatures):
    """FD-DINOv2's extractor (Stein et al. 2023, dgm-eval): uint8 RGB (B, 3, H, W) or (B, H, W, 3) ->
    resize to 224x224 as PIL's bicubic (the aspect ratio is not kept: dgm-eval's default transform,
    torchvision's Resize((224, 224), BICUBIC) on a PIL image) -> [0, 1] ->
    ImageNet mean/std -> Dinov2Model -> {"dinov2": the CLS token after the final layernorm (pooler_output)}.

    `model`: a hub id or a local directory; "facebook/dinov2-large" is ViT-L/14, dgm-eval's dinov2_vitl14."""

    def __init__(self, model: str = "facebook/dinov2-large", precision: str = "32", image_size: int = 224,
                 local_files_only: bool = False) -> None:
        super().__init__(model, precision)
        import transformers

        self.model = transformers.Dinov2Model.from_pretrained(model, dtype=torch.float32, local_files_only=local_files_only)
        self.model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.name = f"dinov2:{model}"
        self.feature_dims = {"dinov2": int(self.model.config.hidden_size)}
        self.preprocessing = (
            f"uint8 RGB -> resize {self.image_size}x{self.image_size} bicubic (PIL's, uint8) -> /255 "
            f"-> ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD}"
        )

    def preprocess(self, images: Any) -> Tensor:
        """uint8 images -> the model's pixel_values (B, 3, image_size, image_size) float32."""
        x = resize_bicubic(self._images(images), (self.image_size, self.image_size))
        return normalise(x, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, images: Any) -> dict[str, Tensor]:
        pixels = self.preprocess(images)
        with self._network_precision():
            cls = self.model(pixel_values=pixels).pooler_output
        return {"dinov2": cls.float()}


class CLIPFeatures(_HubFeatures):
    """CLIP image and text embeddings, L2-normalised: for CLIP score and CMMD.

    Images: uint8 RGB -> shortest side resized to the vision tower's image_size (PIL's bicubic;
    the long side int(size * long / short), as CLIPImageProcessor) -> centre crop -> [0, 1] ->
    CLIP mean/std -> {"clip": image embeds}. Text: `text_features(prompts)`, truncated to the tokenizer's
    maximum length (77 for OpenAI's). CMMD's paper (Jayasumana et al. 2024) uses ViT-L/14 at 336 pixels:
    model="openai/clip-vit-large-patch14-336"."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", precision: str = "32",
                 local_files_only: bool = False) -> None:
        super().__init__(model, precision)
        import transformers

        self.model = transformers.CLIPModel.from_pretrained(model, dtype=torch.float32, local_files_only=local_files_only)
        self.model.eval().requires_grad_(False)
        # AutoTokenizer: CLIP's own BPE tokenizer for OpenAI's checkpoints, whatever a directory saved otherwise.
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
        config = self.model.config
        self.image_size = int(config.vision_config.image_size)
        self.max_length = min(int(self.tokenizer.model_max_length), int(config.text_config.max_position_embeddings))
        self.name = f"clip:{model}"
        self.feature_dims = {"clip": int(config.projection_dim)}
        self.preprocessing = (
            f"uint8 RGB -> shortest side {self.image_size} bicubic (PIL's, uint8) -> centre crop "
            f"{self.image_size} -> /255 -> CLIP mean {CLIP_MEAN} std {CLIP_STD}; text truncated to {self.max_length} tokens"
        )

    def preprocess(self, images: Any) -> Tensor:
        """uint8 images -> the model's pixel_values (B, 3, image_size, image_size) float32."""
        x = self._images(images)
        h, w = x.shape[-2:]
        s = self.image_size
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(s * long / short)
        x = resize_bicubic(x, (s, new_long) if h <= w else (new_long, s))
        top, left = int((x.shape[-2] - s) / 2), int((x.shape[-1] - s) / 2)
        x = x[..., top:top + s, left:left + s]
        return normalise(x, CLIP_MEAN, CLIP_STD)

    def forward(self, images: Any) -> dict[str, Tensor]:
        pixels = self.preprocess(images)
        with self._network_precision():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            embeds = self.model.visual_projection(pooled)
        return {"clip": F.normalize(embeds.float(), dim=-1)}

    @torch.inference_mode()
    def text_features(self, prompts: list[str]) -> Tensor:
        """(len(prompts), projection_dim) float32 L2-normalised text embeddings."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"CLIPFeatures.text_features: prompts must be a non-empty list of str, got {prompts!r:.200}.")
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with self._network_precision():
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            embeds = self.model.text_projection(pooled)
        return F.normalize(embeds.float(), dim=-1)

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "tokenizer": tokenizer_id(self.tokenizer)}
