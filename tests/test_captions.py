"""Image-caption folders: caption layouts, resize and crop, corrupt files, the DataModule."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from diffusion.data.batching import EpochIndex
from diffusion.data.captions import ImageCaptionDataModule, ImageCaptionDataset
from diffusion.data.images import TooManyBadImagesError
from tests.make_captioned_folder import draw, make_captioned_folder, synthetic_items

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("layout", ["csv", "jsonl", "txt"])
def test_each_layout_reads_the_caption_of_each_image(tmp_path, layout, caplog):
    root = make_captioned_folder(tmp_path, n=12, layout=layout, uncaptioned=2)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(root, resolution=32)
    assert "2 of 12 images" in caplog.text and "no caption" in caplog.text
    expected = {item["file_name"]: item["caption"] for item in synthetic_items(12, uncaptioned=2)}
    assert any(name.startswith("sub/") and caption for name, caption in expected.items())
    assert len(ds) == 12
    for index in range(len(ds)):
        item = ds[index]
        name = Path(item["path"]).relative_to(root).as_posix()
        assert item["caption"] == (expected[name] or "") and item["has_caption"] == (expected[name] is not None)
        assert item["index"] == index and item["image"].shape == (3, 32, 32)
        assert -1 <= item["image"].min() and item["image"].max() <= 1


def test_metadata_takes_precedence_over_sidecars(tmp_path):
    root = make_captioned_folder(tmp_path, n=3, layout="csv")
    (root / "img_000.txt").write_text("a sidecar caption")
    ds = ImageCaptionDataset(root, resolution=32)
    assert [r.caption for r in ds.records] == [item["caption"] for item in synthetic_items(3)]


def test_metadata_row_of_a_missing_file_names_it(tmp_path):
    root = make_captioned_folder(tmp_path, n=3, layout="jsonl")
    with (root / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "sub/gone.png", "text": "a lost image"}\n')
    with pytest.raises(FileNotFoundError, match="sub/gone.png"):
        ImageCaptionDataset(root, resolution=32)


def _noise_folder(tmp_path: Path, size: tuple[int, int]) -> tuple[Path, Image.Image]:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.save(tmp_path / "noise.png")
    return tmp_path, img


def _reference(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Resize (aspect kept) to cover height x width with PIL, then crop the centre."""
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("buckets, shape", [(False, (32, 32)), ({"multiple": 8}, (24, 40))])
def test_center_crop_matches_pil_resize_and_crop(tmp_path, buckets, shape):
    root, img = _noise_folder(tmp_path, (80, 50))
    item = ImageCaptionDataset(root, resolution=32, buckets=buckets)[0]
    assert item["caption"] == "" and not item["has_caption"]
    torch.testing.assert_close(item["image"], _reference(img, *shape), atol=1e-6, rtol=0)


def test_exif_rotated_jpeg_is_upright_and_decoded_at_a_reduced_scale(tmp_path):
    stored = draw("red", "triangle", (320, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 160 wide, 320 high
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    ds = ImageCaptionDataset(tmp_path, resolution=32, buckets={"multiple": 8})
    assert ds.records[0].size == (160, 320) and ds.buckets[ds.bucket_ids[0]] == (40, 24)
    image = ds[0]["image"]
    with Image.open(tmp_path / "photo.jpg") as full:  # decoded at full size, no draft
        reference = _reference(ImageOps.exif_transpose(full).convert("RGB"), 40, 24)
    assert image.shape == reference.shape == (3, 40, 24)
    assert (image - reference).abs().mean() < 0.05

def test_hflip_flips_about_half_the_time(tmp_path):
    root, _ = _noise_folder(tmp_path, (80, 50))
    plain = ImageCaptionDataset(root, resolution=32)[0]["image"]
    flipping = ImageCaptionDataset(root, resolution=32, hflip=True)
    flipped = []
    for epoch in range(12):
        image = flipping[EpochIndex(0, epoch)]["image"]
        assert torch.equal(image, plain) or torch.equal(image, plain.flip(-1))
        flipped.append(torch.equal(image, plain.flip(-1)))
    assert 0 < sum(flipped) < len(flipped)


def test_random_crop_is_a_window_of_the_resized_image_and_reproducible(tmp_path):
    root, img = _noise_folder(tmp_path, (80, 50))
    resized = _reference(img, 32, 51)  # 80x50 -> 51x32 covers 32x32; this "crop" is the whole image
    ds = ImageCaptionDataset(root, resolution=32, crop="random")
    lefts = set()
    for epoch in range(8):
        torch.manual_seed(epoch)  # the global generator plays no part
        image = ds[EpochIndex(0, epoch)]["image"]
        assert torch.equal(image, ds[EpochIndex(0, epoch)]["image"])
        windows = {left: resized[:, :, left : left + 32] for left in range(51 - 32 + 1)}
        matches = [left for left, window in windows.items() if torch.allclose(image, window, atol=1e-6)]
        assert len(matches) == 1
        lefts |= set(matches)
    assert len(lefts) > 1
    assert torch.equal(ds[0]["image"], ds[EpochIndex(0, 0)]["image"])  # a plain index: epoch 0


def test_corrupt_and_truncated_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_captioned_folder(tmp_path, n=12, corrupt=2)  # bad_000: random bytes, bad_001: truncated PNG
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.2)
    assert "1 of 14" in caplog.text and "bad_000.png" in caplog.text
    assert len(ds) == 13 and ds.num_bad == 1  # the truncated file's header is fine
    truncated = next(i for i, r in enumerate(ds.records) if r.path.name == "bad_001.png")
    item = ds[truncated]
    assert item["index"] != truncated and ds.bucket_ids[item["index"]] == ds.bucket_ids[truncated]
    assert torch.isfinite(item["image"]).all() and item["caption"] != "a broken file"
    assert ds.num_bad == 2 and {p.name for p in ds.bad_paths} == {"bad_000.png", "bad_001.png"}
    assert "bad_001.png" in caplog.text


def test_bad_counts_add_up_across_dataloader_workers(tmp_path):
    root = make_captioned_folder(tmp_path, n=6, corrupt=2)
    ds = ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.5)
    batches = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert len(batches) == len(ds) and ds.num_bad == 2  # counted in a worker, seen here


