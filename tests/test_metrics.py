"""The metric functions of diffusion.evaluation.metrics against closed forms, direct loops over
pairs, scipy and torchmetrics: FID and its streaming statistics (also over 2 gloo processes),
KID, precision/recall, CLIP score and CMMD; and their refusals of bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from diffusion.evaluation.metrics import (
    FeatureStats,
    clip_score,
    cmmd,
    frechet_distance,
    kid,
    precision_recall,
    trace_sqrt_product,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    g = rng.standard_normal((d, 2 * d))
    return g @ g.T / (2 * d) + 0.1 * np.eye(d)


def _cov(x: np.ndarray) -> np.ndarray:
    return np.cov(x, rowvar=False)


class FeatureVectors(torch.nn.Module):
    """torchmetrics' feature extractor slot filled with the identity: the "images" it is given are
    already (N, num_features) feature vectors."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.5, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)])
def test_fid_of_1d_gaussians_is_mean_gap_squared_plus_std_gap_squared(m1, s1, m2, s2):
    fid = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert fid == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_fid_of_commuting_diagonal_covariances_is_sum_of_sqrt_gaps_squared():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 5.0, 32), rng.uniform(0.1, 5.0, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-11)


def test_fid_is_invariant_under_a_rotation_of_both_gaussians():
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    before = frechet_distance(mu1, s1, mu2, s2)
    after = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert after == pytest.approx(before, rel=1e-10)
    # The rotation changes the matrices themselves, so this is not the same computation twice.
    assert not np.allclose(q @ s1 @ q.T, s1)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(2).standard_normal((500, 32)) + 3.0
    mu, sigma = x.mean(axis=0), _cov(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10
    # ...and not for a slightly different set (the check can fail).
    assert frechet_distance(mu, sigma, mu + 0.1, sigma) == pytest.approx(32 * 0.01, rel=1e-8)


def test_trace_sqrt_product_matches_scipy_sqrtm_on_random_spd_matrices():
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 64), _random_spd(rng, 64)
    reference = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-10)


def test_trace_sqrt_product_is_real_and_right_for_rank_deficient_covariances():
    """20 samples in 64-D: covariances of rank 19, where s1 s2 has 45 zero eigenvalues.

    Exact reference: with s1 = X^T X / (n-1) and s2 = Y^T Y / (n-1) (X, Y centred), s1 s2 has
    the nonzero eigenvalues of B B^T, B = X Y^T / (n-1), so tr((s1 s2)^{1/2}) is the sum of B's
    singular values. Tolerance: rounding puts each zero eigenvalue of the product at
    ~eps * ||s1|| ||s2|| in either sign, and its square root at ~sqrt(eps * ||s1|| ||s2||); with
    45 of them the sum can be off by 45 * sqrt(eps * ||s1|| ||s2||) (~1e-6 here), for scipy's
    sqrtm (a Schur method on the same matrix) and, where a rounded eigenvalue comes out
    positive, for ours too."""
    rng = np.random.default_rng(4)
    n, d = 20, 64
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, d)) * np.linspace(0.5, 2.0, d)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    s1, s2 = _cov(x), _cov(y)
    assert np.linalg.matrix_rank(s1) == n - 1
    exact = np.linalg.svd(xc @ yc.T / (n - 1), compute_uv=False).sum()
    tol = (d - (n - 1)) * math.sqrt(np.finfo(float).eps * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2))

    ours = trace_sqrt_product(s1, s2)
    assert isinstance(ours, float) and math.isfinite(ours)
    assert ours == pytest.approx(exact, abs=tol)
    with warnings.catch_warnings():  # sqrtm may warn that the singular product is ill-conditioned
        warnings.simplefilter("ignore")
        scipys = np.trace(scipy.linalg.sqrtm(s1 @ s2))
    assert np.isfinite(scipys.real)
    assert ours == pytest.approx(scipys.real, abs=2 * tol)
    # The FID built on it is real and finite, and 0 for a rank-deficient set with itself.
    assert math.isfinite(frechet_distance(x.mean(0), s1, y.mean(0), s2))
    assert abs(frechet_distance(x.mean(0), s1, x.mean(0), s1)) < 2 * tol


