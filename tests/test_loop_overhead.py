"""benchmarks/loop_overhead.py measures what it claims: a few steps of both loops on a tiny model,
the same-step check included (the plain loop and Lightning must end with identical weights), and
Lightning charged the extra time an injected per-step cost adds."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_overhead.py"


@pytest.fixture(scope="module")
def loop_overhead():
    spec = importlib.util.spec_from_file_location("loop_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quiet(loop_overhead):
    """The script's quiet(), with Lightning's log levels put back afterwards (warnings filters
    are put back by pytest)."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    loop_overhead.quiet()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


class BurnCPU:
    """A Lightning callback that spends ``seconds`` of CPU time at the start of every batch."""

    def __new__(cls, seconds: float):
        import lightning as L

        class _Burn(L.Callback):
            def on_train_batch_start(self, *args):
                start = time.process_time()
                while time.process_time() - start < seconds:
                    pass

        return _Burn()


def _measure(loop_overhead, monkeypatch, burn: float = 0.0) -> dict:
    """A few steps of both loops on the tiny DiT, one thread; ``burn`` seconds of CPU time added to
    each of Lightning's steps."""
    if burn:
        make_trainer = loop_overhead.make_trainer
        monkeypatch.setattr(loop_overhead, "make_trainer",
                            lambda steps, clip, callbacks: make_trainer(steps, clip, [*callbacks, BurnCPU(burn)]))
    threads, lines = torch.get_num_threads(), []
    try:
        torch.set_num_threads(1)
        cfg = loop_overhead.compose_train_config(["backbone=dit_tiny", "data.module.batch_size=16"])
        result = loop_overhead.measure(cfg, rounds=2, steps=3, warmup=1, report=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines[0].startswith("same step") and len(lines) == 3  # check_same_step passed; a line per round
    return result["cpu"]


def test_loop_overhead_charges_lightning_its_extra_time_per_step(loop_overhead, quiet, monkeypatch, tmp_path):
    """The tiny DiT's step (15-20 ms of CPU) shows Lightning's few ms a step: measured ratio
    0.72-0.90, overhead 1.4-6 ms. With 30 ms of CPU time added to each Lightning step the benchmark
    must charge them to Lightning: measured 29-33 ms more overhead, ratio 0.30-0.37."""
    monkeypatch.chdir(tmp_path)  # the Trainer's default_root_dir
    clean = _measure(loop_overhead, monkeypatch)
    assert 0.5 < clean["ratio"] < 1.1 and clean["overhead_ms"] < 15, clean
    burned = _measure(loop_overhead, monkeypatch, burn=0.030)
    assert 25 < burned["overhead_ms"] - max(clean["overhead_ms"], 0) < 40, (clean, burned)
    assert burned["ratio"] < 0.6 * clean["ratio"], (clean, burned)


def test_same_step_check_catches_a_plain_loop_that_does_not_clip(loop_overhead, quiet, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = loop_overhead.compose_train_config(["backbone=dit_tiny", "data.module.batch_size=16"])
    module = loop_overhead.build(cfg)
    batches = loop_overhead.preload_batches(cfg, 3)
    plain = loop_overhead.run_plain
    monkeypatch.setattr(loop_overhead, "run_plain", lambda m, b, clip, *args, **kw: plain(m, b, None, *args, **kw))
    with pytest.raises(AssertionError, match="differs"):
        loop_overhead.check_same_step(module, batches, clip=1e-3, seed=0)
