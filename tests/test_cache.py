"""Encoding a dataset once into shards, and training from them."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import default_collate

from diffusion import cli
from diffusion.data.cache import CachedDataModule, CachedDataset, write_cache

ROOT = Path(__file__).resolve().parents[1]


def _same_loss(model, batch, seed=0):
    """The module's objective on a batch, with fixed t and noise."""
    x0 = model.latents(batch)
    g = torch.Generator().manual_seed(seed)
    t, noise = torch.rand(x0.shape[0], generator=g), torch.randn(x0.shape, generator=g)
    cond = model.conditioner(batch)
    return model.objective(lambda x, tt: model.backbone(x, tt, cond), x0, t=t, noise=noise).loss


def _cache_and_read(cfg, cache_dir):
    """Encode the configured data into ``cache_dir``; the model, the train split on the fly and from the cache."""
    cli.cache(cfg)
    model = cli.build_module(cfg)
    source = instantiate(cfg.data.module).dataset("train")
    return model, source, CachedDataset(cache_dir / "train", cli.cache_fingerprint(cfg, model))


def test_training_from_the_cache_matches_encoding_on_the_fly(train_config, tmp_path):
    cfg = train_config(f"cache_dir={tmp_path / 'cache'}", "cache_shard_size=500")
    model, source, cached = _cache_and_read(cfg, tmp_path / "cache")
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
    assert not (tmp_path / "run").exists()  # refused before the run directory is written to
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
    while not list(out.glob("shard_00001.bin")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    written = sorted(p.name for p in out.glob("shard_*.bin"))
    assert 2 <= len(written) < 5 and not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError):
        CachedDataset(out)
    data = [{"x": torch.full((3,), float(i))} for i in range(40)]
    write_cache(data, out, lambda b: {"latent": b["x"] * 2}, {"v": 1}, shard_size=8, batch_size=4)
    cached = CachedDataset(out, {"v": 1})
    assert json.loads((out / "index.json").read_text())["num_shards"] == 5
    assert [cached[i]["latent"][0].item() for i in range(40)] == [2.0 * i for i in range(40)]
    assert not list(out.glob("*.tmp"))  # a half-written shard was redone and renamed
    whole = write_cache(data, tmp_path / "whole", lambda b: {"latent": b["x"] * 2}, {"v": 1}, shard_size=8, batch_size=4)
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in out.iterdir())
    assert all((whole / p.name).read_bytes() == p.read_bytes() for p in out.iterdir())  # identical, byte for byte


def _identity(batch):
    return batch


def _samples(n, tokens=(77, 64)):
    """Text-to-image-like samples: float latents and tokens, a bool mask, an integer label."""
    g = torch.Generator().manual_seed(0)
    return [{"latent": 3 * torch.randn(4, 4, 4, generator=g), "tokens": torch.randn(*tokens, generator=g),
             "mask": torch.rand(tokens[0], generator=g) > 0.5, "label": torch.tensor(i)} for i in range(n)]


def _shard_bytes(directory):
    return sum(p.stat().st_size for p in directory.glob("shard_*.bin"))


@pytest.mark.parametrize("dtype, unit_roundoff", [("bfloat16", 2.0 ** -8), ("float16", 2.0 ** -11)])
def test_half_precision_caches_round_trip_within_their_precision_in_half_the_bytes(tmp_path, dtype, unit_roundoff):
    data = _samples(20)
    full = write_cache(data, tmp_path / "float32", _identity, {"dtype": "float32"}, shard_size=8)
    half = write_cache(data, tmp_path / dtype, _identity, {"dtype": dtype}, shard_size=8, dtype=dtype)
    cached = CachedDataset(half, {"dtype": dtype})
    for i, sample in enumerate(data):
        got = cached[i]
        for name in ("latent", "tokens"):  # floating point: stored rounded, read back as float32
            assert got[name].dtype == torch.float32
            assert torch.equal(got[name], sample[name].to(getattr(torch, dtype)).float())
            torch.testing.assert_close(got[name], sample[name], rtol=unit_roundoff, atol=1e-7)
        assert got["mask"].dtype == torch.bool and torch.equal(got["mask"], sample["mask"])  # kept as they are
        assert got["label"].dtype == torch.int64 and torch.equal(got["label"], sample["label"])
    assert 0.49 < _shard_bytes(half) / _shard_bytes(full) < 0.52  # floats are 98 % of a sample's bytes here


def test_a_value_beyond_float16_is_refused_not_stored_as_infinity(tmp_path):
    with pytest.raises(ValueError, match=r"'latent' has values up to 7e\+04.*float16.*cache_dtype=bfloat16"):
        write_cache([{"latent": torch.tensor([1.0, 7e4])}], tmp_path, _identity, {}, dtype="float16")


def test_the_cache_dtype_is_in_the_fingerprint_and_an_unknown_one_is_refused(train_config, tmp_path):
    cfg = train_config(f"cache_dir={tmp_path / 'cache'}", "cache_dtype=bfloat16")
    model, source, cached = _cache_and_read(cfg, tmp_path / "cache")
    idx = [0, 7, 1000]
    from_cache, on_the_fly = default_collate([cached[i] for i in idx]), default_collate([source[i] for i in idx])
    assert from_cache["latent"].dtype == torch.float32
    torch.testing.assert_close(from_cache["latent"], on_the_fly["image"], rtol=2.0 ** -8, atol=0)
    torch.testing.assert_close(_same_loss(model, from_cache), _same_loss(model, on_the_fly), rtol=1e-2, atol=0)
    assert torch.isfinite(torch.tensor(cli.train(cfg)["train/loss"]))
    with pytest.raises(ValueError, match=r"other settings.*\n.*dtype: cache has 'bfloat16', configuration has 'float32'"):
        cli.train(train_config(f"cache_dir={tmp_path / 'cache'}", run_dir=tmp_path / "refused"))
    with pytest.raises(ValueError, match="cache_dtype='float8' is not one of float32, bfloat16, float16"):
        cli.cache(train_config(f"cache_dir={tmp_path / 'other'}", "cache_dtype=float8"))


