"""Peak memory and steps per second of LoRA fine-tuning against full fine-tuning of a small
Stable-Diffusion-layout UNet (diffusers' ``UNet2DConditionModel`` behind our ``DiffusersUNet``,
random weights) on the CPU, in one run. Target (issue 14): LoRA at rank 8 uses at most 0.6x the
memory of full fine-tuning.

The step is our training step: the module's objective (DDPM scaled_linear, eps), backward, AdamW,
the EMA update; the module is ``DiffusionModule`` with ``adapter=full`` or ``adapter=lora`` (rank 8,
alpha 8, diffusers' targets ``to_q/to_k/to_v/to_out.0``), as train.py builds it. Optional further
rows: LoRA with gradient checkpointing (``--checkpointing``) and LoRA on bf16 base weights
(``--bf16-base``), each against the same full fine-tuning.

What is measured. Each configuration runs in a fresh Python process (this script with ``--worker``),
so no allocation of one is reused by the next. Its memory is the growth of the process's peak
resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) from just before the module is built (torch,
diffusers and peft imported, the inputs made) to after the last step: weights, gradients, the
optimiser's moments, the EMA copy, the activations saved for backward and the allocator's slack, as
the operating system sees them. Beside it, an account of the tensors themselves: the weights, the
gradients and AdamW's two moments of the trainable parameters, the EMA's own copy (LoRA's EMA shares
the fixed base), and the activations autograd saves in one forward (the distinct storages passed to
``saved_tensors_hooks``). Both ratios LoRA / full are printed; the target is judged on the measured
one. Speed: steps per second over ``--steps`` timed steps after ``--warmup`` untimed ones, wall clock,
in the same processes; ``--threads`` intra-op threads (1 by default: the shared 2-core machine makes a
second thread wait on its neighbours). The configurations run in turn ``--rounds`` times, alternating
the order; printed are the medians.

    python benchmarks/finetune_memory.py                       (about 3 minutes on 2 cores)
    python benchmarks/finetune_memory.py [--rounds 3] [--steps 3] [--warmup 1] [--batch 2] [--size 32]
                                         [--threads 1] [--checkpointing] [--bf16-base] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: SD 1.5's layout (4 levels, cross-attention in the first three, 2 resnets per level), narrow: 320..1280
#: channels become 64..256, 768-wide text tokens 256; about 1/25 of its 860M parameters.
SMALL_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
)
#: For the smoke test: the tests' tiny SD UNet.
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4,
)
RANK = 8
CONFIGS = {  # name -> (adapter, gradient checkpointing, base dtype)
    "full": ("full", False, "float32"),
    "lora": ("lora", False, "float32"),
    "lora+checkpointing": ("lora", True, "float32"),
    "lora+bf16-base": ("lora", False, "bfloat16"),
}


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(config: dict[str, Any], adapter: str, checkpointing: bool, base_dtype: str):
    """The module train.py would build: our DiffusersUNet from ``config`` (seed 0), the adapter, the EMA."""
    import torch

    from diffusion.adapters import Full, LoRA
    from diffusion.backbones import DiffusersUNet
    from diffusion.schedules import DDPM
    from diffusion.training.module import DiffusionModule

    torch.manual_seed(0)
    backbone = DiffusersUNet(config=config, in_channels=4, token_dim=config["cross_attention_dim"],
                             gradient_checkpointing=checkpointing)
    chosen = LoRA(rank=RANK, alpha=float(RANK), base_dtype=base_dtype) if adapter == "lora" else Full()
    return DiffusionModule(backbone, DDPM("scaled_linear", "eps"), adapter=chosen, ema_decay=0.999).train()


def inputs(config: dict[str, Any], batch: int, size: int):
    import torch

    from diffusion.conditioning import Conditioning

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, size, size, generator=g)
    cond = Conditioning(tokens=torch.randn(batch, 16, config["cross_attention_dim"], generator=g))
    return x0, cond


def saved_activation_bytes(module, x0, cond) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward."""
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(module, x0, cond)
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in params)  # weights are counted as weights


