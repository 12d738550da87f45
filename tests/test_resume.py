"""Resuming, requeueing and extending a run lose nothing: the run continues in its own directory,
its CSV log continues with no step missing or twice, an extended run trains exactly as an
uninterrupted one, checkpoints load safely and are refused when they do not fit, and a command
that fails leaves the run directory exactly as it found it."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest
import torch

from diffusion import cli
from tests.conftest import FAST, compose_config, logged_losses, run_script

# A constant rate: extending a run changes nothing but its length (see the README on decays).
CONSTANT = ["model.optim.decay=constant", "model.optim.warmup_steps=0", "trainer.val_check_interval=4"]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _same_log(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    """Row by row, the same steps and metrics (to 1e-6); Lightning's own epoch counter is left out."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in set(x) - {"epoch"}:
            if x[key] or y.get(key):
                assert float(y[key]) == pytest.approx(float(x[key]), rel=0, abs=1e-6), (x["step"], key)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes, and its modification time."""
    return {str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("batch_size,first,total", [(16, 6, 12), (128, 15, 24), (128, 16, 24)])  # 128: 11 batches an epoch
def test_extending_a_finished_run_in_its_directory_equals_an_uninterrupted_run(batch_size, first, total, train_config,
                                                                               tmp_path):
    """``first`` steps, then resumed in the same directory to ``total``: the log holds each step once
    with the losses (and validation rows, at the same steps) of an uninterrupted run, and the
    weights agree. Lightning records a run stopped by max_steps as a finished epoch; the data and
    the draws follow the run's batch count, not that epoch. The second case stops in its second
    epoch, with only the end-of-training checkpoint, whose step counter Lightning counts twice."""
    common = [*CONSTANT, f"data.module.batch_size={batch_size}", "callbacks.checkpoint.every_n_train_steps=1000"]
    cli.train(train_config(*common, f"trainer.max_steps={total}", run_dir=tmp_path / "straight"))
    cli.train(train_config(*common, f"trainer.max_steps={first}", run_dir=tmp_path / "run"))
    cli.train(train_config(*common, f"trainer.max_steps={total}", "ckpt_path=last", run_dir=tmp_path / "run"))
    straight, extended = _rows(tmp_path / "straight"), _rows(tmp_path / "run")
    assert sorted(logged_losses(tmp_path / "run")) == list(range(total))
    _same_log(straight, extended)
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_a_preempted_run_resumed_in_place_logs_each_step_once(train_config, tmp_path):
    """Stopped at step 5 with its last checkpoint at step 4 (steps 4 and 5 logged, then lost), resumed
    in place: the log drops the rows after the checkpoint and continues, equal to the straight run."""
    common = [*CONSTANT, "trainer.max_steps=10", "callbacks.checkpoint.every_n_train_steps=4",
              "callbacks.checkpoint.save_last=false"]
    cli.train(train_config(*common, run_dir=tmp_path / "straight"))
    cli.train(train_config(*common, "+callbacks.stop._target_=tests.conftest.StopAtStep", "+callbacks.stop.step=6",
                           run_dir=tmp_path / "run"))
    (tmp_path / "run" / "checkpoints" / "step_0000008.ckpt").unlink(missing_ok=True)
    # The end-of-run checkpoint at step 6 is removed too, as if the job had been killed at step 6.
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        if torch.load(path, weights_only=True)["global_step"] != 4:
            path.unlink()
    assert sorted(logged_losses(tmp_path / "run")) == list(range(6))  # steps 4 and 5 are after the checkpoint
    cli.train(train_config(*common, "ckpt_path=last", run_dir=tmp_path / "run"))
    _same_log(_rows(tmp_path / "straight"), _rows(tmp_path / "run"))


def test_resume_records_each_launch_and_keeps_the_first_config(train_config, tmp_path):
    run = tmp_path / "run"
    cli.train(train_config(run_dir=run))
    first = (run / ".hydra" / "config.yaml").read_text()
    cli.train(train_config("trainer.max_steps=6", "ckpt_path=last", run_dir=run))
    assert (run / ".hydra" / "config.yaml").read_text() == first
    resumed = run / ".hydra" / "resumed" / "step_0000004"
    assert "max_steps: 6" in (resumed / "config.yaml").read_text()
    assert "step: 4" in (resumed / "resume.yaml").read_text()


def test_ckpt_path_last_continues_the_newest_run_in_its_own_directory(tmp_path):
    """`python train.py ckpt_path=last` and `python train.py hydra.run.dir=DIR ckpt_path=last`."""
    fast = [o for o in FAST if not o.startswith("trainer.max_steps")]
    first = run_script("train.py", *fast, "trainer.max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = [p.parent.parent for p in (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")]
    assert (first.stdout + first.stderr).count("`Trainer.fit` stopped") == 1  # each line printed once
    assert "Seed set to 0" in (run / "train.log").read_text().splitlines()[0]  # lines from before the checks
    again = run_script("train.py", *fast, "trainer.max_steps=4", "ckpt_path=last", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.parent.parent for p in (tmp_path / "outputs").glob("*/*/checkpoints/last.ckpt")] == [run]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(logged_losses(run)) == [0, 1, 2, 3]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = run_script("train.py", *fast, "trainer.max_steps=6", "ckpt_path=last", f"hydra.run.dir={run}", cwd=elsewhere)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert sorted(logged_losses(run)) == list(range(6))
    assert "Restoring states from the checkpoint" in (run / "train.log").read_text()


def test_a_failing_resume_leaves_the_run_directory_as_it_was(train_config, tmp_path):
    """Each command refused on a finished run leaves every file of it as it was (bytes and times)."""
    run = tmp_path / "run"
    cli.train(train_config("logger=[csv,tensorboard]", run_dir=run))
    before = snapshot(run)
    refused = {
        "another backbone": ("backbone=unet_tiny", "ckpt_path=last"),
        "a decay without max_steps": ("trainer.max_steps=-1", "ckpt_path=last"),
        "a fresh start over the run": (),
        "a missing checkpoint": (f"ckpt_path={tmp_path / 'nope.ckpt'}",),
        "another model size": ("backbone=dit_digits", "ckpt_path=last"),
    }
    for what, overrides in refused.items():
        with pytest.raises(Exception):
            cli.train(train_config("logger=[csv,tensorboard]", *overrides, run_dir=run))
        assert snapshot(run) == before, what


def test_a_failing_resume_from_the_command_line_leaves_its_directory_as_it_was(tmp_path):
    """`hydra.run.dir=DIR ckpt_path=last` in a directory with logs but no checkpoint."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    before = snapshot(run)
    result = run_script("train.py", *FAST, f"hydra.run.dir={run}", "ckpt_path=last", cwd=tmp_path)
    assert result.returncode != 0
    assert f"the run directory {run} holds no checkpoint" in result.stderr
    assert snapshot(run) == before


