"""Lightning loop overhead: steps per second of ``L.Trainer.fit`` against a plain PyTorch loop
that runs the same training step on the same model and data, in one process on the CPU.
Target: Lightning at least 0.97x the plain loop's steps per second.

Same model: the default module of ``conf/train.yaml`` (the class-conditional DiT on 1x8x8
digits, batch 128) is built once from the seed and deep-copied for every run, so every run
starts from the same weights. Same data: ``warmup + steps + 1`` batches of the digits train
loader (shuffled with the seed, real images, no synthetic batch) are pre-loaded into a list once;
both loops read that list through a fresh ``DataLoader(batches, batch_size=None)``, so fetching a
batch costs the same in both.

Same step: the plain loop does what Lightning's automatic optimisation does, in its order:
``module.training_step`` (forward, loss, the finite-loss check), ``zero_grad``, ``backward``,
clipping the gradients' norm at the trainer config's ``gradient_clip_val`` (1.0; the Trainer gets
the same), ``optimizer.step``, the EMA update (the module's ``optimizer_step`` override),
``scheduler.step``. The AdamW and the per-step LambdaLR come from the module's own
``configure_optimizers``, with the run's ``max_steps``. Outside a Trainer, ``self.log`` is a no-op
in the plain loop: logging is Lightning's work and its cost is counted as Lightning's. Before any
timing, 3 steps of both loops from the same weights and RNG state must end with identical
weights, EMA weights, AdamW moments and learning rate, or the script stops.

Only the steps are timed. The sample grids are off (the lean Trainer has no SampleGrids callback). The Trainer is the lean one a
throughput run would use: no logger, checkpointing, progress bar, model summary, validation or
sanity check. A callback reads the clocks at ``on_train_batch_start`` of batch ``warmup`` and of
each batch up to ``warmup + steps``; the window holds ``steps`` whole cycles of Lightning's loop
(fetch, transfer, hooks, step, clipping, scheduler, logging bookkeeping) and leaves out the
once-per-fit setup and teardown (Trainer construction, strategy setup, configure_optimizers, the
loader's first iterator), which do not grow with the run: a long run pays them once. The plain
loop reads its clocks at the same points (before ``training_step`` of those batches), so it is
charged its fetches too. Each run warms up for ``warmup`` untimed steps first.

Two clocks: the CPU time of the process (``time.process_time``) and the wall clock. The CPU time
is the headline: with one thread the loop is a single busy thread that never waits on a device
or on I/O, so its CPU time is its cost, and time the scheduler gives to other jobs on the shared
cores is not charged to whichever loop happened to run then. Rounds alternate the order (plain
first, then Lightning first, ...) so drifting load hits both alike; reported are the medians over
the rounds of steps/s and of the per-round ratio Lightning / plain (PASS/FAIL on the CPU ratio).

It runs with one intra-op thread unless told otherwise: on this shared 2-core machine a second
thread makes every small tensor op wait for a descheduled peer when another process holds a core,
which times the neighbours, not the loop (as in sampler_overhead.py); with more threads the CPU
clock also counts the spinning of OpenMP workers, so read the wall-clock line then.

Lightning's overhead is a fixed cost per step, about 1 ms of Python on this machine (hook
dispatch, the closure, ``self.log``), so the ratio depends on how long the step is: the default
step (~0.3 s) hides it; a tiny one shows it (``backbone=dit_tiny data.module.batch_size=16``,
~8 ms a step). ``--explain`` times ``self.log`` inside a Lightning run and prints a cProfile of
Lightning's steps.

    python benchmarks/loop_overhead.py                      (default: about 2 minutes)
    python benchmarks/loop_overhead.py [--rounds 7] [--steps 20] [--warmup 3] [--threads 1]
                                       [--explain] [Hydra overrides of conf/train.yaml ...]
    python benchmarks/loop_overhead.py --rounds 9 --steps 100 --explain backbone=dit_tiny data.module.batch_size=16
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import logging
import pstats
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from diffusion.cli import build_module
from diffusion.training.module import DiffusionModule

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def quiet() -> None:
    """Lightning's start-up lines and its 'few workers' hint, once per fit, say nothing here."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=r".*`max_steps=\d+` reached.*")
    warnings.filterwarnings("ignore", message=r".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def compose_train_config(overrides: list[str] = ()) -> DictConfig:
    """``conf/train.yaml`` with the sample grids off, as train.py would compose it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose(config_name="train", overrides=["model.sampling.every_n_steps=0", *overrides])


def build(cfg: DictConfig) -> DiffusionModule:
    """The module of ``cfg``, weights from ``cfg.seed`` (the lean Trainer has no SampleGrids callback)."""
    torch.manual_seed(cfg.seed)
    return build_module(cfg)


def preload_batches(cfg: DictConfig, count: int) -> list[dict[str, Any]]:
    """``count`` batches of the configured train loader (epochs repeat as needed), shuffled with the seed."""
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data.module)
    datamodule.setup("fit")
    batches: list[dict[str, Any]] = []
    while len(batches) < count:
        for batch in datamodule.train_dataloader():
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def loader(batches: list[dict[str, Any]]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)


def now() -> tuple[float, float]:
    """(wall-clock, CPU time of this process) in seconds."""
    return time.perf_counter(), time.process_time()


def cycles(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds between consecutive readings."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


# --- the plain loop -------------------------------------------------------------------------
def plain_optimizers(module: DiffusionModule, max_steps: int):
    """The module's own ``configure_optimizers``, with the run length a Trainer would give it.
    (It reads ``self.trainer.max_steps``; ``self.trainer`` raises outside a Trainer, so a stand-in
    with ``max_steps`` is attached for the call and removed again.)"""
    module._trainer = SimpleNamespace(max_steps=max_steps)
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    assert config["lr_scheduler"]["interval"] == "step"
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def run_plain(module: DiffusionModule, batches: list[dict[str, Any]], clip: float | None,
              start: int, stop: int, seed: int | None = None, keep: dict | None = None) -> list[tuple[float, float]]:
    """Train on all ``batches``; the seconds of each cycle from before the step of batch ``start``
    to before that of batch ``stop`` (``stop == len(batches)``: to the end), as (wall, CPU) pairs.
    ``seed``: reseed right before the first step; ``keep``: receives the optimizer and the scheduler."""
    module.configure_model()  # the hook Lightning calls in its setup (e.g. compiling the backbone)
    module.train()
    module.log = lambda *args, **kwargs: None  # no Trainer to log to; Lightning pays for its own
    optimizer, scheduler = plain_optimizers(module, len(batches))
    if keep is not None:
        keep.update(optimizer=optimizer, scheduler=scheduler)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stamps = []
    for i, batch in enumerate(loader(batches)):
        if start <= i <= stop:
            stamps.append(now())
        if i == 0 and seed is not None:
            torch.manual_seed(seed)
        loss = module.training_step(batch, i)
        optimizer.zero_grad()  # where Lightning's closure zeroes: after the step, before backward
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        module.ema.update(module.backbone)  # DiffusionModule.optimizer_step's addition
        scheduler.step()
    if stop == len(batches):
        stamps.append(now())
    return cycles(stamps)


# --- the Lightning loop ---------------------------------------------------------------------
class StepClock(L.Callback):
    """Clock readings at ``on_train_batch_start`` of batches ``start`` to ``stop`` (the last at the
    end of training when ``stop`` is past the last batch); optionally reseeds before batch 0 or
    profiles the window."""

    def __init__(self, start: int, stop: int, seed: int | None = None, profiler: cProfile.Profile | None = None):
        self.start, self.stop, self.seed, self.profiler = start, stop, seed, profiler
        self.stamps: list[tuple[float, float]] = []
        self.threads = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and self.seed is not None:
            torch.manual_seed(self.seed)
        if self.start <= batch_idx <= self.stop:
            self.stamps.append(now())
        if batch_idx == self.start:
            self.threads = torch.get_num_threads()
            if self.profiler is not None:
                self.profiler.enable()
        if batch_idx == self.stop and self.profiler is not None:
            self.profiler.disable()

    def on_train_end(self, trainer, pl_module):
        if len(self.stamps) == self.stop - self.start:
            self.stamps.append(now())
            if self.profiler is not None:
                self.profiler.disable()

    @property
    def cycles(self) -> list[tuple[float, float]]:
        return cycles(self.stamps)


def make_trainer(max_steps: int, clip: float | None, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision=32, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=callbacks)


def run_lightning(module: DiffusionModule, batches: list[dict[str, Any]], clip: float | None,
                  start: int, stop: int, seed: int | None = None,
                  profiler: cProfile.Profile | None = None) -> list[tuple[float, float]]:
    clock, threads = StepClock(start, stop, seed, profiler), torch.get_num_threads()
    make_trainer(len(batches), clip, [clock]).fit(module, loader(batches))
    if clock.threads != threads:
        raise RuntimeError(f"the Trainer ran with {clock.threads} threads instead of {threads}")
    return clock.cycles


# --- same step, checked ----------------------------------------------------------------------
def check_same_step(module: DiffusionModule, batches: list[dict[str, Any]], clip: float | None, seed: int = 0) -> None:
    """Both loops from the same weights and RNG state over ``batches`` must end with the same
    weights, EMA weights and count, optimiser moments and learning rate: they ran the same step."""
    plain, lit, kept = copy.deepcopy(module), copy.deepcopy(module), {}
    run_plain(plain, batches, clip, 0, len(batches), seed=seed, keep=kept)
    run_lightning(lit, batches, clip, 0, len(batches), seed=seed)
    lr_plain, lr_lit = kept["scheduler"].get_last_lr(), lit.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    if lr_plain != lr_lit:
        raise AssertionError(f"learning rates differ: plain {lr_plain}, Lightning {lr_lit}")

    def moments(optimizer):
        return {f"{i}.{k}": v for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}

    pairs = [("backbone", plain.backbone.state_dict(), lit.backbone.state_dict()),
             ("ema", plain.ema.state_dict(), lit.ema.state_dict()),
             ("adamw", moments(kept["optimizer"]), moments(lit.trainer.optimizers[0]))]
    for name, a, b in pairs:
        if a.keys() != b.keys():
            raise AssertionError(f"{name}: different entries")
        for key, x in a.items():
            y = b[key]
            if not torch.equal(x, y):
                raise AssertionError(f"{name}.{key} differs after {len(batches)} steps: max |diff| "
                                     f"{(x.float() - y.float()).abs().max().item():.3g}; the loops do not run the same step")


# --- measurement ----------------------------------------------------------------------------
def measure(cfg: DictConfig, rounds: int, steps: int, warmup: int,
            report: Callable[[str], None] = print) -> dict[str, float]:
    """Alternating rounds of both loops; per clock (CPU time of the process, wall-clock) the
    medians over the rounds of steps/s and of the per-round ratio Lightning / plain."""
    clip = cfg.trainer.get("gradient_clip_val")
    pristine = build(cfg)
    batches = preload_batches(cfg, warmup + steps + 1)
    check_same_step(pristine, batches[:3], clip, seed=cfg.seed)
    report("same step: 3 steps of both loops from one RNG state give identical weights, EMA, "
           "AdamW moments and learning rate")
    clocks = ("cpu", "wall")
    runs = {which: {clock: [] for clock in clocks} for which in ("plain", "lightning")}
    ratios: dict[str, list[float]] = {clock: [] for clock in clocks}
    for r in range(rounds):
        order = ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain")
        got = {}
        for which in order:
            run = run_plain if which == "plain" else run_lightning
            timed = run(copy.deepcopy(pristine), batches, clip, warmup, warmup + steps)
            got[which] = {"wall": steps / sum(w for w, _ in timed), "cpu": steps / sum(c for _, c in timed)}
        for clock in clocks:
            for which in got:
                runs[which][clock].append(got[which][clock])
            ratios[clock].append(got["lightning"][clock] / got["plain"][clock])
        report(f"round {r + 1:2d}/{rounds} ({order[0]:<9} first): steps per CPU second: plain "
               f"{got['plain']['cpu']:8.3f} Lightning {got['lightning']['cpu']:8.3f} ratio {ratios['cpu'][-1]:.3f}"
               f"  | per wall second: {got['plain']['wall']:8.3f} {got['lightning']['wall']:8.3f} "
               f"ratio {ratios['wall'][-1]:.3f}")
    out = {}
    for clock in clocks:
        plain, lit = statistics.median(runs["plain"][clock]), statistics.median(runs["lightning"][clock])
        out[clock] = {"plain_sps": plain, "lightning_sps": lit, "ratio": statistics.median(ratios[clock]),
                      "overhead_ms": 1000 * (1 / lit - 1 / plain), "step_ms": 1000 / plain,
                      "ratio_min": min(ratios[clock]), "ratio_max": max(ratios[clock])}
    return out


def explain(cfg: DictConfig, steps: int, warmup: int, top: int = 15) -> None:
    """Where Lightning's extra time goes: (1) the CPU time of ``self.log`` itself, timed around
    each call in a Lightning run; (2) a cProfile of one Lightning run's timed window: own time by
    package, and Lightning's functions by cumulative time (cProfile inflates Python-heavy code
    more than kernels: read it for shares and call counts, not for ms)."""
    clip = cfg.trainer.get("gradient_clip_val")
    pristine = build(cfg)
    batches = preload_batches(cfg, warmup + steps + 1)

    module, spent = copy.deepcopy(pristine), []
    log = module.log

    def timed_log(*args: Any, **kwargs: Any) -> None:
        begin = time.process_time()
        log(*args, **kwargs)
        spent.append(time.process_time() - begin)

    module.log = timed_log
    timed = run_lightning(module, batches, clip, warmup, warmup + steps)
    per_step = 1000 * sum(c for _, c in timed) / steps
    log_ms = 1000 * statistics.median(spent[warmup:])
    print(f"\nself.log in Lightning: {log_ms:.3f} ms per call, {len(spent) / len(batches):.0f} call per step "
          f"({100 * log_ms / per_step:.2f} % of a {per_step:.2f} ms step)")

    profiler = cProfile.Profile()
    run_lightning(copy.deepcopy(pristine), batches, clip, warmup, warmup + steps, profiler=profiler)
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    groups: dict[str, float] = {}
    for (path, _, _), (_, _, tottime, _, _) in stats.stats.items():
        if "lightning_utilities" in path:
            key = "lightning_utilities (apply_to_collection)"
        elif "/lightning/" in path:
            key = "lightning (loop, hooks, self.log)"
        elif "/torch/" in path or path == "~":  # "~": built-ins, torch's C++ ops among them
            key = "torch: Python and built-ins (the kernels)"
        elif "/diffusion/" in path:
            key = "diffusion (the module's Python)"
        else:
            key = "other (stdlib, ...)"
        groups[key] = groups.get(key, 0.0) + tottime
    print(f"\ncProfile of {steps} Lightning steps ({1000 * total / steps:.2f} ms per step under the profiler), own time:")
    for key, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<44} {1000 * seconds / steps:8.3f} ms/step {100 * seconds / total:6.1f} %")
    print("Lightning's functions by cumulative time (ms per step, calls per step):")
    rows = [(ct, nc, f"{Path(p).parent.name}/{Path(p).name}:{ln}({fn})")
            for (p, ln, fn), (_, nc, _, ct, _) in stats.stats.items() if "/lightning/" in p]
    for ct, nc, name in sorted(rows, reverse=True)[:top]:
        print(f"  {1000 * ct / steps:8.3f} {nc / steps:6.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of both loops")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--explain", action="store_true",
                        help="then: where Lightning's extra time goes (self.log timed, and a cProfile)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. backbone=dit_tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()

    cfg = compose_train_config(args.overrides)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} threads; "
          f"backbone {cfg.backbone.get('name', '?')}, batch {cfg.data.module.batch_size}, "
          f"gradient_clip_val {cfg.trainer.get('gradient_clip_val')}; {args.rounds} rounds of "
          f"{args.warmup} warm-up + {args.steps} timed steps per loop")
    result = measure(cfg, args.rounds, args.steps, args.warmup)
    for clock, label in (("cpu", "steps per CPU second"), ("wall", "steps per wall second")):
        r = result[clock]
        print(f"{label:<22} plain {r['plain_sps']:8.3f} ({r['step_ms']:8.3f} ms/step)  Lightning "
              f"{r['lightning_sps']:8.3f}  overhead {r['overhead_ms']:+7.3f} ms/step  ratio {r['ratio']:.3f} "
              f"(rounds {r['ratio_min']:.3f}..{r['ratio_max']:.3f})")
    ratio = result["cpu"]["ratio"]
    print(f"Lightning / plain, steps per CPU second, median of {args.rounds} rounds: {ratio:.3f}x "
          f"(target >= {args.target}): {'PASS' if ratio >= args.target else 'FAIL'}")
    if args.explain:
        explain(cfg, args.steps, args.warmup)


if __name__ == "__main__":
    main()