def test_too_many_bad_files_at_setup_stop_with_a_clear_error(tmp_path):
    root = make_captioned_folder(tmp_path, n=12, corrupt=1)
    message = r"1 of 13 .*max_bad_fraction=0.05.*bad_000.png.*data.module.max_bad_fraction"
    with pytest.raises(TooManyBadImagesError, match=message):
        ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.05)


def test_too_many_bad_files_while_decoding_stop_with_a_clear_error(tmp_path):
    root = make_captioned_folder(tmp_path, n=12, corrupt=2)
    ds = ImageCaptionDataset(root, resolution=32, max_bad_fraction=0.1)  # 1 of 14 at setup: fine
    with pytest.raises(TooManyBadImagesError, match=r"2 of 14 .*max_bad_fraction=0.1.*data.module.max_bad_fraction"):
        for index in range(len(ds)):
            ds[index]


def test_datamodule_yields_square_batches_and_a_validation_split(tmp_path):
    root = make_captioned_folder(tmp_path, n=12, uncaptioned=3)
    dm = ImageCaptionDataModule(root, resolution=32, batch_size=4, val_fraction=0.25, hflip=True, crop="random")
    assert dm.image_shape == (3, 32, 32) and dm.num_classes is None
    train = list(dm.train_dataloader())
    assert len(train) == 2 and len(dm.val_set) == 3
    for batch in train:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
        assert batch["has_caption"].dtype == torch.bool and batch["index"].shape == (4,)
    (val,) = list(dm.val_dataloader())
    assert val["image"].shape == (3, 3, 32, 32)
    assert not {p for b in train for p in b["path"]} & set(val["path"])


def test_datamodule_validates_on_another_folder(tmp_path):
    train, val = make_captioned_folder(tmp_path / "train", n=8), make_captioned_folder(tmp_path / "val", n=3, layout="txt")
    dm = ImageCaptionDataModule(train, resolution=32, batch_size=2, val_root=val)
    (batch, *rest) = list(dm.val_dataloader())
    assert len(dm.train_set) == 8 and len(dm.val_set) == 3 and len(rest) == 1
    assert all(Path(p).is_relative_to(val) for p in batch["path"])

def test_datamodule_errors_name_the_setting(tmp_path):
    root = make_captioned_folder(tmp_path, n=4)
    with pytest.raises(ValueError, match="data.module.batch_size=8"):
        ImageCaptionDataModule(root, resolution=32, batch_size=8).train_dataloader()
    with pytest.raises(ValueError, match="val_fraction or data.module.val_root"):
        ImageCaptionDataModule(root, val_fraction=0.5, val_root=root)
    with pytest.raises(FileNotFoundError, match="data.module.root"):
        ImageCaptionDataModule(tmp_path / "nowhere").setup()


@pytest.mark.parametrize("overrides", [[], ["buckets={multiple: 8}", "val_fraction=0.2", "crop=random", "hflip=true"]])
def test_config_instantiates(tmp_path, overrides):
    root = make_captioned_folder(tmp_path, n=12)
    data = OmegaConf.load(CONF / "data" / "image_folder.yaml")
    settings = [f"root={root}", "resolution=32", "batch_size=2", "num_workers=0", *overrides]
    cfg = OmegaConf.merge({"seed": 0, "data": data}, OmegaConf.from_dotlist([f"data.module.{s}" for s in settings]))
    assert cfg.data.num_classes is None and list(cfg.data.image_shape) == [3, 32, 32]
    dm = instantiate(cfg.data.module)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[:2] == (2, 3)
