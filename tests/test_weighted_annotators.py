"""Annotators with weights: depth maps from a transformers depth estimator given as a local directory
(tiny random DPT and Depth Anything saved with save_pretrained), equal to transformers'
``pipeline("depth-estimation")`` and to a hand computation; the image-folder data annotating the
training crop; the weights in the fingerprint; clear errors for a missing directory, a model that
is no depth estimator, a missing processor and OpenPose (tests/test_pose_annotator.py: pose). Nothing downloads (the network is refused)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from diffusion.data.annotators import annotate, annotator_identity
from diffusion.data.batching import EpochIndex
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.depth import depth_estimator
from diffusion.data.images import to_tensor
from tests.make_captioned_folder import make_captioned_folder
from tests.tiny_encoders import no_network  # noqa: F401  (autouse: refuses internet connections)

transformers = pytest.importorskip("transformers")


def _save_dpt(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                                    image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                    neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_in_index=-1)
    transformers.DPTForDepthEstimation(config).save_pretrained(directory)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _save_depth_anything(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    backbone = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                         image_size=28, patch_size=14, reshape_hidden_states=False,
                                         out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=14,
                                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                              head_hidden_size=8)
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(directory)
    # Depth-Anything-V2-Small-hf's processor settings, at a tiny size.
    transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                   resample=Image.Resampling.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory) -> Path:
    return _save_dpt(tmp_path_factory.mktemp("dpt"))


def _photo(height: int = 20, width: int = 28, seed: int = 0) -> Image.Image:
    """A smooth image with some texture (random noise gives near-flat depth from random weights)."""
    y, x = np.mgrid[:height, :width]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("family", ["dpt", "depth_anything"])
def test_depth_equals_transformers_depth_pipeline(tmp_path, dpt_dir, family):
    directory = dpt_dir if family == "dpt" else _save_depth_anything(tmp_path / "da")
    image = _photo()
    ours = np.asarray(annotate(image, "depth", model=str(directory)))
    reference = np.asarray(transformers.pipeline("depth-estimation", model=str(directory))(image)["depth"])
    assert ours.shape == (20, 28, 3) and ours.dtype == np.uint8
    assert reference.shape == (20, 28)
    assert all(np.array_equal(ours[..., c], reference) for c in range(3))
    assert ours.min() == 0 and ours.max() == 255 and len(np.unique(ours)) > 10  # a real map, normalised per image

    # By hand: the model's predicted depth, bicubic to the image's size, min-max normalised to 0..255.
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    model = transformers.AutoModelForDepthEstimation.from_pretrained(directory).eval()
    with torch.no_grad():
        depth = model(**processor(images=image, return_tensors="pt")).predicted_depth
    depth = F.interpolate(depth[:, None], size=(20, 28), mode="bicubic", align_corners=False)[0, 0].numpy()
    by_hand = ((depth - depth.min()) / (depth.max() - depth.min()) * 255).astype(np.uint8)
    assert np.array_equal(ours[..., 0], by_hand)


def test_the_estimator_is_loaded_once_per_process_frozen(dpt_dir):
    estimator = depth_estimator(str(dpt_dir))
    assert depth_estimator(str(dpt_dir) + "/") is estimator  # the same directory, however written
    assert not estimator.model.training
    assert not any(p.requires_grad for p in estimator.model.parameters())


def test_the_data_gives_the_depth_of_the_training_crop(tmp_path, dpt_dir):
    root = make_captioned_folder(tmp_path / "images", n=4)
    options = {"model": str(dpt_dir)}
    ds = ImageCaptionDataset(root, resolution=16, buckets={"multiple": 8}, crop="random", hflip=True,
                             annotator="depth", annotator_options=options)
    for epoch in range(2):
        for index in range(len(ds)):
            item = ds[EpochIndex(index, epoch)]
            view = ((item["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            expected = to_tensor(annotate(Image.fromarray(view), "depth", **options))
            assert torch.equal(item["conditioning_image"], expected)
    assert (item["conditioning_image"] > 0).any()

    # The data module's loaders, in the main process and in a DataLoader worker, give the same batches.
    batches = []
    for workers in (0, 1):
        dm = ImageCaptionDataModule(root, resolution=16, batch_size=2, num_workers=workers, annotator="depth",
                                    annotator_options=options)
        dm.setup()
        batches.append(next(iter(dm.train_dataloader())))
    assert batches[0]["conditioning_image"].shape == batches[0]["image"].shape == (2, 3, 16, 16)
    assert torch.equal(batches[0]["conditioning_image"], batches[1]["conditioning_image"])


def test_the_fingerprint_holds_the_model_and_its_weights(tmp_path, dpt_dir):
    root = make_captioned_folder(tmp_path / "images", n=2)
    copy = tmp_path / "copy"
    shutil.copytree(dpt_dir, copy)
    other = _save_dpt(tmp_path / "other", seed=1)

    def source(directory: Path) -> dict:
        return ImageCaptionDataModule(root, annotator="depth", annotator_options={"model": str(directory)}).conditioning_source

    first, same_weights, other_weights = source(dpt_dir), source(copy), source(other)
    assert first["annotator"] == "depth" and first["options"] == {"model": str(dpt_dir)}
    assert first["weights"]["model"] == str(dpt_dir) and len(first["weights"]["weights_sha256"]) == 64
    assert same_weights["weights"]["weights_sha256"] == first["weights"]["weights_sha256"]
    assert other_weights["weights"]["weights_sha256"] != first["weights"]["weights_sha256"]
    assert source(dpt_dir) == first  # deterministic
    assert annotator_identity("canny", {}) is None and annotator_identity(None) is None


def test_bad_depth_models_and_pose_are_clear_errors(tmp_path, dpt_dir, monkeypatch):
    root = make_captioned_folder(tmp_path / "images", n=2)
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"model directory {missing} does not exist"):
        ImageCaptionDataModule(root, annotator="depth", annotator_options={"model": str(missing)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        annotate(_photo(), "depth", model=str(root / "img_000.png"))  # a file, not a directory

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=16)).save_pretrained(bert)
    with pytest.raises(ValueError, match="'bert' model, not a depth estimator.*dpt"):
        ImageCaptionDataModule(root, annotator="depth", annotator_options={"model": str(bert)})

    no_processor = tmp_path / "no_processor"
    shutil.copytree(dpt_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(OSError, match="has no image processor"):
        depth_estimator(str(no_processor))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, without retries
    with pytest.raises(OSError, match="cannot load the model 'nobody-here/no-such-depth-model'"):
        depth_estimator("nobody-here/no-such-depth-model")  # a hub id, offline: refused, not downloaded
    with pytest.raises(ValueError, match="'depth' takes no option low; its options: model"):
        ImageCaptionDataModule(root, annotator="depth", annotator_options={"low": 1})
    with pytest.raises(ValueError, match="annotator='openpose' is not available: it needs OpenPose.*annotator=pose"):
        ImageCaptionDataModule(root, annotator="openpose")
    with pytest.raises(ValueError, match="annotator='openpose' is not available"):
        annotate(_photo(), "openpose")


def test_config_takes_a_depth_model_directory_from_the_command_line(tmp_path, dpt_dir):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import CONF

    root = make_captioned_folder(tmp_path / "images", n=2)
    overrides = ["data=image_folder", f"data.module.root={root}", "data.module.resolution=16", "data.module.batch_size=2",
                 "data.module.num_workers=0", "data.module.annotator=depth",
                 f"data.module.annotator_options={{model: {dpt_dir}}}"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("train", overrides=overrides)
    dm = instantiate(cfg.data.module)
    assert dm.conditioning_source["weights"] == annotator_identity("depth", {"model": str(dpt_dir)})
    dm.setup()
    item = dm.train_set[0]
    view = ((item["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert torch.equal(item["conditioning_image"], to_tensor(annotate(Image.fromarray(view), "depth", model=str(dpt_dir))))
