"""Training steps per second from cached latents: against encoding on the fly, and from the disk
against the same samples held in memory.

1. From cache / on the fly. The VAE has the real Stable Diffusion architecture (random weights
   are fine for timing: the cost is the same), images are 256 px, and the backbone is DiT-S/2 on
   the 32x32x4 latents, class-conditional. Each step is the module's own training step (objective,
   backward, AdamW), once fed images (encoded inside the step) and once fed the cached latents of
   the same images. Target (issue 5): >= 1.9x (the fast-DiT project reports 1.95x on a GPU from
   pre-extracted latents).

2. From disk / in memory. An on-disk cache of ``--shards`` shards of ``--shard-size`` samples
   (default 64 x 16), each what ``cache.py`` stores for text-to-image at 256 px with SD's VAE and
   OpenCLIP ViT-H: a 4x32x32 latent, 77x1024 tokens, their mask and a 1024 pooled vector
   (random values, in ``--cache-dtype``). DiT-S/2 with cross-attention to the tokens trains from
   it through ``CachedDataModule``'s loader (the shuffled batch sampler of training), against the
   same samples, read from that cache once and held in memory as tensors, batched by the same
   sampler: same model, same batches. The two kinds take turns step by step (a pair of steps
   trains on the same batch), and each step is timed with the fetching of its batch. Before each
   step from disk the shards are dropped from the page cache (fsync, then
   ``posix_fadvise(DONTNEED)``), so its reads come from the disk (``--warm`` keeps them cached).
   Target (issue 10): >= 0.9x.

Rounds (pairs of steps in part 2) alternate the order of the two kinds (A B, B A, ...), so a
drifting load hits both alike; printed are the medians of the steps/s and of the per-round ratio.
Part 2 charges a step the wall time of fetching its batch (it may wait on the disk) and the CPU
time of its training step: on a shared machine the other jobs lengthen a step's wall time by far
more than the fetch takes (the wall-clock ratio is printed too; with ``--threads 1`` the CPU time
is the step's work, with more it also counts the spinning of OpenMP workers). The fetch times say
what the ratio would be at another step time, e.g. on a GPU.

    python benchmarks/cache_speed.py [--batch 4] [--rounds 5] [--steps 20] [--threads 2]
                                     [--shards 64] [--shard-size 16] [--cache-dtype float32]
                                     [--workers 0] [--warm] [--dir DIR] [--backbone DiT-S/2]
                                     [--part both|on-the-fly|disk]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from diffusion.autoencoders import KLAutoencoder
from diffusion.backbones import build_dit
from diffusion.conditioning import ClassLabels, Conditioning, TextPrompts
from diffusion.data.cache import CachedDataModule, write_cache
from diffusion.schedules import FlowMatching
from diffusion.training.module import DiffusionModule

# Stable Diffusion's VAE (Rombach et al. 2022; the `vae/config.json` of SD 1.x/2.x).
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    scaling_factor=0.18215,
)
LATENT = (4, 32, 32)  # SD's VAE at 256 px
TOKENS, POOLED = (77, 1024), 1024  # OpenCLIP ViT-H/14's text tower (SD 2.x)


class NullTextEncoder(nn.Module):
    """Training from a cache runs no text encoder; the module needs only the sizes and the null
    condition of classifier-free guidance (zeros here, of OpenCLIP ViT-H's shapes)."""

    def __init__(self, tokens: tuple[int, int] = TOKENS, pooled: int = POOLED):
        super().__init__()
        (self.max_length, self.token_dim), self.pooled_dim = tokens, pooled

    def null_condition(self, batch_size: int = 1) -> Conditioning:
        mask = torch.zeros(batch_size, self.max_length, dtype=torch.bool)
        mask[:, :2] = True  # start and end of the empty prompt
        return Conditioning(tokens=torch.zeros(batch_size, self.max_length, self.token_dim), mask=mask,
                            pooled=torch.zeros(batch_size, self.pooled_dim))


def trainer_step(module: DiffusionModule) -> Callable[[dict[str, Any], int], float]:
    """One timed training step of ``module``: its training_step, backward, AdamW."""
    optimizer = torch.optim.AdamW(module.backbone.parameters(), lr=1e-4)

    def step(batch: dict[str, Any], batch_idx: int = 0) -> float:
        start = time.perf_counter()
        loss = module.training_step(batch, batch_idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def alternate(kinds: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """``{kind: [seconds of each round]}``, the kinds' order reversed every other round."""
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(rounds):
        for name in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
            times[name].append(kinds[name](r))
    return times


def on_the_fly_vs_cache(batch: int, rounds: int) -> dict[str, float]:
    """Seconds per step encoding 256 px images with SD's VAE inside the step, and from their latents."""
    vae = KLAutoencoder(config=SD_VAE)
    module = DiffusionModule(build_dit("DiT-S/2", in_channels=4, num_classes=10), FlowMatching(),
                             conditioner=ClassLabels(10), autoencoder=vae, image_shape=LATENT)
    step = trainer_step(module)
    images = torch.rand(batch, 3, 256, 256) * 2 - 1
    labels = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        latents = vae.encode(images)  # what the cache holds
    batches = {"on the fly": {"image": images, "label": labels}, "from cache": {"latent": latents, "label": labels}}
    for b in batches.values():  # warm-up
        step(b)
    times = alternate({name: (lambda r, b=b: step(b)) for name, b in batches.items()}, rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def text_samples(n: int, latent: tuple[int, ...], tokens: tuple[int, int], pooled: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(tokens[0]) < tokens[0] // 4  # a short caption, padded
    return [{"latent": torch.randn(latent, generator=g), "tokens": torch.randn(tokens, generator=g), "mask": mask,
             "pooled": torch.randn(pooled, generator=g)} for _ in range(n)]


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Make the next reads of these files come from the disk (Linux; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_vs_memory(directory: Path, *, shards: int, shard_size: int, batch: int, steps: int,
                   cache_dtype: str = "float32", workers: int = 0, cold: bool = True, backbone: str = "DiT-S/2",
                   latent: tuple[int, ...] = LATENT, tokens: tuple[int, int] = TOKENS,
                   pooled: int = POOLED) -> dict[str, float]:
    """Steps/s training from an on-disk cache through the data module, and from the same samples
    in memory, ``steps`` steps of each, interleaved; ``ratio`` is the median over the pairs of
    steps of disk / memory (the steps of a pair train on the same batch)."""
    samples = text_samples(shards * shard_size, latent, tokens, pooled)
    write_cache(samples, directory / "train", lambda b: b, {"dtype": cache_dtype}, shard_size=shard_size,
                batch_size=shard_size, dtype=cache_dtype)
    del samples
    loader = CachedDataModule(directory, batch_size=batch, num_workers=workers, seed=0).train_dataloader()
    sampler, dataset = loader.batch_sampler, loader.dataset
    if len(sampler) < steps + 1:
        raise ValueError(f"{len(sampler)} batches an epoch, fewer than --steps {steps} + 1: add shards or lower --steps")
    memory = default_collate([dataset[i] for i in range(len(dataset))])  # the cache's values, held as tensors
    module = DiffusionModule(build_dit(backbone, in_channels=latent[0], token_dim=tokens[1], pooled_dim=pooled),
                             FlowMatching(), conditioner=TextPrompts(NullTextEncoder(tokens, pooled)),
                             image_shape=latent)
    step = trainer_step(module)
    shard_files = sorted((directory / "train").glob("shard_*.bin"))

    sampler.set_epoch(0)  # one shuffled epoch, read both ways
    batches = {"from disk": iter(loader),
               "in memory": ({name: value[torch.as_tensor(indices)] for name, value in memory.items()}
                             for indices in sampler)}
    first = {name: next(it) for name, it in batches.items()}  # the same samples both ways, and a warm-up step
    assert all(torch.equal(first["from disk"][k], v) for k, v in first["in memory"].items())
    step(first["from disk"])
    fetch: dict[str, list[float]] = {name: [] for name in batches}  # wall seconds getting the batch
    wall: dict[str, list[float]] = {name: [] for name in batches}  # wall seconds of fetch + step

    def timed(name: str) -> Callable[[int], float]:
        def one_step(i: int) -> float:
            """The step's cost: the wall time of its fetch (which may wait on the disk) and the CPU
            time of its training step (which the machine's other jobs do not lengthen)."""
            if cold and name == "from disk":
                drop_from_page_cache(shard_files)
            start = time.perf_counter()
            b = next(batches[name])
            fetch[name].append(time.perf_counter() - start)
            cpu = time.process_time()
            step(b, i + 1)
            wall[name].append(time.perf_counter() - start)
            return fetch[name][-1] + time.process_time() - cpu
        return one_step

    cost = alternate({name: timed(name) for name in batches}, steps)
    ratio = [m / d for d, m in zip(cost["from disk"], cost["in memory"])]
    wall_ratio = [m / d for d, m in zip(wall["from disk"], wall["in memory"])]
    return {"disk_sps": 1 / statistics.median(cost["from disk"]),
            "memory_sps": 1 / statistics.median(cost["in memory"]),
            "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
            "wall_ratio": statistics.median(wall_ratio), "wall_ratio_min": min(wall_ratio),
            "wall_ratio_max": max(wall_ratio),
            "disk_fetch_ms": 1e3 * statistics.median(fetch["from disk"]),
            "memory_fetch_ms": 1e3 * statistics.median(fetch["in memory"]),
            "shard_bytes": sum(p.stat().st_size for p in shard_files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps from disk and as many in memory, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--cache-dtype", default="float32")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the disk loader")
    parser.add_argument("--warm", action="store_true", help="leave the shards in the page cache")
    parser.add_argument("--dir", type=Path, default=None, help="where the cache is written (a temporary directory)")
    parser.add_argument("--backbone", default="DiT-S/2", help="of the disk / memory comparison (a smaller one stresses the reads)")
    parser.add_argument("--part", choices=["both", "on-the-fly", "disk"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=r".*self.trainer. reference is not registered")  # steps run without a Trainer

    if args.part != "disk":
        seconds = on_the_fly_vs_cache(args.batch, args.rounds)
        print(f"batch {args.batch} of 256 px images, SD-VAE architecture, DiT-S/2, {args.threads} threads, "
              f"median of {args.rounds}")
        for name, s in seconds.items():
            print(f"  {name:<11} {s:.3f} s/step  {1 / s:.3f} steps/s")
        ratio = seconds["on the fly"] / seconds["from cache"]
        print(f"steps/s from cache / on the fly: {ratio:.2f}x (target >= 1.9x): {'PASS' if ratio >= 1.9 else 'FAIL'}")

    if args.part == "on-the-fly":
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        r = disk_vs_memory(Path(directory), shards=args.shards, shard_size=args.shard_size, batch=args.batch,
                           steps=args.steps, cache_dtype=args.cache_dtype, workers=args.workers,
                           cold=not args.warm, backbone=args.backbone)
    print(f"on-disk cache: {args.shards} shards x {args.shard_size} samples of a {'x'.join(map(str, LATENT))} latent "
          f"and {'x'.join(map(str, TOKENS))} tokens in {args.cache_dtype}, {r['shard_bytes'] / 2 ** 20:.0f} MiB, "
          f"{'page cache dropped before each step' if not args.warm else 'page cache kept'}, {args.workers} workers; "
          f"{args.backbone} text, batch {args.batch}, {args.threads} thread(s), median of {args.steps} shuffled steps")
    print(f"  from disk   {r['disk_sps']:.3f} steps/s, {r['disk_fetch_ms']:.1f} ms of a step fetching the batch")
    print(f"  in memory   {r['memory_sps']:.3f} steps/s, {r['memory_fetch_ms']:.1f} ms of a step fetching the batch")
    print(f"steps/s from disk / in memory: {r['ratio']:.3f}x (fetch wall + step CPU time; pairs of steps "
          f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}), target >= 0.9x: {'PASS' if r['ratio'] >= 0.9 else 'FAIL'}")
    print(f"  wall clock: {r['wall_ratio']:.3f}x (pairs of steps {r['wall_ratio_min']:.3f}-{r['wall_ratio_max']:.3f})")


if __name__ == "__main__":
    main()
