"""Pose skeletons from a transformers ViTPose model (``VitPoseForPoseEstimation`` with its
``VitPoseImageProcessor``, a hub id or a local directory): ControlNet's openpose condition.

ViTPose is top-down: it finds the 17 COCO keypoints of one person inside a given box. A
conditioning image is made of a training crop, which is not a detection, so the box is the whole
crop (``[0, 0, width, height]``, COCO's x, y, w, h; the processor pads it by 1.25 as it does any
box): one person per image, the crop framing them. Crops of several people get one skeleton.
The keypoints are the processor's ``post_process_pose_estimation`` of the model's heatmaps, in
pixels of the crop. A mixture-of-experts ViTPose++ is run with its COCO head (dataset index 0).

The image is drawn as OpenPose draws bodies (controlnet_aux's ``draw_bodypose``, which the
diffusers ControlNet openpose checkpoints were trained on): the COCO keypoints in OpenPose's 18-point
order, the neck being the shoulders' midpoint; each limb an ellipse 8 pixels wide in 0.6 of its
colour, then each joint a disc of radius 4 in its colour, on black, at the crop's size. Keypoints
scoring below ``threshold`` (default 0.3) are left out, and so are the limbs they end.

The model is frozen, in eval mode, on the CPU and loaded once per process, as the depth estimator
(diffusion.data.depth); :func:`pose_identity` gives the sha256 of its weights for fingerprints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion.data.estimators import PretrainedEstimator

DEFAULT_POSE_MODEL = "usyd-community/vitpose-base-simple"
DEFAULT_THRESHOLD = 0.3
NUM_KEYPOINTS = 17  # COCO's: nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles (left before right)
# OpenPose's 18 body points as COCO indices; None is the neck, the midpoint of the shoulders (5, 6).
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose's limbs between its points, and its colours: limb i is drawn in COLOURS[i], point j in COLOURS[j].
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
LIMB_WIDTH = 4  # half-width of a limb's ellipse, pixels
JOINT_RADIUS = 4


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a float in [0, 1]; anything else is an error naming the option."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"pose annotator: threshold must be a number between 0 and 1 (keypoints scoring below it "
                         f"are not drawn), got {threshold!r}")
    return float(threshold)


def openpose_points(keypoints: np.ndarray, scores: np.ndarray, threshold: float) -> list[tuple[float, float] | None]:
    """COCO (17, 2) keypoints and (17,) scores -> OpenPose's 18 points, None where left out."""
    kept = [tuple(map(float, xy)) if s >= threshold else None for xy, s in zip(keypoints, scores)]
    points = []
    for coco in OPENPOSE_FROM_COCO:
        if coco is not None:
            points.append(kept[coco])
        elif kept[5] is not None and kept[6] is not None:
            points.append(((kept[5][0] + kept[6][0]) / 2, (kept[5][1] + kept[6][1]) / 2))
        else:
            points.append(None)
    return points


def draw_pose(keypoints: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor, size: tuple[int, int],
              threshold: float = DEFAULT_THRESHOLD) -> Image.Image:
    """The OpenPose-style skeleton of COCO ``keypoints`` (17, 2), x then y in pixels, with their
    ``scores`` (17,), on a black RGB image of ``size`` (width, height)."""
    keypoints, scores = np.asarray(keypoints, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if keypoints.shape != (NUM_KEYPOINTS, 2) or scores.shape != (NUM_KEYPOINTS,):
        raise ValueError(f"draw_pose takes COCO's {NUM_KEYPOINTS} keypoints (17, 2) and scores (17,), got "
                         f"{keypoints.shape} and {scores.shape}")
    points = openpose_points(keypoints, scores, check_threshold(threshold))
    canvas = Image.new("RGB", size)
    draw = ImageDraw.Draw(canvas)
    angles = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    for (a, b), colour in zip(LIMBS, COLOURS):
        if points[a] is None or points[b] is None:
            continue
        (xa, ya), (xb, yb) = points[a], points[b]
        half_length, direction = math.hypot(xb - xa, yb - ya) / 2, math.atan2(yb - ya, xb - xa)
        u, v = half_length * np.cos(angles), LIMB_WIDTH * np.sin(angles)  # the ellipse along the limb, then rotated
        xs = (xa + xb) / 2 + u * math.cos(direction) - v * math.sin(direction)
        ys = (ya + yb) / 2 + u * math.sin(direction) + v * math.cos(direction)
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=tuple(int(c * 0.6) for c in colour))
    for point, colour in zip(points, COLOURS):  # joints over limbs: a joint's pixel is its colour
        if point is not None:
            x, y = round(point[0]), round(point[1])
            draw.ellipse((x - JOINT_RADIUS, y - JOINT_RADIUS, x + JOINT_RADIUS, y + JOINT_RADIUS), fill=colour)
    return canvas


class PoseEstimator(PretrainedEstimator):
    """``model``: a hub id or a local directory holding a ViTPose model and its image processor (as
    ``save_pretrained`` writes them). Calling it maps a PIL image to its skeleton image, of its size."""

    annotator, holding, model_class = "pose", "a ViTPose model", "VitPoseForPoseEstimation"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.experts = getattr(self.config.backbone_config, "num_experts", 1)

    def check_config(self, model: str, config: Any) -> None:
        if config.model_type != "vitpose":
            raise ValueError(f"pose annotator: {model!r} is a {config.model_type!r} model, not a pose estimator; give a "
                             "ViTPose model (model_type 'vitpose', VitPoseForPoseEstimation), e.g. "
                             f"{DEFAULT_POSE_MODEL}")
        if config.num_labels != NUM_KEYPOINTS:
            raise ValueError(f"pose annotator: {model!r} predicts {config.num_labels} keypoints, not COCO's "
                             f"{NUM_KEYPOINTS} that the OpenPose skeleton is drawn from; give a COCO ViTPose model")

    @torch.inference_mode()
    def keypoints(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """The (17, 2) keypoints (x, y pixels) and (17,) scores of the one person boxed by the whole image."""
        boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]
        inputs = self.processor(images=image, boxes=boxes, return_tensors="pt").to(torch.float32)
        if self.experts > 1:  # ViTPose++: its first expert head is COCO's
            inputs["dataset_index"] = torch.zeros(1, dtype=torch.long)
        pose = self.processor.post_process_pose_estimation(self.model(**inputs), boxes=boxes)[0][0]
        return pose["keypoints"], pose["scores"]

    def __call__(self, image: Image.Image, threshold: float = DEFAULT_THRESHOLD) -> Image.Image:
        threshold = check_threshold(threshold)
        rgb = image.convert("RGB")
        keypoints, scores = self.keypoints(rgb)
        return draw_pose(keypoints.numpy(), scores.numpy(), rgb.size, threshold)


def pose_estimator(model: str = DEFAULT_POSE_MODEL) -> PoseEstimator:
    """The process's estimator of ``model``, loaded at the first call."""
    return PoseEstimator.loaded(model)


def pose_identity(model: str = DEFAULT_POSE_MODEL) -> dict[str, Any]:
    """What a pose image depends on beyond its threshold: the model as given and the sha256 of its
    weights and processor."""
    return PoseEstimator.identity(model)
