"""Class-labelled image folders (data=image_classes): ADM's preprocessing, labels from the sorted
class names, keyed flips, corrupt files, held-out splits, the class-count checks, the class list
kept with the run, caching, and the tiny ImageNet recipes through train.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from diffusion import cli
from diffusion.data import ImageClassDataModule, center_crop_arr
from diffusion.data.batching import EpochIndex
from diffusion.data.cache import CachedDataset
from diffusion.data.images import TooManyBadImagesError
from diffusion.training.randomness import sample_seed
from tests.conftest import CONF, compose_config, run_script
from tests.make_class_folder import class_colour, make_class_folder, synset_names


# --- ADM's center_crop_arr -------------------------------------------------------------------

def _adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, transcribed: box halvings, a bicubic resize of the
    short side to ``size`` (each side rounded), the centre ``size`` square (here with PIL's crop)."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    ratio = size / min(w, h)
    w, h = round(w * ratio), round(h * ratio)
    img = img.resize((w, h), resample=Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width, height, size", [(1000, 700, 256), (513, 300, 256), (256, 256, 256),
                                                 (300, 1000, 256), (1000, 700, 64), (77, 51, 32)])
def test_center_crop_arr_matches_adm_bit_for_bit(width, height, size):
    img = _noise(width, height)
    out = center_crop_arr(img, size)
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    np.testing.assert_array_equal(out, _adm_reference(img, size))


def test_center_crop_arr_box_halves_before_the_bicubic_resize():
    img = _noise(1000, 700)  # 700 >= 2 * 256: one halving, to 500 x 350
    bicubic_only = np.asarray(img.resize((366, 256), Image.BICUBIC).crop((55, 0, 311, 256)))
    assert (center_crop_arr(img, 256).astype(int) - bicubic_only).any()


# --- the dataset and its labels --------------------------------------------------------------

def test_labels_follow_the_sorted_class_names_and_images_are_adm_preprocessed(tmp_path):
    root = make_class_folder(tmp_path, classes=4, per_class=6)
    written = synset_names(4)
    assert written != sorted(written)  # so the order of the labels is the sorted one, not the written one
    dm = ImageClassDataModule(root, resolution=32, batch_size=4, hflip=False, num_classes=4)
    assert dm.class_names == sorted(written) and dm.num_classes == 4 and dm.image_shape == (3, 32, 32)
    ds = dm.dataset("train")
    assert len(ds) == 24 and sum("sub" in Path(r.path).parts for r in ds.records) == 4  # nested images too
    for index in range(len(ds)):
        item = ds[index]
        name = Path(item["path"]).relative_to(root).parts[0]
        assert item["label"].dtype == torch.int64 and int(item["label"]) == sorted(written).index(name)
        with Image.open(item["path"]) as img:
            reference = _adm_reference(img.convert("RGB"), 32).copy()
        expected = torch.from_numpy(reference).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=1e-6)
        centre = ((item["image"][:, 16, 16] + 1) * 127.5).round()
        colours = torch.tensor([class_colour(k, 4) for k in range(4)], dtype=torch.float32)
        assert int((colours - centre).abs().sum(1).argmin()) == written.index(name)  # its class's colour
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1


def test_the_label_conditioner_reads_the_batches(tmp_path):
    from diffusion.conditioning import ClassLabels

    dm = ImageClassDataModule(make_class_folder(tmp_path), resolution=32, batch_size=4, num_classes=4)
    batch = next(iter(dm.train_dataloader()))
    cond = ClassLabels(dm.num_classes)(batch)
    assert torch.equal(cond.labels, batch["label"])


def test_hflip_is_keyed_to_epoch_and_index_and_flips_about_half(tmp_path):
    root = make_class_folder(tmp_path, classes=2, per_class=4)
    plain = ImageClassDataModule(root, resolution=32, hflip=False, seed=3).dataset("train")
    flipping = ImageClassDataModule(root, resolution=32, hflip=True, seed=3).dataset("train")
    again = ImageClassDataModule(root, resolution=32, hflip=True, seed=3).dataset("train")  # a resumed run's
    flips = []
    for epoch in range(12):
        for index in range(len(plain)):
            key = EpochIndex(index, epoch)
            image, reference = flipping[key]["image"], plain[key]["image"]
            coin = torch.rand((), generator=torch.Generator().manual_seed(
                sample_seed(3, int.from_bytes(b"augment", "big"), epoch, index))) < 0.5  # captions' key
            assert torch.equal(image, reference.flip(-1) if coin else reference)
            assert torch.equal(again[key]["image"], image)
            flips.append(bool(coin))
    assert 0.35 < sum(flips) / len(flips) < 0.65  # 96 coins
    assert not (reference.flip(-1) == reference).all()


def _truncated_jpeg(path: Path) -> None:
    _noise(64, 64, seed=1).save(path, quality=95)  # noise: the pixel data is most of the file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_files_are_skipped_counted_and_replaced_by_their_class(tmp_path, caplog):
    root = make_class_folder(tmp_path, classes=3, per_class=6)
    names = sorted(synset_names(3))
    _truncated_jpeg(root / names[1] / "broken.JPEG")  # the header reads, the pixels do not
    (root / names[2] / "notes.png").write_text("not an image at all")  # no header
    with caplog.at_level(logging.WARNING):
        ds = ImageClassDataModule(root, resolution=32, max_bad_fraction=0.1).dataset("train")
    assert "1 of 20" in caplog.text and "notes.png" in caplog.text
    assert len(ds) == 19 and ds.num_bad == 1
    broken = next(i for i, r in enumerate(ds.records) if r.path.name == "broken.JPEG")
    item = ds[broken]
    assert int(item["label"]) == 1 and item["index"] != broken and ds.records[item["index"]].label == 1
    assert torch.isfinite(item["image"]).all() and "broken.JPEG" in caplog.text
    assert ds.num_bad == 2 and {p.name for p in ds.bad_paths} == {"notes.png", "broken.JPEG"}
    strict = ImageClassDataModule(root, resolution=32, max_bad_fraction=0.05).dataset("train")  # 1 of 20 fine
    with pytest.raises(TooManyBadImagesError, match=r"2 of 20 .*data.module.max_bad_fraction"):
        for index in range(len(strict)):
            strict[index]
    with pytest.raises(TooManyBadImagesError, match=r"1 of 20 .*data.module.max_bad_fraction"):
        ImageClassDataModule(root, resolution=32, max_bad_fraction=0.01).setup()


# --- held-out splits -------------------------------------------------------------------------

def test_val_fraction_holds_out_each_class_in_proportion_fixed_by_the_seed(tmp_path):
    root = make_class_folder(tmp_path, classes=4, per_class=10)

    def split(seed):
        dm = ImageClassDataModule(root, resolution=32, batch_size=2, val_fraction=0.3, seed=seed)
        return dm.dataset("train"), dm.dataset("val")

    train, val = split(0)
    assert len(train) == 28 and len(val) == 12
    assert [sum(r.label == k for r in val.records) for k in range(4)] == [3, 3, 3, 3]
    assert not {r.path for r in train.records} & {r.path for r in val.records}
    assert [r.path for r in split(0)[1].records] == [r.path for r in val.records]
    assert [r.path for r in split(1)[1].records] != [r.path for r in val.records]
    val_item = val[EpochIndex(0, 5)]  # validation never flips
    assert torch.equal(val_item["image"], val[0]["image"])


def test_val_root_must_hold_the_same_classes(tmp_path):
    train = make_class_folder(tmp_path / "train", classes=3, per_class=4)
    val = make_class_folder(tmp_path / "val", classes=3, per_class=2, seed=0)
    dm = ImageClassDataModule(train, resolution=32, batch_size=2, val_root=val, num_classes=3)
    assert len(dm.dataset("val")) == 6 and len(list(dm.val_dataloader())) == 3
    other = make_class_folder(tmp_path / "other", classes=3, per_class=2, seed=1)
    with pytest.raises(ValueError, match=r"same classes.*missing from val_root \['n\d{8}'.*only in val_root \['n"):
        ImageClassDataModule(train, resolution=32, val_root=other)
    with pytest.raises(ValueError, match="val_fraction or data.module.val_root"):
        ImageClassDataModule(train, val_fraction=0.2, val_root=val)


# --- the class count and the folder's layout -------------------------------------------------

def test_a_class_count_other_than_data_num_classes_is_refused(tmp_path):
    root = make_class_folder(tmp_path, classes=4, per_class=2)
    with pytest.raises(ValueError, match=r"data.num_classes=1000, but .* holds 4 class folders.*data.num_classes=4"):
        ImageClassDataModule(root, num_classes=1000)


def test_bad_layouts_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.module.root"):
        ImageClassDataModule(tmp_path / "nowhere")
    root = make_class_folder(tmp_path / "a", classes=2, per_class=2)
    (root / "n99999999" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="n99999999 .*hold no images"):
        ImageClassDataModule(root)
    flat = tmp_path / "flat"
    flat.mkdir()
    _noise(8, 8).save(flat / "x.png")
    with pytest.raises(ValueError, match="outside any class folder.*data=image_folder"):
        ImageClassDataModule(flat)
    (flat / "x.png").unlink()
    with pytest.raises(ValueError, match="no class folders"):
        ImageClassDataModule(flat)


def test_the_config_instantiates(tmp_path):
    root = make_class_folder(tmp_path, classes=4, per_class=2)
    data = OmegaConf.load(Path(CONF) / "data" / "image_classes.yaml")
    overrides = OmegaConf.from_dotlist([f"data.module.root={root}", "data.module.resolution=32", "data.num_classes=4",
                                        "data.module.batch_size=2", "data.module.num_workers=0"])
    cfg = OmegaConf.merge({"seed": 0, "data": data}, overrides)
    dm = instantiate(cfg.data.module)
    assert type(dm) is ImageClassDataModule and dm.num_classes == cfg.data.num_classes == 4
    assert list(cfg.data.image_shape) == list(dm.image_shape) == [3, 32, 32]
    assert next(iter(dm.train_dataloader()))["label"].shape == (2,)


# --- the tiny ImageNet recipes through train.py, the class list kept with the run ------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny DiT run through train.py on a 4-class folder: (folder, run directory, last checkpoint)."""
    base = tmp_path_factory.mktemp("dit")
    root = make_class_folder(base / "classes", classes=4, per_class=4, size=(40, 36))
    run = base / "run"
    proc = run_script("train.py", "experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={root}",
                      f"hydra.run.dir={run}", "logger=none", "trainer.enable_progress_bar=false", cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run, run / "checkpoints" / "last.ckpt"


def test_the_tiny_dit_recipe_trains_and_keeps_the_class_list(trained):
    root, run, ckpt = trained
    names = sorted(synset_names(4))
    assert json.loads((run / "classes.json").read_text()) == {"class_names": names}
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["ImageClassDataModule"] == {"class_names": names}
    assert checkpoint["run_config"]["data"]["num_classes"] == 4
    assert checkpoint["state_dict"]["backbone.y_embedder.table.weight"].shape[0] == 5  # 4 classes + null


def test_the_tiny_sit_recipe_trains(tmp_path):
    root = make_class_folder(tmp_path / "classes", classes=4, per_class=4, size=(40, 36))
    proc = run_script("train.py", "experiment=imagenet256_sit_xl_2_tiny", f"data.module.root={root}",
                      f"hydra.run.dir={tmp_path / 'run'}", "logger=none", "trainer.enable_progress_bar=false",
                      "trainer.max_steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "run" / "classes.json").is_file()


def test_a_checkpoint_of_other_classes_is_refused(trained, tmp_path):
    _, _, ckpt = trained
    three = make_class_folder(tmp_path / "three", classes=3, per_class=4, size=(40, 36))
    cfg = compose_config("train", ["experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={three}",
                                   "data.num_classes=3", f"ckpt_path={ckpt}", "logger=none"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"does not fit this model.*shape differs.*y_embedder"):
        cli.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory is written to


def test_resuming_needs_the_same_class_names(trained, tmp_path):
    root, _, ckpt = trained
    same = ["experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={root}", f"ckpt_path={ckpt}", "logger=none",
            "trainer.max_steps=6", "trainer.enable_progress_bar=false"]
    cli.train(compose_config("train", same, tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    renamed = make_class_folder(tmp_path / "renamed", classes=4, per_class=4, size=(40, 36), seed=5)
    cfg = compose_config("train", ["experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={renamed}",
                                   f"ckpt_path={ckpt}", "logger=none", "trainer.max_steps=6"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"other classes than the data's.*0: checkpoint 'n\d{8}', data 'n\d{8}'"):
        cli.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory is written to


# --- caching ---------------------------------------------------------------------------------

def test_cache_round_trip_writes_latents_and_labels_and_trains_without_the_images(tmp_path):
    root = make_class_folder(tmp_path / "classes", classes=4, per_class=4, size=(40, 36))
    overrides = ["experiment=imagenet256_dit_xl_2_tiny", f"data.module.root={root}", f"cache_dir={tmp_path / 'cache'}",
                 "vae.sample_posterior=false", "data.module.val_fraction=0.25", "logger=none", "trainer.max_steps=2"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    fingerprint = cli.cache_fingerprint(cfg, cli.build_module(cfg))
    assert {"root", "resolution", "hflip", "val_fraction", "num_classes", "seed"} <= set(fingerprint["data"])
    cli.cache(cfg)
    model = cli.build_module(cfg)
    source = instantiate(cfg.data.module).dataset("train")
    cached = CachedDataset(tmp_path / "cache" / "train", fingerprint)
    assert len(cached) == len(source) == 12 and len(CachedDataset(tmp_path / "cache" / "val", fingerprint)) == 4
    on_the_fly = default_collate([source[i] for i in range(6)])
    from_cache = default_collate([cached[i] for i in range(6)])
    assert set(from_cache) == {"latent", "label"} and from_cache["latent"].shape == (6, 4, 4, 4)
    assert torch.equal(from_cache["label"], on_the_fly["label"])
    torch.testing.assert_close(from_cache["latent"], model.latents(on_the_fly), rtol=0, atol=0)
    assert json.loads((tmp_path / "cache" / "classes.json").read_text())["class_names"] == sorted(synset_names(4))
    shutil.move(root, tmp_path / "moved")  # a run from the cache reads no image
    metrics = cli.train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["class_names"] == sorted(synset_names(4))
    with pytest.raises(ValueError, match=r"other settings.*\n.*data:.*hflip"):
        cli.train(compose_config("train", [*overrides, "data.module.hflip=false"], tmp_path / "run2"))