def test_fid_matches_torchmetrics_given_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(5)
    real = torch.from_numpy(rng.standard_normal((300, 16)))
    fake = torch.from_numpy(rng.standard_normal((250, 16)) * np.linspace(0.5, 1.5, 16) + 0.3)
    metric = FrechetInceptionDistance(feature=FeatureVectors(16))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    reference = float(metric.compute())

    ours = frechet_distance(real.mean(0), _cov(real.numpy()), fake.mean(0), _cov(fake.numpy()))
    assert ours == pytest.approx(reference, rel=1e-6)
    assert reference > 1.0  # a real gap, not two zeros agreeing


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.0, 0.0], np.eye(2), [0.0, 0.0], np.eye(3)),
         r"sigma1 and sigma2 must have the same shape, got \(2, 2\) and \(3, 3\)"),
        (([0.0, 0.0, 0.0], np.eye(2), [0.0, 0.0], np.eye(2)), r"mu1 \(3,\), mu2 \(2,\).*share one dimension"),
        (([0.0, np.nan], np.eye(2), [0.0, 0.0], np.eye(2)), r"mu1 has 1 non-finite entries"),
        (([0.0, 0.0], np.full((2, 2), np.inf), [0.0, 0.0], np.eye(2)), r"sigma1 has 4 non-finite entries"),
        (([0.0, 0.0], np.ones((2, 3)), [0.0, 0.0], np.eye(2)), r"sigma1 must have shape \(d, d\), got \(2, 3\)"),
        (([[0.0, 0.0]], np.eye(2), [0.0, 0.0], np.eye(2)), r"mu1 must have shape \(d,\), got \(1, 2\)"),
    ],
)
def test_frechet_distance_refuses_mismatched_or_non_finite_input(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


# ---------------------------------------------------------------------------------------------
# FeatureStats


def test_feature_stats_equal_np_cov_and_do_not_depend_on_batch_size_or_merging():
    x = np.random.default_rng(6).standard_normal((101, 12)) * 2.0 + 5.0
    whole = FeatureStats(12)
    whole.update(torch.from_numpy(x).float())  # any float dtype; float32 rounding is the only difference
    one = FeatureStats(12)
    one.update(x)
    np.testing.assert_allclose(one.mean(), x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(one.cov(), _cov(x), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(whole.cov(), _cov(x.astype(np.float32).astype(np.float64)), rtol=1e-11, atol=1e-12)

    batched = FeatureStats(12)
    for start in range(0, 101, 7):
        batched.update(x[start : start + 7])
    a, b = FeatureStats(12), FeatureStats(12)
    a.update(x[:40])
    b.update(torch.from_numpy(x[40:]))
    a.merge(b)
    for stats in (batched, a):
        assert stats.count == 101
        np.testing.assert_allclose(stats.mean(), one.mean(), rtol=1e-13)
        np.testing.assert_allclose(stats.cov(), one.cov(), rtol=1e-11, atol=1e-12)
    assert one.cov().dtype == np.float64 and np.array_equal(one.cov(), one.cov().T)


def test_feature_stats_state_dict_round_trip_resumes_exactly():
    x = np.random.default_rng(7).standard_normal((50, 6))
    stats = FeatureStats(6)
    stats.update(x[:30])
    saved = stats.state_dict()
    assert set(saved) == {"dim", "count", "sum", "outer"} and saved["count"] == 30
    resumed = FeatureStats.from_state_dict(saved)
    stats.update(x[30:])
    resumed.update(x[30:])
    assert resumed.count == 50
    np.testing.assert_array_equal(resumed.mean(), stats.mean())
    np.testing.assert_array_equal(resumed.cov(), stats.cov())
    with pytest.raises(ValueError, match=r"lacks \['outer'\]"):
        FeatureStats.from_state_dict({k: v for k, v in saved.items() if k != "outer"})
    with pytest.raises(ValueError, match=r"has sum of shape \(5,\)"):
        FeatureStats.from_state_dict({**saved, "sum": np.zeros(5)})


def test_feature_stats_refuse_wrong_shape_non_finite_rows_and_too_few_samples():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 4\) for FeatureStats\(dim=4\), got \(3, 5\)"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"must have shape \(N, D\).*got \(4,\)"):
        stats.update(np.zeros(4))
    bad = np.zeros((5, 4))
    bad[1, 2], bad[3, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"features has 2 of 5 rows with non-finite values"):
        stats.update(bad)
    assert stats.count == 0  # a refused batch adds nothing
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"FeatureStats.cov got fewer than 2 samples \(1\)"):
        stats.cov()
    with pytest.raises(ValueError, match=r"dim must be an integer >= 1, got 0"):
        FeatureStats(0)
    with pytest.raises(ValueError, match=r"cannot merge FeatureStats of dim 3 into one of dim 4"):
        stats.merge(FeatureStats(3))


def test_feature_stats_all_reduce_is_a_no_op_without_torch_distributed():
    stats = FeatureStats(3)
    stats.update(np.arange(6.0).reshape(2, 3))
    stats.all_reduce()
    assert stats.count == 2 and np.array_equal(stats.mean(), [1.5, 2.5, 3.5])


def _all_reduce_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        x = np.random.default_rng(8).standard_normal((37, 5)) + 1.0
        stats = FeatureStats(5)
        part = x[:20] if rank == 0 else x[20:]  # unequal shares
        for start in range(0, len(part), 6):
            stats.update(part[start : start + 6])
        stats.all_reduce()
        np.savez(f"{out_dir}/rank{rank}.npz", count=stats.count, mean=stats.mean(), cov=stats.cov())
    finally:
        dist.destroy_process_group()


def test_feature_stats_all_reduce_over_two_gloo_processes_equals_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    x = np.random.default_rng(8).standard_normal((37, 5)) + 1.0
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert int(got["count"]) == 37
        np.testing.assert_allclose(got["mean"], x.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["cov"], _cov(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# KID


def _unbiased_mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), range(m))) / (m * m)
    return xx + yy - 2 * xy


