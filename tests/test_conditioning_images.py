"""Conditioning images of image folders: from a metadata column, a parallel folder or an annotator,
each cropped, flipped and bucketed exactly like its image (checked against copies of the image,
hand-made PIL crops and cv2.Canny); corrupt, missing and doubly-sourced conditioning images."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from diffusion.data.annotators import annotate
from diffusion.data.batching import EpochIndex
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.images import TooManyBadImagesError
from tests.make_captioned_folder import make_captioned_folder, synthetic_items

CONF = Path(__file__).resolve().parents[1] / "conf"
AUGMENT = dict(resolution=32, buckets={"multiple": 8}, crop="random", hflip=True)


def _write_metadata(root: Path, rows: list[dict], layout: str = "csv") -> None:
    for name in ("metadata.csv", "metadata.jsonl"):
        (root / name).unlink(missing_ok=True)
    if layout == "csv":
        with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _column_folder(tmp_path: Path, n: int = 6, layout: str = "csv") -> Path:
    """A captioned folder whose metadata names, for each image, a copy of it under conditioning/."""
    root = make_captioned_folder(tmp_path / "images", n=n)
    rows = []
    for item in synthetic_items(n):
        copy = Path("conditioning") / item["file_name"]
        (root / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / item["file_name"], root / copy)
        rows.append({"file_name": item["file_name"], "text": item["caption"], "conditioning_image": copy.as_posix()})
    _write_metadata(root, rows, layout)
    return root


def _parallel_folder(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    """A captioned folder and a parallel folder of the same pixels, PNGs saved as BMP (another extension)."""
    root = make_captioned_folder(tmp_path / "images", n=n)
    conditioning = tmp_path / "conditioning"
    for item in synthetic_items(n):
        source, target = root / item["file_name"], conditioning / item["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".png":
            with Image.open(source) as img:
                img.save(target.with_suffix(".bmp"))
        else:
            shutil.copyfile(source, target)
    return root, conditioning


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8: the exact pixels to_tensor read."""
    return ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _pixels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("source", ["csv column", "jsonl column", "parallel folder"])
def test_a_copy_of_the_image_as_its_conditioning_image_follows_every_crop_flip_and_bucket(tmp_path, source):
    if source == "parallel folder":
        root, conditioning = _parallel_folder(tmp_path)
        ds = ImageCaptionDataset(root, conditioning_root=conditioning, **AUGMENT)
    else:
        root = _column_folder(tmp_path, layout=source.split()[0])
        ds = ImageCaptionDataset(root, conditioning_column="conditioning_image", **AUGMENT)
    plain_root = make_captioned_folder(tmp_path / "plain", n=6)
    plain = ImageCaptionDataset(plain_root, **AUGMENT)
    unflipped = ImageCaptionDataset(plain_root, **{**AUGMENT, "hflip": False})
    assert len(ds) == 6  # the copies under root/conditioning are not training images
    assert len({ds.buckets[b] for b in ds.bucket_ids}) == 3
    flipped = []
    for epoch in range(6):
        for index in range(len(ds)):
            item = ds[EpochIndex(index, epoch)]
            # The image is augmented as it is without conditioning images: the same draws.
            assert torch.equal(item["image"], plain[EpochIndex(index, epoch)]["image"])
            assert torch.equal(item["crop_top_left"], plain[EpochIndex(index, epoch)]["crop_top_left"])
            assert item["conditioning_image"].shape == item["image"].shape
            assert torch.equal(item["conditioning_image"], item["image"])
            flipped.append(not torch.equal(item["image"], unflipped[EpochIndex(index, epoch)]["image"]))
    assert 0 < sum(flipped) < len(flipped)


def _noise(seed: int, size: tuple[int, int]) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("conditioning_size", [(80, 50), (40, 25)])
def test_another_conditioning_image_takes_the_window_and_flip_of_its_image(tmp_path, conditioning_size):
    """The image and its conditioning image are unrelated noise: the window the image's crop took
    (found by search, as in test_captions) must be the conditioning image's, flipped with it."""
    image, condition = _noise(0, (80, 50)), _noise(1, conditioning_size)
    image.save(tmp_path / "a.png")
    (tmp_path / "cond").mkdir()
    condition.save(tmp_path / "cond" / "a.png")
    rows = [{"file_name": "a.png", "text": "noise", "hint": "cond/a.png"}]
    _write_metadata(tmp_path, rows)
    ds = ImageCaptionDataset(tmp_path, resolution=32, crop="random", hflip=True, conditioning_column="hint")
    # 80x50 covers 32x32 at 51x32: PIL's bicubic resize of each, by hand.
    resized = _pixels(np.asarray(image.resize((51, 32), Image.Resampling.BICUBIC)))
    resized_condition = _pixels(np.asarray(condition.resize((51, 32), Image.Resampling.BICUBIC)))
    seen = set()
    for epoch in range(16):
        item = ds[EpochIndex(0, epoch)]
        matches = [(left, flip) for left in range(51 - 32 + 1) for flip in (False, True)
                   if torch.allclose(item["image"], resized[:, :, left:left + 32].flip(-1) if flip
                                     else resized[:, :, left:left + 32], atol=1e-6)]
        assert len(matches) == 1
        left, flip = matches[0]
        window = resized_condition[:, :, left:left + 32]
        torch.testing.assert_close(item["conditioning_image"], window.flip(-1) if flip else window, atol=1e-6, rtol=0)
        seen.add(matches[0])
    assert len({left for left, _ in seen}) > 1 and {flip for _, flip in seen} == {False, True}


