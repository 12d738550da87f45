"""The speed benchmarks count what they claim: the FLOPs of a DiT forward against the paper's table
and torch's own counter, and the prepared GPU script runs end to end (--tiny, on the CPU)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample_speed():
    return _load("sample_speed")


@pytest.fixture(scope="module")
def gpu_dit_xl():
    return _load("gpu_dit_xl")


# Table 4 of Peebles & Xie 2023: forward Gflops of a 256 px image (32x32x4 latents); the paper
# counts multiply-adds, so FLOPs are twice these.
PAPER_GFLOPS = {"dit_s_2": 6.06, "dit_b_2": 23.01, "dit_l_2": 80.71, "dit_xl_2": 118.64}


@pytest.mark.parametrize("name", PAPER_GFLOPS)
def test_analytic_flops_are_the_papers(name, sample_speed, gpu_dit_xl):
    expected = 2e9 * PAPER_GFLOPS[name]
    assert sample_speed.analytic_flops(name) == pytest.approx(expected, rel=0.005)
    assert gpu_dit_xl.forward_flops(name, 32) == pytest.approx(expected, rel=0.005)


def test_analytic_flops_equal_torchs_flop_counter(sample_speed):
    """FlopCounterMode on a real forward (attention on the math backend, whose matmuls it counts)
    is an independent count of the tiny DiT: the formula must give the same number exactly, and
    the count without attention must miss exactly attention's 4 N^2 D per block."""
    counted = sample_speed.counted_flops("dit_tiny")
    assert sample_speed.analytic_flops("dit_tiny") == counted
    tokens, hidden, depth = 16 * 16, 64, 2  # dit_tiny: patch 2 on 32x32 latents
    assert counted - sample_speed.analytic_flops("dit_tiny", attention=False) == 4 * tokens**2 * hidden * depth


def test_sample_speed_times_every_precision_per_image(sample_speed):
    """One repeat on the tiny DiT: every precision timed, per image, and the bf16-weights model really
    in bf16 (its output dtype), autocast's in float32."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        secs = sample_speed.time_precisions("dit_tiny", {"fp32": 2, "bf16_autocast": 1, "bf16_weights": 1}, repeats=1)
        outputs = {p: sample_speed.forward_fn(sample_speed.build("dit_tiny", p), 1, p)() for p in sample_speed.PRECISIONS}
    finally:
        torch.set_num_threads(threads)
    assert set(secs) == set(sample_speed.PRECISIONS) and all(0 < s < 10 for s in secs.values()), secs
    assert {p: o.dtype for p, o in outputs.items()} == {"fp32": torch.float32, "bf16_autocast": torch.float32,
                                                          "bf16_weights": torch.bfloat16}


def test_gpu_script_runs_tiny_on_the_cpu(gpu_dit_xl, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        results = gpu_dit_xl.main(["--tiny"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert set(results) == {"sample eager", "sample compiled", "train compiled"}, results
    assert all(math.isfinite(r) and r > 0 for r in results.values()), results
    assert "dit_tiny on 16x16x4 latents" in out and "no verdict (--tiny)" in out, out


def test_gpu_training_step_updates_the_weights(gpu_dit_xl):
    """The timed training step is a real optimiser step: every weight tensor moves (a step that did
    nothing would time as fast and pass the target)."""
    torch.manual_seed(0)
    model = gpu_dit_xl.build("dit_tiny", torch.device("cpu")).train()
    for p in model.parameters():  # adaLN-Zero starts at exactly zero output: give every weight a value
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    step = gpu_dit_xl.training_step(model, 2, 16, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step()
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved == len(before), f"{len(before) - moved} of {len(before)} parameters did not move"


def test_feature_speed_runs_small(capsys):
    """benchmarks/feature_speed.py end to end on 2 small images: both precisions timed, the ratio printed."""
    results = _load("feature_speed").main(["--num", "2", "--batch-size", "2", "--size", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    assert set(results) == {"32", "bf16"} and all(math.isfinite(r) and r > 0 for r in results.values()), results
    assert "bf16 / fp32 = " in out and "2 images 32x32" in out, out


def test_finetune_memory_accounts_for_what_each_configuration_holds(capsys, monkeypatch):
    """benchmarks/finetune_memory.py on the tiny UNet, its workers run in this process: the tensors'
    account against counts taken of a diffusers UNet built directly (weights; LoRA's r (in + out) per
    adapted linear; AdamW's two moments and the EMA copy of full fine-tuning), and the report's ratios."""
    from argparse import Namespace

    from diffusers import UNet2DConditionModel

    bench = _load("finetune_memory")
    args = Namespace(tiny=True, batch=1, size=8, threads=torch.get_num_threads(), steps=1, warmup=0, rounds=1,
                     checkpointing=True, bf16_base=False, json=False)
    monkeypatch.setattr(bench, "run_worker", lambda name, a: bench.worker(Namespace(**vars(a), worker=name)))
    result = bench.measure(args)
    unet = UNet2DConditionModel(**bench.TINY_UNET)
    params = sum(p.numel() for p in unet.parameters())
    lora = sum(bench.RANK * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if n.endswith(("to_q", "to_k", "to_v", "to_out.0")))
    full, adapted = result["full"]["account"], result["lora"]["account"]
    assert result["full"]["trainable"] == params and result["lora"]["trainable"] == lora
    assert full["weights"] == full["gradients"] == full["ema"] == 4 * params and full["optimiser"] == 8 * params
    assert adapted["weights"] == 4 * (params + lora)
    assert adapted["gradients"] == adapted["ema"] == 4 * lora and adapted["optimiser"] == 8 * lora
    # Checkpointing saves less for backward; LoRA saves about what full fine-tuning does.
    assert 0 < result["lora+checkpointing"]["account"]["activations"] < adapted["activations"]
    bench.report(result, args)
    out = capsys.readouterr().out
    assert "lora / full: memory" in out and "target <= 0.6x" in out and "lora+checkpointing / full" in out, out