def test_kid_with_one_full_subset_is_the_unbiased_mmd2_over_all_pairs():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    mean, std = kid(x, y, num_subsets=1, subset_size=12)
    assert mean == pytest.approx(_unbiased_mmd2_by_loops(x, y), rel=1e-12)
    assert std == 0.0
    # subset_size above the set sizes is cut to min(subset_size, len(real), len(fake)).
    assert kid(x, y, num_subsets=1, subset_size=1000)[0] == pytest.approx(mean, rel=1e-12)


def test_kid_matches_torchmetrics_given_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(10)
    real = torch.from_numpy(rng.standard_normal((40, 8)))
    fake = torch.from_numpy(rng.standard_normal((40, 8)) * 1.3 + 0.2)
    # One subset of all 40: torchmetrics' random permutation then cannot change the value.
    metric = KernelInceptionDistance(feature=FeatureVectors(8), subsets=1, subset_size=40)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    reference_mean, _ = metric.compute()
    ours, _ = kid(real, fake, num_subsets=1, subset_size=40)
    assert ours == pytest.approx(float(reference_mean), rel=1e-10)
    assert ours > 0.05


def test_kid_subsets_follow_the_seed_and_separate_shifted_distributions():
    rng = np.random.default_rng(11)
    real, same = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
    shifted = rng.standard_normal((600, 8)) + 1.0
    first = kid(real, same, num_subsets=20, subset_size=200, seed=3)
    assert kid(real, same, num_subsets=20, subset_size=200, seed=3) == first
    assert kid(real, same, num_subsets=20, subset_size=200, seed=4) != first
    assert first[1] > 0  # the subsets differ
    # Same distribution: the unbiased estimate centres on 0; a shift of 1 in every one of 8
    # dimensions gives an MMD^2 far outside that noise.
    assert abs(first[0]) < 0.05
    far = kid(real, shifted, num_subsets=20, subset_size=200, seed=3)
    assert far[0] > 1.0 and far[0] > 20 * (abs(first[0]) + first[1])


