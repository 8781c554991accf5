"""The toy ArcFace and its leakage read-outs (facecrafter_jax/toy/identity.py): the projection keeps cosines,
R^2 computed two ways agrees, the cross-validated R^2 matches the closed form of a known linear model, and the
read-outs recover what an embedding carries."""

import numpy as np
import pytest

from facecrafter_jax.toy.identity import (arcface_projection, cross_validated_r2, leakage, linear_r2,
                                          linear_readout_accuracy, r2_from_correlations, toy_arcface)


class _FakeAnalysers:
    def __init__(self, emb):
        self.emb = emb

    def embed(self, images, batch_size=256):
        return self.emb[np.asarray(images)[:, 0, 0, 0]]


def test_projection_is_orthonormal_and_toy_arcface_keeps_cosines():
    q = arcface_projection(64, seed=3)
    assert q.shape == (512, 64)
    np.testing.assert_allclose(q.T @ q, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, arcface_projection(64, seed=3))
    assert np.abs(q - arcface_projection(64, seed=4)).max() > 0.1
    rng = np.random.default_rng(0)
    e = rng.standard_normal((10, 64))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    images = np.zeros((10, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(10)
    arc = toy_arcface(_FakeAnalysers(e), images, seed=3)
    assert arc.shape == (10, 512) and arc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(arc, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(arc @ arc.T, e @ e.T, atol=1e-6)
    with pytest.raises(ValueError):
        arcface_projection(600)


def test_r2_two_ways_and_against_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 6)) @ rng.standard_normal((6, 6))   # correlated columns
    b = rng.standard_normal(6)
    signal = x @ b
    sigma = signal.std() * 0.75        # true R^2 = var(s) / (var(s) + sigma^2) = 1 / (1 + 0.5625) = 0.64
    y = signal + 3.0 + rng.normal(0, sigma, len(x))
    r_lsq, r_corr = linear_r2(x, y), r2_from_correlations(x, y)
    assert abs(r_lsq - r_corr) < 1e-10
    assert abs(r_lsq - 0.64) < 0.02
    r_cv = cross_validated_r2(x, y, seed=0)
    assert r_cv < r_lsq and abs(r_cv - 0.64) < 0.025
    assert abs(cross_validated_r2(rng.standard_normal((3000, 6)), y)) < 0.01   # unrelated features


def test_readouts_recover_what_the_embedding_carries():
    rng = np.random.default_rng(2)
    n, ids = 2400, 12
    identity = rng.integers(0, ids, n)
    yaw = rng.normal(0, 18, n)
    emotion = rng.integers(0, 8, n)
    centres = rng.standard_normal((ids, 16))
    emo_dirs = rng.standard_normal((8, 16))
    emb = np.concatenate([0.02 * yaw[:, None], centres[identity] + 0.8 * emo_dirs[emotion]], 1)
    out = leakage(emb, head_pose=np.stack([yaw, np.zeros(n), rng.normal(0, 5, n)], 1), emotion=emotion,
                  identity=identity)
    assert out["r2_yaw"] > 0.95 and out["r2_roll"] < 0.02      # roll is noise the embedding does not carry
    assert np.isnan(out["r2_pitch"])                             # constant target: no variance to explain
    assert out["emotion_acc"] > 0.95 and out["identity_acc"] > 0.95
    assert abs(linear_readout_accuracy(rng.standard_normal((n, 16)), emotion, 8) - 0.125) < 0.04
