"""The embedded models, the digits data and the DDIM sampling helper (no training here)."""

import socket

import pytest
import torch

from fxcache import models
from fxcache.evaluation.data import load_digits, split_indices


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_data_shapes_range_and_determinism():
    x, y = load_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    x2, y2 = load_digits()
    assert torch.equal(x, x2) and torch.equal(y, y2)
    tr, va = split_indices("train"), split_indices("val")
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1797
    assert 0.18 < len(va) / 1797 < 0.22
    with pytest.raises(ValueError):
        load_digits("test")


def test_available_and_cards():
    assert models.available() == ["unet", "dit", "classifier"]
    for name in models.available():
        c = models.card(name)
        for key in ("config", "data", "seed", "final_loss", "training_wall_time_s", "training"):
            assert key in c, (name, key)
    assert models.card("classifier")["val_accuracy"] > 0.95
    assert models.card("dit")["config"]["num_embeds_ada_norm"] == 10
    c = models.card("unet")
    c["config"] = None  # a copy: mutating it does not change the next call
    assert models.card("unet")["config"] is not None


def test_unknown_name_lists_available():
    with pytest.raises(KeyError) as e:
        models.load("vae")
    msg = str(e.value)
    assert "vae" in msg and "unet" in msg and "dit" in msg and "classifier" in msg
    with pytest.raises(KeyError):
        models.card("nope")


def test_unet_loads_offline_and_forward(no_network):
    from diffusers import UNet2DModel

    m = models.load("unet")
    assert isinstance(m, UNet2DModel) and not m.training
    assert all(not p.requires_grad for p in m.parameters())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = m(x, torch.tensor([999, 500, 0])).sample
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    # DeepCache needs skip connections: a U-Net with down blocks feeding up blocks
    assert len(m.down_blocks) == len(m.up_blocks) == 3


def test_dit_loads_offline_and_forward(no_network):
    from diffusers import DiTTransformer2DModel

    m = models.load("dit")
    assert isinstance(m, DiTTransformer2DModel) and not m.training
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        out = m(x, torch.tensor([999, 500, 0]), class_labels=torch.tensor([0, 5, 10])).sample  # 10 = null class
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_load_dtype():
    m = models.load("unet", dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.float64


def test_classifier_accuracy_on_held_out_digits(no_network):
    clf = models.load("classifier")
    x, y = load_digits("val")  # never seen in the classifier's training
    with torch.no_grad():
        logits = clf(x)
        feats = clf.features(x)
    assert logits.shape == (len(y), 10) and feats.shape == (len(y), 64)
    acc = (logits.argmax(1) == y).double().mean().item()
    assert acc > 0.90


class CountingWrapper(torch.nn.Module):
    """A drop-in wrapper, as fxcache.compile returns: forwards calls and counts them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = 0

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_generate_unet_deterministic_and_wrapper_equal():
    m = models.load("unet")
    a = models.generate(m, num_steps=4, num_samples=2, seed=7)
    b = models.generate(m, num_steps=4, num_samples=2, seed=7)
    c = models.generate(m, num_steps=4, num_samples=2, seed=8)
    assert a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    w = CountingWrapper(m)
    d = models.generate(w, num_steps=4, num_samples=2, seed=7)
    assert w.calls == 4
    assert torch.equal(a, d)


def test_generate_dit_labels_and_guidance():
    m = models.load("dit")
    labels = torch.tensor([3, 7])
    a = models.generate(m, num_steps=3, num_samples=2, seed=0, class_labels=labels)
    b = models.generate(m, num_steps=3, num_samples=2, seed=0, class_labels=[3, 7])
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    w = CountingWrapper(m)
    g = models.generate(w, num_steps=3, num_samples=2, seed=0, class_labels=labels, guidance_scale=2.0)
    assert w.calls == 3 and g.shape == a.shape and not torch.equal(a, g)
    with pytest.raises(ValueError, match="class_labels"):
        models.generate(m, num_steps=2, num_samples=2, seed=0)


def test_generate_initial_noise_depends_only_on_seed_and_shape():
    """The first call sees the seed's CPU noise whatever the model's dtype."""
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @property
        def config(self):
            return self.model.config

        def forward(self, x, t):
            seen.append(x.detach().clone())
            return self.model(x, t)

    expected = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    models.generate(Probe(models.load("unet")), num_steps=1, num_samples=2, seed=3)
    models.generate(Probe(models.load("unet", dtype=torch.float64)), num_steps=1, num_samples=2, seed=3)
    assert torch.equal(seen[0], expected)
    assert torch.equal(seen[1], expected.double())