@pytest.mark.parametrize("annotator, options", [("canny", {}), ("canny", {"low": 50, "high": 120}),
                                                ("grayscale", {}), ("low_resolution", {"factor": 4})])
def test_an_annotator_runs_on_the_training_view(tmp_path, annotator, options):
    root = make_captioned_folder(tmp_path, n=6)
    ds = ImageCaptionDataset(root, annotator=annotator, annotator_options=options, **AUGMENT)
    for epoch in range(3):
        for index in range(len(ds)):
            item = ds[EpochIndex(index, epoch)]
            view = _to_uint8(item["image"])
            if annotator == "canny":  # OpenCV itself, on the cropped, flipped pixels
                edges = cv2.Canny(view, options.get("low", 100), options.get("high", 200))
                expected = np.repeat(edges[..., None], 3, axis=2)
            elif annotator == "grayscale":
                expected = np.repeat(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
            else:
                expected = np.asarray(annotate(Image.fromarray(view), annotator, **options))
            if annotator == "grayscale":  # PIL's and OpenCV's luma weights round differently
                assert (item["conditioning_image"] - _pixels(expected)).abs().max() <= 1 / 127.5 + 1e-6
            else:
                assert torch.equal(item["conditioning_image"], _pixels(expected))
    assert (item["conditioning_image"] > 0).any()


def test_batches_and_validation_carry_conditioning_images(tmp_path):
    root = _column_folder(tmp_path, n=12)
    dm = ImageCaptionDataModule(root, batch_size=2, val_fraction=0.25, conditioning_column="conditioning_image",
                                **AUGMENT)
    batches = list(dm.train_dataloader())
    assert len(batches) >= 4 and len({b["image"].shape for b in batches}) > 1
    for batch in batches:
        assert torch.equal(batch["conditioning_image"], batch["image"])
    assert dm.val_set.crop == "center" and not dm.val_set.hflip
    for batch in dm.val_dataloader():
        assert torch.equal(batch["conditioning_image"], batch["image"])
    assert dm.conditioning_source == {"conditioning_column": "conditioning_image"}


def test_a_validation_folder_has_its_own_parallel_conditioning_folder(tmp_path):
    root, conditioning = _parallel_folder(tmp_path / "train")
    val_root, val_conditioning = _parallel_folder(tmp_path / "val", n=2)
    with pytest.raises(ValueError, match="val_conditioning_root"):
        ImageCaptionDataModule(root, val_root=val_root, conditioning_root=conditioning)
    dm = ImageCaptionDataModule(root, batch_size=2, val_root=val_root, conditioning_root=conditioning,
                                val_conditioning_root=val_conditioning, **AUGMENT)
    batches = list(dm.val_dataloader())
    assert sum(len(b["path"]) for b in batches) == 2
    for batch in batches:
        assert all(Path(p).is_relative_to(val_root) for p in batch["path"])
        assert torch.equal(batch["conditioning_image"], batch["image"])


def test_a_parallel_folder_inside_the_image_folder_holds_no_training_images(tmp_path):
    root, conditioning = _parallel_folder(tmp_path)
    shutil.move(conditioning, root / "hints")
    ds = ImageCaptionDataset(root, conditioning_root=root / "hints", resolution=32)
    assert len(ds) == 6 and all(not r.path.is_relative_to(root / "hints") for r in ds.records)


def test_a_corrupt_conditioning_image_is_counted_and_its_sample_replaced(tmp_path, caplog):
    root = _column_folder(tmp_path, n=8)
    items = synthetic_items(8)
    truncated = root / "conditioning" / items[0]["file_name"]  # a PNG: header fine, pixels cut
    _noise(2, (64, 48)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = root / "conditioning" / items[1]["file_name"]  # header unreadable: skipped at scan
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.3, conditioning_column="conditioning_image")
    assert len(ds) == 7 and ds.num_bad == 1 and str(garbage) in caplog.text
    bad = next(i for i, r in enumerate(ds.records) if r.conditioning == truncated)
    item = ds[bad]
    assert item["index"] != bad and ds.bucket_ids[item["index"]] == ds.bucket_ids[bad]
    assert torch.equal(item["conditioning_image"], item["image"])  # the replacement's own conditioning image
    assert ds.num_bad == 2 and str(truncated) in caplog.text
    with pytest.raises(TooManyBadImagesError, match="2 of 8"):
        ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.15, conditioning_column="conditioning_image")[bad]


