"""evaluate.py end to end, with the cheap TinyFeatures standing in for the TF Inception network: one
process and two give the numbers of a direct computation, a stopped evaluation resumes to them,
PNGs read as the samples.npz does, ADM's reference batches and our references are read (and refused
when made otherwise), a checkpoint is sampled then evaluated, and a sweep ends with its report.

The direct computations run TinyFeatures on the images here and take np.mean / np.cov and the metric
functions of diffusion.evaluation.metrics (tested against closed forms in test_metrics.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import cli
from diffusion.data.digits import DigitsDataModule
from diffusion.evaluation import metrics as M
from diffusion.evaluation.features import STOP_AFTER_ENV
from diffusion.evaluation.job import evaluate
from diffusion.evaluation.reference import ADM_INCEPTION
from diffusion.sampling_job import StoppedForTest, done_ranges
from tests.conftest import ROOT, compose_config, run_script, train_tiny_checkpoint
from tests.tiny_extractors import TinyFeatures

METRICS = "metrics=[fid,sfid,kid,precision_recall]"
REF_NUM = 200  # real images of the digits' train split taken as the reference (a seeded subset)


def tiny(dim: int = 8) -> list[str]:
    return ["extractors.inception._target_=tests.tiny_extractors.TinyFeatures", f"+extractors.inception.dim={dim}"]


def config(run_dir: Path, *overrides: str, dim: int = 8):
    return compose_config("evaluate", ["device=cpu", "precision=32", "progress=false", *tiny(dim), *overrides],
                          run_dir)


def data_ref(refs: Path) -> list[str]:
    return ["ref=data", "data=digits", f"ref_num={REF_NUM}", f"ref_cache_root={refs}"]


def images(n: int, seed: int, size: int = 8) -> np.ndarray:
    """Smooth-ish colour images: a random 4x4 pattern upsampled, plus noise (uint8 (n, size, size, 3))."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).repeat(size // 4, 1).repeat(size // 4, 2)
    return np.clip(coarse + rng.integers(-40, 41, coarse.shape), 0, 255).astype(np.uint8)


def tiny_features(x: np.ndarray, dim: int = 8, extractor: type = TinyFeatures) -> dict[str, np.ndarray]:
    out = extractor(dim=dim)(torch.from_numpy(x).permute(0, 3, 1, 2))
    return {k: v.double().numpy() for k, v in out.items()}


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def digits_reference_images() -> np.ndarray:
    """The reference images by their documented rule, from the dataset itself: REF_NUM of the train split
    drawn by default_rng(ref_seed=0) without replacement, in index order, rounded to uint8, gray to RGB."""
    module = DigitsDataModule(val_fraction=0.2, seed=0)
    module.setup()
    dataset = module.dataset("train")
    picked = np.sort(np.random.default_rng(0).choice(len(dataset), REF_NUM, replace=False))
    x = torch.stack([dataset[int(i)]["image"] for i in picked])
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def ranges(parts: Path) -> list[tuple[int, int]]:
    return [(r.start, r.stop) for r in done_ranges(parts)]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any process-group or SLURM variables (a fresh torchrun sets its own)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC", "GROUP_", "ROLE_", "LOCAL_WORLD")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"PYTHONPATH": str(ROOT), **extra}


# --- fixtures: samples, a cached digits reference, a tiny checkpoint ---------------------------
@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """ref_cache_root shared by the module's evaluations against the digits (computed once)."""
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.npz"
    np.savez(path, arr_0=images(24, seed=1))
    return path


@pytest.fixture(scope="module")
def one_process(samples, refs, tmp_path_factory) -> dict:
    """One process, batches of 5, against the digits (which computes and caches the reference)."""
    run = tmp_path_factory.mktemp("one")
    return evaluate(config(run, f"samples={samples}", f"out={run / 'eval'}", "batch_size=5", *data_ref(refs), METRICS))