def test_ckpt_path_last_without_any_run_says_so(tmp_path):
    result = run_script("train.py", *FAST, "ckpt_path=last", cwd=tmp_path)
    assert result.returncode != 0 and "no run with a checkpoint under" in result.stderr
    assert not (tmp_path / "outputs").exists()
    given = tmp_path / "outputs" / "nope"
    result = run_script("train.py", *FAST, f"hydra.run.dir={given}", "ckpt_path=last", cwd=tmp_path)
    assert result.returncode != 0 and "holds no checkpoint" in result.stderr
    assert not given.exists()  # no empty run directory left behind


def test_a_fresh_start_in_a_directory_that_holds_a_run_is_refused(train_config, tmp_path):
    cli.train(train_config())
    with pytest.raises(FileExistsError, match="already holds a run.*ckpt_path=last"):
        cli.train(train_config())


class _RunsCode:
    """Unpickling this object would create ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_and_load_never_unpickle_code(train_config, tmp_path):
    cli.train(train_config())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "code_ran"
    checkpoint["callbacks"] = {"evil": _RunsCode(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    with pytest.raises(ValueError, match="is not a checkpoint of this project"):
        cli.train(train_config("trainer.max_steps=6", f"ckpt_path={evil}", run_dir=tmp_path / "resumed"))
    with pytest.raises(ValueError, match="is not a checkpoint of this project"):
        cli.load_module(evil)
    assert not marker.exists()


def test_fit_itself_loads_with_weights_only(train_config, tmp_path, monkeypatch):
    """Lightning loads the checkpoint again for the optimiser and loops: with weights_only=True too."""
    import lightning as L

    cli.train(train_config())
    seen = {}
    original = L.Trainer.fit

    def fit(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    cli.train(train_config("trainer.max_steps=5", "ckpt_path=last"))
    assert seen["weights_only"] is True and Path(seen["ckpt_path"]).name == "last.ckpt"


def test_a_checkpoint_with_other_frozen_weights_is_refused_naming_both_hashes(tmp_path):
    from tests.make_captioned_folder import make_captioned_folder

    root = make_captioned_folder(tmp_path / "images", n=8, sizes=[(32, 32)])
    overrides = [*FAST, "experiment=t2i_tiny", f"data.module.root={root}", "data.module.batch_size=4",
                 "trainer.max_steps=2"]
    cli.train(compose_config("train", overrides, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    recorded = torch.load(ckpt, weights_only=True)["frozen_weights"]
    assert set(recorded) == {"autoencoder", "conditioner.encoder"}
    model = cli.load_module(ckpt)  # the same seed rebuilds the same random encoders
    assert model.frozen_weights() == recorded
    # seed=1 builds other random encoders (the run's seed seeds them): resuming with them is refused.
    with pytest.raises(ValueError, match=rf"(?s)other frozen weights.*autoencoder: checkpoint {recorded['autoencoder']}, "
                                         r"this model [0-9a-f]{64}"):
        cli.train(compose_config("train", [*overrides, "seed=1", "trainer.max_steps=4", f"ckpt_path={ckpt}"],
                                 tmp_path / "resumed"))
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["frozen_weights"]["conditioner.encoder"] = "0" * 64
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=r"conditioner.encoder: checkpoint 0{64}, this model"):
        cli.load_module(tmp_path / "tampered.ckpt")


def test_tensorboard_purges_the_steps_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffusion.loggers import TensorBoardLogger

    first = TensorBoardLogger(tmp_path, name="tb", version="")
    for step in range(8):  # a run preempted after step 7, its checkpoint at step 5
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("success")
    resumed = TensorBoardLogger(tmp_path, name="tb", version="")
    resumed.resume_at(5)
    for step in range(5, 10):
        resumed.log_metrics({"loss": 100.0 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 10)]
    with pytest.raises(RuntimeError, match="before anything is logged"):
        resumed.resume_at(3)


def test_the_csv_logger_keeps_an_existing_log(tmp_path):
    from diffusion.loggers import CSVLogger

    path = tmp_path / "logs" / "metrics.csv"
    path.parent.mkdir()
    path.write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n0,2,0.8\n")
    logger = CSVLogger(tmp_path, name="logs", version="")
    logger.resume_at(2)
    logger.log_metrics({"train/loss": 0.7}, step=2)
    logger.save()
    assert path.read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0", "0,1,0.9", ",2,0.7"]
    assert not os.path.exists(str(path) + ".tmp")