def test_missing_conditioning_images_name_the_row_or_the_image(tmp_path):
    root = _column_folder(tmp_path / "column", n=3, layout="jsonl")
    (root / "conditioning" / "img_001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"row 2: conditioning image 'conditioning/img_001.png'"):
        ImageCaptionDataset(root, resolution=32, conditioning_column="conditioning_image")
    with pytest.raises(ValueError, match=r"row 1: needs columns 'file_name', 'text', 'control'"):
        ImageCaptionDataset(root, resolution=32, conditioning_column="control")
    (root / "conditioning" / "img_001.png").write_bytes((root / "img_001.png").read_bytes())
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    _write_metadata(root, rows[1:], "jsonl")
    with pytest.raises(ValueError, match=r"2 images .* have no row in .*metadata.jsonl.*conditioning/img_000.png, .*/img_000.png"):
        ImageCaptionDataset(root, resolution=32, conditioning_column="conditioning_image")
    _write_metadata(root, [*rows, {"file_name": "conditioning/img_001.png", "text": "x", "conditioning_image": "img_002.jpg"}],
                    "jsonl")
    with pytest.raises(ValueError, match="listed both as file_name and as conditioning images"):
        ImageCaptionDataset(root, resolution=32, conditioning_column="conditioning_image")
    plain = make_captioned_folder(tmp_path / "txt", n=3, layout="txt")
    with pytest.raises(FileNotFoundError, match="conditioning_column='conditioning_image' is a column of metadata"):
        ImageCaptionDataset(plain, resolution=32, conditioning_column="conditioning_image")

    root, conditioning = _parallel_folder(tmp_path / "folder", n=4)
    (conditioning / "sub" / "img_003.bmp").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images .*sub/img_003.png \(no .*conditioning/sub/img_003\.\*\)"):
        ImageCaptionDataset(root, resolution=32, conditioning_root=conditioning)
    shutil.copyfile(conditioning / "img_000.bmp", conditioning / "img_000.webp")
    with pytest.raises(ValueError, match="img_000.png has 2 conditioning images"):
        ImageCaptionDataset(root, resolution=32, conditioning_root=conditioning)
    with pytest.raises(FileNotFoundError, match="data.module.conditioning_root"):
        ImageCaptionDataset(root, resolution=32, conditioning_root=tmp_path / "nowhere")


def test_a_conditioning_image_of_another_shape_is_refused(tmp_path):
    root, conditioning = _parallel_folder(tmp_path, n=1)
    _noise(0, (64, 64)).save(conditioning / "img_000.bmp")  # its image is 64x48
    with pytest.raises(ValueError, match="64x64 and its image .*img_000.png 64x48"):
        ImageCaptionDataset(root, resolution=32, conditioning_root=conditioning)


def test_two_sources_or_bad_annotator_options_are_refused(tmp_path):
    root, conditioning = _parallel_folder(tmp_path, n=2)
    message = "one source at most.*conditioning_root=.*annotator='canny'"
    with pytest.raises(ValueError, match=message):
        ImageCaptionDataset(root, resolution=32, conditioning_root=conditioning, annotator="canny")
    with pytest.raises(ValueError, match=message):
        ImageCaptionDataModule(root, conditioning_root=conditioning, annotator="canny")
    with pytest.raises(ValueError, match="conditioning_column='c', conditioning_root="):
        ImageCaptionDataModule(root, conditioning_column="c", conditioning_root=conditioning)
    with pytest.raises(ValueError, match="annotator='segmentation' is not supported"):
        ImageCaptionDataModule(root, annotator="segmentation")
    with pytest.raises(ValueError, match="'canny' takes no option factor; its options: low, high"):
        ImageCaptionDataModule(root, annotator="canny", annotator_options={"factor": 2})
    with pytest.raises(ValueError, match="factor must be an integer"):
        ImageCaptionDataModule(root, annotator="low_resolution", annotator_options={"factor": 0})
    with pytest.raises(ValueError, match="without an annotator"):
        ImageCaptionDataModule(root, annotator_options={"low": 10})


def test_config_instantiates_with_an_annotator_from_the_command_line_overrides(tmp_path):
    root = make_captioned_folder(tmp_path, n=4)
    overrides = ["data=image_folder", f"data.module.root={root}", "data.module.resolution=32", "data.module.batch_size=2",
                 "data.module.num_workers=0", "data.module.annotator=canny", "data.module.annotator_options={low: 50, high: 150}"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    dm = instantiate(cfg.data.module)
    assert dm.conditioning_source == {"annotator": "canny", "options": {"high": 150, "low": 50}}
    batch = next(iter(dm.train_dataloader()))
    assert batch["conditioning_image"].shape == batch["image"].shape == (2, 3, 32, 32)
    assert set(batch["conditioning_image"].unique().tolist()) <= {-1.0, 1.0}