@pytest.fixture(scope="module")
def ref16(samples, tmp_path_factory) -> tuple[Path, dict]:
    """A reference cache made with TinyFeatures of dim 16 (an explicit ref_cache=DIR), and the record of the
    evaluation that made it: 10 samples, fewer than the 16 feature dimensions."""
    run = tmp_path_factory.mktemp("dim16")
    np.savez(run / "ten.npz", arr_0=images(10, seed=2))
    record = evaluate(config(run, f"samples={run / 'ten.npz'}", f"out={run / 'eval'}", "ref=data", "data=digits",
                             f"ref_num={REF_NUM}", f"ref_cache={run / 'ref'}", "metrics=[fid]", dim=16))
    return run / "ref", record


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("train") / "run")


# --- 1. processes ------------------------------------------------------------------------------
def test_two_processes_give_the_metrics_of_one_and_of_a_direct_computation(samples, one_process, refs, tmp_path):
    out, cache = tmp_path / "two", tmp_path / "ref2"  # its own reference cache: computed over the 2 processes too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "evaluate.py"), f"samples={samples}", f"out={out}", "batch_size=3", "ref=data", "data=digits",
           f"ref_num={REF_NUM}", f"ref_cache={cache}", METRICS, "device=cpu", "progress=false", *tiny()]
    result = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert two["world_size"] == 2 and one_process["world_size"] == 1
    assert set(two["metrics"]) == set(one_process["metrics"]) == {"fid", "sfid", "kid", "kid_std", "precision", "recall"}
    assert two["metrics"] == pytest.approx(one_process["metrics"], rel=1e-6, abs=1e-9)
    # Each process extracted its half of the images (12 each, batches of 3).
    assert ranges(out / "samples_features" / "features") == [(s, s + 3) for s in range(0, 24, 3)]

    # Direct: TinyFeatures over all images, np.mean / np.cov, the metric functions.
    fake = tiny_features(np.load(samples)["arr_0"])
    real = tiny_features(digits_reference_images())
    with np.load(cache / "reference.npz") as saved:  # the reference the 2 processes wrote is these images'
        for key in ("pool", "spatial"):
            mu, sigma = stats(real[key])
            np.testing.assert_allclose(saved[f"mu/inception/{key}"], mu, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(saved[f"sigma/inception/{key}"], sigma, rtol=1e-9, atol=1e-12)
    direct = {"fid": M.frechet_distance(*stats(fake["pool"]), *stats(real["pool"])),
              "sfid": M.frechet_distance(*stats(fake["spatial"]), *stats(real["spatial"]))}
    direct["kid"], direct["kid_std"] = M.kid(real["pool"], fake["pool"], num_subsets=100, subset_size=1000, seed=0)
    direct["precision"], direct["recall"] = M.precision_recall(real["pool"], fake["pool"], k=3)
    for record in (one_process, two):
        assert record["metrics"] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert direct["fid"] > 1 and 0 < direct["recall"] < 1  # not a degenerate case that any code would meet


# --- 2. resume ---------------------------------------------------------------------------------
def test_a_resumed_evaluation_equals_an_uninterrupted_one(samples, one_process, refs, tmp_path, monkeypatch):
    args = [f"samples={samples}", f"out={tmp_path / 'eval'}", *data_ref(refs), METRICS]  # the reference is cached
    parts = tmp_path / "eval" / "samples_features" / "features"
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(StoppedForTest):
        evaluate(config(tmp_path, *args, "batch_size=5"))
    assert ranges(parts) == [(0, 5)] and not (tmp_path / "eval" / "metrics.json").exists()
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(StoppedForTest):  # stopped again, resumed with another batch size
        evaluate(config(tmp_path, *args, "batch_size=4"))
    assert ranges(parts) == [(0, 5), (5, 9), (9, 13)]
    monkeypatch.delenv(STOP_AFTER_ENV)
    first = (parts / "000000-000005.npz").stat().st_mtime_ns
    record = evaluate(config(tmp_path, *args, "batch_size=7"))
    assert ranges(parts) == [(0, 5), (5, 9), (9, 13), (13, 20), (20, 24)]  # the rest only
    assert (parts / "000000-000005.npz").stat().st_mtime_ns == first  # not extracted again
    assert record["metrics"] == pytest.approx(one_process["metrics"], rel=1e-9, abs=1e-12)  # a fresh run elsewhere
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == record["metrics"]


def test_features_of_replaced_samples_are_not_reused(refs, one_process, tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images(12, seed=5))
    args = [f"samples={path}", *data_ref(refs), "metrics=[fid]"]  # default out: beside the samples
    evaluate(config(tmp_path, *args))
    assert (tmp_path / "eval" / "metrics.json").is_file()
    np.savez(path, arr_0=images(12, seed=6))  # other images, same path, count and shape
    with pytest.raises(ValueError, match=r"(?s)features of other images or extractors.*crc32.*another out=DIR"):
        evaluate(config(tmp_path, *args))


# --- 3. PNG ------------------------------------------------------------------------------------
def test_a_folder_of_pngs_gives_the_metrics_of_its_samples_npz(samples, one_process, refs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(np.load(samples)["arr_0"]):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    record = evaluate(config(tmp_path, f"samples={folder}", f"out={tmp_path / 'eval'}", "batch_size=5",
                             *data_ref(refs), METRICS))
    assert record["samples"]["num"] == 24 and record["samples"]["source"] == str(folder)
    assert record["metrics"] == one_process["metrics"]  # lossless, same batches: bit for bit


# --- 4. refusals -------------------------------------------------------------------------------
def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _nan_images(path: Path) -> Path:
    x = images(4, seed=0).astype(np.float32) / 127.5 - 1
    x[2, 3, 3, 1] = np.nan
    return _npz(path, arr_0=x)


def _labelled(path: Path) -> Path:
    return _npz(path, arr_0=images(6, seed=0), labels=np.arange(6))


REFUSALS = {  # name: (samples.npz maker, extra overrides, message)
    "nchw": (lambda p: _npz(p, arr_0=images(4, seed=0).transpose(0, 3, 1, 2)), [],
             r"arr_0 has shape \(4, 3, 8, 8\); expected \(N, H, W, 3\) RGB images \(channels first\?"),
    "float32": (lambda p: _npz(p, arr_0=images(4, seed=0).astype(np.float32)), [],
                r"arr_0 has dtype float32; evaluation reads uint8 images 0..255"),
    "nan": (_nan_images, [], r"arr_0 has dtype float32 and holds NaN values \(the sampler diverged\?\)"),
    "no_arr_0": (lambda p: _npz(p, images=images(4, seed=0)), [],
                 r"holds no 'arr_0' array \(it holds \['images'\]\); evaluation reads the images from arr_0"),
    "one_sample": (lambda p: _npz(p, arr_0=images(1, seed=0)), [],
                   r"holds 1 image\(s\); the statistics of an evaluation need at least 2"),
    "resolution": (lambda p: _npz(p, arr_0=images(4, seed=0, size=16)), [],
                   r"(?s)does not match this evaluation:.*resolution: \(8, 8\) in the reference, \(16, 16\) for the "
                   r"samples"),
    "clip_score": (_labelled, ["metrics=[clip_score]", "ref=none"],
                   r"metrics \['clip_score'\] score images against their prompts, and .* carries none \(a class-label"),
    "samples_and_ckpt": (lambda p: _npz(p, arr_0=images(4, seed=0)), ["ckpt=some.ckpt"],
                         r"give samples=PATH \(evaluate those images\) or ckpt=PATH \(sample them first\), not both"),
    "metric_kind": (lambda p: _npz(p, arr_0=images(4, seed=0)), ["metrics=[fid]", "metrics.fid.kind=fisher"],
                    r"metrics.fid.kind='fisher' is not supported; allowed values: 'frechet', 'kid'"),
    "no_data": (lambda p: _npz(p, arr_0=images(4, seed=0)), None,  # ref=data, no data=
                r"ref=data compares with a data config's real images: add data=<an option of conf/data>"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_samples_and_arguments_are_refused_before_anything_is_written(case, refs, one_process, tmp_path):
    make, overrides, message = REFUSALS[case]
    path = make(tmp_path / "samples.npz")
    out = tmp_path / "eval"
    ref = ["ref=data", f"ref_cache_root={refs}"] if overrides is None else data_ref(refs)
    with pytest.raises(ValueError, match=message):
        evaluate(config(tmp_path, f"samples={path}", f"out={out}", *ref, "metrics=[fid]", *(overrides or [])))
    assert not out.exists()


def test_a_reference_made_with_other_extractors_is_refused(ref16, samples, refs, tmp_path):
    cache, _ = ref16  # made with TinyFeatures of dim 16; evaluated now with dim 8
    args = [f"samples={samples}", f"out={tmp_path / 'eval'}", "metrics=[fid]"]
    with pytest.raises(ValueError, match=r"(?s)reference .*reference.npz does not match this evaluation:\n  "
                                         r"extractors.inception.dim: 16 in the reference, 8 now\nrecompute it"):
        evaluate(config(tmp_path, *args, f"ref={cache / 'reference.npz'}"))
    with pytest.raises(ValueError, match=r"(?s)reference.npz holds reference statistics made otherwise:\n  "
                                         r"extractors.inception.dim: 16 in the reference, 8 now\n"
                                         r"delete .*, or pass another ref_cache=DIR"):
        evaluate(config(tmp_path, *args, "ref=data", "data=digits", f"ref_num={REF_NUM}", f"ref_cache={cache}"))
    assert not (tmp_path / "eval").exists()


# --- 5. names ----------------------------------------------------------------------------------
def test_a_frechet_distance_of_fewer_samples_than_dimensions_carries_its_count(ref16, tmp_path):
    cache, record = ref16  # 10 samples, 16 dimensions
    assert list(record["metrics"]) == ["fid@10"]
    saved = json.loads((cache.parent / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == record["metrics"] and any(w.startswith("fid@10: 10 samples, fewer than the 16 feature "
                                                                      "dimensions") for w in saved["warnings"])
    with np.load(cache / "reference.npz") as ref:
        mu, sigma = ref["mu/inception/pool"], ref["sigma/inception/pool"]
    fake = tiny_features(np.load(cache.parent / "ten.npz")["arr_0"], dim=16)["pool"]
    assert record["metrics"]["fid@10"] == pytest.approx(M.frechet_distance(*stats(fake), mu, sigma), rel=1e-9)

    np.savez(tmp_path / "sixteen.npz", arr_0=images(16, seed=3))  # n = dim: the plain name
    full = evaluate(config(tmp_path, f"samples={tmp_path / 'sixteen.npz'}", "ref=data", "data=digits",
                           f"ref_num={REF_NUM}", f"ref_cache={cache}", "metrics=[fid]", dim=16))
    assert list(full["metrics"]) == ["fid"] and not full["warnings"]


# --- 6. ADM reference batches ------------------------------------------------------------------
class AdmLikeTiny(TinyFeatures):
    """TinyFeatures claiming to be the TF Inception network that made ADM's reference batches. That
    network's weights cannot be had here (no downloads), and an evaluation must refuse a batch made by
    another extractor (the next test); so to test the arithmetic of reading a batch (mu/sigma, mu_s/sigma_s,
    arr_0's features for KID) the stand-in carries ADM's fingerprint, and the batch below holds its own
    statistics, so the direct numbers are computable here."""

    def fingerprint(self) -> dict:
        return dict(ADM_INCEPTION)


@pytest.fixture(scope="module")
def adm_batch(tmp_path_factory) -> tuple[Path, np.ndarray]:
    real = images(40, seed=7)
    feats = tiny_features(real)
    (mu, sigma), (mu_s, sigma_s) = stats(feats["pool"]), stats(feats["spatial"])
    path = tmp_path_factory.mktemp("adm") / "VIRTUAL_tiny.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=real)
    return path, real


def test_an_adm_reference_batch_gives_the_direct_distances(adm_batch, samples, tmp_path):
    path, real = adm_batch
    record = evaluate(config(tmp_path, f"samples={samples}", f"out={tmp_path / 'eval'}", f"ref={path}",
                             "metrics=[fid,sfid,kid]", "extractors.inception._target_=tests.test_evaluate.AdmLikeTiny"))
    fake, ref = tiny_features(np.load(samples)["arr_0"]), tiny_features(real)
    with np.load(path) as batch:
        direct = {"fid": M.frechet_distance(*stats(fake["pool"]), batch["mu"], batch["sigma"]),
                  "sfid": M.frechet_distance(*stats(fake["spatial"]), batch["mu_s"], batch["sigma_s"])}
    direct["kid"], direct["kid_std"] = M.kid(ref["pool"], fake["pool"])  # arr_0 through the extractor
    assert record["metrics"] == pytest.approx(direct, rel=1e-6, abs=1e-9)
    assert record["reference"]["kind"] == "adm_reference_batch" and record["reference"]["num"] == 40


def test_an_adm_reference_batch_of_statistics_alone_serves_the_frechet_distances(adm_batch, samples, tmp_path):
    """mu/sigma without arr_0: the resolution and count are unknown, so neither is refused nor warned about;
    a metric that needs the real features is refused."""
    path, _ = adm_batch
    with np.load(path) as batch:
        stats_only = _npz(tmp_path / "stats.npz", mu=batch["mu"], sigma=batch["sigma"])
        fake = tiny_features(np.load(samples)["arr_0"])["pool"]
        direct = M.frechet_distance(*stats(fake), batch["mu"], batch["sigma"])
    args = [f"samples={samples}", f"ref={stats_only}", "extractors.inception._target_=tests.test_evaluate.AdmLikeTiny"]
    record = evaluate(config(tmp_path, *args, f"out={tmp_path / 'eval'}", "metrics=[fid]"))
    assert record["metrics"] == {"fid": pytest.approx(direct, rel=1e-9)} and not record["warnings"]
    with pytest.raises(ValueError, match=r"it holds only the statistics of \[.inception/pool.\], and a chosen "
                                         r"metric needs every real feature vector"):
        evaluate(config(tmp_path, *args, f"out={tmp_path / 'kid'}", "metrics=[kid]"))


def test_an_adm_reference_batch_is_refused_for_another_inception(adm_batch, samples, tmp_path):
    path, _ = adm_batch
    with pytest.raises(ValueError, match=r"(?s)does not match this evaluation:.*extractors.inception.extractor: "
                                         r"'inception_v3_tf_2015_12_05' in the reference, 'tiny_projection' now.*"
                                         r"extractors.inception.resize: 'tf1_bilinear_299_align_corners_false' in "
                                         r"the reference, 'area to 4x4' now"):
        evaluate(config(tmp_path, f"samples={samples}", f"out={tmp_path / 'eval'}", f"ref={path}",
                        "metrics=[fid,kid]"))
    assert not (tmp_path / "eval").exists()  # refused before arr_0 went through the wrong extractor


# --- 7. a checkpoint ---------------------------------------------------------------------------
def test_a_checkpoint_is_sampled_then_evaluated_against_its_data(ckpt, refs, tmp_path):
    args = [f"ckpt={ckpt}", "num=16", "steps=2", "batch_size=6", f"sample_out={tmp_path / 'samples'}",
            f"out={tmp_path / 'eval'}", "ref=data", f"ref_num={REF_NUM}", f"ref_cache_root={refs}", "metrics=[fid,kid]"]
    record = evaluate(config(tmp_path, *args))  # no data=: the checkpoint's run brings it
    job = json.loads((tmp_path / "samples" / "samples.json").read_text())
    assert record["samples"]["job"] == job and record["samples"]["num"] == 16
    assert job["steps"] == 2 and job["num"] == 16 and isinstance(job["sampler"], str) and job["model_evaluations"] >= 2
    run_data = cli.read_checkpoint(ckpt)["run_config"]["data"]["module"]
    assert record["reference"]["data"] == {k: v for k, v in run_data.items() if k not in ("batch_size", "num_workers")}

    fake = tiny_features(np.load(tmp_path / "samples" / "samples.npz")["arr_0"])["pool"]
    real = tiny_features(digits_reference_images())["pool"]
    assert record["metrics"]["fid"] == pytest.approx(M.frechet_distance(*stats(fake), *stats(real)), rel=1e-6)
    # A rerun resamples nothing, rewrites samples.npz with the same images, and reuses the features.
    parts = tmp_path / "eval" / "samples_features" / "features"
    before = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert evaluate(config(tmp_path, *args))["metrics"] == record["metrics"]
    assert {p.name: p.stat().st_mtime_ns for p in parts.iterdir()} == before


def test_evaluations_of_a_checkpoint_with_different_num_sample_into_their_own_directories(ckpt, refs, tmp_path):
    args = ["steps=2", "batch_size=8", "ref=data", f"ref_num={REF_NUM}", f"ref_cache_root={refs}", "metrics=[fid]"]
    samples = ckpt.parent.parent / "samples"
    for num in (4, 6):  # no sample_out=: the default directory, named with num
        record = evaluate(config(tmp_path, f"ckpt={ckpt}", f"num={num}", *args))
        assert record["samples"]["source"] == str(samples / f"euler_2_cfg1_seed0_num{num}" / "samples.npz")
        assert record["num_samples"] == num
    # A sample_out= holding another job is refused, naming the key that chose it.
    with pytest.raises(ValueError, match=r"(?s)num: 4 there, 6 now.*pass another sample_out=DIR, or delete"):
        evaluate(config(tmp_path, f"ckpt={ckpt}", "num=6", f"sample_out={samples / 'euler_2_cfg1_seed0_num4'}",
                        f"out={tmp_path / 'eval'}", *args))
    assert not (tmp_path / "eval").exists()


# --- 8. a sweep --------------------------------------------------------------------------------
def test_a_sweep_ends_with_its_report_and_an_offline_wandb_run(ckpt, refs, tmp_path):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in clean_env(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path)).items()
           if k != "WANDB_API_KEY"}  # no credentials: offline, no login prompt
    result = run_script("evaluate.py", "-m", f"ckpt={ckpt}", "sampler=euler,heun", "steps=2,3", "cfg_scale=1,2",
                        "num=8", "batch_size=8", "device=cpu", "precision=32", "progress=false", *tiny(),
                        "ref=data", f"ref_num={REF_NUM}", f"ref_cache_root={refs}", "metrics=[fid,kid]",
                        f"hydra.sweep.dir={sweep}", "wandb_project=test", cwd=tmp_path, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("report.csv", "report.md", "report.png"):
        assert (sweep / name).is_file(), name
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and len((sweep / "report.md").read_text().splitlines()) == 2 + 8
    grid = {(r["sampler"], int(r["steps"]), float(r["cfg_scale"])) for r in rows}
    assert grid == {(s, n, w) for s in ("euler", "heun") for n in (2, 3) for w in (1.0, 2.0)}
    evals = {(r["sampler"], int(r["steps"]), float(r["cfg_scale"])): int(r["model_evaluations"]) for r in rows}
    for steps in (2, 3):
        for scale in (1.0, 2.0):
            assert evals["heun", steps, scale] > evals["euler", steps, scale]
    assert all(float(r["fid"]) > 0 and r["kid"] for r in rows)
    assert list((sweep / "wandb").glob("offline-run-*")), sorted(p.name for p in sweep.iterdir())
