"""evaluate.py metrics=[bpd]: the likelihood of held-out real digits under a tiny checkpoint, which must be
the number diffusion.likelihood gives on the same images with the same per-image seeds; with other metrics
in the same evaluation; and the evaluations it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from diffusion import cli
from diffusion.data.digits import DigitsDataModule
from diffusion.evaluation.job import evaluate
from diffusion.evaluation.likelihood import image_noise
from diffusion.likelihood import bits_per_dim, dequantize, log_likelihood
from tests.conftest import compose_config, train_tiny_checkpoint

NUM = 6
BPD = ["metrics=[bpd]", f"metrics.bpd.num={NUM}", "metrics.bpd.method=rk4", "metrics.bpd.steps=4"]


def config(run_dir: Path, *overrides: str):
    return compose_config("evaluate", ["device=cpu", "precision=32", "progress=false", *overrides], run_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train") / "run")


def direct_bpd(ckpt: Path, seed: int, batch_size: int, conditional: bool = True) -> torch.Tensor:
    """The first NUM validation digits, dequantised and integrated by hand: the documented per-image seeds,
    the EMA backbone on the given labels, RK4 in 4 steps from t = 1e-3, one Rademacher probe, +7."""
    module = cli.load_module(ckpt)
    data = DigitsDataModule(val_fraction=0.2, seed=0)
    dataset = data.dataset("val")
    values = []
    for start in range(0, NUM, batch_size):
        indices = list(range(start, min(start + batch_size, NUM)))
        batch = default_collate([dataset[i] for i in indices])
        noise = image_noise(seed, indices)
        x = dequantize(batch["image"], noise)
        cond = module.conditioner(batch) if conditional else module.conditioner.null(len(indices), module.device)

        def model(x_t, t, cond=cond):
            return module.ema.module(x_t, t, cond=cond)

        log_px = log_likelihood(model, module.schedule, x, t_min=1e-3, method="rk4", steps=4, generator=noise)
        values.append(bits_per_dim(log_px, 64))
    return torch.cat(values)


def test_bpd_of_a_checkpoint_is_the_direct_likelihood_of_the_same_images(ckpt, tmp_path):
    record = evaluate(config(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'eval'}", "batch_size=4", "seed=3", *BPD))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == record["metrics"] and set(saved["metrics"]) == {"bpd", "bpd_sem"}
    expected = direct_bpd(ckpt, seed=3, batch_size=4)
    assert math.isfinite(saved["metrics"]["bpd"]) and 0 < saved["metrics"]["bpd"] < 64
    assert saved["metrics"]["bpd"] == pytest.approx(float(expected.mean()), rel=1e-6)
    assert saved["metrics"]["bpd_sem"] == pytest.approx(float(expected.std() / NUM**0.5), rel=1e-5)
    assert saved["likelihood"]["bpd"]["num_images"] == NUM and saved["likelihood"]["bpd"]["split"] == "val"
    # Per-image seeds and fixed steps: another batch size gives the same images the same values.
    again = evaluate(config(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'eval5'}", "batch_size=5", "seed=3", *BPD))
    assert again["metrics"]["bpd"] == pytest.approx(saved["metrics"]["bpd"], rel=1e-9)
    # Another seed: other dequantisation and probes, another value.
    other = evaluate(config(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'eval4'}", "batch_size=4", "seed=4", *BPD))
    assert other["metrics"]["bpd"] != pytest.approx(saved["metrics"]["bpd"], rel=1e-9)


def test_the_null_condition_is_another_likelihood(ckpt, tmp_path):
    record = evaluate(config(tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'eval'}", "batch_size=6", *BPD,
                             "metrics.bpd.conditional=false"))
    assert record["metrics"]["bpd"] == pytest.approx(float(direct_bpd(ckpt, 0, 6, conditional=False).mean()), rel=1e-6)


def test_bpd_joins_the_sample_metrics_of_the_same_evaluation(ckpt, tmp_path):
    tiny = ["extractors.inception._target_=tests.tiny_extractors.TinyFeatures", "+extractors.inception.dim=8"]
    record = evaluate(config(tmp_path, f"ckpt={ckpt}", "num=8", "steps=2", "batch_size=4",
                             f"sample_out={tmp_path / 'samples'}", f"out={tmp_path / 'eval'}", "ref=data",
                             "ref_num=50", f"ref_cache_root={tmp_path / 'refs'}", *tiny, "metrics=[fid,bpd]",
                             f"metrics.bpd.num={NUM}", "metrics.bpd.method=rk4", "metrics.bpd.steps=4"))
    assert set(record["metrics"]) == {"fid", "bpd", "bpd_sem"}
    assert record["metrics"]["bpd"] == pytest.approx(float(direct_bpd(ckpt, 0, 4).mean()), rel=1e-6)
    assert record["likelihood"]["bpd"]["num_images"] == NUM


@pytest.mark.parametrize("overrides,match", [
    ([], r"metrics \['bpd'\] are likelihoods of real images under a model and need its checkpoint: pass ckpt="),
    (["samples=some.npz"], r"give ckpt=PATH \(not samples=\)"),
    (["ckpt=CKPT", "metrics.bpd.num=100000"], r"metrics.bpd.num=100000: need an integer in 1\.\.\d+"),
    (["ckpt=CKPT", "metrics.bpd.trace=frobenius"], r"trace='frobenius' is not supported"),
    (["ckpt=CKPT", "+metrics.bpd.tmin=0.1"], r"metrics.bpd: unknown option\(s\) \['tmin'\]"),
])
def test_bad_bpd_evaluations_are_refused(ckpt, tmp_path, overrides, match):
    overrides = [o.replace("CKPT", str(ckpt)) for o in overrides]
    cfg = config(tmp_path, f"out={tmp_path / 'eval'}", "metrics=[bpd]", "metrics.bpd.num=2", *overrides)
    with pytest.raises(ValueError, match=match):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_latent_model_is_refused(ckpt, tmp_path):
    """Its checkpoint's run config names a real autoencoder: refused before the model is built."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["run_config"]["vae"] = {"_target_": "diffusion.autoencoders.KLAutoencoder"}
    latent = tmp_path / "latent.ckpt"
    torch.save(checkpoint, latent)
    with pytest.raises(ValueError, match=r"is a latent model \(vae diffusion.autoencoders.KLAutoencoder\); its ODE "
                                         r"likelihood would be of latents"):
        evaluate(config(tmp_path, f"ckpt={latent}", "metrics=[bpd]"))
