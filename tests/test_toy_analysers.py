"""Toy analysers: a short seeded training run must beat trivial baselines by a wide margin on fresh renders;
metrics against brute-force references; save / load round trip and strict loading; input errors.
"""

import json

import numpy as np
import pytest

from facecrafter_jax.convert.weights import WeightConversionError
from facecrafter_jax.toy.analysers import (AnalyserConfig, ToyAnalysers, _auc, _ccc, evaluate_analysers,
                                           gaussian_blur, landmark_nme, train_analysers)
from facecrafter_jax.toy.world import ToyWorld, WorldConfig

N_ID = 12


def _targets(batch):
    return {"identity": batch.attributes.identity, **batch.features}


@pytest.fixture(scope="module")
def trained():
    # three clearly different emotions (neutral, happy, surprise) so that 200 steps can learn them
    world = ToyWorld(WorldConfig(num_identities=N_ID, seed=5, emotion_weights=(1, 1, 0, 1, 0, 0, 0, 0)))
    train = world.generate(640, seed=1, batch_size=128)
    test = world.generate(256, seed=2, batch_size=128)
    cfg = AnalyserConfig(num_identities=N_ID, steps=200, batch_size=32, warmup_steps=20, seed=0)
    analysers, history = train_analysers(train.images, _targets(train), cfg, log_every=100)
    return world, train, test, analysers, history


def test_short_training_beats_chance_by_a_wide_margin(trained):
    world, train, test, analysers, history = trained
    assert [h["step"] for h in history] == [100, 200]
    assert history[-1]["loss"] < history[0]["loss"]
    m = evaluate_analysers(analysers, test.images, _targets(test))
    t = _targets(test)
    # trivial baselines measured on the same test set: the training mean pose / landmarks, the majority class
    pose_base = np.abs(t["head_pose"] - train.features["head_pose"].mean(0)).mean()
    lm_base = landmark_nme(np.broadcast_to(train.features["landmarks"].mean(0), t["landmarks"].shape),
                           t["landmarks"]).mean()
    emo_base = np.bincount(t["emotion"][:, :8].argmax(1), minlength=8).max() / len(test.images)
    print(json.dumps({**m, "pose_baseline": float(pose_base), "nme_baseline": float(lm_base),
                      "emotion_baseline": float(emo_base)}, indent=1))
    assert m["id_top1"] > 6.0 / N_ID  # chance 1/12
    assert m["id_verification_auc"] > 0.85 and m["id_cos_same"] > m["id_cos_diff"] + 0.3
    assert m["pose_mae_deg"] < 0.6 * pose_base
    assert m["landmark_nme"] < 0.85 * lm_base  # aligned faces: the mean shape is already a fair guess
    assert m["emotion_acc"] > max(0.6, 1.5 * emo_base)  # chance 1/3
    assert m["valence_ccc"] > 0.2 and m["arousal_ccc"] > 0.2


def test_inference_api_and_save_load_round_trip(trained, tmp_path):
    world, train, test, analysers, _ = trained
    x = test.images[:10]
    out = analysers.analyse(x, batch_size=4)  # padded last chunk
    assert out["embedding"].shape == (10, analysers.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert out["head_pose"].shape == (10, 3) and out["landmarks"].shape == (10, 478, 2)
    np.testing.assert_allclose(out["emotion_probs"].sum(1), 1.0, atol=1e-5)
    assert np.all(np.abs(out["va"]) <= 1.0) and out["cosines"].shape == (10, N_ID)
    ident, cos = analysers.identify(x)
    np.testing.assert_array_equal(ident, out["identity"])
    np.testing.assert_allclose(analysers.embed(x, batch_size=16), out["embedding"], atol=1e-5)
    analysers.save(tmp_path / "an", extra={"metrics": {"id_top1": 1.0}})
    meta = json.loads((tmp_path / "an" / "config.json").read_text())
    assert meta["config"]["num_identities"] == N_ID and meta["metrics"]["id_top1"] == 1.0
    back = ToyAnalysers.load(tmp_path / "an")
    again = back.analyse(x, batch_size=4)
    for k in out:
        np.testing.assert_allclose(again[k], out[k], atol=1e-6, err_msg=k)
    # strict: a renamed tensor is reported by name
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "an" / "model.safetensors")
    tensors["pose.kernel_renamed"] = tensors.pop("pose.kernel")
    save_file(tensors, tmp_path / "an" / "model.safetensors")
    with pytest.raises(WeightConversionError, match="pose.kernel"):
        ToyAnalysers.load(tmp_path / "an")