def _bytes_read() -> int:
    """Bytes this process has read through read() and its kin, page cache or not (Linux)."""
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text()).group(1))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through /proc/self/io (Linux)")
def test_reading_a_sample_reads_its_own_bytes_not_its_shard(tmp_path):
    """A shuffled epoch visits the shards in random order: a sample must cost its bytes (4 KiB
    here), not its shard's (128 KiB), whichever shard was read last."""
    g = torch.Generator().manual_seed(0)
    data = [{"latent": torch.randn(4, 16, 16, generator=g)} for _ in range(8 * 32)]
    write_cache(data, tmp_path, _identity, {}, shard_size=32)
    cached = CachedDataset(tmp_path)
    order = torch.randperm(len(data), generator=g)[:40].tolist()
    before = _bytes_read()
    samples = [cached[i] for i in order]
    read = _bytes_read() - before
    sample_bytes = 4 * 16 * 16 * 4
    headers = 8 * 1024  # each shard's header, once: a few bytes a sample
    assert read <= len(order) * sample_bytes + headers + 4096, f"{read} bytes read for {len(order)} samples"
    assert all(torch.equal(s["latent"], data[i]["latent"]) for s, i in zip(samples, order))


def test_latents_of_several_shapes_share_a_shard(tmp_path):
    shapes = [(4, 8, 8), (4, 6, 10), (4, 10, 6)]  # aspect-ratio buckets
    data = [{"latent": torch.randn(shapes[i % 3]), "label": torch.tensor(i)} for i in range(10)]
    write_cache(data, tmp_path, _identity, {}, shard_size=4, batch_size=4)
    cached = CachedDataset(tmp_path)
    assert cached.shapes() == [shapes[i % 3] for i in range(10)]
    assert all(torch.equal(cached[i]["latent"], data[i]["latent"]) for i in range(10))


def test_a_cache_in_the_old_format_is_refused_with_a_message_to_re_encode(tmp_path):
    """Format 1: each shard a torch.save'd list of sample dicts, an index without a format."""
    samples = [{"latent": torch.zeros(2)}]
    torch.save(samples, tmp_path / "shard_00000.pt")
    (tmp_path / "fingerprint.json").write_text("{}")
    (tmp_path / "index.json").write_text(json.dumps({"num_samples": 1, "shard_size": 1024, "num_shards": 1,
                                                     "shapes": [[2]], "shape_of_sample": [0]}))
    with pytest.raises(ValueError, match=r"old format \(shard_\*\.pt\).*re-encode"):
        CachedDataset(tmp_path)
    with pytest.raises(ValueError, match=r"old format \(shard_\*\.pt\).*re-encode"):
        write_cache(samples, tmp_path, _identity, {})


@pytest.mark.skipif(sys.platform != "linux", reason="forks DataLoader workers")
def test_loader_workers_read_the_batches_the_sampler_chose(tmp_path):
    """Workers open the shards themselves (forked after the parent has read some, or spawned from
    a pickled dataset, which carries no open file), and every sample is the one the sampler chose."""
    data = _samples(24, tokens=(5, 8))
    write_cache(data, tmp_path / "train", _identity, {}, shard_size=5)
    dataset = CachedDataset(tmp_path / "train")
    assert torch.equal(dataset[7]["tokens"], data[7]["tokens"])  # the parent holds an open shard now
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[12]["latent"], data[12]["latent"])
    loader = CachedDataModule(tmp_path, batch_size=4, seed=3).train_dataloader()
    expected = [default_collate([data[i] for i in indices]) for indices in loader.batch_sampler]
    # Forked workers (spawned ones start from the pickled copy above, and take seconds to import torch).
    batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=loader.batch_sampler, num_workers=2,
                                               multiprocessing_context="fork"))
    assert len(batches) == len(expected) == 6
    assert all(torch.equal(got[k], want[k]) for got, want in zip(batches, expected) for k in want)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(loader, expected) for k in b)  # the main process too


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")  # steps run without a Trainer
def test_the_cache_benchmark_trains_from_an_on_disk_cache_of_50_shards(tmp_path):
    """benchmarks/cache_speed.py's disk part on a tiny model: 50 shards of 2 samples, written,
    read through the data module's shuffled loader, checked equal to the in-memory batch, timed."""
    spec = importlib.util.spec_from_file_location("cache_speed", ROOT / "benchmarks" / "cache_speed.py")
    cache_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_speed)
    result = cache_speed.disk_vs_memory(tmp_path, shards=50, shard_size=2, batch=2, steps=3,
                                        cache_dtype="bfloat16", backbone="dit_tiny", latent=(4, 8, 8), tokens=(7, 16),
                                        pooled=16)
    assert len(list((tmp_path / "train").glob("shard_*.bin"))) == 50
    assert result["disk_sps"] > 0 and result["memory_sps"] > 0
    assert 0 < result["ratio_min"] <= result["ratio"] <= result["ratio_max"]


def test_samples_of_a_shard_with_other_fields_or_dtypes_are_refused(tmp_path):
    data = [{"latent": torch.zeros(2), "label": torch.tensor(0)}, {"latent": torch.zeros(2), "label": torch.tensor(1.5)}]
    with pytest.raises(ValueError, match=r"sample 1 of a shard has the fields \{'latent': 'float32', 'label': 'float32'\}"):
        write_cache(data, tmp_path, _identity, {}, batch_size=1)
