"""Text-to-image in latent space, offline end to end: a tiny captioned folder, tiny random
encoders built from config, a cache, a few training steps from it, and sampling with prompts."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from torch.utils.data import default_collate

from diffusion import cli
from diffusion.data.cache import CachedDataset
from tests.conftest import compose_config, run_script
from tests.make_captioned_folder import make_captioned_folder


def _overrides(tmp_path):
    root = make_captioned_folder(tmp_path / "images", n=12, sizes=[(48, 48), (64, 48)], layout="csv", uncaptioned=2)
    return ["experiment=t2i_tiny", f"data.module.root={root}", f"cache_dir={tmp_path / 'cache'}",
            "data.module.batch_size=4", "backbone=dit_tiny", "cache_shard_size=5"]


def _loss(model, batch):
    x0 = model.latents(batch)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
    cond = model.conditioner(batch)
    return model.objective(lambda x, tt: model.backbone(x, tt, cond), x0, t=t, noise=noise).loss


def test_text_to_image_end_to_end_offline(train_config, tmp_path):
    cfg = train_config(*_overrides(tmp_path))
    cli.cache(cfg)

    # The same batch gives the same loss from the cache as with the encoders run on the fly.
    model = cli.build_module(cfg).eval()
    source = instantiate(cfg.data.module).dataset("train")
    cached = CachedDataset(tmp_path / "cache" / "train", cli.cache_fingerprint(cfg, model))
    idx = [0, 1, 2, 3, 5, 6]  # across shards of 5, captioned and not
    assert not all(source[i]["has_caption"] for i in range(len(source)))
    on_the_fly = default_collate([source[i] for i in idx])
    from_cache = default_collate([cached[i] for i in idx])
    torch.testing.assert_close(_loss(model, from_cache), _loss(model, on_the_fly), rtol=1e-5, atol=1e-6)
    from diffusion.conditioning.micro import MICRO_KEYS  # SDXL's image sizes are cached with them

    assert all(torch.equal(from_cache[k], on_the_fly[k]) for k in MICRO_KEYS)

    cli.train(cfg)  # from the shards
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained = cli.load_module(ckpt)
    images = trained.sample(2, ["a red circle", "a blue square"], steps=3)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()

    out = tmp_path / "prompted.png"
    sample_cfg = compose_config("sample", [f"ckpt={ckpt}", "num=4", "steps=2", "cfg_scale=4",
                                           'prompts=["a red circle","a green square"]', f"out={out}",
                                           "progress=false"], tmp_path)
    assert cli.sample(sample_cfg).is_file()


def test_the_checkpoint_leaves_out_the_frozen_encoders(train_config, tmp_path):
    cfg = train_config(*[o for o in _overrides(tmp_path) if not o.startswith("cache_dir")])
    cli.train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith(("autoencoder.", "conditioner."))]
    assert any(k.startswith("backbone.") for k in state)


def test_aspect_ratio_buckets_train_on_the_fly_and_from_the_cache(train_config, tmp_path):
    root = make_captioned_folder(tmp_path / "images", n=12, sizes=[(96, 48), (48, 48), (48, 96)], layout="txt")
    overrides = ["experiment=t2i_tiny", f"data.module.root={root}", "data.module.batch_size=2", "backbone=dit_tiny",
                 "data.module.resolution=64", "data.module.buckets={multiple: 16, max_ratio: 2.0}",
                 "model.sampling.num_images=2"]
    cli.train(train_config(*overrides, run_dir=tmp_path / "fly"))
    assert (tmp_path / "fly" / "checkpoints" / "last.ckpt").is_file()

    cfg = train_config(*overrides, f"cache_dir={tmp_path / 'cache'}", run_dir=tmp_path / "cached")
    cli.cache(cfg)
    shapes = set(CachedDataset(tmp_path / "cache" / "train").shapes())
    assert shapes == {(4, 8, 8), (4, 6, 10), (4, 10, 6)}, shapes  # square, wide and tall latents of 64 px buckets
    cli.train(cfg)
    assert (tmp_path / "cached" / "checkpoints" / "last.ckpt").is_file()


def test_an_fsdp2_checkpoint_of_a_latent_text_model_leaves_out_the_encoders_and_samples_in_one_process(tmp_path):
    """Two FSDP2 processes shard the backbone only; the frozen VAE and text encoder stay out of the
    checkpoint, which one process rebuilds from its config and samples from with prompts."""
    overrides = [o for o in _overrides(tmp_path) if not o.startswith(("cache_dir", "data.module.batch_size"))]
    result = run_script("train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides,
                        "data.module.batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                        "trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_train_steps=2",
                        "model.sampling.steps=2", "model.sampling.num_images=2", "trainer.enable_progress_bar=false",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not [k for k in state if k.startswith(("autoencoder.", "conditioner."))]
    assert cli.load_module(ckpt).sample(2, ["a red circle", "a blue square"], steps=2).shape == (2, 3, 32, 32)