def test_metric_helpers_against_brute_force():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, 50), 1)  # rounding makes ties
    neg = np.round(rng.normal(0.0, 1.0, 70), 1)
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert _auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    x, y = rng.normal(size=200), rng.normal(size=200) * 0.5 + 0.2
    xy = 0.3 * x + y
    ref = 2 * np.cov(x, xy, bias=True)[0, 1] / (x.var() + xy.var() + (x.mean() - xy.mean()) ** 2)
    assert _ccc(x, xy) == pytest.approx(ref, rel=1e-9)
    assert _ccc(x, x) == pytest.approx(1.0)
    t = rng.uniform(0, 1, (3, 478, 3))
    p = t[..., :2] + rng.normal(0, 0.01, (3, 478, 2))
    iod = np.linalg.norm(t[:, 33, :2] - t[:, 263, :2], axis=1)
    ref = np.array([np.mean([np.hypot(*(p[i, j] - t[i, j, :2])) for j in range(478)]) / iod[i] for i in range(3)])
    np.testing.assert_allclose(landmark_nme(p, t), ref, rtol=1e-12)


def test_blur_augmentation_matches_scipy():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
    for sigma in (1.0, 2.0):  # radius ceil(3 sigma) = scipy's int(3 sigma + 0.5) for these
        ours = gaussian_blur(images[:1], np.array([sigma]))[0]
        ref = gaussian_filter(images[0].astype(np.float64), sigma=(sigma, sigma, 0), mode="nearest", truncate=3.0)
        np.testing.assert_allclose(ours, ref, atol=1e-3)
    mixed = gaussian_blur(images, np.array([1.0, 0.0]))  # sigma 0: the image unchanged
    np.testing.assert_allclose(mixed[1], images[1], atol=1e-4)
    with pytest.raises(ValueError, match="blur_augment"):
        AnalyserConfig(blur_augment=-1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown analyser config key"):
        AnalyserConfig.from_dict({"num_identities": 4, "width": [8]})
    with pytest.raises(ValueError, match="input_size"):
        AnalyserConfig(input_size=60)
    cfg = AnalyserConfig(num_identities=4, widths=(8, 8), input_size=16, hidden=8, embed_dim=4, batch_size=2)
    imgs = np.zeros((4, 32, 32, 3), np.uint8)
    good = {"identity": np.zeros(4, int), "head_pose": np.zeros((4, 3)), "landmarks": np.zeros((4, 478, 3)),
            "emotion": np.zeros((4, 10))}
    with pytest.raises(ValueError, match="targets lack 'emotion'"):
        train_analysers(imgs, {k: v for k, v in good.items() if k != "emotion"}, cfg)
    with pytest.raises(ValueError, match=r"targets\['head_pose'\] must have shape"):
        train_analysers(imgs, {**good, "head_pose": np.zeros((4, 2))}, cfg)
    with pytest.raises(ValueError, match="config.num_identities"):
        train_analysers(imgs, {**good, "identity": np.full(4, 7)}, cfg)
    with pytest.raises(ValueError, match="uint8"):
        train_analysers(imgs.astype(np.float32), good, cfg)
    an = ToyAnalysers(cfg)
    with pytest.raises(ValueError, match=r"multiple of 16 \(config.input_size\)"):
        an.embed(np.zeros((2, 24, 24, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="no toy analyser config"):
        ToyAnalysers.load("/nonexistent/dir")
