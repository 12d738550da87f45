"""evaluate.py with the real TF Inception (the other evaluation tests use a cheap stand-in): FID and
sFID of a few samples against a few real digits equal the same figures computed directly from the
network's features, and the names carry the sample count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.data import load_digits_split
from diffusion.evaluation import metrics
from diffusion.evaluation.inception import InceptionFeatures
from diffusion.evaluation.job import evaluate
from tests.conftest import compose_config


def test_fid_and_sfid_through_evaluate_py_equal_the_networks_features_directly(tmp_path):
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=fake)
    cfg = compose_config("evaluate", [f"samples={tmp_path / 'samples.npz'}", "data=digits", "ref_split=val", "ref_num=6",
                                      "metrics=[fid,sfid]", f"ref_cache_root={tmp_path / 'refs'}", "progress=false",
                                      "device=cpu"], tmp_path)
    with pytest.warns(UserWarning, match="fid@6: 6 samples, fewer than the 2048"):
        record = evaluate(cfg)

    # Directly: the same 6 real digits (the seeded subset), rounded back to bytes, through the network.
    val = load_digits_split()["val"][0]
    chosen = np.sort(np.random.default_rng(0).choice(len(val), 6, replace=False))
    real = ((val[chosen] + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    network = InceptionFeatures().eval()
    with torch.inference_mode():
        f_fake = network(torch.from_numpy(fake).permute(0, 3, 1, 2))
        f_real = network(real)
    for name, key in (("fid@6", "pool"), ("sfid@6", "spatial")):
        a, b = f_fake[key].double().numpy(), f_real[key].double().numpy()
        expected = metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert record["metrics"][name] == pytest.approx(expected, rel=1e-6)
    assert record["extractors"]["inception"]["extractor"] == "inception_v3_tf_2015_12_05"
    assert record["reference"]["num"] == 6 and record["num_samples"] == 6
    assert "no classifier head" in record["inception_score"]
