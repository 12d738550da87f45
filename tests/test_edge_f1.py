"""Edge F1 (ControlNet's control fidelity) against scikit-learn's scores of cv2.Canny maps, and a
hand-made dilation (cv2.dilate) for the pixel tolerance."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from diffusion.evaluation.edges import edge_f1, edge_scores
from tests.make_captioned_folder import COLOURS, SHAPES, draw


def _images(n: int, seed: int, size: int = 48) -> np.ndarray:
    """Shapes on grey with a little noise: Canny finds their outlines and a few noise edges."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        img = np.asarray(draw(list(COLOURS)[i % 4], SHAPES[i % 3], (size, size)), dtype=np.int16)
        images.append(np.clip(img + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8))
    return np.stack(images)


def _canny(images: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    return np.stack([cv2.Canny(image, low, high) for image in images])  # (N, H, W) 0 / 255


@pytest.mark.parametrize("low, high", [(100, 200), (40, 120)])
def test_edge_f1_equals_sklearn_on_cv2_canny_maps(low, high):
    samples, sources = _images(6, seed=0), _images(6, seed=1)
    sources[3] = sources[2]  # another image's condition: a poor score
    wanted = _canny(sources, low, high)
    scores = {"precision": [], "recall": [], "f1": []}
    for sample_edges, condition_edges in zip(_canny(samples, low, high) > 0, wanted > 0):
        truth, found = condition_edges.ravel(), sample_edges.ravel()
        scores["precision"].append(precision_score(truth, found, zero_division=1.0))
        scores["recall"].append(recall_score(truth, found, zero_division=1.0))
        scores["f1"].append(f1_score(truth, found, zero_division=1.0))
    # The conditions as a Canny ControlNet takes them: edge maps, (N, H, W) or RGB.
    for conditions in (wanted, np.repeat(wanted[..., None], 3, axis=-1), torch.from_numpy(wanted > 0)):
        ours = edge_scores(samples, conditions, low, high)
        for key, reference in scores.items():
            np.testing.assert_allclose(ours[key].numpy(), reference, rtol=1e-12)
        assert edge_f1(samples, conditions, low, high) == pytest.approx(np.mean(scores["f1"]), rel=1e-12)
    # A condition that is an image: its own Canny edges.
    assert edge_f1(samples, sources, low, high, condition="image") == pytest.approx(np.mean(scores["f1"]), rel=1e-12)
    assert 0.2 < np.mean(scores["f1"]) < 0.99


@pytest.mark.parametrize("tolerance", [1, 2])
def test_the_tolerance_counts_edges_within_a_square_of_pixels(tolerance):
    samples, conditions = _images(4, seed=2), _canny(_images(4, seed=3))
    kernel = np.ones((2 * tolerance + 1,) * 2, np.uint8)
    expected = []
    for found, wanted in zip(_canny(samples) > 0, conditions > 0):
        near_wanted = cv2.dilate(wanted.astype(np.uint8), kernel) > 0
        near_found = cv2.dilate(found.astype(np.uint8), kernel) > 0
        precision, recall = (found & near_wanted).sum() / found.sum(), (wanted & near_found).sum() / wanted.sum()
        expected.append(2 * precision * recall / (precision + recall))
    np.testing.assert_allclose(edge_scores(samples, conditions, tolerance=tolerance)["f1"].numpy(), expected, rtol=1e-12)
    assert edge_f1(samples, conditions, tolerance=tolerance) > edge_f1(samples, conditions)


def test_a_shifted_outline_scores_one_within_a_pixel_and_empty_maps_are_scored_as_sklearn():
    square = np.zeros((1, 32, 32, 3), np.uint8)
    square[:, 8:24, 8:24] = 255
    shifted = np.roll(square, 1, axis=2)
    assert edge_f1(square, square, condition="image") == 1.0  # Canny of it: exactly the sample's edges
    assert edge_f1(square, square) < 0.5  # taken as an edge map, the filled square is no outline
    assert edge_f1(shifted, _canny(square)) < 0.7
    assert edge_f1(shifted, _canny(square), tolerance=1) == 1.0
    blank = np.full((1, 32, 32, 3), 128, np.uint8)
    assert edge_f1(blank, np.zeros((1, 32, 32), bool)) == 1.0 == f1_score([0] * 4, [0] * 4, zero_division=1.0)
    assert edge_f1(blank, _canny(square)) == 0.0 == edge_f1(square, np.zeros((1, 32, 32), bool))


def test_bad_inputs_are_named():
    samples = _images(2, seed=0)
    with pytest.raises(ValueError, match=r"samples must be \(N, H, W, 3\) uint8"):
        edge_f1(samples.transpose(0, 3, 1, 2), _canny(samples))
    with pytest.raises(ValueError, match="uint8 images 0..255"):
        edge_f1(samples / 255.0, _canny(samples))
    with pytest.raises(ValueError, match="resize the conditions"):
        edge_f1(samples, _canny(samples)[:, :32])
    with pytest.raises(ValueError, match="tolerance"):
        edge_f1(samples, _canny(samples), tolerance=-1)
    with pytest.raises(ValueError, match="condition='photo' is not supported"):
        edge_f1(samples, _canny(samples), condition="photo")


def test_evaluate_py_scores_samples_against_their_controls(tmp_path):
    """evaluate.py metrics=[edge_f1] control=FOLDER: sample i against control file i % n, the mean
    F1 of cv2.Canny edges (scikit-learn's f1_score per image), written to metrics.json."""
    import json

    import numpy as np
    from PIL import Image
    from sklearn.metrics import f1_score

    from diffusion.evaluation.job import evaluate
    from tests.conftest import compose_config

    rng = np.random.default_rng(0)
    samples = np.zeros((4, 32, 32, 3), np.uint8)
    for i, s in enumerate(samples):
        s[4 + 2 * i: 20, 6: 24 + i] = rng.integers(120, 255, 3)  # a rectangle, its edges where Canny finds them
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    (tmp_path / "controls").mkdir()
    controls = []
    for i in range(2):  # two edge maps, cycled: sample i against control i % 2
        edges = cv2.Canny(samples[i], 100, 200)
        edges[::7] = 0  # not quite the sample's
        controls.append(edges)
        Image.fromarray(np.repeat(edges[..., None], 3, axis=2)).save(tmp_path / "controls" / f"{i}.png")
    cfg = compose_config("evaluate", [f"samples={tmp_path / 'samples.npz'}", "metrics=[edge_f1]", "ref=none",
                                      f"control={tmp_path / 'controls'}", f"out={tmp_path / 'eval'}", "device=cpu"],
                         tmp_path)
    evaluate(cfg)
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["edge_f1"]
    expected = np.mean([f1_score(controls[i % 2].ravel() > 0, cv2.Canny(samples[i], 100, 200).ravel() > 0,
                                 zero_division=1) for i in range(4)])
    assert got == pytest.approx(expected, abs=1e-12) and 0 < got < 1
    cfg = compose_config("evaluate", [f"samples={tmp_path / 'samples.npz'}", "metrics=[edge_f1]", "ref=none",
                                      f"out={tmp_path / 'no'}", "device=cpu"], tmp_path)
    with pytest.raises(ValueError, match="pass control=PATH"):
        evaluate(cfg)
