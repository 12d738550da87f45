"""Depth maps from a transformers depth estimator (DPT / MiDaS, Depth Anything, ... : any model
``AutoModelForDepthEstimation`` loads, with its ``AutoImageProcessor``): ControlNet's depth condition.

The map is the ``depth`` image of transformers' ``pipeline("depth-estimation")``, which diffusers'
ControlNet depth examples stack into three channels: the image processor's input, the model's
``predicted_depth`` resized to the image's size by the processor's post-processing (bicubic for DPT
and Depth Anything), min-max normalised per image and scaled to 0..255, truncated to uint8. A
constant prediction (the pipeline would divide by zero) gives a black map.

The model is frozen, in eval mode, on the CPU (DataLoader workers cannot use CUDA after a fork) and
loaded once per process, lazily: the data module loads it when it is built (so a bad model fails at
setup), a forked worker inherits it, a spawned worker loads it at its first sample. Its identity
(the model as given, the sha256 of its weights and of its image processor's settings) is
:func:`depth_identity`, for fingerprints: caches see a change of weights behind the same name.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion.frozen import weights_sha256

DEFAULT_DEPTH_MODEL = "Intel/dpt-hybrid-midas"  # diffusers' ControlNet depth examples' estimator
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"
_LOADED: dict[str, "DepthEstimator"] = {}  # one estimator per model and process


def model_location(model: str, annotator: str, holding: str) -> str:
    """Where transformers loads ``model`` from: a local directory, else a hub id; a path that is no
    directory (and no hub id) is an error naming the ``annotator`` option and what it should hold."""
    local = Path(model).expanduser()
    if not local.is_dir() and (local.exists() or not _HUB_ID.match(model)):
        raise FileNotFoundError(f"{annotator} annotator: model directory {model} does not exist (or is not a "
                                "directory); set data.module.annotator_options.model to a hub id or to a directory "
                                f"holding {holding} and its image processor (save_pretrained)")
    return str(local) if local.is_dir() else model


def process_key(model: str) -> str:
    """The key of a model in a process's table of loaded ones: a directory however written, or the id."""
    local = Path(str(model)).expanduser()
    return str(local.resolve()) if local.is_dir() else str(model)


class DepthEstimator:
    """``model``: a hub id or a local directory holding a depth model and its image processor (as
    ``save_pretrained`` writes them). Calling it maps a PIL image to its RGB depth map, of its size."""

    def __init__(self, model: str) -> None:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

        self.name = model = str(model)
        where = model_location(model, "depth", "a depth model")
        try:
            config = transformers.AutoConfig.from_pretrained(where)
        except OSError as e:
            raise OSError(f"depth annotator: cannot load the model {model!r} ({e}); give a hub id reachable or in the "
                          "local cache, or a directory holding a depth model and its image processor") from e
        if config.model_type not in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES:
            raise ValueError(f"depth annotator: {model!r} is a {config.model_type!r} model, not a depth estimator; give "
                             "a model that transformers' AutoModelForDepthEstimation loads ("
                             f"{', '.join(sorted(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES))})")
        self.model = transformers.AutoModelForDepthEstimation.from_pretrained(where, dtype=torch.float32)
        self.model.requires_grad_(False).eval()
        try:
            self.processor = transformers.AutoImageProcessor.from_pretrained(where)
        except OSError as e:
            raise OSError(f"depth annotator: {model!r} has no image processor ({e}); save the model's image processor "
                          "beside it (preprocessor_config.json)") from e
        settings = json.dumps(self.processor.to_dict(), sort_keys=True, default=str).encode()
        self.hashes = {"weights_sha256": weights_sha256(self.model),
                       "processor_sha256": hashlib.sha256(settings).hexdigest()}

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
    key = process_key(model)
    if key not in _LOADED:
        _LOADED[key] = DepthEstimator(model)
    return _LOADED[key]


def depth_identity(model: str = DEFAULT_DEPTH_MODEL) -> dict[str, Any]:
    """What a depth map depends on: the model as given and the sha256 of its weights and processor."""
    return {"model": str(model), **depth_estimator(model).hashes}
