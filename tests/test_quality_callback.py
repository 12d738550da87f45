"""callbacks=[default,quality]: FID while training, on every process, logged once per evaluated step as
val/fid@<num>, monitored by ModelCheckpoint, and equal to evaluate.py on the same checkpoint's samples.

The cheap stand-in extractor (tests/tiny_extractors.py) replaces the TF Inception here; the callback
builds whatever extractor its config names, and the Inception has tests of its own."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion import cli
from diffusion.evaluation.job import evaluate
from diffusion.training.quality import QualityMetrics
from tests.conftest import FAST, compose_config, run_script
from tests.tiny_encoders import no_network  # noqa: F401 (fixture)

TINY = "tests.tiny_extractors.TinyFeatures"
QUALITY = ["callbacks=[default,quality]", "callbacks.quality.every_n_steps=2", "callbacks.quality.num=20",
           "callbacks.quality.batch_size=8", f"callbacks.quality.extractor._target_={TINY}"]


def _logged(run: Path, key: str) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
    return {int(r["step"]): float(r[key]) for r in rows}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two gloo processes, 4 steps, the quality callback every 2, the best checkpoint by val/fid@20 kept."""
    run = tmp_path_factory.mktemp("quality") / "run"
    result = run_script("train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *FAST, *QUALITY,
                        "callbacks.checkpoint.monitor=val/fid@20", "callbacks.checkpoint.save_top_k=1",
                        "callbacks.checkpoint.filename='best_{step:07d}'", f"hydra.run.dir={run}", cwd=run.parent,
                        timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


def test_fid_is_logged_once_at_each_evaluated_step_and_the_best_checkpoint_is_kept(ddp_run):
    fid = _logged(ddp_run, "val/fid@20")
    assert sorted(fid) == [1, 3]  # global steps 2 and 4 (the CSV's step counts from 0)
    assert all(v > 0 for v in fid.values())
    best = min(fid, key=fid.get)
    kept = sorted(p.name for p in (ddp_run / "checkpoints").glob("best_*.ckpt"))
    assert kept == [f"best_{best + 1:07d}.ckpt"], (kept, fid)
    assert (ddp_run / "quality_reference" / "reference.npz").is_file()  # computed once, kept with the run


def test_the_logged_fid_equals_evaluate_py_on_the_checkpoints_samples(ddp_run, tmp_path):
    """The callback (2 processes, per-image seeds) and evaluate.py (1 process, sampling the saved
    checkpoint with the same seeds) see the same 20 images and the same reference, so the same FID."""
    ckpt = ddp_run / "checkpoints" / "last.ckpt"  # step 4: saved after the callback of that step
    cfg = compose_config("evaluate", [f"ckpt={ckpt}", "num=20", "batch_size=8", "device=cpu", "precision=32",
                                      f"sample_out={tmp_path / 'samples'}", f"out={tmp_path / 'eval'}",
                                      "metrics=[fid]", f"extractors.inception._target_={TINY}",
                                      f"ref_cache={ddp_run / 'quality_reference'}", "progress=false"], tmp_path)
    record = evaluate(cfg)
    assert record["metrics"]["fid"] == pytest.approx(_logged(ddp_run, "val/fid@20")[3], rel=1e-5)


def test_bad_settings_are_refused_before_training(train_config):
    with pytest.raises(ValueError, match="num=1"):
        QualityMetrics(num=1)
    with pytest.raises(ValueError, match="every_n_steps"):
        QualityMetrics(every_n_steps=0)

    class Trainer:
        world_size = 3

    class Module:
        class conditioner:
            takes = "labels"

    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        QualityMetrics(num=20).setup(Trainer(), Module(), "fit")


def test_a_text_model_without_prompts_is_refused(train_config, tmp_path):
    class Trainer:
        world_size = 1

    class Module:
        class conditioner:
            takes = "prompts"

        class sampling:
            prompts = None

    with pytest.raises(ValueError, match="needs prompts"):
        QualityMetrics(num=20).setup(Trainer(), Module(), "fit")


def test_nan_samples_are_refused_not_scored():
    from diffusion.sampling_job import to_uint8

    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="samples at step 2: 1 of 3 images hold NaN"):
        to_uint8(images, "samples at step 2")


# --- a text-to-image run: val/clip_score@<num> ---------------------------------------------------
CLIP_PROMPTS = '["a red cat","a blue dog on the sea","a small green tree"]'  # words of the tiny CLIP's vocabulary


@pytest.mark.usefixtures("no_network")
def test_a_text_model_logs_the_clip_score_of_evaluate_py(tmp_path, monkeypatch):
    """A tiny latent text-to-image run with a tiny random CLIP: val/clip_score@4 is logged at each evaluated
    step, next to val/fid@4, and equals evaluate.py's clip_score on the last checkpoint's samples (the same
    seeds and prompts, one process each)."""
    from tests.make_captioned_folder import make_captioned_folder
    from tests.tiny_extractors import save_tiny_clip

    # Seed 3: a random CLIP whose image and prompt embeddings point alike here (seed 0 scores every sample 0).
    clip = save_tiny_clip(tmp_path / "clip", image_size=16, patch_size=8, seed=3)  # the 32-pixel samples are resized
    root = make_captioned_folder(tmp_path / "images", n=8, sizes=[(32, 32)], layout="csv")
    run = tmp_path / "run"
    cli.train(compose_config("train", [
        *FAST, "experiment=t2i_tiny", f"data.module.root={root}", "data.module.batch_size=4", "backbone=dit_tiny",
        "model.sampling.steps=3", "callbacks=[default,quality]", "callbacks.quality.every_n_steps=2",
        "callbacks.quality.num=4", "callbacks.quality.batch_size=4", f"callbacks.quality.extractor._target_={TINY}",
        f"callbacks.quality.prompts={CLIP_PROMPTS}",
        f"callbacks.quality.clip={{_target_: diffusion.evaluation.hub.CLIPFeatures, model: '{clip}'}}"], run))
    clip_score, fid = _logged(run, "val/clip_score@4"), _logged(run, "val/fid@4")
    assert sorted(clip_score) == sorted(fid) == [1, 3]  # global steps 2 and 4
    assert all(v > 0 for v in clip_score.values())

    reads = []  # evaluate.py reads the run config once (the text check, ref=data's data), load_module the weights
    monkeypatch.setattr(cli, "read_checkpoint", lambda path, read=cli.read_checkpoint: reads.append(path) or read(path))
    cfg = compose_config("evaluate", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "num=4", "batch_size=4",
                                      "device=cpu", "precision=32", f"prompts={CLIP_PROMPTS}", "ref=data",
                                      f"ref_cache={tmp_path / 'ref'}", "metrics=[clip_score,cmmd]",
                                      f"extractors.clip.model={clip}", "progress=false",
                                      f"sample_out={tmp_path / 'samples'}", f"out={tmp_path / 'eval'}"], tmp_path)
    record = evaluate(cfg)
    assert len(reads) == 2, reads
    assert list(np.load(tmp_path / "samples" / "samples.npz")["prompts"]) == ["a red cat", "a blue dog on the sea",
                                                                             "a small green tree", "a red cat"]
    assert record["metrics"]["clip_score"] == pytest.approx(clip_score[3], rel=1e-5)
    assert record["metrics"]["cmmd"] > 0 and record["reference"]["data"]["root"] == str(root)  # the run's data
