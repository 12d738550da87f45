"""The pose annotator: ViTPose (a tiny random VitPoseForPoseEstimation saved with save_pretrained,
with its processor, in a local directory) on the whole image as one box; the keypoints equal
transformers' own ``post_process_pose_estimation`` of the model's output for that box; the drawing
puts OpenPose's joint colours at the keypoint pixels, 0.6 of the limb colours along the limbs and
nothing for keypoints below the threshold; the image-folder data annotating the training crop; the
weights in the fingerprint; clear errors. Nothing downloads (the network is refused)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.annotators import annotate, annotator_identity
from diffusion.data.batching import EpochIndex
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.images import to_tensor
from diffusion.data.pose import COLOURS, draw_pose, pose_estimator
from tests.make_captioned_folder import make_captioned_folder
from tests.tiny_encoders import no_network  # noqa: F401  (autouse: refuses internet connections)

transformers = pytest.importorskip("transformers")


def _save_vitpose(directory: Path, seed: int = 0, num_labels: int = 17) -> Path:
    torch.manual_seed(seed)
    backbone = transformers.VitPoseBackboneConfig(image_size=[32, 24], patch_size=[8, 8], hidden_size=32,
                                                  num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                                  out_indices=[2])
    config = transformers.VitPoseConfig(backbone_config=backbone, scale_factor=4, num_labels=num_labels)
    transformers.VitPoseForPoseEstimation(config).save_pretrained(directory)
    transformers.VitPoseImageProcessor(size={"height": 32, "width": 24}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vitpose_dir(tmp_path_factory) -> Path:
    return _save_vitpose(tmp_path_factory.mktemp("vitpose"))


def _photo(height: int = 30, width: int = 22, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3)).astype(np.uint8))


def test_keypoints_equal_transformers_post_processing_of_the_whole_image_box(vitpose_dir):
    image = _photo()
    boxes = [[[0.0, 0.0, 22.0, 30.0]]]  # COCO x, y, w, h: the whole image
    processor = transformers.VitPoseImageProcessor.from_pretrained(vitpose_dir)
    model = transformers.VitPoseForPoseEstimation.from_pretrained(vitpose_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, boxes=boxes, return_tensors="pt"))
    reference = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]

    keypoints, scores = pose_estimator(str(vitpose_dir)).keypoints(image)
    assert keypoints.shape == (17, 2) and scores.shape == (17,)
    assert torch.allclose(keypoints, reference["keypoints"], atol=1e-5)
    assert torch.allclose(scores, reference["scores"], atol=1e-6)
    threshold = float(scores.median())  # some keypoints kept, some left out
    ours = annotate(image, "pose", model=str(vitpose_dir), threshold=threshold)
    assert ours.mode == "RGB" and ours.size == image.size
    drawn = draw_pose(reference["keypoints"].numpy(), reference["scores"].numpy(), image.size, threshold)
    assert np.array_equal(np.asarray(ours), np.asarray(drawn))
    assert np.asarray(ours).any()


def test_the_estimator_is_loaded_once_per_process_frozen(vitpose_dir):
    estimator = pose_estimator(str(vitpose_dir))
    assert pose_estimator(str(vitpose_dir) + "/") is estimator
    assert not estimator.model.training
    assert not any(p.requires_grad for p in estimator.model.parameters())


# A standing person on a 96 x 128 image, COCO order (x, y): joints at least 8 pixels apart.
BODY = np.array([(48, 20), (54, 12), (42, 12), (62, 18), (34, 18), (64, 40), (32, 40), (76, 62), (20, 62),
                 (84, 84), (12, 84), (58, 80), (38, 80), (60, 100), (36, 100), (62, 120), (34, 120)], dtype=float)
# OpenPose's points as COCO indices (the neck, 1, is the shoulders' midpoint).
OPENPOSE = {0: 0, 2: 6, 3: 8, 4: 10, 5: 5, 6: 7, 7: 9, 8: 12, 9: 14, 10: 16, 11: 11, 12: 13, 13: 15, 14: 2, 15: 1,
            16: 4, 17: 3}


def test_the_drawing_colours_the_kept_joints_and_limbs_and_leaves_out_low_scores():
    scores = np.full(17, 0.9)
    scores[9], scores[4] = 0.1, 0.29  # the left wrist and the right ear: below 0.3
    image = np.asarray(draw_pose(BODY, scores, (96, 128)))
    assert image.shape == (128, 96, 3) and image.dtype == np.uint8
    for openpose, coco in OPENPOSE.items():
        x, y = BODY[coco].astype(int)
        expected = (0, 0, 0) if coco in (9, 4) else COLOURS[openpose]
        assert tuple(image[y, x]) == expected, (openpose, coco)
    assert tuple(image[40, 48]) == COLOURS[1]  # the neck, between the shoulders
    # Limbs in 0.6 of their colour: right elbow to wrist (limb 3) drawn; left elbow to wrist (5) not.
    assert tuple(image[73, 16]) == (153, 153, 0) and tuple(image[73, 80]) == (0, 0, 0)
    assert tuple(image[0, 0]) == (0, 0, 0) and tuple(image[127, 95]) == (0, 0, 0)
    # Where a left-out keypoint lies does not matter; at threshold 0 it is drawn.
    moved = BODY.copy()
    moved[9] = (5, 5)
    assert np.array_equal(np.asarray(draw_pose(moved, scores, (96, 128))), image)
    everything = np.asarray(draw_pose(BODY, scores, (96, 128), threshold=0.0))
    assert tuple(everything[84, 84]) == COLOURS[7] and tuple(everything[73, 80]) == tuple(int(c * 0.6) for c in COLOURS[5])
    # Without a shoulder, no neck and none of its limbs.
    scores[5] = 0.0
    no_neck = np.asarray(draw_pose(BODY, scores, (96, 128)))
    assert tuple(no_neck[40, 48]) == (0, 0, 0) and tuple(no_neck[40, 64]) == (0, 0, 0)
    assert tuple(no_neck[40, 32]) == COLOURS[2]


def test_the_data_gives_the_pose_of_the_training_crop(tmp_path, vitpose_dir):
    root = make_captioned_folder(tmp_path / "images", n=3)
    options = {"model": str(vitpose_dir), "threshold": 0.2}
    ds = ImageCaptionDataset(root, resolution=24, buckets={"multiple": 8}, crop="random", hflip=True,
                             annotator="pose", annotator_options=options)
    for index in range(len(ds)):
        item = ds[EpochIndex(index, 1)]
        view = ((item["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = to_tensor(annotate(Image.fromarray(view), "pose", **options))
        assert item["conditioning_image"].shape == item["image"].shape
        assert torch.equal(item["conditioning_image"], expected)
    assert (item["conditioning_image"] > -1).any()  # something is drawn

    dm = ImageCaptionDataModule(root, annotator="pose", annotator_options=options)
    weights = dm.conditioning_source["weights"]
    assert weights == annotator_identity("pose", options) and len(weights["weights_sha256"]) == 64
    other = _save_vitpose(tmp_path / "other", seed=1)
    assert annotator_identity("pose", {"model": str(other)})["weights_sha256"] != weights["weights_sha256"]


def test_bad_pose_models_and_options_are_clear_errors(tmp_path, vitpose_dir, monkeypatch):
    root = make_captioned_folder(tmp_path / "images", n=2)
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"pose annotator: model directory {missing} does not exist"):
        ImageCaptionDataModule(root, annotator="pose", annotator_options={"model": str(missing)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        annotate(_photo(), "pose", model=str(root / "img_000.png"))  # a file, not a directory

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=16)).save_pretrained(bert)
    with pytest.raises(ValueError, match="'bert' model, not a pose estimator.*ViTPose"):
        ImageCaptionDataModule(root, annotator="pose", annotator_options={"model": str(bert)})
    with pytest.raises(ValueError, match="predicts 2 keypoints, not COCO's 17"):
        pose_estimator(str(_save_vitpose(tmp_path / "two", num_labels=2)))
    no_processor = tmp_path / "no_processor"
    shutil.copytree(vitpose_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(OSError, match="has no image processor"):
        pose_estimator(str(no_processor))

    for bad in (1.5, "high", None):
        with pytest.raises(ValueError, match="threshold must be a number between 0 and 1"):
            ImageCaptionDataModule(root, annotator="pose", annotator_options={"model": str(vitpose_dir),
                                                                              "threshold": bad})
    with pytest.raises(ValueError, match="'pose' takes no option low; its options: model, threshold"):
        ImageCaptionDataModule(root, annotator="pose", annotator_options={"low": 1})

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, without retries
    with pytest.raises(OSError, match="cannot load the model 'nobody-here/no-such-pose-model'"):
        pose_estimator("nobody-here/no-such-pose-model")  # a hub id, offline: refused, not downloaded


def test_config_takes_a_pose_model_directory_and_threshold_from_the_command_line(tmp_path, vitpose_dir):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import CONF

    root = make_captioned_folder(tmp_path / "images", n=2)
    overrides = ["data=image_folder", f"data.module.root={root}", "data.module.resolution=16", "data.module.batch_size=2",
                 "data.module.num_workers=0", "data.module.annotator=pose",
                 f"data.module.annotator_options={{model: {vitpose_dir}, threshold: 0.25}}"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("train", overrides=overrides)
    dm = instantiate(cfg.data.module)
    assert dm.conditioning_source["weights"] == annotator_identity("pose", {"model": str(vitpose_dir)})
    dm.setup()
    item = dm.train_set[0]
    view = ((item["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = annotate(Image.fromarray(view), "pose", model=str(vitpose_dir), threshold=0.25)
    assert torch.equal(item["conditioning_image"], to_tensor(expected))
