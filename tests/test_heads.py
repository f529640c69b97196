"""Pooling heads: shapes, padding invariance, save/load round trips."""
import numpy as np
import pytest
import torch

from ser_cache.features import LayerData
from ser_cache.heads import HEADS, LinearHead, build_head, frame_statistics, load_head, save_head

TORCH_HEADS = ["mean", "attentive", "qkv"]
DIM, N_CLASSES = 12, 5


def make_batch(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g)
    lengths = torch.tensor([T, 1, T - 3, 5])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return x.masked_fill(~mask[..., None], 0.0), mask


def test_registry_names():
    assert sorted(HEADS) == ["attentive", "linear", "mean", "qkv"]
    with pytest.raises(ValueError, match="available heads"):
        build_head("transformer", DIM, N_CLASSES)


@pytest.mark.parametrize("name", TORCH_HEADS)
def test_shapes(name):
    head = build_head(name, DIM, N_CLASSES, d_model=32).eval()
    x, mask = make_batch()
    assert head(x, mask).shape == (4, N_CLASSES)
    assert head.pool(head.front(x), mask).shape == (4, head.pooled_dim)


@pytest.mark.parametrize("name", TORCH_HEADS)
@pytest.mark.parametrize("junk", ["noise", "huge", "nan"])
def test_padding_does_not_change_output(name, junk):
    """Appending padded frames (mask False) holding anything leaves the logits unchanged."""
    torch.manual_seed(0)
    head = build_head(name, DIM, N_CLASSES, d_model=32).eval()
    x, mask = make_batch()
    extra = {"noise": torch.randn(4, 7, DIM), "huge": torch.full((4, 7, DIM), 1e6),
             "nan": torch.full((4, 7, DIM), float("nan"))}[junk]
    x2 = torch.cat([x, extra], dim=1)
    mask2 = torch.cat([mask, torch.zeros(4, 7, dtype=torch.bool)], dim=1)
    # also write junk into the existing padded positions
    x2[:, : x.shape[1]][~mask] = extra[:, :1].expand(-1, x.shape[1], -1)[~mask]
    with torch.no_grad():
        a, b = head(x, mask), head(x2, mask2)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TORCH_HEADS)
def test_batch_equals_single(name):
    """An utterance gets the same logits alone as inside a padded batch."""
    head = build_head(name, DIM, N_CLASSES, d_model=32).eval()
    x, mask = make_batch()
    with torch.no_grad():
        batched = head(x, mask)
        for i in range(4):
            n = int(mask[i].sum())
            alone = head(x[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(alone[0], batched[i], rtol=1e-5, atol=1e-5)


def test_sizes_are_options():
    head = build_head("attentive", DIM, N_CLASSES, d_model=16, n_heads=3, head_dim=8)
    assert head.pooled_dim == 24 and head.back[0].in_features == 24
    head = build_head("qkv", DIM, N_CLASSES, n_heads=2, head_dim=5)
    assert head.pooled_dim == 10 and head.front[0].out_features == 256


def test_dropout_only_in_training_mode():
    head = build_head("qkv", DIM, N_CLASSES, dropout=0.5)
    x, mask = make_batch()
    with torch.no_grad():
        head.eval()
        assert torch.equal(head(x, mask), head(x, mask))
        head.train()
        assert not torch.equal(head(x, mask), head(x, mask))


@pytest.mark.parametrize("name", TORCH_HEADS)
def test_torch_head_round_trip(name, tmp_path):
    kwargs = {"dim": DIM, "n_classes": N_CLASSES, "d_model": 16}
    head = build_head(name, **kwargs).eval()
    labels = [f"c{i}" for i in range(N_CLASSES)]
    save_head(tmp_path / "h.pt", head, name, kwargs, labels, layer=3, fold=1)
    again, info = load_head(tmp_path / "h.pt")
    assert info["head"] == name and info["labels"] == labels and info["layer"] == 3 and info["fold"] == 1
    x, mask = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(head(x, mask), again(x, mask))


def tiny_layer(n=30, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 8, size=n)
    labels = np.array([f"c{i % 3}" for i in range(n)])
    frames = rng.normal(size=(lengths.sum(), DIM)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(n):  # class evidence in the mean of frame dimension 0
        frames[offsets[i] : offsets[i + 1], 0] += 3 * (i % 3)
    ids = np.array([f"u{i}" for i in range(n)])
    return LayerData(frames, offsets, ids, labels, np.array(["s"] * n), np.array([""] * n), layer=2)


def test_frame_statistics():
    data = tiny_layer()
    feats = frame_statistics(data)
    assert feats.shape == (len(data), 2 * DIM)
    np.testing.assert_allclose(feats[4, :DIM], data.utterance(4).mean(0), rtol=1e-5)
    np.testing.assert_allclose(feats[4, DIM:], data.utterance(4).std(0), rtol=1e-5)


def test_linear_head_fits_and_round_trips(tmp_path):
    data = tiny_layer()
    feats, y = frame_statistics(data), np.arange(len(data)) % 3
    head = LinearHead(DIM, 4, C=1.0).fit(feats, y)  # class 3 never seen: probability 0
    probs = head.predict_proba(feats)
    assert probs.shape == (len(data), 4) and np.allclose(probs.sum(1), 1) and (probs[:, 3] == 0).all()
    assert (probs.argmax(1) == y).mean() > 0.9
    save_head(tmp_path / "h.joblib", head, "linear", {"dim": DIM, "n_classes": 4}, list("abcd"), layer=2)
    again, info = load_head(tmp_path / "h.joblib")
    assert info["head"] == "linear" and info["labels"] == list("abcd")
    np.testing.assert_array_equal(again.predict_proba(feats), probs)


def test_input_standardisation_is_applied_and_saved():
    """standardize_inputs changes what the front sees and travels in the state dict."""
    torch.manual_seed(0)
    head = build_head("mean", dim=6, n_classes=3).eval()
    x, mask = torch.randn(2, 5, 6) * 3 + 7, torch.ones(2, 5, dtype=torch.bool)
    raw = head(x, mask)
    mean, std = x.reshape(-1, 6).mean(0).numpy(), x.reshape(-1, 6).std(0).numpy()
    head.standardize_inputs(mean, std)
    standardised = head(x, mask)
    assert not torch.allclose(raw, standardised)
    twin = build_head("mean", dim=6, n_classes=3).eval()
    twin.load_state_dict(head.state_dict())
    torch.testing.assert_close(twin(x, mask), standardised)
    # Same as feeding pre-standardised frames to an identity-standardised copy.
    plain = build_head("mean", dim=6, n_classes=3).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items()} | {
        "input_mean": torch.zeros(6), "input_scale": torch.ones(6)})
    torch.testing.assert_close(plain((x - torch.tensor(mean)) / torch.tensor(std), mask), standardised, atol=1e-5, rtol=1e-5)
