"""Depth maps from a transformers depth estimator (DPT / MiDaS, Depth Anything, ... : any model
``AutoModelForDepthEstimation`` loads, with its ``AutoImageProcessor``): ControlNet's depth condition.

The map is the ``depth`` image of transformers' ``pipeline("depth-estimation")``, which diffusers'
ControlNet depth examples stack into three channels: the image processor's input, the model's
``predicted_depth`` resized to the image's size by the processor's post-processing (bicubic for DPT
and Depth Anything), min-max normalised per image and scaled to 0..255, truncated to uint8. A
constant prediction (the pipeline would divide by zero) gives a black map.

The model is loaded as every weighted annotator's (diffusion.data.estimators): frozen, on the CPU,
once per process, lazily: the data module loads it when it is built (so a bad model fails at setup),
a forked worker inherits it, a spawned worker loads it at its first sample. Its identity for
fingerprints is :func:`depth_identity`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion.data.estimators import PretrainedEstimator

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"  # diffusers' ControlNet depth examples' estimator


class DepthEstimator(PretrainedEstimator):
    """``model``: a hub id or a local directory holding a depth model and its image processor (as
    ``save_pretrained`` writes them). Calling it maps a PIL image to its RGB depth map, of its size."""

    annotator, holding, model_class = "depth", "a depth model", "AutoModelForDepthEstimation"

    def check_config(self, model: str, config: Any) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES:
            raise ValueError(f"depth annotator: {model!r} is a {config.model_type!r} model, not a depth estimator; give "
                             "a model that transformers' AutoModelForDepthEstimation loads ("
                             f"{', '.join(sorted(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES))})")

    @torch.inference_mode()
    def predicted_depth(self, image: Image.Image) -> torch.Tensor:
        """The model's depth of ``image`` (RGB), resized to its (H, W) by the processor's post-processing."""
        inputs = self.processor(images=image, return_tensors="pt").to(torch.float32)
        outputs = self.model(**inputs)
        # Passed positionally as the pipeline does: ZoeDepth reads it as source sizes, the others as targets.
        return self.processor.post_process_depth_estimation(outputs, [(image.height, image.width)])[0]["predicted_depth"]

    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        depth = self.predicted_depth(rgb).float().cpu().numpy()
        low, high = depth.min(), depth.max()
        if high > low:  # the pipeline's order of operations, so that the uint8 values agree exactly
            depth = ((depth - low) / (high - low) * 255).astype(np.uint8)
        else:
            depth = np.zeros(depth.shape, dtype=np.uint8)
        return Image.fromarray(np.repeat(depth[..., None], 3, axis=2))


def depth_estimator(model: str = DEFAULT_DEPTH_MODEL) -> DepthEstimator:
    """The process's estimator of ``model``, loaded at the first call."""
    return DepthEstimator.loaded(model)


def depth_identity(model: str = DEFAULT_DEPTH_MODEL) -> dict[str, Any]:
    """What a depth map depends on: the model as given and the sha256 of its weights and processor."""
    return DepthEstimator.identity(model)