def test_kid_refuses_too_few_samples_and_mismatched_widths():
    with pytest.raises(ValueError, match=r"kid needs at least 2 samples in each set, got 1 real and 5 fake"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"real and fake must have the same feature dimension, got 3 and 4"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"num_subsets must be an integer >= 1, got 0"):
        kid(np.zeros((5, 3)), np.zeros((5, 3)), num_subsets=0)


# ---------------------------------------------------------------------------------------------
# Precision and recall


def _precision_recall_by_cdist(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    d_rr, d_ff, d_fr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    return float((d_fr <= r_real[None, :]).any(axis=1).mean()), float((d_fr <= r_fake[:, None]).any(axis=0).mean())


def test_precision_recall_of_identical_and_of_far_apart_sets():
    x = np.random.default_rng(12).standard_normal((200, 6))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_on_points_of_a_line_computed_by_hand():
    # k = 1. Real 0, 1, 3, 6, 10: radii 1, 1, 2, 3, 4. Fake -2, 2, 4.5, 14, 15: radii 4, 2.5, 2.5, 1, 1.
    # Precision: -2 no (closest ball: real 0, 2 > 1); 2 yes (real 1, 1 <= 1); 4.5 yes (real 3,
    # 1.5 <= 2); 14 yes only with <= (real 10, 4 <= 4); 15 no (real 10, 5 > 4) -> 3/5.
    # Recall: real 0 in fake -2's ball (2 <= 4), 1 and 3 in fake 2's (1, 1 <= 2.5), 6 in fake 4.5's
    # (1.5 <= 2.5), 10 in none (4.5: 5.5 > 2.5; 14: 4 > 1) -> 4/5.
    real = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fake = np.array([[-2.0], [2.0], [4.5], [14.0], [15.0]])
    assert precision_recall(real, fake, k=1) == (0.6, 0.8)
    assert precision_recall(fake, real, k=1) == (0.8, 0.6)  # the roles swap


def test_precision_recall_of_fakes_in_the_centre_quarter_of_the_reals_square():
    """Reals uniform on the unit square, fakes uniform on its centre [0.25, 0.75]^2 (a quarter of
    its area), k = 10 (with k = 3 the reals' balls leave ~2% of the square uncovered, so precision
    would be ~0.98 even for fakes drawn like the reals). Every fake lies in the reals' manifold:
    precision 1. The fakes' balls (radius ~sqrt(10 / (pi * 4000)) ~ 0.028 inside, ~sqrt(2) times
    that at the edge, where the neighbours lie on one side only) cover the reals of the centre
    quarter, 25% of them, and part of a margin of that width around it, at most
    (0.5 + 2 * 0.04)^2 - 0.25 ~ 9% more: recall between 0.25 and 0.34."""
    rng = np.random.default_rng(13)
    real = rng.uniform(0.0, 1.0, (1000, 2))
    fake = rng.uniform(0.25, 0.75, (1000, 2))
    precision, recall = precision_recall(real, fake, k=10)
    assert precision == 1.0
    assert 0.23 < recall < 0.36  # the bounds above, with the sampling noise of 1000 reals (~0.015)
    assert (precision, recall) == _precision_recall_by_cdist(real, fake, 10)
    # The reals seen as fakes of the centre: most fall outside it (precision ~0.3), all of the
    # centre's points are covered (recall 1).
    swapped = precision_recall(fake, real, k=10)
    assert 0.23 < swapped[0] < 0.36 and swapped[1] == 1.0


def test_precision_recall_does_not_depend_on_batch_size_and_matches_cdist():
    rng = np.random.default_rng(14)
    real = rng.standard_normal((300, 8))
    fake = rng.standard_normal((250, 8)) * 1.2 + 0.4
    whole = precision_recall(real, fake, k=5, batch_size=10_000)
    assert precision_recall(real, fake, k=5, batch_size=7) == whole
    assert precision_recall(torch.from_numpy(real).float(), fake, k=5, batch_size=64) == \
        _precision_recall_by_cdist(real.astype(np.float32).astype(np.float64), fake, 5)
    assert whole == _precision_recall_by_cdist(real, fake, 5)
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


def test_precision_recall_refuses_sets_without_a_kth_neighbour():
    with pytest.raises(ValueError, match=r"k=3 needs more than 3 points in each set.*got 3 real and 10 fake"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"fake has 1 of 10 rows with non-finite values"):
        precision_recall(np.zeros((10, 2)), np.r_[np.zeros((9, 2)), [[np.nan, 0.0]]])


# ---------------------------------------------------------------------------------------------
# CLIP score and CMMD


def test_clip_score_is_w_times_clipped_cosine_per_sample():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    text = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [2.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    scores = clip_score(image, text, w=100.0)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    # orthogonal, anti-parallel (0, not -100), parallel, 60 degrees
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.0, 100.0, 50.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert clip_score(image, text, w=2.5)[2] == pytest.approx(2.5)
    assert clip_score(image.float(), text.float())[3] == pytest.approx(50.0, rel=1e-6)  # float32 input


def test_clip_score_does_not_depend_on_embedding_scale():
    rng = np.random.default_rng(15)
    image, text = rng.standard_normal((50, 16)), rng.standard_normal((50, 16))
    scales = rng.uniform(0.1, 10.0, (50, 1))
    torch.testing.assert_close(clip_score(image * scales, text / scales), clip_score(image, text), rtol=1e-12, atol=1e-12)
    cos = np.sum(image * text, axis=1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    np.testing.assert_allclose(clip_score(image, text).numpy(), 100 * np.maximum(cos, 0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"1 of 2 image/text embedding pairs contain a zero vector"):
        clip_score(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"must pair up row by row.*got \(2, 2\) and \(3, 2\)"):
        clip_score(np.ones((2, 2)), np.ones((3, 2)))


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_of_a_set_with_itself_is_exactly_zero_and_single_points_have_a_closed_form():
    x = _normalised(np.random.default_rng(16).standard_normal((64, 32)))
    assert cmmd(x, x.copy()) == 0.0
    a, b = np.array([[0.6, 0.8, 0.0]]), np.array([[0.0, 0.0, 1.0]])
    for sigma, scale in [(10.0, 1000.0), (0.5, 1.0)]:
        expected = scale * (2 - 2 * math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2)))
        assert cmmd(a, b, sigma=sigma, scale=scale) == pytest.approx(expected, rel=1e-12)


def test_cmmd_matches_a_loop_over_all_pairs_and_grows_with_a_shift():
    rng = np.random.default_rng(17)
    x, y = rng.standard_normal((9, 4)), rng.standard_normal((7, 4))
    k = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * 3.0**2))  # noqa: E731
    mean = lambda p, q: sum(k(u, v) for u in p for v in q) / (len(p) * len(q))  # noqa: E731, diagonal included
    assert cmmd(x, y, sigma=3.0, scale=1.0) == pytest.approx(mean(x, x) + mean(y, y) - 2 * mean(x, y), rel=1e-12)

    base = _normalised(rng.standard_normal((100, 16)))
    other = _normalised(rng.standard_normal((100, 16)))
    values = [cmmd(base, _normalised(other + shift * np.eye(16)[0])) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    with pytest.raises(ValueError, match=r"sigma must be > 0, got 0.0"):
        cmmd(x, y, sigma=0.0)
