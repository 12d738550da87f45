"""Encoding a dataset once into shards, and training from them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from diffusion import cli
from diffusion.data.cache import CachedDataset, write_cache

ROOT = Path(__file__).resolve().parents[1]


def _same_loss(model, batch, seed=0):
    """The module's objective on a batch, with fixed t and noise."""
    x0 = model.latents(batch)
    g = torch.Generator().manual_seed(seed)
    t, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
    cond = model.conditioner(batch)
    return model.objective(lambda x, tt: model.backbone(x, tt, cond), x0, t=t, noise=noise).loss


def test_training_from_the_cache_matches_encoding_on_the_fly(train_config, tmp_path):
    cfg = train_config(f"cache_dir={tmp_path / 'cache'}", "cache_shard_size=500")
    cli.cache(cfg)
    model = cli.build_module(cfg)
    source = __import__("hydra.utils", fromlist=["instantiate"]).instantiate(cfg.data.module).dataset("train")
    cached = CachedDataset(tmp_path / "cache" / "train", cli.cache_fingerprint(cfg, model))
    assert len(cached) == len(source) and (tmp_path / "cache" / "val" / "index.json").exists()
    idx = [0, 7, 499, 500, 1000]  # across shards
    on_the_fly = default_collate([source[i] for i in idx])
    from_cache = default_collate([cached[i] for i in idx])
    torch.testing.assert_close(_same_loss(model, from_cache), _same_loss(model, on_the_fly), rtol=0, atol=0)
    metrics = cli.train(cfg)  # and a run reads the shards
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_fingerprint_mismatch_is_refused_with_what_differs(train_config, tmp_path):
    cli.cache(train_config(f"cache_dir={tmp_path / 'cache'}"))
    with pytest.raises(ValueError, match=r"other settings.*\n.*data:.*val_fraction"):
        cli.train(train_config(f"cache_dir={tmp_path / 'cache'}", "data.module.val_fraction=0.3"))
    with pytest.raises(ValueError, match="conditioner"):
        cli.cache(train_config(f"cache_dir={tmp_path / 'cache'}", "conditioning=none"))


def test_an_incomplete_cache_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "fingerprint.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a complete cache"):
        CachedDataset(tmp_path / "c")


SLOW_WRITER = """
import sys, time, torch
from diffusion.data.cache import write_cache
data = [{"x": torch.full((3,), float(i))} for i in range(40)]
def encode(batch):
    time.sleep(0.15)  # slow enough to be killed part-way
    return {"latent": batch["x"] * 2}
write_cache(data, sys.argv[1], encode, {"v": 1}, shard_size=8, batch_size=4)
"""


def test_a_kill_while_writing_then_a_rerun_gives_a_complete_correct_cache(tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], cwd=ROOT)
    deadline = time.time() + 60
    while not list(out.glob("shard_00001.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    written = sorted(p.name for p in out.glob("shard_*.pt"))
    assert 2 <= len(written) < 5 and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError):
        CachedDataset(out)
    data = [{"x": torch.full((3,), float(i))} for i in range(40)]
    write_cache(data, out, lambda b: {"latent": b["x"] * 2}, {"v": 1}, shard_size=8, batch_size=4)
    cached = CachedDataset(out, {"v": 1})
    assert json.loads((out / "index.json").read_text())["num_shards"] == 5
    assert [cached[i]["latent"][0].item() for i in range(40)] == [2.0 * i for i in range(40)]
    assert not list(out.glob("*.tmp"))  # a half-written shard was redone and renamed