def step_loss(module, x0, cond):
    from functools import partial

    import torch

    t = torch.linspace(0.1, 0.9, x0.shape[0])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    return module.objective(partial(module.model(module.backbone), cond=cond), x0, t=t, noise=noise).loss


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process: its peak memory growth, its tensors' account, its steps/s."""
    import torch

    torch.set_num_threads(args.threads)
    config = TINY_UNET if args.tiny else SMALL_UNET
    adapter, checkpointing, base_dtype = CONFIGS[args.worker]
    x0, cond = inputs(config, args.batch, args.size)
    # One step of the tiny UNet first: what is imported and set up lazily (diffusers' blocks, peft,
    # autograd's and the allocator's first use) is then not counted as this configuration's memory.
    tiny = build(TINY_UNET, adapter, checkpointing, base_dtype)
    step_loss(tiny, *inputs(TINY_UNET, 1, 8)).backward()
    warm = tiny.configure_optimizers()  # held: its scheduler refers to the optimiser weakly
    warm["optimizer"].step()
    del tiny, warm
    before = peak_rss_bytes()
    module = build(config, adapter, checkpointing, base_dtype)
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"]
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step_loss(module, x0, cond).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated, as between steps of a run
        module.ema.update(module.backbone)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = peak_rss_bytes() - before
    trainable = [p for p in module.backbone.parameters() if p.requires_grad]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    own_ema = [e for e, p in zip(module.ema.module.parameters(), module.backbone.parameters())
               if e.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()]
    account = {"weights": nbytes(module.backbone.parameters()), "gradients": nbytes(trainable),
               "optimiser": sum(nbytes([s["exp_avg"], s["exp_avg_sq"]]) for s in optimizer.state.values()),
               "ema": nbytes(own_ema), "activations": saved_activation_bytes(module, x0, cond)}
    return {"config": args.worker, "peak_rss_growth": peak, "account": account,
            "parameters": sum(p.numel() for p in module.backbone.parameters()),
            "trainable": sum(p.numel() for p in trainable), "steps_per_s": len(times) / sum(times)}


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--size", str(args.size),
               "--threads", str(args.threads), *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"the {name} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration ``rounds`` times (order alternating); medians, and ratios to full."""
    names = ["full", "lora"] + (["lora+checkpointing"] if args.checkpointing else []) + (
        ["lora+bf16-base"] if args.bf16_base else [])
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(run_worker(name, args))
    result: dict[str, Any] = {}
    for name, rs in runs.items():
        result[name] = {**rs[0], "peak_rss_growth": statistics.median(x["peak_rss_growth"] for x in rs),
                        "steps_per_s": statistics.median(x["steps_per_s"] for x in rs)}
        result[name]["accounted"] = sum(result[name]["account"].values())
    full = result["full"]
    for name in names[1:]:
        r = result[name]
        # nan when full's peak did not grow: a worker run in a process whose peak was already higher (tests)
        r["memory_ratio"] = r["peak_rss_growth"] / full["peak_rss_growth"] if full["peak_rss_growth"] else float("nan")
        r["accounted_ratio"] = r["accounted"] / full["accounted"]
        r["speed_ratio"] = r["steps_per_s"] / full["steps_per_s"]
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    mib = 2.0 ** 20
    full = result["full"]
    print(f"{'UNet (tiny)' if args.tiny else 'small SD-layout UNet'}: {full['parameters'] / 1e6:.2f}M parameters, "
          f"batch {args.batch} of 4x{args.size}x{args.size} latents, {args.threads} thread(s), "
          f"median of {args.rounds} round(s)")
    print(f"{'config':20s} {'trainable':>10s} {'peak RSS +':>11s} {'weights':>8s} {'grads':>7s} {'optim':>7s} "
          f"{'ema':>7s} {'activ.':>7s} {'steps/s':>8s}  (MiB)")
    for name, r in result.items():
        a = r["account"]
        print(f"{name:20s} {r['trainable']:>10d} {r['peak_rss_growth'] / mib:>11.1f} {a['weights'] / mib:>8.1f} "
              f"{a['gradients'] / mib:>7.1f} {a['optimiser'] / mib:>7.1f} {a['ema'] / mib:>7.1f} "
              f"{a['activations'] / mib:>7.1f} {r['steps_per_s']:>8.3f}")
    for name, r in result.items():
        if name == "full":
            continue
        verdict = "PASS" if name != "lora" or r["memory_ratio"] <= 0.6 else "FAIL"
        print(f"{name} / full: memory {r['memory_ratio']:.2f}x measured (peak RSS growth), "
              f"{r['accounted_ratio']:.2f}x accounted (tensors); speed {r['speed_ratio']:.2f}x"
              + (f"  [{verdict}: target <= 0.6x]" if name == "lora" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="also LoRA with gradient checkpointing")
    parser.add_argument("--bf16-base", action="store_true", help="also LoRA on bf16 base weights")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (a smoke test)")
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    result = measure(args)
    print(json.dumps(result)) if args.json else report(result, args)


if __name__ == "__main__":
    main()
