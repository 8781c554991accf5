"""Flax EmoNet vs our PyTorch reference of the official architecture (random seeded weights)."""

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from flax import nnx

from emonet_reference import EmoNetReference, random_checkpoint
from facecrafter_jax.convert.emonet import emonet_key_map, export_emonet_state, load_emonet, load_emonet_state
from facecrafter_jax.convert.weights import WeightConversionError
from facecrafter_jax.models.emonet import EmoNet, predict_emotion


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("emonet") / "emonet_8.pth"
    ref = random_checkpoint(path, seed=3)
    return path, ref


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).random((2, 256, 256, 3), dtype=np.float32)


def test_key_map_covers_official_layout():
    ref_keys = {k for k in EmoNetReference().state_dict() if not k.endswith("num_batches_tracked")}
    params, stats = emonet_key_map(EmoNet(rngs=nnx.Rngs(0)))
    ours = [r.torch_key for r in params + stats]
    assert len(ours) == len(set(ours))
    assert set(ours) == ref_keys
    assert "m1.b2_plus_1.conv3.weight" in ref_keys and "emo_net_2.6.downsample" not in " ".join(ref_keys)
    assert "conv4.downsample.0.running_var" in ref_keys and "emo_fc_2.1.running_mean" in ref_keys


def test_parity_with_pytorch_reference(checkpoint, images):
    path, ref = checkpoint
    model = load_emonet(path)
    assert model.n_expression == 8
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2))
    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
    for name in ("expression", "valence", "arousal"):
        w, g = want[name].numpy(), np.asarray(got[name])
        assert g.shape == w.shape, name
        err = np.abs(g - w).max()
        print(f"{name}: max abs err {err:.2e}, scale {np.abs(w).max():.3f}")
        assert err <= 1e-4, name
    heat_w = want["heatmap"].permute(0, 2, 3, 1).numpy()
    heat_err = np.abs(np.asarray(got["heatmap"]) - heat_w).max() / (np.abs(heat_w).max() + 1e-12)
    assert heat_err <= 1e-4
    # Inputs that differ give different outputs (the test is not blind to the input).
    assert (want["expression"][0] - want["expression"][1]).abs().max().item() > 1e-3

    emo = np.asarray(predict_emotion(model, jnp.asarray(images)))
    probs = torch.softmax(want["expression"], dim=-1).numpy()
    np.testing.assert_allclose(emo[:, :8], probs, atol=1e-5)
    np.testing.assert_allclose(emo[:, 8], np.clip(want["valence"].numpy(), -1, 1), atol=1e-4)
    np.testing.assert_allclose(emo[:, 9], np.clip(want["arousal"].numpy(), -1, 1), atol=1e-4)

    # Export is the exact inverse of import.
    exported = export_emonet_state(model)
    sd = ref.state_dict()
    for k, v in exported.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_importer_errors_name_keys(checkpoint, tmp_path):
    path, ref = checkpoint
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = EmoNet(rngs=nnx.Rngs(0))

    missing = dict(sd)
    del missing["m0.b2_plus_1.bn2.running_var"]
    with pytest.raises(WeightConversionError, match=r"missing.*m0\.b2_plus_1\.bn2\.running_var"):
        load_emonet_state(model, missing)

    extra = dict(sd, **{"emo_fc_2.9.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightConversionError, match=r"unused.*emo_fc_2\.9\.weight"):
        load_emonet_state(model, extra)

    bad = dict(sd, **{"conv2.conv1.weight": np.zeros((32, 64, 3, 3), np.float32)})
    with pytest.raises(WeightConversionError, match=r"shape mismatch.*conv2\.conv1\.weight"):
        load_emonet_state(model, bad)

    five = tmp_path / "e5.pth"
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, five)
    with pytest.raises(WeightConversionError, match="n_expression=5"):
        load_emonet(five, n_expression=5)

    with pytest.raises(ValueError, match="256x256"):
        model(jnp.zeros((1, 128, 128, 3)))
