"""The generic key map: PyTorch layouts, strict key accounting, and the inverse export."""

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from flax import nnx

from facecrafter_jax.convert.weights import (
    WeightConversionError, build_key_map, export_torch_state, load_flax_params, load_torch_state,
    read_torch_checkpoint, save_flax_params,
)


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.norm = torch.nn.LayerNorm(6)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 5), torch.nn.Dropout(0.0)])

    def forward(self, ids, img):
        h = self.conv(img).mean(dim=(2, 3)) + self.embed(ids)
        return self.to_out[0](self.norm(h))


class FlaxToy(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.conv = nnx.Conv(3, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.norm = nnx.LayerNorm(6, epsilon=1e-5, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Dropout(0.0)])

    def __call__(self, ids, img_nhwc):
        h = self.conv(img_nhwc).mean(axis=(1, 2)) + self.embed(ids)
        return self.to_out[0](self.norm(h))


@pytest.fixture
def torch_toy():
    torch.manual_seed(0)
    m = TorchToy()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def test_key_map_names_and_transforms():
    rules = {r.torch_key: r for r in build_key_map(FlaxToy(nnx.Rngs(0)))}
    assert set(rules) == {"embed.weight", "conv.weight", "conv.bias", "norm.weight", "norm.bias", "to_out.0.weight", "to_out.0.bias"}
    assert rules["conv.weight"].transform == "conv"
    assert rules["to_out.0.weight"].transform == "linear"
    assert rules["norm.weight"].flax_path == ("norm", "scale")
    assert rules["embed.weight"].transform == "identity"


def test_parity_and_exact_round_trip(torch_toy):
    sd = {k: v.numpy() for k, v in torch_toy.state_dict().items()}
    model = FlaxToy(nnx.Rngs(1))
    rules = build_key_map(model)
    load_torch_state(model, sd, rules)
    ids = np.array([1, 7])
    img = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    ref = torch_toy(torch.tensor(ids), torch.tensor(img)).detach().numpy()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(img.transpose(0, 2, 3, 1))))
    assert np.abs(out - ref).max() < 1e-5
    back = export_torch_state(model, rules)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k


def test_errors_name_the_key(torch_toy):
    sd = {k: v.numpy() for k, v in torch_toy.state_dict().items()}
    model = FlaxToy(nnx.Rngs(1))
    rules = build_key_map(model)
    missing = dict(sd); del missing["norm.bias"]
    with pytest.raises(WeightConversionError, match=r"missing.*norm\.bias"):
        load_torch_state(model, missing, rules)
    extra = dict(sd, **{"extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightConversionError, match=r"unused.*extra\.weight"):
        load_torch_state(model, extra, rules)
    load_torch_state(model, extra, rules, ignore=["extra.weight"])  # explicitly ignored buffers are fine
    bad = dict(sd, **{"to_out.0.weight": np.zeros((5, 7), np.float32)})
    with pytest.raises(WeightConversionError, match=r"shape mismatch.*to_out\.0\.weight"):
        load_torch_state(model, bad, rules)


def test_read_checkpoint_formats(tmp_path, torch_toy):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in torch_toy.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save(sd, str(tmp_path / "weights.bin"))
    a = read_torch_checkpoint(str(tmp_path))  # folder -> model.safetensors
    b = read_torch_checkpoint(str(tmp_path / "weights.bin"))  # pickle through weights_only=True
    for k in sd:
        assert np.array_equal(a[k], sd[k].numpy()) and np.array_equal(b[k], sd[k].numpy())
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(str(tmp_path / "nope"))
    # A pickle holding arbitrary objects is refused by weights_only=True.
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, str(tmp_path / "evil.bin"))
    with pytest.raises(Exception):
        read_torch_checkpoint(str(tmp_path / "evil.bin"))


def test_flax_checkpoint_round_trip(tmp_path, torch_toy):
    a = FlaxToy(nnx.Rngs(3))
    save_flax_params(a, str(tmp_path / "ck"), {"kind": "toy"})
    b = FlaxToy(nnx.Rngs(4))
    load_flax_params(b, str(tmp_path / "ck"))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)), nnx.to_flat_state(nnx.state(b, nnx.Param))):
        assert pa == pb and np.array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))
