"""benchmarks/loop_overhead.py runs: a few steps of both loops on a tiny model, the same-step
check included (the plain loop and Lightning must end with identical weights)."""

from __future__ import annotations

import importlib.util
import logging
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


def test_loop_overhead_measures_a_few_steps(loop_overhead, quiet, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the Trainer's default_root_dir
    threads = torch.get_num_threads()
    lines = []
    try:
        torch.set_num_threads(1)
        cfg = loop_overhead.compose_train_config(["backbone=dit_tiny", "data.module.batch_size=16"])
        result = loop_overhead.measure(cfg, rounds=2, steps=3, warmup=1, report=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines[0].startswith("same step")  # check_same_step passed
    assert len(lines) == 3  # one line per round
    for clock in ("cpu", "wall"):
        r = result[clock]
        assert r["plain_sps"] > 0 and r["lightning_sps"] > 0
        assert 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_same_step_check_catches_a_plain_loop_that_does_not_clip(loop_overhead, quiet, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = loop_overhead.compose_train_config(["backbone=dit_tiny", "data.module.batch_size=16"])
    module = loop_overhead.build(cfg)
    batches = loop_overhead.preload_batches(cfg, 3)
    plain = loop_overhead.run_plain
    monkeypatch.setattr(loop_overhead, "run_plain", lambda m, b, clip, *args, **kw: plain(m, b, None, *args, **kw))
    with pytest.raises(AssertionError, match="differs"):
        loop_overhead.check_same_step(module, batches, clip=1e-3, seed=0)
