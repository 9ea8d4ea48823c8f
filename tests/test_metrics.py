"""Metrics on constructed cases with known answers (no models needed except the last tests)."""

import math

import numpy as np
import pytest
import torch

from fxcache.evaluation import metrics


def test_sqnr_psnr_inf_for_equal():
    x = torch.randn(2, 1, 16, 16)
    assert metrics.sqnr(x, x.clone()) == math.inf
    assert metrics.psnr(x, x.clone()) == math.inf
    z = torch.zeros(3)
    assert metrics.sqnr(z, z) == math.inf


def test_sqnr_exact_value():
    ref = torch.full((4, 25), 2.0, dtype=torch.float64)  # ||ref||^2 = 100 * 4 = 400
    test = ref.clone()
    test[0, 0] += 0.2  # ||ref - test||^2 = 0.04 → ratio 1e4 → 40 dB
    assert metrics.sqnr(ref, test) == pytest.approx(40.0, abs=1e-9)
    # scale invariance: scaling both by the same factor does not change SQNR
    assert metrics.sqnr(3 * ref, 3 * test) == pytest.approx(40.0, abs=1e-9)
    # noise-only reference gives -inf
    assert metrics.sqnr(torch.zeros(3), torch.ones(3)) == -math.inf


def test_psnr_exact_value():
    ref = torch.zeros(10, 10, dtype=torch.float64)
    test = torch.full((10, 10), 0.02, dtype=torch.float64)  # mse = 4e-4, data_range 2 → 4 / 4e-4 = 1e4 → 40 dB
    assert metrics.psnr(ref, test) == pytest.approx(40.0, abs=1e-9)
    assert metrics.psnr(ref, test, data_range=1.0) == pytest.approx(10 * math.log10(1 / 4e-4), abs=1e-9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(torch.zeros(3), torch.zeros(4))


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    assert metrics.frechet_distance(f, f.copy()) == pytest.approx(0.0, abs=1e-6)
    # also with fewer samples than dimensions (singular covariance)
    g = rng.normal(size=(20, 64))
    assert metrics.frechet_distance(g, g) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(torch.from_numpy(g), torch.from_numpy(g)) == pytest.approx(0.0, abs=1e-6)


def _closed_form(mu1, s1, mu2, s2):
    from scipy.linalg import sqrtm

    covmean = sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_closed_form_diagonal():
    # For diagonal covariances d² = |μ1-μ2|² + Σ (σ1 - σ2)², with σ the standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2  # = 10
    got = metrics.frechet_distance((mu1, np.diag(v1)), (mu2, np.diag(v2)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_closed_form_general_and_sampled():
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = _closed_form(mu1, s1, mu2, s2)
    assert metrics.frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(exact, rel=1e-8)
    # From samples of the two Gaussians the estimate converges to the closed form.
    n = 200_000
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    assert metrics.frechet_distance(x1, x2) == pytest.approx(exact, rel=0.03)


def test_frechet_grows_with_shift():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2000, 10))
    g = rng.normal(size=(2000, 10))
    base = metrics.frechet_distance(f, g)
    shifts = [0.5, 1.0, 2.0, 4.0]
    ds = [metrics.frechet_distance(f, g + s) for s in shifts]
    assert base < ds[0] < ds[1] < ds[2] < ds[3]
    # a shift of every coordinate by s adds about 10 s² (exactly, up to the sample means)
    assert ds[-1] == pytest.approx(base + 10 * 16, rel=0.05)


def test_frechet_dimension_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))


def test_fid_digits_real_vs_real_small_and_noise_large():
    from fxcache.evaluation.data import load_digits

    x, y = load_digits("val")
    real = metrics.fid_digits(x)
    noise = metrics.fid_digits(torch.rand(359, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real < noise / 10
    assert metrics.classifier_features(x[:5]).shape == (5, 64)
    assert metrics.class_accuracy(x, y) > 0.9
